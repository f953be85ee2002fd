"""XTI / P+ (extended textual inversion): one embedding of the new token per U-Net cross-attention layer.

The 16 layers of an SD1.x/2.x U-Net are named as in the LDM layout: IN01 IN02 IN04 IN05 IN07 IN08
(down blocks), MID, OUT03…OUT11 (up blocks). A caption is encoded once per layer, each time with that
layer's vectors in place of the token's, and each cross-attention layer attends to its own encoding.

Built from three small parts, none of which touches the trainer:
- `LayerVectors`: the trained tensor `[16, N, width]` and a token-embedding stand-in that looks up the
  base table and puts the current layer's vectors at the new tokens' positions;
- `LayerContexts`: attention-processor wrappers that hand each cross-attention layer its own
  encoding (and otherwise call the processor that was there);
- `per_layer_predict`: the recipe's `Attached.predict` (also used by sample images).
Files: `{"IN01": [N, width], …, "OUT11": [N, width]}` (.safetensors or .pt), as upstream writes them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from library.errors import UserError
from library.models.embeddings import XTI_LAYERS

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")


class XTIError(UserError, ValueError):
    """An XTI option or file that cannot be used (named in the message)."""


def layer_name(module_name: str) -> str | None:
    """The XTI layer of a U-Net module name (`down_blocks.1.attentions.0...` -> IN04), or None."""
    if module_name.startswith("mid_block.attentions."):
        return "MID"
    match = _DOWN.match(module_name)
    if match:
        return f"IN{3 * int(match.group(1)) + int(match.group(2)) + 1:02d}"
    match = _UP.match(module_name)
    if match:
        return f"OUT{3 * int(match.group(1)) + int(match.group(2)):02d}"
    return None


def cross_attention_layers(unet) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """XTI layer -> its cross-attention modules (`attn2` of each transformer block), in U-Net order."""
    layers: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            layer = layer_name(name)
            if layer not in XTI_LAYERS:
                raise XTIError(f"the U-Net's cross-attention {name} has no XTI layer: XTI needs an SD1.x/SD2.x U-Net")
            layers.setdefault(layer, []).append((name, module))
    return layers


class LayerVectors(torch.nn.Module):
    """The trained vectors `[16, N, width]`, and the token-embedding stand-in that uses them.

    `self.layer` picks the layer whose vectors replace the new tokens' rows in the next lookup.
    """

    def __init__(self, table: torch.nn.Embedding, token_ids: list[int], start: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["table"] = table  # the frozen base table: not a submodule (its weight is not trained here)
        self.first_id, self.count = token_ids[0], len(token_ids)
        self.vectors = torch.nn.Parameter(start.clone().float())  # [16, N, width]
        self.layer = XTI_LAYERS.index("MID")

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = (input_ids >= self.first_id) & (input_ids < self.first_id + self.count)
        base = self.table(torch.where(new, torch.zeros_like(input_ids), input_ids))
        if not bool(new.any()):
            return base
        vectors = self.vectors[self.layer].to(base.dtype)[(input_ids - self.first_id).clamp(0, self.count - 1)]
        return torch.where(new.unsqueeze(-1), vectors, base)


class _TokenLookup(torch.nn.Module):
    """Stands in for the text encoder's token embedding; keeps `weight` visible for code that reads it."""

    def __init__(self, layer_vectors: LayerVectors) -> None:
        super().__init__()
        self.__dict__["layer_vectors"] = layer_vectors  # not a submodule: its parameter belongs to the recipe

    @property
    def weight(self) -> torch.Tensor:
        return self.layer_vectors.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layer_vectors.lookup(input_ids)


def install_lookup(text_encoder, layer_vectors: LayerVectors) -> None:
    """Route the text encoder's token lookups through `layer_vectors` (its table stays as it is)."""
    text_encoder.set_input_embeddings(_TokenLookup(layer_vectors))


class _LayerProcessor:
    """Wraps a cross-attention processor: uses this layer's encoding when one is set."""

    def __init__(self, layer: str, contexts: "LayerContexts", inner) -> None:
        self.layer, self.contexts, self.inner = layer, contexts, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        own = self.contexts.states.get(self.layer)
        if own is not None:
            encoder_hidden_states = own.to(hidden_states.dtype)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class LayerContexts:
    """The per-layer encodings of the current forward pass, read by the wrapped processors."""

    def __init__(self, unet) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.layers = cross_attention_layers(unet)
        for layer, modules in self.layers.items():
            for _, module in modules:
                module.set_processor(_LayerProcessor(layer, self, module.processor))


def per_layer_predict(layer_vectors: LayerVectors, contexts: LayerContexts):
    """`Attached.predict`: encode the captions once per layer the U-Net has, then run the U-Net."""

    def predict(unet, encode, noisy_latents, timesteps, captions):
        try:
            for layer in contexts.layers:
                layer_vectors.layer = XTI_LAYERS.index(layer)
                contexts.states[layer] = encode(captions)
            reference = contexts.states["MID"] if "MID" in contexts.states else next(iter(contexts.states.values()))
            return unet(noisy_latents, timesteps, reference.to(noisy_latents.dtype)).sample
        finally:
            contexts.states.clear()

    return predict


def initial_layer_vectors(start: torch.Tensor | None, num_vectors: int, width: int) -> torch.Tensor:
    """[16, N, width]: every layer starts from `start` ([N, width]) or from a small random draw."""
    if start is None:
        start = torch.randn(num_vectors, width) * 0.01
    return start.float().unsqueeze(0).repeat(len(XTI_LAYERS), 1, 1)


def read_xti_file(path: str | Path) -> torch.Tensor:
    """[16, N, width] from a 16-key XTI file (.safetensors or .pt, opened safely)."""
    from library.models.checkpoint_io import read_state_dict

    data = read_state_dict(path)
    missing = [layer for layer in XTI_LAYERS if layer not in data]
    if missing:
        raise XTIError(
            f"--weights {path}: not an XTI embedding (missing {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}"
            f"; it has {', '.join(list(data)[:4])}); a plain embedding is for train_textual_inversion.py"
        )
    shapes = {tuple(data[layer].shape) for layer in XTI_LAYERS}
    if len(shapes) != 1:
        raise XTIError(f"--weights {path}: its 16 layers have different shapes ({sorted(shapes)})")
    return torch.stack([data[layer].float().reshape(-1, data[layer].shape[-1]) for layer in XTI_LAYERS])


def xti_state_dict(vectors: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {layer: vectors[i].detach().to("cpu", dtype=dtype or torch.float32).contiguous() for i, layer in enumerate(XTI_LAYERS)}
