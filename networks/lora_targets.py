"""Which Linear/Conv2d layers of an SD1/SD2 U-Net and CLIP text encoder get a LoRA, and their kohya key names.

Kept apart from the network so the rules (reference/formats.md §1.2-1.4) can be read, tested and
counted on meta-device models without building any LoRA weights. Target lists are tuples built
per call: upstream extends a class-level list in place, so one conv-LoRA in a process silently
changes every later network (formats.md §10 #1).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"
UNET_CONTAINERS = ("Transformer2DModel",)
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers 4.x also had CLIPSdpaAttention / CLIPFlashAttention2 subclasses.
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

NUM_BLOCKS = 12  # down (and up) blocks in LDM numbering: input_blocks 1..11 (+1 unused), output_blocks 0..11
NUM_BLOCK_VALUES = 2 * NUM_BLOCKS + 1  # 25 values: 12 down + mid + 12 up
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class LoraSite:
    """One layer that can carry a LoRA: its kohya name and the layer itself."""

    name: str
    module: torch.nn.Module

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, torch.nn.Conv2d)

    @property
    def is_3x3(self) -> bool:
        """Convs bigger than 1x1 use conv_dim/conv_alpha; Linear and 1x1 convs use network_dim/alpha."""
        return self.is_conv and tuple(self.module.kernel_size) != (1, 1)


def find_sites(root: torch.nn.Module | None, prefix: str, containers: tuple[str, ...]) -> list[LoraSite]:
    """Every Linear/Conv2d inside a module whose class name is in `containers`, named the kohya way."""
    if root is None:
        return []
    sites, seen = [], set()
    for path, container in root.named_modules():
        if type(container).__name__ not in containers:
            continue
        for child_path, child in container.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            full = ".".join(p for p in (path, child_path) if p)
            if prefix == PREFIX_TEXT_ENCODER and full.startswith("encoder."):
                # transformers >= 5 dropped the `text_model` wrapper; files always use the 4.x names.
                full = "text_model." + full
            name = f"{prefix}.{full}".replace(".", "_")
            if name not in seen:
                seen.add(name)
                sites.append(LoraSite(name, child))
    return sites


def unet_sites(unet: torch.nn.Module | None, include_conv: bool) -> list[LoraSite]:
    containers = UNET_CONTAINERS + (UNET_CONV_CONTAINERS if include_conv else ())
    return find_sites(unet, PREFIX_UNET, containers)


def text_encoder_sites(text_encoder: torch.nn.Module | None) -> list[LoraSite]:
    return find_sites(text_encoder, PREFIX_TEXT_ENCODER, TEXT_ENCODER_CONTAINERS)


def count_lora_modules(unet, text_encoder, conv_dim: int | None = None) -> tuple[int, int]:
    """(U-Net sites, text-encoder sites) a default network would get; works on meta-device models."""
    return len(unet_sites(unet, include_conv=bool(conv_dim))), len(text_encoder_sites(text_encoder))


def block_index(lora_name: str) -> int:
    """LDM block number (0-24) of a U-Net LoRA name: 1-11 down, 12 mid, 13-24 up; -1 if none (upstream's rule)."""
    match = _RE_UPDOWN.search(lora_name)
    if match:
        kind, i, part, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
        return 1 + idx if kind == "down" else NUM_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return NUM_BLOCKS
    return -1


# ------------------------------------------------------------------ block-wise dims and learning rates


def parse_number_list(key: str, text: str, kind: type, length: int | None = NUM_BLOCK_VALUES) -> list:
    """'4,4,8' -> [4, 4, 8]; empty items count as 0 (upstream accepts '1,,1' for lr weights)."""
    try:
        values = [kind(item) if item.strip() else kind(0) for item in str(text).split(",")]
    except ValueError:
        raise ValueError(f"network_args {key}={text}: expected comma-separated {kind.__name__} values") from None
    if length is not None and len(values) != length:
        raise ValueError(
            f"network_args {key}: needs {length} values (12 down blocks, mid, 12 up blocks), got {len(values)}"
        )
    return values


def block_dims_and_alphas(kwargs: dict, network_dim: int, network_alpha: float, conv_dim, conv_alpha):
    """(block_dims, block_alphas, conv_block_dims, conv_block_alphas), 25 values each (conv ones may be None)."""
    dims = kwargs.get("block_dims")
    dims = parse_number_list("block_dims", dims, int) if dims is not None else [network_dim] * NUM_BLOCK_VALUES
    alphas = kwargs.get("block_alphas")
    alphas = (
        parse_number_list("block_alphas", alphas, float) if alphas is not None else [network_alpha] * NUM_BLOCK_VALUES
    )
    conv_dims, conv_alphas = kwargs.get("conv_block_dims"), kwargs.get("conv_block_alphas")
    if conv_dims is not None:
        conv_dims = parse_number_list("conv_block_dims", conv_dims, int)
        default_alpha = 1.0 if conv_alpha is None else conv_alpha
        conv_alphas = (
            parse_number_list("conv_block_alphas", conv_alphas, float)
            if conv_alphas is not None
            else [default_alpha] * NUM_BLOCK_VALUES
        )
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * NUM_BLOCK_VALUES, [conv_alpha] * NUM_BLOCK_VALUES
    else:
        conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas


def _preset_weights(key: str, spec: str) -> list[float]:
    """'cosine', 'sine', 'linear', 'reverse_linear', 'zeros', optionally '+<base>' (e.g. 'sine+0.5')."""
    name, _, base = spec.partition("+")
    try:
        base = float(base) if base else 0.0
    except ValueError:
        raise ValueError(f"network_args {key}={spec}: '+' must be followed by a number") from None
    n = NUM_BLOCKS
    ramp = [i / (n - 1) for i in range(n)]
    curves = {
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * n,
    }
    if name not in curves:
        raise ValueError(f"network_args {key}={spec}: expected numbers or one of {', '.join(LR_WEIGHT_PRESETS)}")
    return [v + base for v in curves[name]]


def _looks_numeric(spec: str) -> bool:
    return all(c in "0123456789.,-+eE " for c in spec)


def _lr_weight_list(key: str, spec: str | None, length: int, threshold: float) -> list[float]:
    if spec is None:
        return [1.0] * length  # not given: the block trains at the full rate, whatever the threshold
    spec = str(spec).strip()
    if length == NUM_BLOCKS and spec.split("+")[0] in LR_WEIGHT_PRESETS:
        values = _preset_weights(key, spec)
    elif length == NUM_BLOCKS and not _looks_numeric(spec):
        raise ValueError(f"network_args {key}={spec}: expected numbers or one of {', '.join(LR_WEIGHT_PRESETS)}")
    else:
        values = parse_number_list(key, spec, float, length=None)
    if len(values) > length:
        logger.warning("network_args %s has %d values; only the first %d are used", key, len(values), length)
    values = (values + [1.0] * length)[:length]  # missing values count as 1, like upstream
    return [v if v > threshold else 0.0 for v in values]


def block_lr_weights(kwargs: dict) -> list[float] | None:
    """25 learning-rate factors from down_lr_weight / mid_lr_weight / up_lr_weight, or None when none is given.

    Factors at or below block_lr_zero_threshold become 0 (those blocks get no LoRA at all).
    """
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if all(kwargs.get(k) is None for k in keys):
        return None
    try:
        threshold = float(kwargs.get("block_lr_zero_threshold") or 0.0)
    except ValueError:
        raise ValueError(
            f"network_args block_lr_zero_threshold={kwargs['block_lr_zero_threshold']}: expected a number"
        ) from None
    return (
        _lr_weight_list("down_lr_weight", kwargs.get("down_lr_weight"), NUM_BLOCKS, threshold)
        + _lr_weight_list("mid_lr_weight", kwargs.get("mid_lr_weight"), 1, threshold)
        + _lr_weight_list("up_lr_weight", kwargs.get("up_lr_weight"), NUM_BLOCKS, threshold)
    )
