"""--fp8_base / --fp8_base_unet: frozen base weights stored in float8_e4m3fn, computed in the
--mixed_precision dtype.

Every frozen Linear / Conv2d weight (nearly all of a U-Net's or text encoder's bytes) is stored in
fp8 and read through a parametrization that casts it to the compute dtype on each use. Reading
through `module.weight` (rather than replacing `forward`) keeps every wrapper working: LoRA modules
that reroute a layer's forward, gradient checkpointing and torch.compile all see an ordinary weight
tensor of the compute dtype. Biases, norms and embeddings stay in the compute dtype (they are small).
sd-scripts casts the whole module to fp8 and relies on CUDA autocast to cast back; this works the
same on every device (CPU autocast does not take fp8 weights).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.utils import parametrize

FP8 = torch.float8_e4m3fn


class ComputeIn(torch.nn.Module):
    """Parametrization: the stored (fp8) weight, cast to the compute dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the frozen Linear/Conv2d weights of `module` in fp8; returns how many were converted.
    Weights that train (requires_grad) are left alone."""
    converted = 0
    for layer in list(module.modules()):
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or parametrize.is_parametrized(layer, "weight"):
            continue
        weight = layer.weight
        if weight.requires_grad:
            continue
        layer.weight = torch.nn.Parameter(weight.detach().to(FP8), requires_grad=False)
        parametrize.register_parametrization(layer, "weight", ComputeIn(compute_dtype), unsafe=True)
        converted += 1
    return converted


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters occupy as stored (fp8 originals count one byte per value)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def apply_fp8_base(args: argparse.Namespace, parts, attached, compute_dtype: torch.dtype, log=print) -> None:
    """The trainer's step for --fp8_base / --fp8_base_unet, after the models are in place: the U-Net
    (and, with --fp8_base, the text encoder) when their own weights do not train."""
    fp8_unet = getattr(args, "fp8_base_unet", False)
    if not (getattr(args, "fp8_base", False) or fp8_unet):
        return
    targets = [("U-Net", parts.unet, attached.unet_weights_train)]
    if not fp8_unet:
        targets.append(("text encoder", parts.text_encoder, attached.text_encoder_weights_train))
    for name, module, trains in targets:
        if trains:
            log(f"fp8 base: the {name}'s own weights train, so they stay in {str(compute_dtype).replace('torch.', '')}")
            continue
        before = parameter_bytes(module)
        count = store_in_fp8(module, compute_dtype)
        after = parameter_bytes(module)
        log(f"fp8 base: {count} {name} weights stored as float8_e4m3fn: {name} parameters "
            f"{after / 2**20:.2f} MiB (were {before / 2**20:.2f} MiB)")
