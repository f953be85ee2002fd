"""Images per second of the finetune/ data tools on this machine: captioning (BLIP, GIT), tagging (WD14-shaped
ONNX at the real 448-px input), and latent preparation against the latent cache inside training.

    .venv/bin/python bench/bench_data_tools.py [--images 64] [--size 256] [--runs 3] [--work DIR]

The captioners are the tests' tiny random models (real transformers classes, so the per-image
overhead of loading, preprocessing, generation and writing is measured, not a large model's compute);
the tagger is a WD14-shaped ONNX model whose input is 448x448 like the real ones; the VAE is the shipped
base model's. Latent preparation (`prepare_buckets_latents.py`) and training's in-memory cache run the
same images through the same encoder, so their ratio shows the cost of the script around it (files,
metadata). Medians of --runs; the load average is printed since other processes make runs noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from finetune import make_captions, make_captions_by_git, prepare_buckets_latents, tag_images_by_wd14_tagger  # noqa: E402
from tests.tiny_captioners import build_tiny_blip, build_tiny_git  # noqa: E402
from tests.tiny_taggers import WD14_TAGS, ColourTagger, export  # noqa: E402

BASE = ROOT / "models" / "tiny-sd-shapes"


def write_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((size, size, 3), 255, dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        pixels[y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")
    return folder


def timed(function, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = function()
        times.append(time.perf_counter() - start)
        assert code == 0, f"exit {code}"
    return statistics.median(times)


def in_memory_cache(folder: Path, meta: Path, batch: int) -> int:
    """What a training run with --cache_latents does for the same dataset and VAE."""
    import fine_tune
    from library.data.latent_cache import cache_latents
    from library.data.latent_preparation import vae_for_caching
    from library.data.pipeline import prepare_datasets

    args = prepare_buckets_latents.training_options(
        prepare_buckets_latents.build_parser().parse_args([str(folder), str(meta), str(meta), str(BASE),
                                                           "--max_resolution", "256,256", "--min_bucket_reso", "128",
                                                           "--max_bucket_reso", "512"])
    )
    group = prepare_datasets(args, fine_tune.INFO.datasets)
    cache_latents(group.cache_items(), vae_for_caching(str(BASE), "no"), batch_size=batch, to_disk=False,
                  generator=torch.Generator().manual_seed(0), show_progress=False)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_data_tools_"))
    images = write_images(work / "images", args.images, args.size)
    blip, git = build_tiny_blip(work / "blip"), build_tiny_git(work / "git")
    tagger_dir = work / "tagger"
    export(ColourTagger(WD14_TAGS), tagger_dir / "bench_wd14" / "model.onnx", (1, 448, 448, 3),
           ("input_1", "predictions_sigmoid"), dynamic=True)
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},1" for i, (n, c, _, _) in enumerate(WD14_TAGS)]
    (tagger_dir / "bench_wd14" / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    meta = work / "meta.json"
    meta.write_text(json.dumps({p.stem: {"caption": "a square"} for p in images.glob("*.png")}))
    n = args.images
    print(f"load average before: {os.getloadavg()[0]:.2f}; {n} images of {args.size}px; medians of {args.runs}")
    results = {
        "BLIP captions (tiny model, batch 8)": timed(lambda: make_captions.main(
            [str(images), "--caption_weights", str(blip), "--batch_size", "8", "--max_length", "20", "--overwrite"]),
            args.runs),
        "GIT captions (tiny model, batch 8)": timed(lambda: make_captions_by_git.main(
            [str(images), "--model_id", str(git), "--batch_size", "8", "--max_length", "20", "--overwrite"]), args.runs),
        "WD14 tags (448-px ONNX, batch 8)": timed(lambda: tag_images_by_wd14_tagger.main(
            [str(images), "--model_dir", str(tagger_dir), "--repo_id", "bench/wd14", "--batch_size", "8"]), args.runs),
        "prepare_buckets_latents.py (shipped VAE, batch 8)": timed(lambda: prepare_buckets_latents.main(
            [str(images), str(meta), str(work / "lat.json"), str(BASE), "--batch_size", "8", "--max_resolution",
             "256,256", "--min_bucket_reso", "128", "--max_bucket_reso", "512"]), args.runs),
        "training's in-memory latent cache (same VAE, batch 8)": timed(lambda: in_memory_cache(images, meta, 8),
                                                                      args.runs),
    }
    for name, seconds in results.items():
        print(f"{name:55s} {seconds:7.2f} s  {n / seconds:7.1f} images/s")
    prep = results["prepare_buckets_latents.py (shipped VAE, batch 8)"]
    cache = results["training's in-memory latent cache (same VAE, batch 8)"]
    print(f"latent preparation / training cache time: {prep / cache:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
