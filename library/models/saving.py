"""--save_model_as / --save_precision for full models: LDM single files and diffusers folders.

Every write goes to a temporary name first and is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from library.fileio import atomic_path
from library.models.checkpoint_io import write_state_dict
from library.models.ldm_conversion import (
    clip_text_diffusers_to_ldm,
    join_ldm_state_dict,
    open_clip_diffusers_to_ldm,
    unet_diffusers_to_ldm,
    vae_diffusers_to_ldm,
)
from library.models.modelspec import build_modelspec
from library.models.tokenizer import save_tokenizer

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast_state_dict(state_dict: dict, precision: str | None) -> dict:
    """Detached tensors in the `--save_precision` dtype (unchanged when precision is None)."""
    dtype = SAVE_PRECISIONS[precision] if precision else None
    return {k: (v.detach().to(dtype) if dtype and v.is_floating_point() else v.detach()) for k, v in state_dict.items()}


def text_encoder_state_dict_4x(text_encoder) -> dict:
    """Text encoder weights with the `text_model.` level transformers 4.x expects (5.x reads it too)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text_encoder.state_dict().items()}


def ldm_state_dict(unet, vae, text_encoder, v2: bool) -> dict:
    """One LDM-layout state dict (model.diffusion_model., first_stage_model., cond_stage_model.)."""
    unet_sd = unet_diffusers_to_ldm(dict(unet.state_dict()), dict(unet.config))
    vae_sd = vae_diffusers_to_ldm(dict(vae.state_dict()), dict(vae.config))
    text_sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    if v2:
        text_sd = open_clip_diffusers_to_ldm(text_sd, text_encoder.config.num_hidden_layers)
    else:
        text_sd = clip_text_diffusers_to_ldm(text_sd)
    return join_ldm_state_dict(unet_sd, vae_sd, text_sd, v2=v2)


def save_single_file(
    path: str | os.PathLike,
    unet,
    vae,
    text_encoder,
    *,
    v2: bool,
    precision: str | None = None,
    metadata: dict[str, str] | None = None,
    epoch: int = 0,
    global_step: int = 0,
    source_state_dict: dict | None = None,
) -> None:
    """Write an LDM `.safetensors` (with metadata) or `.ckpt` (`{"state_dict", "epoch", "global_step"}`).

    Keys of `source_state_dict` that we do not train (EMA weights, buffers) are carried over.
    """
    state_dict = ldm_state_dict(unet, vae, text_encoder, v2)
    if source_state_dict:
        state_dict = {**{k: v for k, v in source_state_dict.items() if k not in state_dict}, **state_dict}
    state_dict = cast_state_dict(state_dict, precision)
    is_safetensors = str(path).lower().endswith(".safetensors")
    write_state_dict(
        path,
        state_dict,
        metadata=metadata if is_safetensors else None,
        ckpt_extra=None if is_safetensors else {"epoch": epoch, "global_step": global_step},
    )


def save_diffusers_folder(
    folder: str | os.PathLike,
    parts,
    *,
    precision: str | None = None,
    safe_serialization: bool = True,
) -> None:
    """Write a diffusers StableDiffusionPipeline folder that transformers 4.x and 5.x both read."""
    import diffusers

    folder = Path(folder)
    weights_names = _weight_file_names(safe_serialization)
    with atomic_path(folder) as tmp:
        for name, module, state_dict in (
            ("unet", parts.unet, parts.unet.state_dict()),
            ("vae", parts.vae, parts.vae.state_dict()),
            ("text_encoder", parts.text_encoder, text_encoder_state_dict_4x(parts.text_encoder)),
        ):
            sub = tmp / name
            sub.mkdir(parents=True)
            _save_module_config(module, sub, precision)
            _write_weights(sub / weights_names[name], cast_state_dict(state_dict, precision), safe_serialization)
        save_tokenizer(parts.tokenizer, tmp / "tokenizer")
        _inference_scheduler(parts).save_pretrained(str(tmp / "scheduler"))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(diffusers.__version__), indent=2) + "\n")


def save_model(path: str | os.PathLike, parts, save_model_as: str, *, precision: str | None = None, **single_file_kwargs) -> Path:
    """Dispatch on `--save_model_as`; returns the written path."""
    if save_model_as not in SAVE_FORMATS:
        raise ValueError(f"--save_model_as must be one of {', '.join(SAVE_FORMATS)}, not {save_model_as!r}")
    path = Path(path)
    if save_model_as.startswith("diffusers"):
        save_diffusers_folder(path, parts, precision=precision, safe_serialization=save_model_as == "diffusers_safetensors")
    else:
        if single_file_kwargs.get("metadata") is None:
            single_file_kwargs["metadata"] = build_modelspec(v2=parts.v2, v_parameterization=parts.v_parameterization)
        save_single_file(
            path, parts.unet, parts.vae, parts.text_encoder, v2=parts.v2, precision=precision, **single_file_kwargs
        )
    return path


def _weight_file_names(safe: bool) -> dict[str, str]:
    diffusers_name = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    return {"unet": diffusers_name, "vae": diffusers_name, "text_encoder": "model.safetensors" if safe else "pytorch_model.bin"}


def _write_weights(path: Path, state_dict: dict, safe: bool) -> None:
    if safe:
        write_state_dict(path, state_dict, metadata={"format": "pt"})
    else:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def _save_module_config(module, folder: Path, precision: str | None) -> None:
    if hasattr(module, "save_config"):  # diffusers model
        module.save_config(str(folder))
        return
    config = module.config.__class__.from_dict(module.config.to_dict())
    dtype = SAVE_PRECISIONS[precision] if precision else module.dtype
    config.dtype = dtype
    config.save_pretrained(str(folder))


# The betas/timesteps of the model's training schedule carry over to the saved scheduler.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
SD_SCHEDULE = (
    ("num_train_timesteps", 1000), ("beta_start", 0.00085), ("beta_end", 0.012), ("beta_schedule", "scaled_linear"),
)


def _inference_scheduler(parts):
    """The DDIM config SD's own folders (and upstream's saves) carry.

    A DDIMScheduler built from the training DDPM config would keep steps_offset 0 and
    set_alpha_to_one True; SD uses steps_offset 1 (diffusers warns about 0 when loading),
    no final alpha of one and no sample clipping. skip_prk_steps is kept for PNDMScheduler,
    SD's original scheduler class, which pipelines may swap in from this config.
    """
    from diffusers import DDIMScheduler

    training = dict(getattr(parts.noise_scheduler, "config", None) or {})
    config = dict(SD_SCHEDULE)
    config.update({k: training[k] for k in SCHEDULE_KEYS if training.get(k) is not None})
    prediction_type = training.get("prediction_type") or "epsilon"
    config.update(
        prediction_type="v_prediction" if parts.v_parameterization else prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        skip_prk_steps=True,
    )
    return DDIMScheduler.from_config(config)


def _model_index(diffusers_version: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
