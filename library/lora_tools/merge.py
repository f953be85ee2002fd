"""Merging LoRAs: into a model's weights (W + Σ ratio·ΔW), or into one LoRA (concatenated, or re-factored by SVD).

Everything works module by module: a model is loaded once (single files without a second copy, see
library/models/single_file.py) and each layer's weight is updated in place; LoRA merges hold one module's
factors at a time in the SVD.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_tools.factors import (
    KOHYA_STYLE,
    LoraFactors,
    Retained,
    as_kohya,
    concat,
    conform_shape,
    refactor,
    require_modules,
)
from library.lora_tools.files import dtype_of, read_lora
from networks import lora_targets as targets

logger = logging.getLogger(__name__)

LBW_LENGTHS = (12, 17, 20, 26)
# Which of the 26 blocks (BASE = text encoder, IN00-IN11, MID, OUT00-OUT11) a list of each length names
# (the LoRA Block Weight extension's presets, as upstream's svd_merge_lora.py reads them).
_LBW_BLOCKS = {
    12: "BASE IN04 IN05 IN07 IN08 MID OUT00 OUT01 OUT02 OUT03 OUT04 OUT05",
    17: "BASE IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    20: "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 MID OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08",
    26: "BASE " + " ".join(f"IN{i:02d}" for i in range(12)) + " MID " + " ".join(f"OUT{i:02d}" for i in range(12)),
}
LBW_NAMES = _LBW_BLOCKS[26].split()


@dataclass
class LoraInput:
    """One LoRA to merge: its modules (sd-scripts names), ratio, optional per-block weights (26 values)."""

    path: str
    modules: dict[str, LoraFactors]
    metadata: dict[str, str]
    ratio: float = 1.0
    block_weights: list[float] | None = None

    def multiplier(self, name: str) -> float:
        if self.block_weights is None:
            return self.ratio
        return self.ratio * self.block_weights[lbw_index(name)]


def lbw_index(name: str) -> int:
    """Index among the 26 LBW blocks: 0 for the text encoder (BASE), 1 + LDM block number for the U-Net."""
    if name.startswith("lora_te"):
        return 0
    index = targets.block_index(name)
    return 0 if index < 0 else index + 1


def parse_block_weights(specs: list[str] | None, count: int) -> list[list[float] | None]:
    """--lbws: one JSON list per model (12, 17, 20 or 26 numbers, all the same length) -> 26 weights each."""
    if not specs:
        return [None] * count
    if len(specs) != count:
        raise UserError(f"--lbws: {len(specs)} lists for {count} models; give one list per model")
    lists = []
    for spec in specs:
        try:
            values = json.loads(spec)
        except ValueError:
            raise UserError(f"--lbws {spec}: not a JSON list such as [1,1,0.5,...]") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise UserError(f"--lbws {spec}: must be a JSON list of numbers")
        if len(values) not in LBW_LENGTHS:
            raise UserError(f"--lbws {spec}: {len(values)} values; the length must be one of 12, 17, 20, 26")
        lists.append(values)
    if len({len(v) for v in lists}) != 1:
        raise UserError("--lbws: all lists must have the same length")
    out = []
    for values in lists:
        weights = [1.0] * 26
        for block, value in zip(_LBW_BLOCKS[len(values)].split(), values):
            weights[LBW_NAMES.index(block)] = float(value)
        out.append(weights)
    return out


def load_inputs(paths: list[str], ratios: list[float] | None, lbws: list[str] | None = None) -> list[LoraInput]:
    if not paths:
        raise UserError("--models: give at least one LoRA file")
    if ratios is not None and len(ratios) != len(paths):
        raise UserError(f"--ratios: {len(ratios)} values for {len(paths)} models; give one ratio per model")
    ratios = ratios if ratios is not None else [1.0] * len(paths)
    inputs = []
    for path, ratio, weights in zip(paths, ratios, parse_block_weights(lbws, len(paths))):
        state_dict, metadata = read_lora(path)
        modules, other = require_modules(state_dict, str(path))
        if other:
            logger.warning("%s: %d tensors that are no LoRA module are ignored (e.g. %s)", path, len(other), next(iter(other)))
        inputs.append(LoraInput(str(path), as_kohya(modules), metadata, float(ratio), weights))
    return inputs


def module_terms(inputs: list[LoraInput]) -> dict[str, list[tuple[LoraFactors, float]]]:
    """{module name: [(factors, multiplier), ...]} over all inputs, shapes conformed to the first file's."""
    terms: dict[str, list[tuple[LoraFactors, float]]] = {}
    for item in inputs:
        for name, module in item.modules.items():
            existing = terms.setdefault(name, [])
            if existing:
                module = conform_shape(module, existing[0][0])
            existing.append((module, item.multiplier(name)))
    return terms


# ---------------------------------------------------------------------- LoRAs into one LoRA


def merge_loras_concat(inputs: list[LoraInput], shuffle: bool = False, seed: int = 0) -> dict[str, LoraFactors]:
    """Σ ratio·ΔW exactly: each module's ranks stacked (rank = Σ ranks of the inputs that have it)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    terms = module_terms(inputs)
    return {name: concat(t, name, generator) for name, t in tqdm(terms.items(), desc="concatenating", unit="module")}


def merge_loras_svd(inputs: list[LoraInput], new_rank: int | None, new_conv_rank: int | None = None,
                    device=None, clamp_quantile: float | None = None, keep_scale: bool = False,
                    ) -> tuple[dict[str, LoraFactors], dict[str, Retained]]:  # fmt: skip
    """Σ ratio·ΔW re-factored per module to its best approximation of rank `new_rank` (3×3: `new_conv_rank`).

    A rank of None keeps each module at the largest rank it has among the inputs. With `keep_scale` the
    alpha of the module's first input is kept (the file looks like its inputs), else alpha = the requested
    rank; either way one alpha per kind of module, which diffusers needs (see factors.concat).
    """
    terms = module_terms(inputs)
    modules, report = {}, {}
    for name, module_list in tqdm(terms.items(), desc="merging by SVD", unit="module"):
        first = module_list[0][0]
        rank = new_conv_rank if first.is_3x3 else new_rank
        if rank is None:
            rank = max(m.rank for m, _ in module_list)
        merged, kept = refactor(
            module_list, name, rank, device=device, clamp_quantile=clamp_quantile,
            alpha=float(first.alpha or first.rank) if keep_scale else float(rank),
        )  # fmt: skip
        merged.style = KOHYA_STYLE
        modules[name], report[name] = merged, kept
    return modules, report


# ---------------------------------------------------------------------- LoRAs into a model


def lora_sites(parts) -> dict[str, torch.nn.Module]:
    """{sd-scripts module name: layer} for every layer a LoRA/LoCon file can name (3×3 convs included)."""
    sites = targets.unet_sites(parts.unet, include_conv=True) + targets.text_encoder_sites(parts.text_encoder)
    return {site.name: site.module for site in sites}


def merge_into_parts(parts, inputs: list[LoraInput], precision: str = "float", device=None) -> int:
    """W ← W + Σ ratio·ΔW for every module of every input, in place; returns the number of layers changed.

    Each sum is computed in `precision` (fp32 for "float") on `device`, then stored in the weight's dtype.
    """
    sites = lora_sites(parts)
    dtype = dtype_of(precision, torch.float32)
    changed, unmatched = set(), []
    for item in inputs:
        for name, module in tqdm(item.modules.items(), desc=f"merging {Path(item.path).name}", unit="module"):
            layer = sites.get(name)
            if layer is None:
                unmatched.append(name)
                continue
            weight = layer.weight
            delta = module.delta(item.multiplier(name), device=device)
            if delta.numel() != weight.numel():
                raise UserError(
                    f"{item.path}: module {name} has a ΔW of shape {tuple(delta.shape)} but the model's layer is "
                    f"{tuple(weight.shape)}: the LoRA was trained on another architecture (SD1 vs SD2?)"
                )
            with torch.no_grad():
                new = weight.to(device, dtype) + delta.reshape(weight.shape).to(dtype)
                weight.copy_(new.to(weight.device, weight.dtype))
            changed.add(name)
        missing = [n for n in item.modules if n not in sites]
        if missing and len(missing) == len(item.modules):
            raise UserError(
                f"{item.path}: none of its {len(missing)} modules matches a layer of this model (e.g. {missing[0]}); "
                "is it a LoRA for another architecture (SDXL, SD3, FLUX)?"
            )
    if unmatched:
        logger.warning("%d LoRA modules match no layer of the model and were skipped, e.g. %s", len(unmatched), unmatched[0])
    logger.info("merged into %d layers", len(changed))
    return len(changed)


def detect_v2(path: str | os.PathLike, v2: bool) -> bool:
    """--v2 for a single file: read from its keys when it is a .safetensors (no tensor is loaded)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        from library.models.ldm_conversion import is_v2_ldm

        with safe_open(str(path), framework="pt") as f:
            found = is_v2_ldm(dict.fromkeys(f.keys()))
        if found != v2:
            logger.info("%s is an SD%s checkpoint; using that (--v2 %s)", path, 2 if found else 1, "set" if v2 else "not set")
        return found
    return v2


def load_model(path: str, v2: bool, v_parameterization: bool, precision: str = "float"):
    from library.models.loading import load_base_model

    v2 = detect_v2(path, v2)
    return load_base_model(path, v2=v2, v_parameterization=v_parameterization, dtype=dtype_of(precision, torch.float32))


def save_model(parts, source: str, save_to: str, save_precision: str | None, metadata: dict | None = None) -> Path:
    """An LDM single file when `save_to` ends in .safetensors/.ckpt, else a diffusers folder (safetensors).

    Keys of a single-file source that the model does not hold (EMA weights, SD2's unused last text block,
    buffers) are carried over into a single-file output, read one by one.
    """
    from library.models.modelspec import build_modelspec
    from library.models.saving import ldm_state_dict, save_diffusers_folder, save_single_file

    out = Path(save_to)
    if out.suffix.lower() not in (".safetensors", ".ckpt"):
        save_diffusers_folder(out, parts, precision=save_precision, safe_serialization=True)
        return out
    extra = {}
    if Path(source).is_file():
        produced = set(ldm_state_dict(parts.unet, parts.vae, parts.text_encoder, parts.v2))
        extra = _source_tensors_except(Path(source), produced)
    if metadata is None:
        metadata = build_modelspec(v2=parts.v2, v_parameterization=parts.v_parameterization)
    save_single_file(out, parts.unet, parts.vae, parts.text_encoder, v2=parts.v2, precision=save_precision,
                     metadata=metadata, source_state_dict=extra)  # fmt: skip
    return out


def _source_tensors_except(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in keys}
    from library.models.checkpoint_io import read_state_dict

    return {k: v for k, v in read_state_dict(path).items() if k not in keys}
