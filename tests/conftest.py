"""Shared fixtures: the tiny SD1/SD2 models are built once per test run and reused."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"sd1": diffusers folder, "sd1_file": LDM .safetensors, "sd2": ..., "sd2_file": ...}."""
    from tools.build_tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
