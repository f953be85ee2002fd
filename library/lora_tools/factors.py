"""The arithmetic of LoRA files, in one place: modules of every key style, ΔW, SVDs, ranks, re-factoring.

A module holds `down` ([r, in] or [r, in, kh, kw]), `up` ([out, r] or [out, r, 1, 1]) and `alpha`; its
effective weight change at multiplier m is ΔW = m · (alpha / r) · up @ down (formats.md §1.5), where a
3×3 `down` is a conv kernel per rank and `up` mixes the ranks (ΔW[o, i, k, l] = Σ_r up[o, r] down[r, i, k, l]).

Every SVD of a LoRA-shaped product goes through `lowrank_svd`, which factors `up @ down` through two QR
decompositions and an SVD of an r×r core: exact, and the full out×in matrix is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from library.errors import UserError
from networks.lora import lora_delta

# (down suffix, up suffix): sd-scripts, PEFT / diffusers, diffusers' old attention processors, ControlLoRA.
KEY_STYLES = (
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_B.weight"),
    ("lora.down.weight", "lora.up.weight"),
    ("down.weight", "up.weight"),
    ("lora_down", "lora_up"),
    ("lora_A", "lora_B"),
    ("down", "up"),
)
KOHYA_STYLE = KEY_STYLES[0]
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # a ΔW whose largest singular value is below this is treated as zero


class NotALoRAError(UserError, ValueError):
    """A file with no LoRA modules in it (a checkpoint, a LoHa/OFT file, an embedding)."""


@dataclass
class LoraFactors:
    """One module of a LoRA file. `alpha` None: the file has none (PEFT), i.e. scale 1."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    style: tuple[str, str] = KOHYA_STYLE
    extra: dict = field(default_factory=dict)  # other tensors of the module (dora_scale, ...)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_3x3(self) -> bool:
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the layer's weight as this file sees it ([out, in] or [out, in, kh, kw])."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, multiplier: float = 1.0, device=None) -> torch.Tensor:
        """ΔW = multiplier · alpha/r · up·down, fp32, shaped like the layer's weight."""
        down, up = self.down.to(device), self.up.to(device)
        return lora_delta(down, up, self.scale * multiplier, self.weight_shape)

    def state_dict(self, style: tuple[str, str] | None = None) -> dict[str, torch.Tensor]:
        down_key, up_key = style or self.style
        sd = {f"{self.name}.{down_key}": self.down, f"{self.name}.{up_key}": self.up}
        if self.alpha is not None:
            sd[f"{self.name}.alpha"] = torch.tensor(float(self.alpha))
        sd.update({f"{self.name}.{k}": v for k, v in self.extra.items()})
        return sd


def split_modules(state_dict: dict) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """({module name: LoraFactors}, {key: tensor} of everything else) for a LoRA state dict of any key style."""
    modules: dict[str, LoraFactors] = {}
    used: set[str] = set()
    for key in state_dict:
        for down_suffix, up_suffix in KEY_STYLES:
            if not key.endswith("." + down_suffix):
                continue
            name = key[: -len(down_suffix) - 1]
            up_key = f"{name}.{up_suffix}"
            if up_key not in state_dict or name in modules:
                continue
            alpha = state_dict.get(f"{name}.alpha")
            modules[name] = LoraFactors(
                name, state_dict[key], state_dict[up_key],
                None if alpha is None else (float(alpha) or None), (down_suffix, up_suffix),
            )  # fmt: skip
            used.update((key, up_key, f"{name}.alpha"))
            break
    for key, value in state_dict.items():  # per-module extras such as dora_scale stay with their module
        if key in used:
            continue
        name, _, leaf = key.rpartition(".")
        if name in modules and "." not in leaf:
            modules[name].extra[leaf] = value
            used.add(key)
    return modules, {k: v for k, v in state_dict.items() if k not in used}


def require_modules(state_dict: dict, source: str) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    modules, other = split_modules(state_dict)
    if not modules:
        sample = ", ".join(list(state_dict)[:3]) or "no tensors"
        raise NotALoRAError(
            f"{source}: no LoRA modules found (keys such as {sample}); expected lora_down/lora_up (sd-scripts), "
            "lora_A/lora_B (PEFT/diffusers) or down/up (ControlLoRA) pairs. LoHa, LoKr and OFT files are not LoRAs."
        )
    return modules, other


def kohya_name(name: str) -> str:
    """The sd-scripts module name of a module named in any style (`unet.down_blocks.0...to_q` -> `lora_unet_...`)."""
    if name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return name
    for prefix in ("base_model.model.", "transformer."):
        name = name.removeprefix(prefix)
    if name.startswith("unet."):
        return "lora_unet_" + name[len("unet.") :].replace(".", "_")
    if name.startswith(("text_encoder.", "te.")):
        path = name.split(".", 1)[1]
        return "lora_te_" + ("" if path.startswith("text_model.") else "text_model_") + path.replace(".", "_")
    if name.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
        return "lora_unet_" + name.replace(".", "_")
    if name.startswith(("text_model.", "encoder.layers.")):
        return "lora_te_" + ("" if name.startswith("text_model.") else "text_model_") + name.replace(".", "_")
    return name.replace(".", "_")


def as_kohya(modules: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    out = {}
    for module in modules.values():
        name = kohya_name(module.name)
        out[name] = LoraFactors(name, module.down, module.up, module.alpha, KOHYA_STYLE, dict(module.extra))
    return out


# ---------------------------------------------------------------------- SVD


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of up @ down for up [out, R], down [R, n]: U [out, k], S [k], Vh [k, n], k = min(out, R, n).

    QR of both factors, then an SVD of the small core R_up @ R_down^T. Exact (no truncation), fp32 or better,
    and never builds the out×n product.
    """
    dtype = torch.float64 if up.dtype == torch.float64 else torch.float32
    q_up, r_up = torch.linalg.qr(up.to(dtype))
    q_down, r_down = torch.linalg.qr(down.to(dtype).T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def full_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a dense matrix ([out, in] or a conv weight flattened to [out, in·kh·kw]), fp32."""
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    return torch.linalg.svd(matrix.flatten(1).to(dtype), full_matrices=False)


def dynamic_rank(s: torch.Tensor, method: str | None, param: float | None, max_rank: int) -> int:
    """The rank a rule gives for singular values `s` (descending), capped to [1, max_rank].

    - None: max_rank.
    - sv_ratio t: the singular values within a factor t of the largest, i.e. count(s_i ≥ s_0 / t).
    - sv_cumulative t: the smallest k with Σ_{i<k} s_i ≥ t · Σ s_i.
    - sv_fro t: the smallest k with sqrt(Σ_{i<k} s_i²) ≥ t · ‖s‖₂ (Frobenius norm kept).
    A zero matrix (s_0 ≤ MIN_SV) gets rank 1 (a module cannot have rank 0 and stay in the file).
    """
    s = s.detach().double().cpu()
    max_rank = max(1, min(int(max_rank), s.numel()))
    if s.numel() == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method is None:
        return max_rank
    if param is None:
        raise ValueError(f"--dynamic_method {method} needs --dynamic_param")
    tol = 1e-9
    if method == "sv_ratio":
        k = int((s * param >= s[0] * (1 - tol)).sum())
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(s, 0) / s.sum()
        k = int((cumulative < param - tol).sum()) + 1
    elif method == "sv_fro":
        cumulative = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
        k = int((cumulative < param - tol).sum()) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}; one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(k, max_rank))


@dataclass(frozen=True)
class Retained:
    """How much of a ΔW a truncation to `rank` keeps: Frobenius norm share and Σs share, and s_0 / s_{rank-1}."""

    rank: int
    fro: float
    sum: float
    max_ratio: float


def retained(s: torch.Tensor, rank: int) -> Retained:
    s = s.detach().double().cpu()
    total_sq, total = float((s * s).sum()), float(s.sum())
    if total <= 0 or float(s[0]) <= MIN_SV:  # a numerically zero ΔW: nothing to lose
        return Retained(rank, 1.0, 1.0, 1.0)
    kept = s[:rank]
    smallest = float(kept[-1]) if kept.numel() else 0.0
    return Retained(
        rank, math.sqrt(float((kept * kept).sum()) / total_sq), float(kept.sum()) / total,
        float(s[0]) / smallest if smallest > 0 else math.inf,
    )  # fmt: skip


def factors_from_svd(u, s, vh, rank: int, weight_shape, scale: float = 1.0):
    """(down, up) whose product · scale is the rank-`rank` truncation U_r S_r Vh_r, reshaped for the layer.

    √S goes to both factors (balanced magnitudes: better in fp16/bf16 and for further training).
    """
    root = torch.sqrt(s[:rank].clamp(min=0) / scale)
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    out_dim = weight_shape[0]
    if len(weight_shape) == 4:
        down = down.reshape(rank, *weight_shape[1:])
        up = up.reshape(out_dim, rank, 1, 1)
    return down.float().contiguous(), up.float().contiguous()


def clamp_factors(down: torch.Tensor, up: torch.Tensor, quantile: float | None):
    """Clamp both factors' entries to ±(the `quantile` of |entries| of both); None or ≥ 1 leaves them as they are."""
    if quantile is None or quantile >= 1:
        return down, up
    values = torch.cat([down.flatten(), up.flatten()]).abs().float()
    if values.numel() > 16_000_000:  # torch.quantile's limit: sample evenly
        values = values[:: values.numel() // 16_000_000 + 1]
    limit = float(torch.quantile(values, quantile))
    return down.clamp(-limit, limit), up.clamp(-limit, limit)


def product_factors(terms: list[tuple[LoraFactors, float]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, R], down [R, n]) with up @ down = Σ multiplier · ΔW of the terms (concatenated ranks; exact)."""
    ups, downs = [], []
    first = terms[0][0]
    for module, multiplier in terms:
        ups.append(module.up.to(device).float().flatten(1) * (module.scale * multiplier))
        downs.append(module.down.to(device).float().reshape(module.rank, -1))
        if downs[-1].shape[1] != first.down[0].numel() or ups[-1].shape[0] != first.up.shape[0]:
            raise ValueError(
                f"{module.name}: shapes {tuple(module.down.shape)}/{tuple(module.up.shape)} do not match "
                f"{tuple(first.down.shape)}/{tuple(first.up.shape)} of the same module in another file"
            )
    return torch.cat(ups, 1), torch.cat(downs, 0)


def refactor(module_terms: list[tuple[LoraFactors, float]], name: str, rank: int | None,
             method: str | None = None, param: float | None = None, alpha=None,
             device=None, clamp_quantile: float | None = None) -> tuple[LoraFactors, Retained]:  # fmt: skip
    """One LoraFactors approximating Σ multiplier·ΔW of `module_terms` by SVD at `rank` (or a dynamic rule).

    `rank` None keeps the exact rank of the sum. The stored alpha is `alpha(new rank)` when `alpha` is
    callable, `alpha` when it is a number, else the new rank; the factors absorb alpha/rank, so the
    effective weight is the best approximation of the sum at the new rank (Eckart-Young) whatever the
    alpha. `Retained` says how much of the sum is kept.
    """
    first = module_terms[0][0]
    up, down = product_factors(module_terms, device)
    u, s, vh = lowrank_svd(up, down)
    if rank is None and method is None:  # exact: drop only numerically zero directions
        new_rank = max(1, int((s > s[0] * 1e-7).sum())) if s.numel() and float(s[0]) > 0 else 1
    else:
        new_rank = dynamic_rank(s, method, param, s.numel() if rank is None else min(rank, s.numel()))
    alpha = float(alpha(new_rank) if callable(alpha) else (new_rank if alpha is None else alpha))
    new_down, new_up = factors_from_svd(u, s, vh, new_rank, first.weight_shape, alpha / new_rank)
    new_down, new_up = clamp_factors(new_down, new_up, clamp_quantile)
    return LoraFactors(name, new_down.cpu(), new_up.cpu(), alpha, first.style), retained(s, new_rank)


def concat(module_terms: list[tuple[LoraFactors, float]], name: str, shuffle_generator=None) -> LoraFactors:
    """The exact sum Σ multiplier·ΔW as one module of rank R = Σ r (ranks stacked).

    The alpha is the first term's (so a file whose inputs share one alpha keeps one alpha: diffusers 0.42
    drops per-module alphas of attention layers that differ from the most common one); up absorbs R/alpha.
    """
    first = module_terms[0][0]
    up, down = product_factors(module_terms)
    rank = up.shape[1]
    alpha = float(first.alpha or first.rank)
    up = up * (rank / alpha)
    if shuffle_generator is not None:  # upstream's --shuffle: a permutation of the ranks changes nothing in ΔW
        order = torch.randperm(rank, generator=shuffle_generator)
        up, down = up[:, order], down[order]
    if first.is_conv:
        down = down.reshape(rank, *first.down.shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LoraFactors(name, down.contiguous(), up.contiguous(), alpha, KOHYA_STYLE)


def conform_shape(module: LoraFactors, like: LoraFactors) -> LoraFactors:
    """SD2 proj_in/proj_out may be Linear in one file and 1×1 conv in another: reshape to `like`'s form."""
    if module.down.dim() == like.down.dim():
        return module
    down = module.down.reshape(module.rank, *like.down.shape[1:])
    up = module.up.reshape(module.up.shape[0], module.rank, *like.up.shape[2:])
    return LoraFactors(module.name, down, up, module.alpha, module.style, dict(module.extra))
