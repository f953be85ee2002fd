"""Dataset start-up cost at 1k / 10k / 100k small images: scan, captions, sizes, buckets, epoch plan.

    .venv/bin/python bench/bench_dataset_startup.py [--counts 1000 10000 100000] [--runs 3] [--work DIR]

Images (8x8 .. 64x48 PNGs of varied aspect ratios, each with a .txt caption) are written once into
DIR/<count>/ by a process pool and reused by later runs. Every stage is timed on its own, then the
whole ``build_dataset_group(check_readable=False)``, then the readability check separately. Each
count is measured ``--runs`` times and the median is shown; the load average before and after is
printed because other processes on the machine make single runs noisy.

``--cache_info`` instead times the whole ``build_dataset_group`` (readability check included) three ways:
without cache_info, a first run with it (no metadata_cache.json yet: everything is read and the file
written) and a second run with it (nothing changed: nothing read, nothing decoded), with ratios against
the run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from library.data.captions import read_caption_file  # noqa: E402
from library.data.config import DatasetBlueprint, SubsetBlueprint  # noqa: E402
from library.data.dataset_scan import _folder_names, parallel_map, read_sizes  # noqa: E402
from library.data.datasets import assign_dataset_buckets, build_dataset_group  # noqa: E402
from library.data.images import check_images_readable  # noqa: E402
from library.data.info_cache import CACHE_FILE_NAME, RACY_NS  # noqa: E402

SIZES = [(8, 8), (16, 8), (8, 16), (32, 24), (24, 32), (64, 48), (48, 64), (40, 40), (64, 16), (16, 64)]
STAGES = ["scan", "captions", "sizes", "buckets", "plan", "build (no check)", "readable check"]


def _write_range(folder: str, start: int, stop: int) -> None:
    for i in range(start, stop):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.full((h, w, 3), (i * 7) % 256, dtype=np.uint8)
        ok, data = cv2.imencode(".png", pixels)
        assert ok
        with open(os.path.join(folder, f"{i:06d}.png"), "wb") as file:
            file.write(data.tobytes())
        with open(os.path.join(folder, f"{i:06d}.txt"), "w", encoding="utf-8") as file:
            file.write(f"tag{i % 50}, shape{i % len(SIZES)}, bench\n")


def ensure_images(work: Path, count: int) -> Path:
    folder = work / str(count)
    marker = folder / ".complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    step = 2000
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_range, [str(folder)] * len(range(0, count, step)),
                      range(0, count, step), [min(s + step, count) for s in range(0, count, step)]))
    marker.write_text("ok")
    return folder


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def bench(folder: Path, readable_check: bool = True) -> dict[str, float]:
    subset = SubsetBlueprint(image_dir=str(folder), caption_extension=".txt", num_repeats=2)
    blueprint = DatasetBlueprint(kind="dreambooth", resolution=(512, 512), batch_size=4, enable_bucket=True,
                                 subsets=(subset,))
    times = {}
    times["scan"], (names, _) = timed(lambda: _folder_names(str(folder)))
    captions = [str(folder / (n[:-4] + ".txt")) for n in names]
    times["captions"], _ = timed(lambda: parallel_map(lambda p: read_caption_file(p, False), captions))
    paths = [str(folder / n) for n in names]
    times["sizes"], sizes = timed(lambda: read_sizes(paths))
    array = np.asarray(sizes, dtype=np.int64)
    times["buckets"], _ = timed(lambda: assign_dataset_buckets(blueprint, array))
    times["build (no check)"], group = timed(lambda: build_dataset_group([blueprint], check_readable=False))
    times["plan"], _ = timed(lambda: group.batches_for_epoch(1))
    times["readable check"], _ = timed(lambda: check_images_readable(paths)) if readable_check else (float("nan"), None)
    return times


CACHE_MODES = ["no cache_info", "cache_info, 1st run", "cache_info, 2nd run"]


def bench_cache_info(folder: Path) -> dict[str, float]:
    """Whole build_dataset_group with the full decode check: without cache_info, then a first and a second run
    with it (the cache file is removed first, so the first run always starts without one)."""
    cache_file = folder / CACHE_FILE_NAME
    times = {}
    for mode in CACHE_MODES:
        if mode == CACHE_MODES[1]:
            cache_file.unlink(missing_ok=True)
        subset = SubsetBlueprint(image_dir=str(folder), caption_extension=".txt", num_repeats=2,
                                 cache_info=mode != CACHE_MODES[0])
        blueprint = DatasetBlueprint(kind="dreambooth", resolution=(512, 512), batch_size=4, enable_bucket=True,
                                     subsets=(subset,))
        times[mode], _ = timed(lambda: build_dataset_group([blueprint], check_readable=True))
    cache_file.unlink(missing_ok=True)
    return times


def main_cache_info(args) -> None:
    results = {}
    load_before = _load_average()
    for count in args.counts:
        seconds, folder = timed(lambda: ensure_images(args.work, count))
        print(f"{count} images ready in {seconds:.1f}s ({folder})", flush=True)
        # files written less than RACY_NS ago are never trusted by the cache: let the newest ones age first
        time.sleep(max(0.0, RACY_NS / 1e9 - (time.time() - (folder / ".complete").stat().st_mtime)))
        runs = [bench_cache_info(folder) for _ in range(max(1, args.runs))]
        results[count] = {mode: statistics.median(run[mode] for run in runs) for mode in CACHE_MODES}
    print(
        f"\nCPU cores: {os.cpu_count()}; load average before {load_before}, after {_load_average()}; whole "
        f"build_dataset_group with the decode check; median of {max(1, args.runs)} runs, seconds (µs per image)"
    )
    print(f"{'count':<8}" + "".join(f"{mode:>34}" for mode in CACHE_MODES))
    for count, times in results.items():
        base = times[CACHE_MODES[0]]
        print(f"{count:<8}" + "".join(
            f"{times[m]:>9.3f}s ({times[m] / count * 1e6:>6.1f}µs, {times[m] / base:>5.2f}x)" for m in CACHE_MODES
        ))
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_before, _load_average()], "seconds": results}))


def _load_average() -> str:
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # not available on Windows
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--runs", type=int, default=3, help="measurements per count; the median is shown")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "dataset_images")
    parser.add_argument("--skip_readable_check", action="store_true", help="do not time the full-decode check")
    parser.add_argument("--json", type=Path, help="also write {count: {stage: seconds}} here")
    parser.add_argument("--cache_info", action="store_true",
                        help="time the whole start-up without cache_info, and its first and second run with it")
    args = parser.parse_args()
    if args.cache_info:
        return main_cache_info(args)
    results = {}
    load_before = _load_average()
    for count in args.counts:
        seconds, folder = timed(lambda: ensure_images(args.work, count))
        print(f"{count} images ready in {seconds:.1f}s ({folder})", flush=True)
        runs = [bench(folder, not args.skip_readable_check) for _ in range(max(1, args.runs))]
        results[count] = {stage: statistics.median(run[stage] for run in runs) for stage in STAGES}
    print(
        f"\nCPU cores: {os.cpu_count()}; load average before {load_before}, after {_load_average()}; "
        f"repeats 2, batch 4, 512x512 buckets; median of {max(1, args.runs)} runs, seconds (µs per image)"
    )
    header = f"{'stage':<18}" + "".join(f"{c:>22}" for c in results)
    counts = list(results)
    ratios = list(zip(counts, counts[1:]))
    header += "".join(f"{f'{b}/{a}':>14}" for a, b in ratios)
    print(header)
    for stage in STAGES:
        row = f"{stage:<18}"
        for count, times in results.items():
            row += f"{times[stage]:>10.3f}s ({times[stage] / count * 1e6:>6.1f}µs)"
        for a, b in ratios:
            row += f"{results[b][stage] / max(results[a][stage], 1e-9):>14.1f}"
        print(row)
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_before, _load_average()], "seconds": results}))


if __name__ == "__main__":
    main()
