"""LoRA training speed and memory of train_network.py: s/step, peak RSS, time to the first step.

    .venv/bin/python bench/bench_train_network.py [--models tiny sd15] [--bases file folder]
        [--variants plain gc te gc+te] [--repeats 3] [--steps 12] [--work DIR]

Every run is a fresh process (imports, model loading and latent caching count) that runs
train_network.py's own recipe through `run_recipe`, with one extra hook recording the clock at
`at_start` (everything set up, the loop about to begin) and at each `after_step`:

    python bench/bench_train_network.py --child --json OUT.json -- <train_network.py options>

Options of every run (the reference the issue's peers were measured on): LoRA rank 4 / alpha 1,
U-Net only (--network_train_unet_only), batch 1, fp32 (--mixed_precision no), --cache_latents,
--max_data_loader_n_workers 0, 12 images with .txt captions, --max_train_steps 12 (one epoch).
Models: full-size SD1.5 architecture with random weights at 128 px (the files of
bench_model_loading.py, built there if missing) and the tiny test model at 64 px. Variants:
plain, --gradient_checkpointing (gc), --cache_text_encoder_outputs (te), both (gc+te).

Reported per run (medians over --repeats runs in the table):
  s/step      median of the durations of steps 3..12 (step i = after_step(i) - after_step(i-1))
  first step  seconds from process creation (psutil create_time, i.e. fork/exec of the child, before
              the interpreter starts) to at_start (step 1 begins) and to after_step(1) (step 1 ends)
  peak RSS    ru_maxrss of the training process (from os.wait4 on it, also VmHWM inside) and
              RUSAGE_CHILDREN inside it (data loader workers; none with 0 workers)
  load / cache  base model loading and latent caching times (wrapped inside the child)
  unet LoRA   number of U-Net LoRA modules (192 for SD1.5)
  hashed      whether the base model file was hashed before step 1 (it must not be: metadata is
              built at the first save); the hash's time at the final save is shown separately
  te/step     text-encoder forward calls and seconds inside steps 3..12, U-Net forward seconds
  CPU/wait    per step, CPU seconds of all threads and their run-queue wait (/proc/self/task/*/schedstat)
  fastest     the fastest timed step of all runs (the least disturbed by other processes)

The page cache is warmed (model files read once) before the runs, so every run reads warm files.
The load average is printed before and after each run: other processes make single runs noisy.
On a shared machine use --wait_idle and/or --nice -10 (see docs/benchmarks.md, "Shared machines").
--baselines ours peft also times bench/minimal_lora_loop.py, the same work without our trainer.
Results: a table on stdout and bench/results/train_network.json (per run and medians).
"""

from __future__ import annotations

import time

_T0_WALL = time.time()  # the very top of the child, before heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VARIANTS = {
    "plain": [],
    "gc": ["--gradient_checkpointing"],
    "te": ["--cache_text_encoder_outputs"],
    "gc+te": ["--gradient_checkpointing", "--cache_text_encoder_outputs"],
}
RESOLUTION = {"sd15": 128, "tiny": 64}
MEASURED_FROM = 3  # steps MEASURED_FROM.. are timed (1-based)


# ====================================================================== child


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU), summed over this process's threads."""
    on_cpu = waiting = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as file:
                fields = file.read().split()
        except OSError:  # a thread that just ended
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def child_main(json_path: str, train_argv: list[str], cprofile: str | None, torch_profile: str | None = None) -> int:
    import resource

    import psutil

    create_time = psutil.Process().create_time()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    record: dict = {
        "process_create_wall": create_time,
        "child_top_wall": _T0_WALL,
        "interpreter_start_s": _T0_WALL - create_time,
        "argv": train_argv,
    }
    events: dict = {"step_wall": [], "step_sched": [], "hash_calls_wall": [], "te_calls": [], "unet_fwd": []}

    import torch

    record["imports_torch_done_s"] = time.time() - create_time
    import train_network
    from library.data import latent_cache
    from library.recipe import Hooks
    from library.training import metadata, trainer

    record["imports_done_s"] = time.time() - create_time

    # --- wrap what we time inside (no behaviour change)
    original_hashes = metadata.model_file_hashes

    def timed_hashes(path):
        start = time.time()
        out = original_hashes(path)
        events["hash_calls_wall"].append((start, time.time(), str(path)))
        return out

    metadata.model_file_hashes = timed_hashes

    original_cache = latent_cache.cache_latents

    def timed_cache(*args, **kwargs):
        start = time.perf_counter()
        out = original_cache(*args, **kwargs)
        record["latent_cache_s"] = time.perf_counter() - start
        record["rss_after_cache_kib"] = _status_kib("VmRSS")
        return out

    latent_cache.cache_latents = timed_cache

    original_load = trainer.Trainer._load_base_model

    def timed_load(self):
        start = time.perf_counter()
        record["rss_before_load_kib"] = _status_kib("VmRSS")
        out = original_load(self)
        record["load_s"] = time.perf_counter() - start
        record["load_end_s"] = time.time() - create_time
        record["rss_after_load_kib"] = _status_kib("VmRSS")
        record["hwm_after_load_kib"] = _status_kib("VmHWM")
        return out

    trainer.Trainer._load_base_model = timed_load

    class TimingHook:
        def __init__(self, recipe):
            self.recipe = recipe

        def at_start(self, ctx, progress):
            events["start_wall"] = time.time()
            events["start_sched"] = _schedstat()
            parts = ctx.parts
            network = self.recipe.network
            record["unet_lora_modules"] = len(network.unet_loras)
            record["text_encoder_lora_modules"] = len(network.text_encoder_loras)
            record["trainable_params"] = sum(p.numel() for p in network.parameters() if p.requires_grad)
            record["dtypes"] = {
                name: str(next(getattr(parts, name).parameters()).dtype) for name in ("unet", "text_encoder", "vae")
            }
            record["devices"] = {
                name: str(next(getattr(parts, name).parameters()).device) for name in ("unet", "text_encoder", "vae")
            }
            record["rss_at_start_kib"] = _status_kib("VmRSS")
            record["hwm_at_start_kib"] = _status_kib("VmHWM")
            record["torch_threads"] = torch.get_num_threads()

            def te_pre(module, inputs):
                events["_te_t"] = time.perf_counter()

            def te_post(module, inputs, output):
                events["te_calls"].append((len(events["step_wall"]) + 1, time.perf_counter() - events["_te_t"]))

            def unet_pre(module, *a, **k):
                events["_unet_t"] = time.perf_counter()

            def unet_post(module, *a, **k):
                events["unet_fwd"].append((len(events["step_wall"]) + 1, time.perf_counter() - events["_unet_t"]))

            parts.text_encoder.register_forward_pre_hook(te_pre)
            parts.text_encoder.register_forward_hook(te_post)
            parts.unet.register_forward_pre_hook(unet_pre)
            parts.unet.register_forward_hook(unet_post)

        def after_step(self, ctx, progress):
            events["step_wall"].append(time.time())
            events["step_sched"].append(_schedstat())
            done = len(events["step_wall"])
            if done == 1:
                record["rss_after_step1_kib"] = _status_kib("VmRSS")
            if torch_profile and done == MEASURED_FROM - 1:  # profile steps MEASURED_FROM, MEASURED_FROM + 1
                events["profiler"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True
                )
                events["profiler"].__enter__()
            elif torch_profile and done == MEASURED_FROM + 1 and "profiler" in events:
                events["profiler"].__exit__(None, None, None)
                averages = events["profiler"].key_averages()
                with open(torch_profile, "w") as out:
                    out.write("two training steps, sorted by self CPU time\n")
                    out.write(averages.table(sort_by="self_cpu_time_total", row_limit=40))
                    out.write("\n\nsorted by total CPU time\n")
                    out.write(averages.table(sort_by="cpu_time_total", row_limit=40))
                    out.write("\n\nby call site (5 Python frames), sorted by number of calls\n")
                    by_stack = events["profiler"].key_averages(group_by_stack_n=5)
                    out.write(by_stack.table(sort_by="count", row_limit=40))

    class BenchRecipe(train_network.NetworkRecipe):
        def hooks(self, args):
            timing = TimingHook(self)
            return [*super().hooks(args), Hooks(at_start=timing.at_start, after_step=timing.after_step)]

    from library.training.entry import run_recipe

    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    rc = run_recipe(BenchRecipe(), train_argv)
    end_wall = time.time()
    if cprofile:
        profiler.disable()
        profiler.dump_stats(cprofile)

    steps = events["step_wall"]
    start = events.get("start_wall")
    record["rc"] = rc
    record["steps_done"] = len(steps)
    record.update(step_timings(start, steps, create_time, end_wall))
    if start is not None and steps:
        timed = record["step_s"][MEASURED_FROM - 1 :]
        record["first_step_begins_from_top_s"] = start - _T0_WALL
        record["first_step_ends_from_top_s"] = steps[0] - _T0_WALL
        first_step_wall = steps[0]
        record["hashed_before_step1"] = any(s < first_step_wall for s, _, _ in events["hash_calls_wall"])
        record["hash_s"] = sum(e - s for s, e, _ in events["hash_calls_wall"])
        sched = [events["start_sched"], *events["step_sched"]]
        record["step_cpu_s"] = [b[0] - a[0] for a, b in zip(sched, sched[1:])]
        record["step_runqueue_wait_s"] = [b[1] - a[1] for a, b in zip(sched, sched[1:])]
        record["cpu_s_per_step"] = statistics.median(record["step_cpu_s"][MEASURED_FROM - 1 :])
        record["runqueue_wait_s_per_step"] = statistics.median(record["step_runqueue_wait_s"][MEASURED_FROM - 1 :])
        te = [t for step, t in events["te_calls"] if step >= MEASURED_FROM]
        un = [t for step, t in events["unet_fwd"] if step >= MEASURED_FROM]
        n = max(1, len(timed))
        record["te_calls_timed_steps"] = len(te)
        record["te_s_per_step"] = sum(te) / n
        record["unet_forward_s_per_step"] = sum(un) / n
    record["total_s"] = end_wall - create_time
    record["ru_maxrss_self_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record["ru_maxrss_children_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    record["vmhwm_kib"] = _status_kib("VmHWM")
    record["major_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    Path(json_path).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rc


# ====================================================================== parent


def step_timings(start: float | None, steps: list[float], create_time: float, end_wall: float) -> dict:
    """Per-step durations and their median from step MEASURED_FROM on, and when step 1 began and ended
    (seconds since the child process was created), from the wall clock at at_start and each after_step."""
    if start is None or not steps:
        return {}
    durations = [b - a for a, b in zip([start, *steps[:-1]], steps)]
    timed = durations[MEASURED_FROM - 1 :]
    return {
        "step_s": durations,
        "s_per_step": statistics.median(timed) if timed else None,
        "first_step_begins_s": start - create_time,
        "first_step_ends_s": steps[0] - create_time,
        "after_last_step_to_exit_s": end_wall - steps[-1],
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over the next `seconds` (from /proc/stat)."""

    def snap():
        with open("/proc/stat") as file:
            values = [int(v) for v in file.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    idle0, total0 = snap()
    time.sleep(seconds)
    idle1, total1 = snap()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(max_wait: float, threshold: float = 0.15, window: float = 5.0, needed: int = 3) -> dict:
    """Wait (at most max_wait s) until the CPUs were less than `threshold` busy for `needed` windows in a row."""
    start, quiet, busy = time.perf_counter(), 0, 1.0
    while True:
        busy = _cpu_busy(window)
        quiet = quiet + 1 if busy < threshold else 0
        waited = time.perf_counter() - start
        if quiet >= needed or waited >= max_wait:
            return {"waited_s": waited, "busy_before": busy, "idle_reached": quiet >= needed}


def write_dataset(folder: Path, size: int, count: int = 12) -> Path:
    """`folder/1_bench/` with `count` size×size PNGs (shapes on noise) and distinct .txt captions."""
    import numpy as np
    from PIL import Image

    sub = folder / "1_bench"
    if (sub / ".complete").exists():
        return folder
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "yellow", "purple", "cyan"]
    rgb = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30), (150, 60, 200), (30, 190, 200)]
    for i in range(count):
        pixels = rng.integers(0, 64, (size, size, 3), dtype=np.uint8) + 160
        x0, y0 = (i * 11) % (size // 2), (i * 7) % (size // 2)
        pixels[y0 : y0 + size // 2, x0 : x0 + size // 2] = rgb[i % len(rgb)]
        Image.fromarray(pixels).save(sub / f"img{i:03d}.png")
        caption = f"a {colors[i % len(colors)]} square, photo number {i}, high quality, bench"
        (sub / f"img{i:03d}.txt").write_text(caption, encoding="utf-8")
    (sub / ".complete").write_text("ok")
    return folder


def ensure_models(work: Path, models: list[str]) -> dict[tuple[str, str], Path]:
    paths = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if "tiny" in models:
        tiny = work / "tiny"
        if not (tiny / "sd1.safetensors").is_file():
            subprocess.run([sys.executable, str(ROOT / "tools" / "build_tiny_models.py"), str(tiny)], check=True, env=env)
        paths["tiny", "file"], paths["tiny", "folder"] = tiny / "sd1.safetensors", tiny / "sd1"
    if "sd15" in models:
        single, folder = work / "sd15_random.safetensors", work / "sd15_random"
        if not (single.is_file() and folder.is_dir()):
            # the files of bench_model_loading.py (random SD1.5 weights, the real CLIP tokenizer)
            code = (
                "import sys; sys.path.insert(0, %r); from pathlib import Path; "
                "from bench.bench_model_loading import build_files; build_files(Path(%r))" % (str(ROOT), str(work))
            )
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
        paths["sd15", "file"], paths["sd15", "folder"] = single, folder
    return paths


def warm_page_cache(path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass


def train_argv(model: Path, data: Path, out: Path, resolution: int, steps: int, extra: list[str]) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--caption_extension", ".txt",
        "--resolution", str(resolution),
        "--output_dir", str(out),
        "--output_name", "bench",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "1",
        "--network_train_unet_only",
        "--learning_rate", "1e-4",
        "--train_batch_size", "1",
        "--mixed_precision", "no",
        "--cache_latents",
        "--max_train_steps", str(steps),
        "--max_data_loader_n_workers", "0",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def _raise_priority(nice: int) -> None:
    """In the child before exec: its own session, so its own scheduler autogroup, with niceness `nice`.

    With kernel.sched_autogroup_enabled=1 (as on the shared 2-core machines) CPU time is shared
    between sessions first, so a process's own nice value does nothing against other sessions;
    the autogroup's does. Needs root.
    """
    os.setsid()
    with open("/proc/self/autogroup", "w") as file:
        file.write(str(nice))
    os.nice(nice)


def run_child(
    argv: list[str], json_path: Path, log_path: Path, cprofile: str | None = None, torch_profile: str | None = None,
    wait_idle: float = 0, nice: int = 0,
) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--json", str(json_path)]
    if cprofile:
        command += ["--cprofile", cprofile]
    if torch_profile:
        command += ["--torch_profile", torch_profile]
    command += ["--", *argv]
    return run_process(command, json_path, log_path, wait_idle, nice)


def run_process(command: list[str], json_path: Path, log_path: Path, wait_idle: float = 0, nice: int = 0) -> dict:
    """Run a measuring child that writes json_path; add its own peak RSS (wait4) and the load around it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    json_path.unlink(missing_ok=True)
    idle = wait_for_idle(wait_idle) if wait_idle > 0 else {}
    load_before = load_average()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        preexec = (lambda: _raise_priority(nice)) if nice else None
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
        # wait4: the rusage of this child alone (ru_maxrss in KiB on Linux)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not json_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    record = json.loads(json_path.read_text())
    record["wait4_maxrss_kib"] = usage.ru_maxrss
    record["wall_s"] = wall
    record.update(idle)
    record["nice"] = nice
    record["load_before"] = load_before
    record["load_after"] = load_average()
    return record


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


SUMMARY_KEYS = [
    "s_per_step", "first_step_begins_s", "first_step_ends_s", "wait4_maxrss_kib", "vmhwm_kib",
    "ru_maxrss_children_kib", "hwm_after_load_kib", "load_s", "latent_cache_s", "imports_done_s",
    "te_s_per_step", "unet_forward_s_per_step", "hash_s", "after_last_step_to_exit_s", "total_s",
    "cpu_s_per_step", "runqueue_wait_s_per_step",
]  # fmt: skip


def summarize(label: dict, runs: list[dict]) -> dict:
    out = dict(label)
    out["runs"] = len(runs)
    for key in SUMMARY_KEYS:
        out[key] = median_of(runs, key)
    out["s_per_step_range"] = [min(r["s_per_step"] for r in runs), max(r["s_per_step"] for r in runs)]
    # the fastest timed step of all runs: the least disturbed by other processes on a shared machine
    out["fastest_step_s"] = min(min(r["step_s"][MEASURED_FROM - 1 :]) for r in runs)
    out["unet_lora_modules"] = runs[0]["unet_lora_modules"]
    out["te_calls_timed_steps"] = runs[0]["te_calls_timed_steps"]
    out["hashed_before_step1"] = any(r["hashed_before_step1"] for r in runs)
    out["load_averages"] = [r["load_before"] for r in runs]
    out["busy_before"] = [r.get("busy_before") for r in runs]
    return out


def _num(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_baselines(baselines: list[dict]) -> str:
    gib = 2**20
    lines = ["| model | base | loop | variant | U-Net LoRA | s/step (range) | step 1 ends (s) | peak RSS GiB |",
             "|" + "---|" * 8]
    for b in baselines:
        lo, hi = b["s_per_step_range"]
        lines.append(f"| {b['model']} | {b['base']} | {b['loop']} | {b['variant']} | {b['unet_lora_modules']} "
                     f"| {b['s_per_step']:.3f} ({lo:.3f}–{hi:.3f}) | {b['first_step_ends_s']:.1f} "
                     f"| {b['wait4_maxrss_kib'] / gib:.2f} |")
    return "\n".join(lines)


def _load_note(load: str, busy) -> str:
    return load.split()[0] + ("" if busy is None else f" ({busy:.0%})")


def format_table(rows: list[dict]) -> str:
    gib = 2**20
    head = (
        "| model | base | variant | s/step (range) | CPU s/step (run-queue wait s) | step 1 begins / ends (s) | peak RSS GiB (children) "
        "| fastest step s | load s | latent cache s | TE fwd s/step (calls) | U-Net fwd s/step | U-Net LoRA | hashed before step 1 "
        "| final save+hash s | load avg 1 min (CPU busy before) |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lo, hi = r["s_per_step_range"]
        priority = f" (nice {r['nice']})" if r.get("nice") else ""
        lines.append(
            f"| {r['model']} | {r['base']} | {r['variant']}{priority} "
            f"| {r['s_per_step']:.3f} ({lo:.3f}–{hi:.3f}) "
            f"| {_num(r.get('cpu_s_per_step'), 2)} ({_num(r.get('runqueue_wait_s_per_step'), 2)}) "
            f"| {r['first_step_begins_s']:.1f} / {r['first_step_ends_s']:.1f} "
            f"| {r['wait4_maxrss_kib'] / gib:.2f} ({r['ru_maxrss_children_kib'] / gib:.2f}) "
            f"| {r['fastest_step_s']:.2f} | {r['load_s']:.1f} | {r['latent_cache_s']:.2f} "
            f"| {r['te_s_per_step']:.3f} ({r['te_calls_timed_steps']}) | {r['unet_forward_s_per_step']:.3f} "
            f"| {r['unet_lora_modules']} | {'yes' if r['hashed_before_step1'] else 'no'} "
            f"| {r['after_last_step_to_exit_s']:.1f} (hash {r['hash_s']:.1f}) "
            f"| {', '.join(_load_note(a, b) for a, b in zip(r['load_averages'], r.get('busy_before') or [None] * r['runs']))} |"
        )
    return "\n".join(lines)


def config_key(r: dict) -> tuple:
    return r["model"], r["base"], r["variant"], r.get("nice", 0)


def config_label(key: tuple) -> dict:
    return {"model": key[0], "base": key[1], "variant": key[2], "nice": key[3]}


def print_saved_table(json_path: Path) -> None:
    saved = json.loads(json_path.read_text(encoding="utf-8"))
    rows = []
    for old in saved["summary"]:
        key = config_key(old)
        runs = [r for r in saved["runs"] if config_key(r) == key]
        row = summarize(config_label(key), runs)
        row.update(date=old.get("date"), steps=old.get("steps"))
        rows.append(row)
    print(format_table(rows))
    for row in rows:
        print(f"{row['model']} {row['base']} {row['variant']}: {row['date']}, load averages {row['load_averages']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--bases", nargs="+", default=["file", "folder"], choices=["file", "folder"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", default=str(RESULTS / "models"), help="where the model files are (built if missing)")
    parser.add_argument("--json", default=str(RESULTS / "train_network.json"))
    parser.add_argument("--append", action="store_true", help="keep the other configurations already in --json")
    parser.add_argument("--cprofile", metavar="DIR", help="cProfile the first run of each configuration into DIR/<name>.prof")
    parser.add_argument(
        "--torch_profile", metavar="DIR",
        help=f"torch.profiler over steps {MEASURED_FROM}-{MEASURED_FROM + 1} of the first run of each configuration: DIR/<name>.txt",
    )
    parser.add_argument(
        "--wait_idle", type=float, default=0, metavar="S",
        help="before each run, wait up to S seconds until the CPUs are <15%% busy for 15 s (shared machines)",
    )
    parser.add_argument(
        "--nice", type=int, default=0,
        help="run each training process in its own session whose scheduler autogroup has this niceness "
        "(e.g. -10, needs root): most of the CPU time on a machine shared with other sessions",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=[], choices=["ours", "peft"],
        help="also time bench/minimal_lora_loop.py (no trainer) with our LoRA and/or peft's, variants plain/gc",
    )
    parser.add_argument("--table_only", action="store_true", help="print the table of the runs already in --json")
    args = parser.parse_args()
    if args.table_only:
        print_saved_table(Path(args.json))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = RESULTS / "train_network_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(work, args.models)
    print(f"machine: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}, load average {load_average()}")
    rows, all_runs, baselines = [], [], []
    for model in args.models:
        data = write_dataset(RESULTS / f"train_data_{RESOLUTION[model]}px", RESOLUTION[model])
        for base in args.bases:
            path = models[model, base]
            warm_page_cache(path)
            for variant in args.variants:
                runs = []
                name = f"{model}_{base}_{variant}"
                for repeat in range(args.repeats):
                    out = runs_dir / f"{name}_out"
                    argv = train_argv(path, data, out, RESOLUTION[model], args.steps, VARIANTS[variant])
                    prof = tprof = None
                    if args.cprofile and repeat == 0:
                        Path(args.cprofile).mkdir(parents=True, exist_ok=True)
                        prof = str(Path(args.cprofile) / f"{name}.prof")
                    if args.torch_profile and repeat == 0:
                        Path(args.torch_profile).mkdir(parents=True, exist_ok=True)
                        tprof = str(Path(args.torch_profile) / f"{name}.txt")
                    r = run_child(
                        argv, runs_dir / f"{name}_{repeat}.json", runs_dir / f"{name}_{repeat}.log", prof, tprof,
                        args.wait_idle, args.nice,
                    )
                    r.update(model=model, base=base, variant=variant, repeat=repeat, nice=args.nice)
                    runs.append(r)
                    print(
                        f"{name} #{repeat + 1}: {r['s_per_step']:.3f} s/step (fastest {min(r['step_s'][MEASURED_FROM - 1:]):.2f}, "
                        f"run-queue wait {r['runqueue_wait_s_per_step']:.2f} s/step), step 1 ends at "
                        f"{r['first_step_ends_s']:.1f} s, peak {r['wait4_maxrss_kib'] / 2**20:.2f} GiB, "
                        f"load avg {r['load_before']} -> {r['load_after']}"
                        + (f", waited {r['waited_s']:.0f} s for idle (busy {r['busy_before']:.2f})" if "waited_s" in r else ""),
                        flush=True,
                    )
                all_runs += runs
                rows.append(summarize(config_label((model, base, variant, args.nice)), runs))
            for lora in args.baselines:
                # the same work in a bare loop (bench/minimal_lora_loop.py): what the trainer costs per step
                for variant in [v for v in ("plain", "gc") if v in args.variants]:
                    runs = []
                    name = f"{model}_{base}_bare-{lora}_{variant}"
                    for repeat in range(args.repeats):
                        command = [
                            sys.executable, str(ROOT / "bench" / "minimal_lora_loop.py"), "--json",
                            str(runs_dir / f"{name}_{repeat}.json"), "--model", str(path), "--data", str(data),
                            "--resolution", str(RESOLUTION[model]), "--lora", lora, "--steps", str(args.steps),
                            *(["--gradient_checkpointing"] if variant == "gc" else []),
                        ]  # fmt: skip
                        r = run_process(command, runs_dir / f"{name}_{repeat}.json", runs_dir / f"{name}_{repeat}.log",
                                        args.wait_idle, args.nice)
                        r.update(model=model, base=base, variant=variant, loop=f"bare-{lora}", repeat=repeat)
                        runs.append(r)
                        print(f"{name} #{repeat + 1}: {r['s_per_step']:.3f} s/step, step 1 ends at "
                              f"{r['first_step_ends_s']:.1f} s, peak {r['wait4_maxrss_kib'] / 2**20:.2f} GiB", flush=True)
                    baselines.append({
                        "model": model, "base": base, "variant": variant, "loop": f"bare-{lora}", "nice": args.nice,
                        "unet_lora_modules": runs[0]["unet_lora_modules"],
                        **{k: median_of(runs, k) for k in ("s_per_step", "first_step_ends_s", "wait4_maxrss_kib",
                                                           "load_s", "latent_cache_s")},
                        "s_per_step_range": [min(r["s_per_step"] for r in runs), max(r["s_per_step"] for r in runs)],
                        "runs": runs,
                    })
    for row in rows:
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        row["steps"] = args.steps
    json_path = Path(args.json)
    if args.append and json_path.is_file():
        # keep the other configurations of an earlier invocation; these replace their own
        old = json.loads(json_path.read_text(encoding="utf-8"))
        mine = {config_key(r) for r in rows}
        kept = []
        for row in old["summary"]:
            key = config_key(row)
            if key not in mine:  # summarized again: older files may lack newer columns
                runs = [r for r in old["runs"] if config_key(r) == key]
                kept.append({**summarize(config_label(key), runs),
                             "date": row.get("date"), "steps": row.get("steps")})
        rows = kept + rows
        all_runs = [r for r in old["runs"] if config_key(r) not in mine] + all_runs
        order = {(m, b, v): i for i, (m, b, v) in enumerate(
            (m, b, v) for m in ("sd15", "tiny") for b in ("file", "folder") for v in VARIANTS)}
        rows.sort(key=lambda r: (r.get("nice", 0), order[r["model"], r["base"], r["variant"]]))
    if args.append and json_path.is_file() and not baselines:
        baselines = json.loads(json_path.read_text(encoding="utf-8")).get("baselines", [])
    print()
    print(format_table(rows))
    if baselines:
        print()
        print(format_baselines(baselines))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"cpus": os.cpu_count(), "summary": rows, "runs": all_runs, "baselines": baselines}, indent=1),
        encoding="utf-8",
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child = argparse.ArgumentParser()
        child.add_argument("--child", action="store_true")
        child.add_argument("--json", required=True)
        child.add_argument("--cprofile")
        child.add_argument("--torch_profile")
        split = sys.argv.index("--")
        opts = child.parse_args(sys.argv[1:split])
        sys.exit(child_main(opts.json, sys.argv[split + 1 :], opts.cprofile, opts.torch_profile))
    main()
