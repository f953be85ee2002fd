"""Shared fixtures: the tiny SD1/SD2 models are built once per test run and reused."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory):
    """The per-user cache (the image-check record, library/fileio.py user_cache_dir) in a folder of this test run,
    never the user's ~/.cache; scripts the tests start inherit it."""
    folder = tmp_path_factory.mktemp("user_cache")
    before = os.environ.get("SD_TRAINER_CACHE_DIR")
    os.environ["SD_TRAINER_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SD_TRAINER_CACHE_DIR", None)
    else:
        os.environ["SD_TRAINER_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"sd1": diffusers folder, "sd1_file": LDM .safetensors, "sd2": ..., "sd2_file": ...}."""
    from tools.build_tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def base_parts():
    """The shipped base model (models/tiny-sd-shapes), loaded once for the learning tests."""
    from library.models.loading import load_base_model
    from tests.learning_helpers import BASE

    return load_base_model(str(BASE))


@pytest.fixture(scope="session")
def base_images(base_parts):
    """The base model's images of the learning tests' prompts (the "before")."""
    from tests.learning_helpers import CONCEPT_PROMPTS, OTHER_PROMPTS, generate

    return {"concept": generate(base_parts, CONCEPT_PROMPTS), "other": generate(base_parts, OTHER_PROMPTS)}


@pytest.fixture
def one_torch_thread():
    """In-process training on one CPU thread: torch's multi-threaded kernels can differ run to run by ~1e-5 on
    some CPUs, which tests comparing a resumed run with a straight one bit for bit must not see."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
