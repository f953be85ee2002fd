"""--debug_dataset as a user runs it on a headless machine: previews and captions written, exit 0, no training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path) -> Path:
    train = root / "train" / "3_sks circle"
    train.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
        Image.new("RGB", size, (200, 30 * i, 10)).save(train / f"img{i}.png")
    (train / "img0.caption").write_text("a sks circle, red\n", encoding="utf-8")
    return root / "train"


def test_debug_dataset_headless_writes_previews_and_captions(tmp_path):
    train = make_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_network.py"), "--train_data_dir", str(train), "--resolution", "64",
         "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--debug_dataset",
         "--train_batch_size", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "debug_dataset"
    assert str(folder.resolve()) in result.stdout
    assert "9 training samples/epoch" in result.stdout and "resolution" in result.stdout  # counts + bucket table
    previews = sorted(folder.glob("*.png"))
    assert len(previews) >= 3  # 3 images x 3 repeats, in batches that never mix buckets
    listing = (folder / "captions.txt").read_text(encoding="utf-8")
    assert "a sks circle, red" in listing and "'sks circle'" in listing
    assert "bucket=" in listing and "repeats=3" in listing
    assert "not built yet" not in result.stderr


def run_train_network(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train_network.py"), *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )


def test_bad_images_are_named_together_and_can_be_skipped(tmp_path):
    train = make_folder(tmp_path)
    folder = train / "3_sks circle"
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (4000, 3000), (0, 0, 255)).save(folder / "huge.jpg", quality=80)
    common = ["--train_data_dir", str(train), "--resolution", "64", "--debug_dataset"]
    result = run_train_network(tmp_path, *common)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "broken.jpg" in result.stderr and "empty.png" in result.stderr
    assert "--skip_unreadable_images" in result.stderr
    result = run_train_network(tmp_path, *common, "--skip_unreadable_images")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "huge.jpg" in (tmp_path / "debug_dataset" / "captions.txt").read_text(encoding="utf-8")


def test_cache_latents_with_color_aug_is_refused_before_loading(tmp_path):
    train = make_folder(tmp_path)
    result = run_train_network(
        tmp_path, "--train_data_dir", str(train), "--resolution", "64", "--cache_latents", "--color_aug",
        "--pretrained_model_name_or_path", str(unloadable_model(tmp_path)), "--output_dir", str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "color_aug" in result.stderr and "--cache_latents" in result.stderr
    assert "Traceback" not in result.stderr


def unloadable_model(tmp_path):
    """A valid .safetensors file that is no SD model: loading it would fail, so an error about data proves order."""
    from safetensors.torch import save_file

    path = tmp_path / "not_an_sd_model.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path
