"""LyCORIS through `--network_module lycoris.kohya`, as sd-scripts users run it: LoHa, LoKr and DoRA train,
save, resume exactly, draw samples with the network applied, and their files load again as --network_weights.

The runs are the real train_network.py entry point, in-process on the tiny SD1 model, with the pinned
lycoris-lora package (requirements.txt).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.training.entry import run_recipe
from tests.training_helpers import dreambooth_folders, lora_args

ALGORITHMS = {
    "loha": ["algo=loha"],
    "lokr": ["algo=lokr", "factor=4"],
    "dora": ["algo=lora", "dora_wd=True"],
}
# The part of each module's keys that names its kind (LoHa's Hadamard factors, LoKr's Kronecker factors,
# DoRA's magnitude vector beside a LoRA pair).
KIND_KEYS = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}


def train(model, data, out, algo: str, *extra: str) -> int:
    argv = lora_args(model, data, out, "--network_module", "lycoris.kohya", "--network_args", *ALGORITHMS[algo], *extra)
    return run_recipe(train_network.NetworkRecipe(), argv)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("lycoris_data"), count=3)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_lycoris_trains_saves_resumes_exactly_and_reloads(algo, tiny_models, data, tmp_path):
    common = ["--max_train_steps", "4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    straight = tmp_path / "straight"
    assert train(tiny_models["sd1"], data, straight, algo, *common, "--save_every_n_steps", "2", "--save_state") == 0
    weights = load_file(str(straight / "tiny.safetensors"))
    assert any(KIND_KEYS[algo] in key for key in weights), sorted(weights)[:5]
    assert any(key.startswith("lora_unet_") for key in weights) and any(key.startswith("lora_te_") for key in weights)
    with safe_open(str(straight / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    recorded = json.loads(meta["ss_network_args"])
    assert recorded.pop("dropout") is None  # --network_dropout, recorded as sd-scripts does
    assert [f"{key}={value}" for key, value in recorded.items()] == ALGORITHMS[algo]
    assert meta["sshs_model_hash"]

    # the network trained: not all factors are still at their initial values (up/second factors start at 0)
    start = load_file(str(straight / "tiny-step00000002.safetensors"))
    assert max_diff(start, weights) > 0

    resumed = tmp_path / "resumed"
    assert train(tiny_models["sd1"], data, resumed, algo, *common, "--resume", str(straight / "tiny-step00000002-state")) == 0
    assert max_diff(weights, load_file(str(resumed / "tiny.safetensors"))) <= 1e-6

    # the file loads again as --network_weights (same ranks), and with --dim_from_weights
    # (a learning rate of 1e-12: AdamW's first step moves each weight by about that much)
    for name, extra in (("again", []), ("dims", ["--dim_from_weights"])):
        assert train(tiny_models["sd1"], data, tmp_path / name, algo, "--max_train_steps", "1", "--learning_rate", "1e-12",
                     "--network_weights", str(straight / "tiny.safetensors"), *extra) == 0
        assert max_diff(weights, load_file(str(tmp_path / name / "tiny.safetensors"))) < 1e-9


def test_lycoris_network_is_applied_in_sample_images(tiny_models, data, tmp_path):
    """Samples before and after training differ: the LoHa acts in the sampling pipeline (not only in training)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks square --w 64 --h 64 --d 3 --s 4\n", encoding="utf-8")
    out = tmp_path / "out"
    assert train(tiny_models["sd1"], data, out, "loha", "--max_train_steps", "3", "--learning_rate", "3e-2",
                 "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_steps", "3") == 0
    files = sorted((out / "sample").glob("*.png"))
    assert len(files) == 2, files
    before, after = (np.asarray(Image.open(f), dtype=np.float32) for f in files)
    assert np.abs(before - after).mean() > 0.5


def test_scale_weight_norms_and_module_dropout_work_with_lycoris(tiny_models, data, tmp_path):
    """Upstream's optional network calls: max-norm regularization after each step; module dropout under DDP rules."""
    out = tmp_path / "out"
    assert train(tiny_models["sd1"], data, out, "lokr", "--max_train_steps", "2", "--scale_weight_norms", "1.0",
                 "--learning_rate", "1e-2", "--network_args", "algo=lokr", "factor=4", "module_dropout=0.1") == 0
    assert (out / "tiny.safetensors").is_file()
