"""The ss_* / sshs_* metadata of LoRA files (reference/formats.md §2), as pure functions.

Metadata viewers, the A1111 additional-networks extension and the kohya GUI read these keys, so
names and value spellings follow sd-scripts' train_network.py: every value is `str()` of the
setting (JSON for the dataset blobs).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from library.hashing import model_file_hashes, precalculate_safetensors_hashes  # noqa: F401 - part of this module's API

# --no_metadata keeps only what tools need to filter and load the file.
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

# ss_* key -> (args attribute, default when the recipe lacks the option). Values are stored as str(value).
_PLAIN_ARGS = (
    ("ss_output_name", "output_name", None),
    ("ss_learning_rate", "learning_rate", None),
    ("ss_unet_lr", "unet_lr", None),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps", 1),
    ("ss_max_grad_norm", "max_grad_norm", 1.0),
    ("ss_lr_warmup_steps", "lr_warmup_steps", 0),
    ("ss_lr_scheduler", "lr_scheduler", "constant"),
    ("ss_network_dim", "network_dim", None),
    ("ss_network_alpha", "network_alpha", 1),  # upstream's argparse default is the int 1 -> "1"
    ("ss_network_dropout", "network_dropout", None),
    ("ss_mixed_precision", "mixed_precision", "no"),
    ("ss_clip_skip", "clip_skip", None),
    ("ss_max_token_length", "max_token_length", None),
    ("ss_seed", "seed", None),
    ("ss_lowram", "lowram", False),
    ("ss_noise_offset", "noise_offset", None),
    ("ss_noise_offset_random_strength", "noise_offset_random_strength", False),
    ("ss_adaptive_noise_scale", "adaptive_noise_scale", None),
    ("ss_multires_noise_iterations", "multires_noise_iterations", None),
    ("ss_multires_noise_discount", "multires_noise_discount", 0.3),
    ("ss_ip_noise_gamma", "ip_noise_gamma", None),
    ("ss_ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength", False),
    ("ss_zero_terminal_snr", "zero_terminal_snr", False),
    ("ss_min_snr_gamma", "min_snr_gamma", None),
    ("ss_loss_type", "loss_type", "l2"),
    ("ss_huber_schedule", "huber_schedule", "snr"),
    ("ss_huber_c", "huber_c", 0.1),
    ("ss_huber_scale", "huber_scale", 1.0),
    ("ss_scale_weight_norms", "scale_weight_norms", None),
    ("ss_prior_loss_weight", "prior_loss_weight", 1.0),
    ("ss_caption_dropout_rate", "caption_dropout_rate", 0.0),
    ("ss_caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", 0),
    ("ss_caption_tag_dropout_rate", "caption_tag_dropout_rate", 0.0),
    ("ss_face_crop_aug_range", "face_crop_aug_range", None),
    ("ss_validation_seed", "validation_seed", None),
    ("ss_validation_split", "validation_split", 0.0),
    ("ss_max_validation_steps", "max_validation_steps", None),
    ("ss_validate_every_n_epochs", "validate_every_n_epochs", None),
    ("ss_validate_every_n_steps", "validate_every_n_steps", None),
    ("ss_resize_interpolation", "resize_interpolation", None),
    ("ss_training_comment", "training_comment", None),
)
_BOOL_ARGS = (
    ("ss_gradient_checkpointing", "gradient_checkpointing"),
    ("ss_full_fp16", "full_fp16"),
    ("ss_fp8_base", "fp8_base"),
    ("ss_fp8_base_unet", "fp8_base_unet"),
    ("ss_v2", "v2"),
    ("ss_cache_latents", "cache_latents"),
    ("ss_debiased_estimation", "debiased_estimation_loss"),
)


def project_commit_hash() -> str:
    """Git HEAD of this project read from .git (no subprocess), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    git = root / ".git"
    try:
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        bases = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
        for base in bases:
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except (OSError, IndexError, ValueError):
        pass
    return "unknown"


# ------------------------------------------------------------------ training metadata


def parse_network_kwargs(network_args) -> dict[str, str]:
    """--network_args ['conv_dim=4', ...] -> {'conv_dim': '4'} (values stay strings, split at the first '=')."""
    kwargs = {}
    for item in network_args or ():
        key, _, value = str(item).partition("=")
        kwargs[key.strip()] = value.strip()
    return kwargs


def base_model_version(v2: bool, v_parameterization: bool) -> str:
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def text_encoder_lr_value(value):
    """--text_encoder_lr as upstream records it: a single number (first of a list), or None."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _resolution(value):
    """'512' -> (512, 512), '512,768' -> (512, 768): the tuple upstream has parsed by the time it writes metadata."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, (list,)):
        return tuple(value)
    if isinstance(value, int):
        return (value, value)
    try:
        parts = tuple(int(p) for p in str(value).split(","))
    except ValueError:
        return value
    return parts * 2 if len(parts) == 1 else parts


def network_training_metadata(
    args: argparse.Namespace,
    *,
    dataset_metadata: dict,
    counts: dict,
    session_id: int,
    started_at: float,
    uses_dataset_config: bool,
) -> dict[str, str]:
    """Every ss_* key train_network.py writes (formats.md §2.1-2.3), all values strings.

    ss_epoch / ss_steps / ss_training_finished_at are added per save by finalize_metadata().

    `dataset_metadata` is DatasetGroup.metadata(); `counts` holds num_train_images, num_reg_images,
    num_batches_per_epoch, num_epochs, max_train_steps, optimizer (description string) and
    optionally num_validation_images and num_processes.
    """
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - recipes differ in options
    meta: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_text_encoder_lr": text_encoder_lr_value(get("text_encoder_lr")),
        "ss_num_train_images": counts["num_train_images"],
        "ss_num_validation_images": counts.get("num_validation_images", 0),
        "ss_num_reg_images": counts["num_reg_images"],
        "ss_num_batches_per_epoch": counts["num_batches_per_epoch"],
        "ss_num_epochs": counts["num_epochs"],
        "ss_max_train_steps": counts["max_train_steps"],
        "ss_optimizer": counts["optimizer"],
        "ss_network_module": get("network_module") or "networks.lora",  # the recipe's default when unset
        "ss_base_model_version": base_model_version(bool(get("v2")), bool(get("v_parameterization"))),
        "ss_sd_scripts_commit_hash": project_commit_hash(),
    }
    for key, attr, default in _PLAIN_ARGS:
        meta[key] = get(attr, default)
    for key, attr in _BOOL_ARGS:
        meta[key] = bool(get(attr, False))
    if uses_dataset_config:
        meta["ss_datasets"] = json.dumps(dataset_metadata.get("ss_datasets", []))
        meta["ss_tag_frequency"] = json.dumps(dataset_metadata.get("ss_tag_frequency", {}))
        meta["ss_dataset_dirs"] = json.dumps(dataset_metadata.get("ss_dataset_dirs", {}))
    else:
        meta.update(_legacy_dataset_keys(args, dataset_metadata, counts))
    if get("network_args"):
        net_kwargs: dict[str, Any] = parse_network_kwargs(get("network_args"))
        if not get("dim_from_weights") and "dropout" not in net_kwargs:
            net_kwargs["dropout"] = get("network_dropout")  # upstream injects it (LyCORIS workaround)
        meta["ss_network_args"] = json.dumps(net_kwargs)
    meta.update(_model_identity("sd", get("pretrained_model_name_or_path")))
    meta.update(_model_identity("vae", get("vae")))
    return {k: str(v) for k, v in meta.items()}


def _legacy_dataset_keys(args, dataset_metadata: dict, counts: dict) -> dict[str, Any]:
    """Keys written for folder datasets (--train_data_dir / --in_json) instead of ss_datasets."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    datasets = dataset_metadata.get("ss_datasets") or [{}]
    dataset = datasets[0]
    dirs, reg_dirs = {}, {}
    for subset in dataset.get("subsets", []):
        name = subset.get("image_dir") if "is_reg" in subset else subset.get("metadata_file")
        target = reg_dirs if subset.get("is_reg") else dirs
        target[name] = {"n_repeats": subset.get("num_repeats"), "img_count": subset.get("img_count")}
    batch = get("train_batch_size", 1)
    total = counts.get("total_batch_size") or (
        batch * counts.get("num_processes", 1) * get("gradient_accumulation_steps", 1)
    )
    bucket_info = dataset_metadata.get("ss_bucket_info", dataset.get("bucket_info"))
    return {
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": total,
        "ss_resolution": _resolution(get("resolution")),
        "ss_color_aug": bool(get("color_aug")),
        "ss_flip_aug": bool(get("flip_aug")),
        "ss_random_crop": bool(get("random_crop")),
        "ss_shuffle_caption": bool(get("shuffle_caption")),
        "ss_enable_bucket": bool(dataset.get("enable_bucket", get("enable_bucket"))),
        "ss_bucket_no_upscale": bool(get("bucket_no_upscale")),
        "ss_min_bucket_reso": dataset.get("min_bucket_reso", get("min_bucket_reso")),
        "ss_max_bucket_reso": dataset.get("max_bucket_reso", get("max_bucket_reso")),
        "ss_keep_tokens": get("keep_tokens", 0),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.get("tag_frequency", dataset_metadata.get("ss_tag_frequency", {}))),
        "ss_bucket_info": json.dumps(bucket_info),
    }


def _model_identity(kind: str, name_or_path: str | None) -> dict[str, str]:
    """ss_sd_model_name/_hash/new_..._hash (or ss_vae_*): hashes only when the path exists on disk."""
    if name_or_path is None:
        return {}
    prefix = "ss_sd_model" if kind == "sd" else "ss_vae"
    name, out = str(name_or_path), {}
    if os.path.exists(name):
        out[f"{prefix}_hash"], out[f"ss_new_{prefix[3:]}_hash"] = model_file_hashes(name)
        name = os.path.basename(os.path.normpath(name))
    out[f"{prefix}_name"] = name
    return out


def finalize_metadata(metadata: dict[str, str], *, epoch: int, step: int, finished_at: float) -> dict[str, str]:
    """A copy with the per-save keys updated (ss_epoch, ss_steps, ss_training_finished_at)."""
    return {
        **metadata,
        "ss_training_finished_at": str(finished_at),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
    }


def minimal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """--no_metadata: only the keys needed to recognise the network (modelspec/sshs are added on save)."""
    return {k: metadata[k] for k in MINIMUM_KEYS if k in metadata}


def network_modelspec(args: argparse.Namespace, *, timestamp: float | None = None) -> dict[str, str]:
    """modelspec.* keys of a LoRA file from the options (--metadata_*, --output_name, --resolution, ...)."""
    return modelspec_from_args(args, kind="lora", timestamp=timestamp)


def modelspec_from_args(args: argparse.Namespace, *, kind: str, timestamp: float | None = None) -> dict[str, str]:
    """modelspec.* keys of a saved file ("checkpoint", "lora", ...) from the options."""
    from library.models.modelspec import build_modelspec

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    resolution = _resolution(get("resolution"))
    spec = build_modelspec(
        v2=bool(get("v2")),
        v_parameterization=bool(get("v_parameterization")),
        kind=kind,
        title=get("metadata_title") or get("output_name"),
        resolution=resolution if isinstance(resolution, tuple) else None,
        clip_skip=get("clip_skip"),
        timestamp=timestamp,
    )
    if get("min_timestep") is not None or get("max_timestep") is not None:
        spec["modelspec.timestep_range"] = f"{get('min_timestep') or 0},{get('max_timestep') or 1000}"
    for field in ("author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase",
                  "preprocessor"):
        if get(f"metadata_{field}") is not None:
            spec[f"modelspec.{field}"] = str(get(f"metadata_{field}"))
    if get("metadata_thumbnail"):
        spec["modelspec.thumbnail"] = thumbnail_data_uri(get("metadata_thumbnail"))
    if get("metadata_is_negative_embedding"):
        spec["modelspec.is_negative_embedding"] = "true"
    return spec


def thumbnail_data_uri(path: str) -> str:
    """`data:<mime>;base64,...` of an image file (the modelspec form of a thumbnail)."""
    import base64
    import mimetypes

    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def modelspec_option_problems(args: argparse.Namespace) -> list[str]:
    """--metadata_thumbnail must be an image file (it is read at every save)."""
    from pathlib import Path

    thumbnail = getattr(args, "metadata_thumbnail", None)
    if thumbnail and not Path(thumbnail).is_file():
        return [f"--metadata_thumbnail {thumbnail}: file not found (give a .png/.jpg/.webp image)"]
    return []
