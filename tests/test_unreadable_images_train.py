"""The image issue end to end: a folder with a corrupt JPEG, an empty file and a 4000x3000 photo.

Without --skip_unreadable_images train_network.py stops before loading the model with one error naming
both bad files; with it, the run trains on the two good images (the large one included) and names
what it skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.training_helpers import assert_ok, lora_args, run_script


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed_images")
    folder = root / "train" / "1_sks photo"
    folder.mkdir(parents=True)
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(folder / "large.jpg", quality=70)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "good.png")
    Image.new("RGB", (256, 256), (9, 9, 9)).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    return root / "train"


def test_bad_files_are_named_together_before_the_model_loads(mixed_folder, tmp_path):
    from safetensors.torch import save_file

    missing_model = tmp_path / "not_an_sd_model.safetensors"  # loading it would fail: the dataset check must come first
    save_file({"x": torch.zeros(1)}, str(missing_model))
    result = run_script(
        "train_network.py", *lora_args(missing_model, mixed_folder, tmp_path / "out", "--max_train_steps", "2")
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr
    assert "2 image file(s) cannot be read" in message
    assert "corrupt.jpg" in message and "empty.png" in message and "empty file (0 bytes)" in message
    assert "--skip_unreadable_images" in message
    assert "Traceback" not in message
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


def test_skip_unreadable_images_trains_on_the_rest_including_the_large_image(tiny_models, mixed_folder, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], mixed_folder, out, "--max_train_steps", "2", "--skip_unreadable_images"),
    )
    assert_ok(result)
    output = result.stdout + result.stderr
    # the two skipped files are named, once
    assert output.count("2 unreadable image(s) left out") == 1
    assert "corrupt.jpg" in output and "empty.png" in output
    # the dataset is the two good images, the 4000x3000 one among them, and both steps ran
    assert "2 training samples/epoch" in output
    assert "finished at step 2" in result.stdout
    weights = load_file(out / "tiny.safetensors")
    assert any(k.startswith("lora_unet_") for k in weights)
    assert max(float(v.abs().max()) for k, v in weights.items() if k.endswith("lora_up.weight")) > 0
