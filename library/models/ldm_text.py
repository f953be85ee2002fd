"""Text-encoder state dicts: transformers `CLIPTextModel` <-> LDM single-file naming.

SD1 (CLIP ViT-L, HF names): LDM keys here carry no `cond_stage_model.transformer.` prefix and
always start with `text_model.` on the LDM side. transformers 5 state dicts have no
`text_model.` level (4.x ones do); both are accepted on input, output is the 5.x layout.

SD2 (OpenCLIP ViT-H, keys without `cond_stage_model.model.`): q/k/v live in one `in_proj`
tensor, and the file holds one resblock more than SD uses (SD takes the penultimate output
and applies the final layer norm). Reading splits `in_proj` into views (no copy); writing has
to concatenate, which allocates the attention weights once more.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .ldm_unet import PrefixPairs, StateDict, rename_by_prefix

TEXT_MODEL_PREFIX = "text_model."
POSITION_IDS_SUFFIX = "position_ids"  # a buffer, not a weight; transformers rebuilds it

# transformers CLIPEncoderLayer children -> OpenCLIP ResidualAttentionBlock children
OPEN_CLIP_LAYER_PARTS = (
    ("layer_norm1.", "ln_1."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
OPEN_CLIP_TOP_LEVEL_PARTS = (
    ("embeddings.token_embedding.", "token_embedding."),
    ("final_layer_norm.", "ln_final."),
)
OPEN_CLIP_POSITION_KEYS = ("embeddings.position_embedding.weight", "positional_embedding")
# Parts of the OpenCLIP text tower that SD's text encoder does not use.
OPEN_CLIP_UNUSED_KEYS = ("text_projection", "logit_scale", "attn_mask")
QKV = ("q", "k", "v")
RESBLOCK_INDEX = re.compile(r"transformer\.resblocks\.(\d+)\.")

SD1_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SD2_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
HEAD_CHANNELS = 64


def strip_text_model_prefix(key: str) -> str:
    return key[len(TEXT_MODEL_PREFIX) :] if key.startswith(TEXT_MODEL_PREFIX) else key


def _weights_only(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers-5 layout (no `text_model.`) without position_ids buffers."""
    return {strip_text_model_prefix(k): t for k, t in sd.items() if not k.endswith(POSITION_IDS_SUFFIX)}


# ---------------------------------------------------------------------------
# SD1: CLIP ViT-L


def clip_text_ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """LDM SD1 text encoder (with or without `text_model.`) -> transformers-5 keys."""
    return _weights_only(sd)


def clip_text_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers CLIPTextModel state dict (4.x or 5.x) -> LDM keys, all under `text_model.`."""
    return {TEXT_MODEL_PREFIX + k: t for k, t in _weights_only(sd).items()}


# ---------------------------------------------------------------------------
# SD2: OpenCLIP ViT-H


def _open_clip_prefix_pairs(num_layers: int) -> PrefixPairs:
    pairs: PrefixPairs = list(OPEN_CLIP_TOP_LEVEL_PARTS)
    for layer in range(num_layers):
        for part, ldm_part in OPEN_CLIP_LAYER_PARTS:
            pairs.append((f"encoder.layers.{layer}.{part}", f"transformer.resblocks.{layer}.{ldm_part}"))
    return pairs


def open_clip_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """OpenCLIP text tower (keys without `cond_stage_model.model.`) -> transformers-5 keys.

    Resblocks >= num_layers, text_projection and logit_scale are not part of SD's text encoder.
    """
    diffusers_key, ldm_key = OPEN_CLIP_POSITION_KEYS
    converted: StateDict = {}
    renamable: StateDict = {}
    for key, tensor in sd.items():
        if key in OPEN_CLIP_UNUSED_KEYS or _resblock_index(key, default=-1) >= num_layers:
            continue
        if key == ldm_key:
            converted[diffusers_key] = tensor
        elif ".attn.in_proj_" in key:
            converted.update(_split_in_proj(key, tensor))
        else:
            renamable[key] = tensor
    prefix_map = {ldm: diffusers for diffusers, ldm in _open_clip_prefix_pairs(num_layers)}
    converted.update(rename_by_prefix(renamable, prefix_map, "OpenCLIP LDM->diffusers"))
    return converted


def _resblock_index(key: str, default: int) -> int:
    match = RESBLOCK_INDEX.match(key)
    return int(match.group(1)) if match else default


def _split_in_proj(key: str, tensor: torch.Tensor) -> StateDict:
    """`transformer.resblocks.N.attn.in_proj_weight` -> q/k/v_proj.weight (views along dim 0)."""
    layer = _resblock_index(key, default=-1)
    kind = key.rsplit("_", 1)[1]  # "weight" or "bias"
    chunks = tensor.chunk(3, dim=0)
    return {f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}": chunk for name, chunk in zip(QKV, chunks)}


def open_clip_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """transformers CLIPTextModel (SD2) state dict -> OpenCLIP keys (without `cond_stage_model.model.`).

    Adds what an SD2 file carries but SD does not train: one more resblock (a copy of the
    last one), text_projection = ones(hidden, hidden) and logit_scale = 1.
    """
    diffusers_key, ldm_key = OPEN_CLIP_POSITION_KEYS
    source = _weights_only(sd)
    converted: StateDict = {}
    renamable: StateDict = {}
    for key, tensor in source.items():
        if key == diffusers_key:
            converted[ldm_key] = tensor
        elif ".self_attn." in key and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            continue  # joined below
        else:
            renamable[key] = tensor
    for layer in range(num_layers):
        converted.update(_join_in_proj(source, layer))
    prefix_map = dict(_open_clip_prefix_pairs(num_layers))
    converted.update(rename_by_prefix(renamable, prefix_map, "OpenCLIP diffusers->LDM"))
    converted.update(_unused_open_clip_parts(converted, num_layers))
    return converted


def _join_in_proj(source: Mapping[str, torch.Tensor], layer: int) -> StateDict:
    joined: StateDict = {}
    attention = f"encoder.layers.{layer}.self_attn."
    for kind in ("weight", "bias"):
        parts = [source[f"{attention}{name}_proj.{kind}"] for name in QKV]
        joined[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return joined


def _unused_open_clip_parts(converted: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """The extra resblock (cloned: safetensors refuses tensors that share memory), projection, scale."""
    last, extra = f"transformer.resblocks.{num_layers - 1}.", f"transformer.resblocks.{num_layers}."
    parts: StateDict = {extra + k[len(last) :]: t.clone() for k, t in converted.items() if k.startswith(last)}
    token_embedding = converted["token_embedding.weight"]
    hidden = token_embedding.shape[1]
    parts["text_projection"] = torch.ones(hidden, hidden, dtype=token_embedding.dtype, device=token_embedding.device)
    parts["logit_scale"] = torch.tensor(1.0, dtype=token_embedding.dtype, device=token_embedding.device)
    return parts


# ---------------------------------------------------------------------------
# config inference from LDM shapes


def infer_text_config(text_ldm_sd: Mapping[str, torch.Tensor], v2: bool) -> dict:
    """CLIPTextConfig kwargs for an LDM text encoder (SD1 HF names or SD2 OpenCLIP names)."""
    return _infer_open_clip_config(text_ldm_sd) if v2 else _infer_clip_l_config(text_ldm_sd)


def _infer_clip_l_config(text_ldm_sd: Mapping[str, torch.Tensor]) -> dict:
    sd = _weights_only(text_ldm_sd)
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    return _text_config(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_count_layers(sd, r"encoder\.layers\.(\d+)\."),
        max_position_embeddings=int(sd["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu",
        projection_dim=int(hidden),
        **SD1_TOKEN_IDS,
    )


def _infer_open_clip_config(sd: Mapping[str, torch.Tensor]) -> dict:
    vocab, hidden = sd["token_embedding.weight"].shape
    projection = sd.get("text_projection")
    return _text_config(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=_count_layers(sd, r"transformer\.resblocks\.(\d+)\.") - 1,  # last block unused by SD
        max_position_embeddings=int(sd["positional_embedding"].shape[0]),
        hidden_act="gelu",
        projection_dim=int(projection.shape[1]) if projection is not None else int(hidden),
        **SD2_TOKEN_IDS,
    )


def _text_config(hidden_size: int, **fields: object) -> dict:
    """Shape-derived fields plus the CLIP defaults; SD uses 64-channel attention heads."""
    return {
        "hidden_size": hidden_size,
        **fields,
        "num_attention_heads": max(1, hidden_size // HEAD_CHANNELS),
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


def _count_layers(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(match.group(1)) for key in sd if (match := regex.match(key))}
    return max(indices) + 1 if indices else 0
