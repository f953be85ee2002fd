"""Extracting a LoRA from two models: per layer, the best rank-`dim` approximation of (tuned − original).

Usable as a function (`extract_lora`) as well as through networks/extract_lora_from_models.py; nothing
reads global options. The text encoder is kept whenever it changed: its largest |ΔW| is compared with a
threshold that is 0 for full-precision files (any change is real) and the rounding step of the coarser
stored precision otherwise; `--min_diff` sets it by hand. The decision and the threshold are reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from library.lora_tools.factors import (
    KOHYA_STYLE,
    LoraFactors,
    Retained,
    clamp_factors,
    factors_from_svd,
    full_svd,
    retained,
)
from library.lora_tools.merge import load_model
from networks import lora_targets as targets

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    modules: dict[str, LoraFactors]
    report: dict[str, Retained]
    text_encoder_max_diff: float
    text_encoder_threshold: float
    text_encoder_kept: bool
    v2: bool
    v_parameterization: bool
    notes: list[str] = field(default_factory=list)


def stored_text_encoder_dtype(path: str) -> torch.dtype | None:
    """The dtype a model keeps its text-encoder weights in (safetensors single files and diffusers folders)."""
    from safetensors import safe_open

    path = Path(path)
    candidates = [path] if path.is_file() else [path / "text_encoder" / "model.safetensors"]
    for file in candidates:
        if not (file.is_file() and file.suffix == ".safetensors"):
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if ("cond_stage_model" in key or path.is_dir()) and key.endswith("weight"):
                    return _DTYPES.get(f.get_slice(key).get_dtype())
    return None


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def auto_threshold(dtypes: list[torch.dtype | None], weight_max: float) -> tuple[float, str]:
    """0 when both models are stored in fp32 (or unknown: assumed fp32); else half the rounding step of the
    coarser stored precision at the largest weight, the most that saving the same weights could change them."""
    halves = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    if not halves:
        return 0.0, "both models are stored in full precision, so any difference is a change"
    eps = max(torch.finfo(d).eps for d in halves)
    return eps * weight_max, f"rounding step of {', '.join(sorted({str(d).removeprefix('torch.') for d in halves}))} storage"


@torch.no_grad()
def extract_lora(model_org: str, model_tuned: str, dim: int = 4, conv_dim: int | None = None, *,
                 v2: bool = False, v_parameterization: bool | None = None, device=None,
                 clamp_quantile: float | None = 0.99, min_diff: float | None = None,
                 load_precision: str | None = None) -> ExtractResult:  # fmt: skip
    """A LoRA (alpha = rank) approximating tuned − original for every LoRA layer (3×3 convs with `conv_dim`)."""
    v_param = bool(v2 if v_parameterization is None else v_parameterization)
    logger.info("loading the original model %s", model_org)
    org = load_model(model_org, v2, v_param, load_precision or "float")
    logger.info("loading the tuned model %s", model_tuned)
    tuned = load_model(model_tuned, org.v2, v_param, load_precision or "float")
    with_conv = conv_dim is not None and conv_dim > 0
    unet_pairs = zip(targets.unet_sites(org.unet, with_conv), targets.unet_sites(tuned.unet, with_conv))
    text_pairs = list(zip(targets.text_encoder_sites(org.text_encoder), targets.text_encoder_sites(tuned.text_encoder)))

    # Is the text encoder changed? Decided before any SVD, over all its layers.
    te_max, te_weight_max = 0.0, 0.0
    for a, b in text_pairs:
        te_max = max(te_max, float((b.module.weight.float() - a.module.weight.float()).abs().max()))
        te_weight_max = max(te_weight_max, float(a.module.weight.float().abs().max()))
    if min_diff is None:
        threshold, why = auto_threshold([stored_text_encoder_dtype(model_org), stored_text_encoder_dtype(model_tuned)],
                                        te_weight_max)  # fmt: skip
    else:
        threshold, why = float(min_diff), "--min_diff"
    te_kept = te_max > threshold
    logger.info(
        "text encoder: largest |ΔW| %.3g, threshold %.3g (%s): %s", te_max, threshold, why,
        "changed, extracted" if te_kept else "unchanged, left out",
    )  # fmt: skip

    modules, report = {}, {}
    pairs = list(unet_pairs) + (text_pairs if te_kept else [])
    for a, b in tqdm(pairs, desc="extracting", unit="module"):
        weight_a, weight_b = a.module.weight, b.module.weight
        diff = weight_b.detach().to(device, torch.float32) - weight_a.detach().to(device, torch.float32)
        alpha = conv_dim if a.is_3x3 else dim  # one alpha per kind of module, even where the rank is capped
        u, s, vh = full_svd(diff)
        rank = max(1, min(alpha, s.numel()))
        down, up = factors_from_svd(u, s, vh, rank, tuple(diff.shape), alpha / rank)
        down, up = clamp_factors(down, up, clamp_quantile)
        modules[a.name] = LoraFactors(a.name, down.cpu(), up.cpu(), float(alpha), KOHYA_STYLE)
        report[a.name] = retained(s, rank)
        del diff, u, s, vh
    return ExtractResult(modules, report, te_max, threshold, te_kept, org.v2, v_param)
