"""Faster CPU path for the U-Net's large 3x3 convolutions at few positions.

At batch 1 the SD U-Net's inner levels apply 1280x1280 (and 2560/1920x1280) 3x3 convolutions to
4-256 positions. torch sends most of them to oneDNN, which re-lays out the whole weight (59-118 MB)
on every call, forward and backward: a 1280x1280 convolution at 8x8 takes 3x as long as the same
work as one matrix product over the unfolded input (`bench/bench_cpu_convolutions.py` measures
each shape). Those convolutions are weight-bound, so the product, which reads each weight once, is
what the hardware allows; in bf16 (autocast or bf16 weights) oneDNN loses more still. Only fp32 and
bf16 CPU calls at few positions take the product; everything else (GPU, channels-last inputs, larger
batches or images, fp16) keeps torch's own choice. The weights, keys and saved files are unchanged:
the module's `_conv_forward` is routed per instance.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# A weight of at least 1280x1280x3x3 elements, applied to at most 256 positions (batch x height x
# width: batch 1 up to a 16x16 level, i.e. 512 px images), is where the product wins on the CPUs
# measured; at 512 positions both paths take the same time, at 4096 (320 channels at 64x64) oneDNN
# is 1.4x faster.
MIN_WEIGHT_ELEMENTS = 640 * 1920 * 9
MAX_POSITIONS = 256
PRODUCT_DTYPES = (torch.float32, torch.bfloat16)  # bf16: oneDNN is 3-9x slower than the product there


def routable(conv: torch.nn.Module) -> bool:
    """A plain 3x3, stride-1, padding-1 convolution with a weight large enough to be weight-bound."""
    return (
        isinstance(conv, torch.nn.Conv2d)
        and type(conv)._conv_forward is torch.nn.Conv2d._conv_forward  # not a subclass computing its own
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.weight.numel() >= MIN_WEIGHT_ELEMENTS
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution computes in: autocast's where autocast is on (it casts conv2d), else the input's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def takes_product_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and compute_dtype(x) in PRODUCT_DTYPES
        and (weight.dtype == x.dtype or (torch.is_autocast_enabled("cpu") and weight.dtype in PRODUCT_DTYPES))
        and x.dim() == 4
        and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_POSITIONS
        and x.is_contiguous()
    )


class _WeightTimesColumns(torch.autograd.Function):
    """`weight @ columns` whose input gradient reads the weight in its stored (row-major) order.

    torch's own backward computes weight.T @ grad, which reads the transposed weight and takes about
    twice as long at a few columns; (grad.T @ weight).T reads it front to back.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, columns if weight.requires_grad else None)
        return weight @ columns

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, columns = ctx.saved_tensors
        grad_weight = grad @ columns.t() if ctx.needs_input_grad[0] else None
        grad_columns = (grad.t() @ weight).t() if ctx.needs_input_grad[1] else None
        return grad_weight, grad_columns


def conv3x3_as_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 / stride 1 / padding 1 convolution as one matrix product over the unfolded input."""
    n, _, h, w = x.shape
    columns = F.unfold(x, kernel_size=3, padding=1)  # [n, c*9, h*w]
    columns = columns.transpose(0, 1).reshape(columns.shape[1], n * h * w)  # one product for the batch
    y = _WeightTimesColumns.apply(weight.reshape(weight.shape[0], -1), columns)  # [out, n*h*w]
    if bias is not None:
        y = y + bias[:, None]
    return y.view(-1, n, h, w).transpose(0, 1).contiguous()


def _routed_conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if takes_product_path(x, weight):
        dtype = compute_dtype(x)  # cast as autocast would cast conv2d's arguments
        return conv3x3_as_product(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return torch.nn.Conv2d._conv_forward(self, x, weight, bias)


def route_weight_bound_convolutions(model: torch.nn.Module) -> int:
    """Send the model's large 3x3 convolutions through the product path when a call is weight-bound.

    Returns how many convolutions were routed. Idempotent; wrappers that call the module's own
    forward (LoRA, LyCORIS) keep working, as the routing sits below `forward`.
    """
    routed = 0
    for module in model.modules():
        if routable(module):
            module._conv_forward = types.MethodType(_routed_conv_forward, module)
            routed += 1
    return routed
