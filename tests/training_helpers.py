"""Small datasets and a subprocess runner for the recipe tests (the scripts run as a user runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLORS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30), (150, 60, 200), (30, 190, 200)]


def write_image_folder(folder: Path, count: int = 4, size: tuple[int, int] = (64, 64), caption: str | None = None) -> Path:
    """`count` PNGs of coloured squares on white, with .txt captions when `caption` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(count):
        pixels = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = (i * 7) % (w // 2), (i * 5) % (h // 2)
        pixels[y0 : y0 + h // 2, x0 : x0 + w // 2] = COLORS[i % len(COLORS)]
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        if caption is not None:
            (folder / f"img{i:03d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


def dreambooth_folders(root: Path, count: int = 4, repeats: int = 1) -> Path:
    """`root/train/<repeats>_sks square/` with images and no caption files (class tokens are the captions)."""
    write_image_folder(root / "train" / f"{repeats}_sks square", count=count)
    return root / "train"


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None):
    """Run a recipe script in a fresh process; returns CompletedProcess with text output.

    One CPU thread unless `env` says otherwise: several tests compare two runs bit for bit, and on some
    CPUs (measured on an Intel Xeon, not on AMD EPYC) torch's multi-threaded kernels give run-to-run
    differences of about 1e-5 in the trained weights. The tiny models also train faster on one thread."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def lora_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A small LoRA run on the tiny model at 64 px (a few seconds on 2 cores)."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--resolution", "64",
        "--output_dir", str(out),
        "--output_name", "tiny",
        "--network_dim", "4",
        "--network_alpha", "2",
        "--learning_rate", "1e-3",
        "--max_data_loader_n_workers", "0",
        "--seed", "7",
        *extra,
    ]


def assert_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"


def max_state_diff(a: dict, b: dict, prefix: str = "") -> float:
    """Largest absolute difference between the tensors of two state dicts whose keys start with `prefix`."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and all(k in b for k in keys)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
