"""Build diffusers/transformers modules from an LDM single-file checkpoint without a second copy of the weights.

The modules are created on the meta device (no memory), the checkpoint's tensors are
renamed to diffusers names (no copies) and then assigned as the modules' parameters.
Peak memory is therefore about one copy of the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType

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
PART_NAMES = MappingProxyType({"text_encoder": "text encoder", "unet": "U-Net", "vae": "VAE"})
# Raised by shape-based inference, module construction or load_state_dict when a config does not
# fit the weights (missing keys, GroupNorm groups that do not divide the channels, size mismatches).
CONFIG_MISMATCH_ERRORS = (KeyError, IndexError, ValueError, RuntimeError)


def load_single_file(
    path: str | os.PathLike,
    *,
    v2: bool,
    v_parameterization: bool,
    dtype: torch.dtype,
    config_folder: str | os.PathLike | None = None,
):
    """(text_encoder, unet, vae) from an SD1.x/2.x `.safetensors`/`.ckpt`; vae is None if the file has none.

    With `config_folder` (a local diffusers folder) the modules are built from its
    unet/, vae/ and text_encoder/ config.json (where present) instead of configs inferred
    from the weights.
    """
    from library.models.loading import ModelLoadError

    configs = _reference_configs(Path(config_folder)) if config_folder is not None else {}
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

    def build(part: str, make):
        return _build_part(path, part, config_folder, part in configs, make)

    text_config = configs.get("text_encoder")
    text_encoder = build("text_encoder", lambda sd=text_sd: _text_encoder_from_ldm(sd, v2, dtype, text_config))
    del text_sd
    unet_config = configs.get("unet")
    unet = build("unet", lambda sd=unet_sd: _unet_from_ldm(sd, v2, v_parameterization, dtype, unet_config))
    del unet_sd
    vae_config = configs.get("vae")
    vae = build("vae", lambda: _vae_from_ldm(vae_sd, dtype, vae_config)) if vae_sd else None
    return text_encoder, unet, vae


def _build_part(path, part: str, config_folder, from_reference: bool, make):
    """`make()`, turning a config that does not fit the weights into a one-line ModelLoadError."""
    from library.models.loading import ModelConfigError, ModelLoadError

    try:
        return make()
    except ModelLoadError:
        raise
    except CONFIG_MISMATCH_ERRORS as err:
        detail = " ".join(str(err).split())  # load_state_dict reports over several lines
        detail = f"{type(err).__name__}: {detail[:300]}{'...' if len(detail) > 300 else ''}"
        name = PART_NAMES[part]
        if not from_reference:
            lacking = f"; {config_folder} has no {part}/config.json" if config_folder is not None else ""
            raise ModelConfigError(
                f"{path}: the {name} config could not be inferred from its weights ({detail}){lacking}"
            ) from None
        raise ModelLoadError(
            f"{path}: the {name} weights do not fit {Path(config_folder) / part / 'config.json'} ({detail}); "
            "the reference must be a diffusers folder of the same architecture"
        ) from None


def _reference_configs(folder: Path) -> dict:
    """{"unet": dict, "vae": dict, "text_encoder": CLIPTextConfig} for the parts whose config.json the folder has."""
    from transformers import CLIPTextConfig

    from library.models.loading import ModelLoadError

    configs: dict = {}
    for part in PART_NAMES:
        file = folder / part / "config.json"
        if not file.is_file():
            continue
        try:
            if part == "text_encoder":
                configs[part] = CLIPTextConfig.from_pretrained(str(file.parent))
            else:
                configs[part] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read the reference config {file}: {err}") from None
    if not configs:
        raise ModelLoadError(
            f"{folder} has none of unet/config.json, vae/config.json, text_encoder/config.json: "
            "the reference model must be a diffusers folder"
        )
    return configs


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


def _unet_from_ldm(unet_sd: dict, v2: bool, v_parameterization: bool, dtype: torch.dtype, config: dict | None = None):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if config is None:
        config = infer_unet_config(unet_sd, v2=v2, v_parameterization=v_parameterization)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    # the model's config has diffusers' defaults filled in where a reference config.json leaves them out
    return _materialize(unet, unet_ldm_to_diffusers(unet_sd, dict(unet.config)), dtype)


def _vae_from_ldm(vae_sd: dict, dtype: torch.dtype, config: dict | None = None):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    if config is None:
        config = infer_vae_config(vae_sd)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    return _materialize(vae, vae_ldm_to_diffusers(vae_sd, dict(vae.config)), dtype)


def _text_encoder_from_ldm(text_sd: dict, v2: bool, dtype: torch.dtype, config=None):
    """`config`: a CLIPTextConfig (from a reference folder); inferred from the weights when None."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    if config is None:
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
