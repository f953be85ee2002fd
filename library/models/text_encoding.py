"""Caption -> text-encoder hidden states, shared by every training recipe.

CLIP sees 77 tokens at a time (BOS, 75 content tokens, EOS/pad). Longer captions
(``--max_token_length 150`` or ``225``) follow sd-scripts' scheme:

1. tokenize to ``max_token_length + 2`` ids: BOS, up to N content tokens, EOS, padding;
2. cut the N content positions into 75-token chunks and give every chunk its own
   BOS in front and the sequence's last id behind (see `split_into_chunks`);
3. run all chunks through the encoder as one batch;
4. glue the outputs back into ``N + 2`` positions: the first chunk's BOS, the 75
   inner positions of every chunk, the last chunk's final position.

The default window (``None`` or 75) is simply one chunk of 77 positions.

``--clip_skip k`` takes the k-th hidden state from the end and passes it through the
encoder's final layer norm, as sd-scripts does; ``None`` or ``1`` is the ordinary
output. SD2 needs no special case: its Diffusers text encoder already stops at the
penultimate OpenCLIP layer, so ``v2`` only describes which tokenizer to expect.

Nothing here decides about gradients: wrap calls in ``torch.no_grad()`` when the text
encoder is frozen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from library.models.prompt_weights import parse_prompt_weights

CHUNK_LENGTH = 77  # CLIP's context window
CHUNK_CONTENT = CHUNK_LENGTH - 2  # positions left between BOS and EOS


@dataclass(frozen=True)
class TextEncoding:
    """How captions become conditioning.

    max_token_length: None or 75 (one chunk), 150 or 225 (any multiple of 75 works).
    clip_skip: None/1 = last layer, 2 = penultimate (with final layer norm), ...
    v2: SD2 model, whose tokenizer pads with "!" instead of EOS.
    weighted: parse A1111 attention syntax like ``(word:1.2)`` in captions.
    """

    max_token_length: int | None = None
    clip_skip: int | None = None
    v2: bool = False
    weighted: bool = False

    def __post_init__(self) -> None:
        chunk_count(self.max_token_length)  # validates
        if self.clip_skip is not None and self.clip_skip < 1:
            raise ValueError(f"clip_skip must be 1 or more, got {self.clip_skip}")

    @classmethod
    def from_args(cls, args: Any) -> "TextEncoding":
        """Read the upstream option names (max_token_length, clip_skip, v2, weighted_captions)."""
        return cls(
            max_token_length=getattr(args, "max_token_length", None),
            clip_skip=getattr(args, "clip_skip", None),
            v2=bool(getattr(args, "v2", False)),
            weighted=bool(getattr(args, "weighted_captions", False)),
        )

    @property
    def num_chunks(self) -> int:
        return chunk_count(self.max_token_length)

    @property
    def num_positions(self) -> int:
        """Length of the encoded sequence the U-Net attends to (77, 152, 227)."""
        return token_window(self.max_token_length)


# --------------------------------------------------------------------------- lengths


def chunk_count(max_token_length: int | None) -> int:
    """How many 77-token chunks a caption window needs."""
    if max_token_length is None:
        return 1
    if max_token_length <= 0 or max_token_length % CHUNK_CONTENT:
        raise ValueError(f"max_token_length must be None or a multiple of {CHUNK_CONTENT} (75, 150, 225), got {max_token_length}")
    return max_token_length // CHUNK_CONTENT


def token_window(max_token_length: int | None) -> int:
    """Ids per caption before chunking: content plus one BOS and one EOS."""
    return chunk_count(max_token_length) * CHUNK_CONTENT + 2


# --------------------------------------------------------------------------- tokenizing


def split_into_chunks(flat_ids: torch.Tensor, bos_id: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """[b, 75n+2] ids (BOS, content, EOS, pads) -> [b, n, 77] chunks, each a valid CLIP input.

    Chunk k is BOS + content[75k : 75k+75] + the sequence's last id, as sd-scripts'
    get_input_ids builds it. When padding differs from EOS (SD2), two repairs follow:
    a chunk whose last content position is a real token ends in EOS, and a chunk that
    starts with padding (caption already over) becomes BOS, EOS, pad, ...
    With SD1 (pad == EOS) both repairs change nothing.
    """
    batch, length = flat_ids.shape
    num_chunks = (length - 2) // CHUNK_CONTENT
    if num_chunks * CHUNK_CONTENT + 2 != length:
        raise ValueError(f"token sequence length {length} is not 75*n + 2")

    content = flat_ids[:, 1:-1].reshape(batch, num_chunks, CHUNK_CONTENT)
    first = flat_ids[:, :1].unsqueeze(1).expand(batch, num_chunks, 1)
    last = flat_ids[:, -1:].unsqueeze(1).expand(batch, num_chunks, 1)
    chunks = torch.cat([first, content, last], dim=-1)

    cut_mid_caption = (chunks[..., -2] != eos_id) & (chunks[..., -2] != pad_id)
    chunks[..., -1] = torch.where(cut_mid_caption, eos_id, chunks[..., -1])
    empty_chunk = chunks[..., 1] == pad_id
    chunks[..., 1] = torch.where(empty_chunk, eos_id, chunks[..., 1])
    return chunks


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Captions -> LongTensor [b, n_chunks, 77], ready for `encode`."""
    flat_ids = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=token_window(max_token_length),
        return_tensors="pt",
    ).input_ids
    return split_into_chunks(flat_ids, *_special_ids(tokenizer))


def _weighted_flat_ids(tokenizer: Any, caption: str, window: int) -> tuple[list[int], list[float]]:
    """One caption -> (ids, weights) of length `window`: BOS, weighted content, EOS, pads."""
    bos_id, eos_id, pad_id = _special_ids(tokenizer)
    fragments = parse_prompt_weights(caption)
    ids: list[int] = []
    weights: list[float] = []
    if fragments:
        # truncating each fragment to the window loses nothing and keeps the tokenizer from warning
        texts = [text for text, _ in fragments]
        fragment_ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=window).input_ids
        for token_ids, (_, weight) in zip(fragment_ids, fragments):
            ids += token_ids
            weights += [weight] * len(token_ids)

    capacity = window - 2
    ids, weights = ids[:capacity], weights[:capacity]  # same truncation as the unweighted path
    padding = capacity - len(ids)
    return [bos_id, *ids, eos_id] + [pad_id] * padding, [1.0, *weights, 1.0] + [1.0] * padding


def tokenize_weighted(tokenizer: Any, captions: list[str], max_token_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted captions -> (ids [b, n_chunks, 77], weights [b, 75n+2]).

    Weight syntax is removed before tokenizing; each fragment is tokenized on its own
    (without specials), so a caption without weights gives the same ids as `tokenize`.
    The weights line up with the positions `encode` returns; BOS, EOS and padding get 1.0.
    """
    window = token_window(max_token_length)
    pairs = [_weighted_flat_ids(tokenizer, caption, window) for caption in captions]
    flat_ids = torch.tensor([ids for ids, _ in pairs], dtype=torch.long)
    weights = torch.tensor([w for _, w in pairs], dtype=torch.float32)
    return split_into_chunks(flat_ids, *_special_ids(tokenizer)), weights


# --------------------------------------------------------------------------- encoding


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    """The encoder's last LayerNorm: on the model itself in transformers 5, under .text_model in 4.x."""
    model = getattr(text_encoder, "module", text_encoder)  # DDP-style wrappers
    for owner in (model, getattr(model, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if norm is not None:
            return norm
    raise AttributeError(f"{type(model).__name__} has no final_layer_norm; clip_skip needs a CLIP text encoder")


def _encoder_device(text_encoder: torch.nn.Module) -> torch.device:
    return next(text_encoder.parameters()).device


def run_text_encoder(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """[m, 77] ids -> [m, 77, dim] hidden states, honouring clip_skip."""
    if clip_skip is None or clip_skip == 1:
        return text_encoder(input_ids, return_dict=True).last_hidden_state
    hidden_states = text_encoder(input_ids, output_hidden_states=True, return_dict=True).hidden_states
    if clip_skip > len(hidden_states):
        raise ValueError(f"clip_skip={clip_skip} but the text encoder only has {len(hidden_states) - 1} layers")
    return _final_layer_norm(text_encoder)(hidden_states[-clip_skip])


def join_chunk_states(chunk_states: torch.Tensor) -> torch.Tensor:
    """[b, n, 77, dim] per-chunk states -> [b, 75n+2, dim].

    Keeps the first chunk's BOS, the 75 inner positions of every chunk and the last
    chunk's final position; the BOS/EOS of the chunks in between are dropped.
    SD2 gets the same treatment: sd-scripts' v2 branch means to patch empty chunks
    but its check compares an id with a string and never fires, so this is what it does.
    """
    batch, num_chunks, _, dim = chunk_states.shape
    inner = chunk_states[:, :, 1:-1].reshape(batch, num_chunks * CHUNK_CONTENT, dim)
    return torch.cat([chunk_states[:, 0, :1], inner, chunk_states[:, -1, -1:]], dim=1)


def encode(text_encoder: Any, input_ids: torch.Tensor, settings: TextEncoding) -> torch.Tensor:
    """Ids from `tokenize` ([b, n, 77]) -> hidden states [b, 75n+2, dim] (77 for one chunk).

    Runs on the encoder's device and returns the encoder's dtype.
    """
    batch, num_chunks, length = input_ids.shape
    if num_chunks != settings.num_chunks:
        raise ValueError(f"input_ids have {num_chunks} chunks but max_token_length={settings.max_token_length} needs {settings.num_chunks}")
    flat = input_ids.reshape(batch * num_chunks, length).to(_encoder_device(text_encoder))
    states = run_text_encoder(text_encoder, flat, settings.clip_skip)
    return join_chunk_states(states.reshape(batch, num_chunks, length, -1))


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position's embedding by its weight ([b, L, dim] * [b, L])."""
    weights = weights.to(device=hidden_states.device, dtype=hidden_states.dtype)
    return hidden_states * weights.unsqueeze(-1)


def encode_weighted(tokenizer: Any, text_encoder: Any, captions: list[str], settings: TextEncoding) -> torch.Tensor:
    """Encode captions with A1111 attention syntax; [b, 75n+2, dim].

    Every token's output embedding is multiplied by its weight. Unlike sd-scripts'
    get_weighted_text_embeddings we do NOT rescale afterwards to restore the
    original mean: that rescaling changes every position of the caption, whereas
    here a weight changes exactly the embeddings of the weighted tokens and a
    caption without weights encodes exactly as with `encode`.
    """
    input_ids, weights = tokenize_weighted(tokenizer, captions, settings.max_token_length)
    return apply_token_weights(encode(text_encoder, input_ids, settings), weights)


def _warn_on_tokenizer_mismatch(tokenizer: Any, settings: TextEncoding) -> None:
    pads_with_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    if settings.v2 == pads_with_eos:
        expected = "SD2 (pads with '!')" if settings.v2 else "SD1 (pads with EOS)"
        warnings.warn(f"settings say v2={settings.v2} but the tokenizer is not the {expected} tokenizer", stacklevel=3)


def encode_prompts(tokenizer: Any, text_encoder: Any, captions: list[str], settings: TextEncoding) -> torch.Tensor:
    """Captions -> conditioning [b, 75n+2, dim], weighted or not as `settings` say."""
    _warn_on_tokenizer_mismatch(tokenizer, settings)
    if settings.weighted:
        return encode_weighted(tokenizer, text_encoder, captions, settings)
    return encode(text_encoder, tokenize(tokenizer, captions, settings.max_token_length), settings)
