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

``--image_check`` times the whole ``build_dataset_group`` with the decode check (library/data/image_check.py)
against a same-session baseline, main's check before it was remembered and run in processes (a thread pool, one
image per task, every image decoded on every start): without any check (what sd-scripts does: sizes only), the
baseline, a first run (no record in the user cache), a second run (nothing changed: nothing decoded) and a deferred
first run (``defer_readability_check``: the group is ready while the check goes on; "ready" and "check done"),
plus the time to load the second run's record alone.

``--train`` runs train_network.py on the tiny model (bench_train_network.py's measuring child: seconds from process
creation to step 1) with a small and a large folder, with main's check (baseline) and with the new one (first run,
then second run): how much of the check start-up still shows, and how much is hidden behind model loading. "new 1st,
all CPUs" runs the background check with one worker per CPU instead of leaving one CPU to the model loading.
--wait_idle N waits (up to N s) for idle CPUs before each run, for shared machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from library.data.captions import read_caption_file  # noqa: E402
from library.data.config import DatasetBlueprint, SubsetBlueprint  # noqa: E402
from library.data.dataset_scan import _folder_names, parallel_map, read_sizes  # noqa: E402
from library.data.datasets import assign_dataset_buckets, build_dataset_group  # noqa: E402
from library.data.images import check_images_readable, unreadable_reason  # noqa: E402
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
    times["readable check"], _ = (
        timed(lambda: check_images_readable(paths, remember=False)) if readable_check else (float("nan"), None)
    )
    return times


CACHE_MODES = ["no cache_info", "cache_info, 1st run", "cache_info, 2nd run"]


def bench_cache_info(folder: Path) -> dict[str, float]:
    """Whole build_dataset_group with the full decode check: without cache_info, then a first and a second run
    with it (the cache file is removed first, so the first run always starts without one)."""
    cache_file = folder / CACHE_FILE_NAME
    times = {}
    for mode in CACHE_MODES:
        _forget_image_checks()  # the comparison is about cache_info alone
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


def _forget_image_checks() -> None:
    from library.data.image_check import RECORD_FOLDER
    from library.fileio import user_cache_dir

    shutil.rmtree(user_cache_dir() / RECORD_FOLDER, ignore_errors=True)


def main_branch_check(paths, workers=None):
    """check_images_readable as main had it before image_check.py (the same-session baseline): a thread pool,
    one image per task, nothing remembered."""
    paths = [Path(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(unreadable_reason, paths))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


@contextlib.contextmanager
def main_branch_behaviour():
    """build_dataset_group with main's check: every image decoded by the thread pool, on every start, before
    the build returns."""
    import library.data.datasets as datasets

    saved = datasets.check_images_readable
    datasets.check_images_readable = main_branch_check
    try:
        yield
    finally:
        datasets.check_images_readable = saved


def _blueprint(folder: Path) -> DatasetBlueprint:
    subset = SubsetBlueprint(image_dir=str(folder), caption_extension=".txt", num_repeats=2)
    return DatasetBlueprint(kind="dreambooth", resolution=(512, 512), batch_size=4, enable_bucket=True,
                            subsets=(subset,))


CHECK_MODES = ["no check", "main's check", "1st run", "2nd run", "deferred 1st: ready", "deferred 1st: done",
               "record load"]


def bench_image_check(folder: Path) -> dict[str, float]:
    from library.data.image_check import _Record

    blueprint = _blueprint(folder)
    times = {}
    times["no check"], _ = timed(lambda: build_dataset_group([blueprint], check_readable=False))
    with main_branch_behaviour():
        times["main's check"], _ = timed(lambda: build_dataset_group([blueprint]))
    _forget_image_checks()
    times["1st run"], _ = timed(lambda: build_dataset_group([blueprint]))
    times["2nd run"], _ = timed(lambda: build_dataset_group([blueprint]))
    times["record load"], _ = timed(lambda: _Record(str(folder)))
    _forget_image_checks()
    start = time.perf_counter()
    group = build_dataset_group([blueprint], defer_readability_check=True)
    times["deferred 1st: ready"] = time.perf_counter() - start
    group.finish_readability_check()
    times["deferred 1st: done"] = time.perf_counter() - start
    return times


def main_image_check(args) -> None:
    results = {}
    load_before = _load_average()
    for count in args.counts:
        seconds, folder = timed(lambda: ensure_images(args.work, count))
        print(f"{count} images ready in {seconds:.1f}s ({folder})", flush=True)
        time.sleep(max(0.0, RACY_NS / 1e9 - (time.time() - (folder / ".complete").stat().st_mtime)))
        check_images_readable(sorted(folder.glob("*.png")), remember=False)  # warm: every file in the page cache
        runs = [bench_image_check(folder) for _ in range(max(1, args.runs if count < 50000 else 1))]
        results[count] = {mode: statistics.median(run[mode] for run in runs) for mode in CHECK_MODES}
        print(f"  {count}: " + ", ".join(f"{m} {t:.3f}s" for m, t in results[count].items()), flush=True)
    print(
        f"\nCPU cores: {os.cpu_count()}; load average before {load_before}, after {_load_average()}; whole "
        f"build_dataset_group; median of {max(1, args.runs)} runs (1 at 50k+), seconds (x = ratio to main's check)"
    )
    print(f"{'count':<8}" + "".join(f"{mode:>26}" for mode in CHECK_MODES))
    for count, times in results.items():
        base = times["main's check"]
        print(f"{count:<8}" + "".join(f"{times[m]:>16.3f}s ({times[m] / base:>5.2f}x)" for m in CHECK_MODES))
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_before, _load_average()], "seconds": results}))


# ---------------------------------------------------------------- --train: time to step 1 of train_network.py


def train_child(mode: str, json_path: str, train_argv: list[str]) -> int:
    """bench_train_network.py's measuring child, with main's check when mode is "main"."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train_network

    if mode == "new-all-cpus":  # the background check with one worker per CPU (none left for the model loading)
        import library.data.image_check as image_check

        workers = image_check.default_workers
        image_check.default_workers = lambda background=False: workers(False)
    if mode != "main":
        from library.data.datasets import DatasetGroup

        finish, waited = DatasetGroup.finish_readability_check, []

        def timed_finish(group):  # how long the trainer waits for the check after loading the model
            start = time.perf_counter()
            try:
                return finish(group)
            finally:
                waited.append(time.perf_counter() - start)

        DatasetGroup.finish_readability_check = timed_finish
        rc = bench_train_network.child_main(json_path, train_argv, None)
        record = json.loads(Path(json_path).read_text(encoding="utf-8"))
        record["check_wait_s"] = waited[0] if waited else 0.0
        Path(json_path).write_text(json.dumps(record), encoding="utf-8")
        return rc
    import library.data.pipeline as pipeline

    prepare = pipeline.prepare_datasets
    pipeline.prepare_datasets = lambda args, support, defer_readability_check=False: prepare(args, support, False)
    with main_branch_behaviour():
        return bench_train_network.child_main(json_path, train_argv, None)


def main_train(args) -> None:
    import subprocess
    import tempfile

    model = ROOT / "bench" / "results" / "models" / "tiny" / "sd1.safetensors"
    if not model.is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "build_tiny_models.py"), str(model.parent)], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench_check_train_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SD_TRAINER_CACHE_DIR": str(work / "user_cache")}
    small, large = 12, max(args.counts)
    folders = {count: ensure_images(args.work, count) for count in (small, large)}
    time.sleep(RACY_NS / 1e9)
    runs = [("main", small), ("main", large), ("new", small), ("new 1st", large), ("new 1st, all CPUs", large),
            ("new 2nd", large)]
    results: dict[str, list[float]] = {}
    loads: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train_network import wait_for_idle

    for repeat in range(max(1, args.runs)):
        for mode, count in runs:
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            if mode.startswith("new 1st"):
                shutil.rmtree(work / "user_cache", ignore_errors=True)
            config = work / f"{count}.toml"
            config.write_text(
                f"[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\n"
                f"image_dir = '{folders[count]}'\ncaption_extension = '.txt'\n", encoding="utf-8")
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            json_path = work / "child.json"
            train_argv = [
                "--pretrained_model_name_or_path", str(model), "--dataset_config", str(config),
                "--output_dir", str(out), "--output_name", "tiny", "--network_module", "networks.lora",
                "--network_dim", "4", "--network_alpha", "1", "--network_train_unet_only",
                "--mixed_precision", "no", "--max_data_loader_n_workers", "0", "--seed", "1",
                "--max_train_steps", "3",  # the measuring child times steps 3+
            ]
            child = {"main": "main", "new 1st, all CPUs": "new-all-cpus"}.get(mode, "new")
            command = [sys.executable, str(Path(__file__).resolve()), "--train_child", child, "--json", str(json_path),
                       "--", *train_argv]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode} {count}: exit {done.returncode}\n{done.stderr[-3000:]}")
            record = json.loads(json_path.read_text(encoding="utf-8"))
            key = f"{mode}, {count} images"
            results.setdefault(key, []).append(record["first_step_begins_s"])
            loads.setdefault(key, []).append(record["load_s"])
            waits.setdefault(key, []).append(record.get("check_wait_s", float("nan")))
            print(f"  run {repeat + 1}: {key}: step 1 begins {record['first_step_begins_s']:.2f}s after process "
                  f"creation; model load {record['load_s']:.2f}s, then waited {waits[key][-1]:.2f}s for the check; "
                  f"load {_load_average()}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in results.items()}
    print(f"\nCPU cores: {os.cpu_count()}; train_network.py, tiny model, 64 px, batch 1; seconds from process "
          f"creation to step 1 (median of {max(1, args.runs)})")
    print(f"{'':<36}{'step 1':>8}{'model load':>12}{'check wait':>12}")
    for key, value in medians.items():
        print(f"{key:<36}{value:>7.2f}s{statistics.median(loads[key]):>11.2f}s{statistics.median(waits[key]):>11.2f}s")
    base = medians[f"main, {large} images"] - medians[f"main, {small} images"]
    for mode in ("new 1st", "new 1st, all CPUs", "new 2nd"):
        extra = medians[f"{mode}, {large} images"] - medians[f"new, {small} images"]
        print(f"{large} images over {small}: main +{base:.2f}s, {mode} +{extra:.2f}s ({extra / base:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"first_step_begins_s": results, "load_s": loads, "check_wait_s": waits,
                                         "medians": medians}))


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
    parser.add_argument("--image_check", action="store_true",
                        help="time the start-up with main's decode check, and the remembered one (1st, 2nd, deferred)")
    parser.add_argument("--train", action="store_true",
                        help="time to step 1 of train_network.py with 12 and max(--counts) images, main's check vs new")
    parser.add_argument("--wait_idle", type=float, default=0,
                        help="--train: before each run wait up to this many seconds for idle CPUs (shared machines)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_user_cache_") as cache:
        os.environ["SD_TRAINER_CACHE_DIR"] = cache  # the image-check records: never the user's own cache
        if args.cache_info:
            return main_cache_info(args)
        if args.image_check:
            return main_image_check(args)
        if args.train:
            return main_train(args)
        return main_stages(args)


def main_stages(args) -> None:
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
    if len(sys.argv) > 1 and sys.argv[1] == "--train_child":
        split = sys.argv.index("--")
        child = argparse.ArgumentParser()
        child.add_argument("--train_child", choices=["main", "new", "new-all-cpus"])
        child.add_argument("--json", required=True)
        options = child.parse_args(sys.argv[1:split])
        sys.exit(train_child(options.train_child, options.json, sys.argv[split + 1 :]))
    main()
