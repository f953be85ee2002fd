"""Original LDM ("single file", A1111 / ComfyUI) checkpoints <-> Diffusers / transformers state dicts.

Facade over `ldm_unet`, `ldm_vae` and `ldm_text`, plus splitting a whole LDM state dict into
its parts and joining them back. Everything works on plain `{key: tensor}` dicts and reuses
the input tensor objects (renames and reshape views only), so a multi-GB checkpoint converts
without a second full copy. Input dicts are never modified.

Typical load path::

    unet, vae, text, other = split_ldm_state_dict(checkpoint)
    v2 = is_v2_ldm(checkpoint)
    unet_config = infer_unet_config(unet, v2, v_parameterization)
    unet_sd = unet_ldm_to_diffusers(unet, unet_config)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .ldm_text import (
    clip_text_diffusers_to_ldm,
    clip_text_ldm_to_diffusers,
    infer_text_config,
    open_clip_diffusers_to_ldm,
    open_clip_ldm_to_diffusers,
)
from .ldm_unet import StateDict, infer_unet_config, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from .ldm_vae import infer_vae_config, vae_diffusers_to_ldm, vae_ldm_to_diffusers

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "StateDict",
    "clip_text_diffusers_to_ldm",
    "clip_text_ldm_to_diffusers",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "is_v2_ldm",
    "join_ldm_state_dict",
    "open_clip_diffusers_to_ldm",
    "open_clip_ldm_to_diffusers",
    "split_ldm_state_dict",
    "unet_diffusers_to_ldm",
    "unet_ldm_to_diffusers",
    "vae_diffusers_to_ldm",
    "vae_ldm_to_diffusers",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
OPEN_CLIP_MARKER = "transformer.resblocks."


def split_ldm_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict, StateDict, StateDict]:
    """(unet, vae, text, other): the three models with their prefixes removed, and the rest
    (EMA weights, scheduler buffers, ...) under their full keys.

    SD1 text keys keep whatever follows `cond_stage_model.transformer.` (usually `text_model.`,
    missing in some files; the text converters accept both).
    """
    parts: tuple[StateDict, StateDict, StateDict, StateDict] = ({}, {}, {}, {})
    unet, vae, text, other = parts
    prefixes = ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (SD1_TEXT_PREFIX, text), (SD2_TEXT_PREFIX, text))
    for key, tensor in sd.items():
        for prefix, target in prefixes:
            if key.startswith(prefix):
                target[key[len(prefix) :]] = tensor
                break
        else:
            other[key] = tensor
    return parts


def is_v2_ldm(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the checkpoint's text encoder is OpenCLIP (SD 2.x)."""
    marker = SD2_TEXT_PREFIX + OPEN_CLIP_MARKER
    return any(key.startswith(marker) for key in sd)


def join_ldm_state_dict(
    unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor], v2: bool
) -> StateDict:
    """One LDM state dict from converted parts (keys as produced by the *_diffusers_to_ldm functions)."""
    text_prefix = SD2_TEXT_PREFIX if v2 else SD1_TEXT_PREFIX
    joined: StateDict = {}
    for prefix, part in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (text_prefix, text)):
        joined.update({prefix + key: tensor for key, tensor in part.items()})
    return joined
