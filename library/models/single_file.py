"""Build diffusers/transformers modules from an LDM single-file checkpoint without a second copy of the weights.

The modules are created on the meta device (no memory), the checkpoint's tensors are
renamed to diffusers names (no copies) and then assigned as the modules' parameters.
Peak memory is therefore about one copy of the checkpoint.
"""

from __future__ import annotations

import os

import torch

from library.models.checkpoint_io import read_state_dict
from library.models.ldm_conversion import (
    clip_text_ldm_to_diffusers,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    is_v2_ldm,
    open_clip_ldm_to_diffusers,
    split_ldm_state_dict,
    unet_ldm_to_diffusers,
    vae_ldm_to_diffusers,
)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."


def load_single_file(path: str | os.PathLike, *, v2: bool, v_parameterization: bool, dtype: torch.dtype):
    """(text_encoder, unet, vae) from an SD1.x/2.x `.safetensors`/`.ckpt`; vae is None if the file has none."""
    from library.models.loading import ModelLoadError

    state_dict = read_state_dict(path)
    if not any(k.startswith(LDM_UNET_PREFIX) for k in state_dict):
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion checkpoint in the original (LDM) layout: "
            f"no '{LDM_UNET_PREFIX}*' keys (is it a LoRA, an embedding or a VAE file?)"
        )
    file_is_v2 = is_v2_ldm(state_dict)
    if file_is_v2 != v2:
        raise ModelLoadError(
            f"{path} is an SD{'2' if file_is_v2 else '1'}.x checkpoint (its text encoder is "
            f"{'OpenCLIP-H' if file_is_v2 else 'CLIP-L'}) but --v2 is {'not ' if file_is_v2 else ''}set: "
            f"{'add' if file_is_v2 else 'remove'} --v2"
        )
    unet_sd, vae_sd, text_sd, _ = split_ldm_state_dict(state_dict)
    del state_dict  # the split dicts hold the only references now

    text_encoder = _text_encoder_from_ldm(text_sd, v2, dtype)
    del text_sd
    unet = _unet_from_ldm(unet_sd, v2, v_parameterization, dtype)
    del unet_sd
    vae = _vae_from_ldm(vae_sd, dtype) if vae_sd else None
    return text_encoder, unet, vae


def load_vae_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A VAE from a VAE-only LDM file (e.g. vae-ft-mse-840000) or from a full checkpoint's VAE part."""
    from library.models.loading import ModelLoadError

    state_dict = read_state_dict(path)
    if any(k.startswith(LDM_VAE_PREFIX) for k in state_dict):
        vae_sd = {k[len(LDM_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_VAE_PREFIX)}
    elif any(k.startswith("encoder.down.") for k in state_dict):
        vae_sd = {k: v for k, v in state_dict.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    else:
        raise ModelLoadError(
            f"--vae {path}: no VAE weights in the original (LDM) layout found (expected keys 'encoder.down.*' "
            "or 'first_stage_model.*'); for a diffusers VAE pass its folder instead"
        )
    del state_dict
    return _vae_from_ldm(vae_sd, dtype)


def _materialize(module: torch.nn.Module, state_dict: dict, dtype: torch.dtype) -> torch.nn.Module:
    module.load_state_dict(state_dict, strict=True, assign=True)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module.eval()


def _unet_from_ldm(unet_sd: dict, v2: bool, v_parameterization: bool, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = infer_unet_config(unet_sd, v2=v2, v_parameterization=v_parameterization)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return _materialize(unet, unet_ldm_to_diffusers(unet_sd, config), dtype)


def _vae_from_ldm(vae_sd: dict, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    config = infer_vae_config(vae_sd)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    return _materialize(vae, vae_ldm_to_diffusers(vae_sd, config), dtype)


def _text_encoder_from_ldm(text_sd: dict, v2: bool, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**infer_text_config(text_sd, v2=v2))
    with init_empty_weights():
        text_encoder = CLIPTextModel(config)
    if v2:
        converted = open_clip_ldm_to_diffusers(text_sd, config.num_hidden_layers)
    else:
        converted = clip_text_ldm_to_diffusers(text_sd)
    converted = _match_text_encoder_layout(converted, text_encoder)
    return _materialize(text_encoder, converted, dtype)


def _match_text_encoder_layout(state_dict: dict, text_encoder) -> dict:
    """Add or strip the `text_model.` level so keys fit the installed transformers major version."""
    wants_prefix = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    has_prefix = any(k.startswith("text_model.") for k in state_dict)
    if wants_prefix and not has_prefix:
        return {f"text_model.{k}": v for k, v in state_dict.items()}
    if has_prefix and not wants_prefix:
        return {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    return state_dict
