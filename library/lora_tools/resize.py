"""Resizing a LoRA: each module's ΔW truncated to its best approximation at a fixed or rule-given rank.

The stored alpha keeps each module's scale alpha/r (new alpha = old alpha/old r · new r), so the
effective weight is the truncation itself and a module already at or under the rank is unchanged.
Module names and key style (sd-scripts, PEFT, ControlLoRA) are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from library.errors import UserError
from library.lora_tools.factors import DYNAMIC_METHODS, LoraFactors, Retained, refactor, require_modules

logger = logging.getLogger(__name__)


@dataclass
class ResizeResult:
    modules: dict[str, LoraFactors]
    other: dict  # tensors that are no LoRA module, kept as they were
    report: dict[str, Retained]
    old_ranks: dict[str, int]

    def summary(self) -> str:
        fro = [r.fro for r in self.report.values()]
        lowest = min(self.report.items(), key=lambda kv: kv[1].fro)
        ranks = sorted({r.rank for r in self.report.values()})
        return (
            f"{len(fro)} modules, new ranks {ranks[0]}..{ranks[-1]}; Frobenius norm retained: mean {sum(fro) / len(fro):.2%}, "
            f"lowest {lowest[1].fro:.2%} ({lowest[0]})"
        )


def resize_lora(state_dict: dict, new_rank: int = 4, new_conv_rank: int | None = None,
                dynamic_method: str | None = None, dynamic_param: float | None = None,
                device=None, source: str = "LoRA") -> ResizeResult:  # fmt: skip
    """Resize every module of a LoRA state dict (any key style). `new_rank` is the rank (or, with a dynamic
    method, the most a module may keep); 3×3 modules use `new_conv_rank` (default: `new_rank`)."""
    if dynamic_method is not None and dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}")
    if dynamic_method and dynamic_param is None:
        raise UserError(f"--dynamic_method {dynamic_method} needs --dynamic_param")
    if new_rank is not None and new_rank < 1:
        raise UserError("--new_rank must be at least 1")
    new_conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    modules, other = require_modules(state_dict, source)
    out, report, old = {}, {}, {}
    for name, module in tqdm(modules.items(), desc="resizing", unit="module"):
        rank = new_conv_rank if module.is_3x3 else new_rank
        # Fixed rank: alpha rescaled with the rank (alpha/rank kept, as sd-scripts does). Dynamic: the alpha is
        # kept and the factors absorb the change of rank, so a file with one alpha keeps one alpha (diffusers
        # 0.42 ignores per-module alphas of attention layers that differ from the most common one).
        alpha = (lambda r, s=module.scale: s * r) if dynamic_method is None else float(module.alpha or module.rank)
        if module.alpha is None:  # PEFT files carry no alpha (scale 1): keep it that way
            alpha = None
        resized, kept = refactor([(module, 1.0)], name, rank, dynamic_method, dynamic_param, alpha=alpha, device=device)
        resized.extra = dict(module.extra)
        if module.alpha is None:
            resized.alpha = None
        out[name], report[name], old[name] = resized, kept, module.rank
    return ResizeResult(out, other, report, old)


def report_lines(result: ResizeResult) -> list[str]:
    """One line per module: name, old -> new rank, alpha, Frobenius and Σs share kept, s_max / s_min kept."""
    lines = []
    for name, kept in result.report.items():
        module = result.modules[name]
        lines.append(
            f"{name:75} | rank {result.old_ranks[name]} -> {kept.rank}, alpha {module.alpha or module.rank:g} | "
            f"fro retained {kept.fro:.1%}, sum(S) retained {kept.sum:.1%}, max(S) ratio {kept.max_ratio:.1f}"
        )
    return lines
