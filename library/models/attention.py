"""Attention backends for the U-Net and VAE: PyTorch SDPA (default), xformers, or sliced attention."""

from __future__ import annotations

import importlib.util
import logging

from library.errors import UserError

logger = logging.getLogger(__name__)


class AttentionBackendError(UserError, RuntimeError):
    """The requested attention backend cannot run here; the message names what is missing."""


def check_xformers_usable() -> None:
    """Raise AttentionBackendError unless both the xformers package and a CUDA GPU are present."""
    import torch

    missing = []
    if importlib.util.find_spec("xformers") is None:
        missing.append("the xformers package is not installed (pip install xformers, matching your torch and CUDA)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available (xformers only runs on CUDA)")
    if not missing:
        probe_error = _xformers_probe_error()
        if probe_error:
            missing.append(
                f"xformers {_xformers_version()} is installed but cannot run on this GPU ({probe_error}); "
                f"install the xformers build made for torch {torch.__version__}"
            )
    if missing:
        raise AttentionBackendError(
            "--xformers cannot be used: "
            + "; ".join(missing)
            + ". Leave out --xformers to use PyTorch's scaled-dot-product attention (the default, "
            "memory-efficient on GPUs), or use --mem_eff_attn."
        )


def _xformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xformers")
    except PackageNotFoundError:
        return "?"


def _xformers_probe_error() -> str | None:
    """Run one tiny attention through xformers; the first line of its complaint, or None if it works.

    An xformers wheel built without CUDA kernels (or for another torch) imports fine and only
    fails at the first call, deep inside training; we find out before anything loads.
    """
    import torch

    try:
        import xformers.ops

        q = torch.zeros(1, 2, 1, 40, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable", reported verbatim
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reasons = [line for line in lines if "build" in line or "not supported" in line]
        return (reasons or lines or [type(err).__name__])[0]
    return None


def attention_backend_name(xformers: bool = False, mem_eff_attn: bool = False) -> str:
    if xformers:
        return "xformers"
    if mem_eff_attn:
        return "sliced"
    return "sdpa"


def set_attention_backend(*models, xformers: bool = False, mem_eff_attn: bool = False) -> str:
    """Switch every attention layer of the given diffusers models; returns the backend name.

    - default: torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA);
    - `--xformers`: xformers' memory_efficient_attention (CUDA only; a clear error otherwise);
    - `--mem_eff_attn`: attention computed in slices of heads, which lowers peak memory
      on any device at some speed cost.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    backend = attention_backend_name(xformers, mem_eff_attn)
    if backend == "xformers":
        check_xformers_usable()
    for model in models:
        if model is None:
            continue
        if backend == "xformers":
            model.enable_xformers_memory_efficient_attention()
        elif backend == "sliced" and hasattr(model, "set_attention_slice"):
            model.set_attention_slice(_half_head_slices(model))
        else:
            model.set_attn_processor(AttnProcessor2_0())
    logger.info("attention backend: %s", backend)
    return backend


def _half_head_slices(model) -> list[int]:
    """Half of each attention layer's heads per slice (at least one), in diffusers' layer order.

    diffusers' own "auto" gives 0 for single-head layers, which then fails at run time.
    """
    dims = [m.sliceable_head_dim for m in model.modules() if hasattr(m, "sliceable_head_dim")]
    return [max(1, d // 2) for d in dims]
