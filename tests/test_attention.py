"""Attention backends give the same U-Net output; xformers without CUDA is refused clearly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from library.models.attention import AttentionBackendError, check_xformers_usable, set_attention_backend
from library.models.loading import load_base_model


def unet_output(unet):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), context).sample


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sdpa_and_sliced_attention_agree(tiny_models, name):
    parts = load_base_model(str(tiny_models[name]), v2=name == "sd2")
    assert set_attention_backend(parts.unet, parts.vae) == "sdpa"
    reference = unet_output(parts.unet)
    assert set_attention_backend(parts.unet, parts.vae, mem_eff_attn=True) == "sliced"
    processors = {type(p).__name__ for p in parts.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    torch.testing.assert_close(unet_output(parts.unet), reference, atol=1e-5, rtol=1e-4)


def test_xformers_error_names_what_is_missing():
    try:
        check_xformers_usable()
    except AttentionBackendError as err:
        message = str(err)
    else:
        pytest.skip("xformers is usable here")
    installed = importlib.util.find_spec("xformers") is not None
    if not installed:
        assert "xformers package is not installed" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in message
    if installed and torch.cuda.is_available():
        assert "cannot run on this GPU" in message
    assert "Leave out --xformers" in message
