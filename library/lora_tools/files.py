"""LoRA files for the tools: reading (tensors + metadata), ss_* metadata of a new or changed file, writing.

Writes go through networks.lora.write_weights: atomic, cast to the save precision, sshs_* hashes
recomputed from the final tensors (formats.md §2.5).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from library.lora_tools.factors import LoraFactors
from library.models.checkpoint_io import check_weights_file, read_safetensors_metadata, read_state_dict
from library.models.modelspec import build_modelspec
from networks.lora import write_weights

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("float", "fp16", "bf16")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def dtype_of(precision: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    return PRECISIONS[precision] if precision else default


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; .ckpt/.pt files have no metadata ({})."""
    path = check_weights_file(path)
    metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    return read_state_dict(path), metadata


def check_output_name(path: str | os.PathLike, option: str = "--save_to") -> Path:
    from library.errors import UserError

    if not path:
        raise UserError(f"{option} is required: the file to write (.safetensors, .ckpt, .pt or .pth)")
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise UserError(f"{option} {path}: must end in .safetensors, .ckpt, .pt or .pth")
    return path


def dims_metadata(modules: dict[str, LoraFactors]) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha / ss_network_args describing these modules.

    A single value when every Linear/1×1 module has the same rank (alpha), else "Dynamic"; 3×3 modules are
    described in ss_network_args (conv_dim / conv_alpha) the way train_network.py writes them.
    """
    plain = [m for m in modules.values() if not m.is_3x3]
    conv = [m for m in modules.values() if m.is_3x3]

    def one(values):
        values = set(values)
        return values.pop() if len(values) == 1 else "Dynamic"

    out = {}
    if plain:
        dim, alpha = one(m.rank for m in plain), one(float(m.alpha or m.rank) for m in plain)
        out["ss_network_dim"] = str(dim)
        out["ss_network_alpha"] = str(alpha)
    if conv:
        conv_dim, conv_alpha = one(m.rank for m in conv), one(float(m.alpha or m.rank) for m in conv)
        out["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)})
    return out


def minimum_metadata(modules: dict[str, LoraFactors], source_metadata: dict[str, str] | None, comment: str,
                     no_metadata: bool = False, title: str | None = None) -> dict[str, str]:  # fmt: skip
    """The metadata of a LoRA a tool makes: what the base model is (from the source file), dims, a comment,
    and modelspec.* unless `no_metadata` (then only the minimum ss_* keys, like upstream)."""
    source = source_metadata or {}
    v2 = source.get("ss_v2", "False")
    base = source.get("ss_base_model_version") or ("sd_v2" if v2 == "True" else "sd_v1")
    metadata = {"ss_v2": v2, "ss_base_model_version": base, "ss_network_module": "networks.lora"}
    metadata.update(dims_metadata(modules))
    metadata["ss_training_comment"] = comment
    if not no_metadata:
        v_param = base.endswith("_v") or source.get("modelspec.prediction_type") == "v"
        metadata.update(
            build_modelspec(v2=v2 == "True", v_parameterization=v_param, kind="lora", title=title,
                            timestamp=time.time())
        )  # fmt: skip
    return metadata


def updated_metadata(source_metadata: dict[str, str], modules: dict[str, LoraFactors], comment: str) -> dict[str, str]:
    """The source file's metadata with dims, comment and date brought up to date (hashes are added on write)."""
    metadata = {k: v for k, v in source_metadata.items() if not k.startswith("sshs_")}
    dims = dims_metadata(modules)
    if "ss_network_args" in dims and metadata.get("ss_network_args"):
        try:
            args = json.loads(metadata["ss_network_args"])
            args.update(json.loads(dims["ss_network_args"]))
            dims["ss_network_args"] = json.dumps(args)
        except ValueError:
            pass
    metadata.update(dims)
    old = metadata.get("ss_training_comment")
    metadata["ss_training_comment"] = comment if not old or old == "None" else f"{comment}; {old}"
    if "modelspec.date" in metadata:
        metadata["modelspec.date"] = build_modelspec(v2=False, v_parameterization=False)["modelspec.date"]
    return metadata


def write_lora(path: str | os.PathLike, modules: dict[str, LoraFactors], metadata: dict[str, str],
               precision: str | None = None, other: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write the modules (+ `other` tensors kept from the source) atomically, with sshs_* hashes."""
    state_dict = {}
    for module in modules.values():
        state_dict.update(module.state_dict())
    state_dict.update(other or {})
    write_weights(state_dict, path, dtype_of(precision, torch.float32), metadata)
    return Path(path)
