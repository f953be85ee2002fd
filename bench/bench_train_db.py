"""DreamBooth (full U-Net) training speed and memory of train_db.py: s/step, peak RSS, time to the first step.

    .venv/bin/python bench/bench_train_db.py [--models sd15 tiny] [--bases file folder]
        [--variants adamw adamw+gc adafactor adamw+te ...] [--repeats 2] [--steps 12]
        [--sd_scripts DIR --sd_python PY --sd_pythonpath DIR]

Every run is a fresh process (imports, model loading and latent caching count) that runs
train_db.py's own recipe (`DreamBoothRecipe`) through `run_recipe`, with one extra `Hooks` that
records the clock at `at_start` (everything set up, the loop about to begin) and at each
`after_step`:

    python bench/bench_train_db.py --child --json OUT.json -- <train_db.py options>

Options of every run: the whole U-Net trains, batch 1, fp32 (--mixed_precision no), --cache_latents,
--sdpa, --max_data_loader_n_workers 0, --learning_rate 1e-6, 12 images with .txt captions in a
`1_bench` DreamBooth folder, --max_train_steps 12 (one epoch), --save_model_as safetensors with
--save_precision fp16 (one save, after the last step: not in the timed steps). The text encoder is
frozen (--stop_text_encoder_training -1) except in the `+te` variants. Models: full-size SD1.5
architecture with random weights at 128 px (the files of bench_model_loading.py, built if missing)
and the tiny test model at 64 px (a smoke test). Variants: see VARIANTS; those marked CUDA need a
GPU and are refused on a CPU-only machine (--allow_cpu runs them anyway).

Reported per run (medians over --repeats runs in the table):
  s/step      median of the durations of steps 3..N (step i = after_step(i) - after_step(i-1))
  first step  seconds from process creation (psutil create_time) to at_start and to after_step(1)
  peak RSS    ru_maxrss of the training process (os.wait4 in the parent); on CUDA also
              torch.cuda.max_memory_allocated
  load / cache / save  base model loading, latent caching and the final save (wrapped in the child)

sd-scripts side by side (--sd_scripts DIR: a checkout of kohya-ss/sd-scripts with its own venv,
--sd_python its interpreter, --sd_pythonpath extra import folders such as a torchvision stand-in):
its train_db.py runs with the same options in a fresh process of that interpreter
(`bench_train_db.py --sd_child`, standard library only), which times the `update` calls of its
"steps" progress bar (tqdm) the way our hook times `after_step`; peak RSS from os.wait4 as for
ours. Its tokenizer comes from --tokenizer_cache_dir (the base folder's tokenizer/ copied there).
Results: a table on stdout and bench/results/train_db.json (per run and medians).
"""

from __future__ import annotations

import time

_T0_WALL = time.time()  # the very top of a child, before heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESOLUTION = {"sd15": 128, "tiny": 64}
MEASURED_FROM = 3  # steps MEASURED_FROM.. are timed (1-based)

FROZEN_TE = ["--stop_text_encoder_training", "-1"]
ADAFACTOR = [
    "--optimizer_type", "Adafactor",
    "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False",
]  # fmt: skip
# name: (options added to the common ones, needs CUDA, what it is)
VARIANTS: dict[str, tuple[list[str], bool, str]] = {
    "adamw": (FROZEN_TE, False, "AdamW (default), text encoder frozen"),
    "adamw+gc": (FROZEN_TE + ["--gradient_checkpointing"], False, "AdamW + gradient checkpointing"),
    "adafactor": (FROZEN_TE + ADAFACTOR, False, "Adafactor, relative_step=False, lr 1e-6"),
    "adafactor+gc": (FROZEN_TE + ADAFACTOR + ["--gradient_checkpointing"], False, "Adafactor + gradient checkpointing"),
    "adamw+te": ([], False, "AdamW, text encoder trained too (the whole run)"),
    # GPU levers: CUDA kernels (bitsandbytes' CPU kernels step, but at another speed), bf16 weights
    "adamw8bit": (FROZEN_TE + ["--optimizer_type", "AdamW8bit"], False, "bitsandbytes AdamW8bit"),
    "bf16": (FROZEN_TE + ["--mixed_precision", "bf16", "--full_bf16"], True, "bf16 weights, gradients, states"),
    "bf16+adamw8bit": (
        FROZEN_TE + ["--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "AdamW8bit"], True,
        "bf16 + AdamW8bit",
    ),
    "bf16+adafactor": (FROZEN_TE + ADAFACTOR + ["--mixed_precision", "bf16", "--full_bf16"], True, "bf16 + Adafactor"),
    "xformers": (FROZEN_TE + ["--xformers"], True, "xformers attention"),
    "mem_eff_attn": (FROZEN_TE + ["--mem_eff_attn"], True, "sliced attention (a GPU memory lever)"),
}
DEFAULT_VARIANTS = ["adamw", "adamw+gc", "adafactor"]


# ====================================================================== children


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def child_main(json_path: str, train_argv: list[str]) -> int:
    """Run train_db.py's recipe with a timing hook; write what was measured to json_path."""
    import resource

    import psutil

    create_time = psutil.Process().create_time()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from bench.bench_train_network import _schedstat, _status_kib, step_timings

    record: dict = {"process_create_wall": create_time, "interpreter_start_s": _T0_WALL - create_time, "argv": train_argv}
    events: dict = {"step_wall": [], "step_sched": []}

    import torch

    import train_db
    from library.data import latent_cache
    from library.recipe import Hooks
    from library.training import trainer
    from library.training.entry import run_recipe

    record["imports_done_s"] = time.time() - create_time
    cuda = torch.cuda.is_available()

    # --- wrap what we time inside (no behaviour change)
    original_cache = latent_cache.cache_latents

    def timed_cache(*args, **kwargs):
        start = time.perf_counter()
        out = original_cache(*args, **kwargs)
        record["latent_cache_s"] = time.perf_counter() - start
        return out

    latent_cache.cache_latents = timed_cache

    original_load = trainer.Trainer._load_base_model

    def timed_load(self):
        start = time.perf_counter()
        out = original_load(self)
        record["load_s"] = time.perf_counter() - start
        record["rss_after_load_kib"] = _status_kib("VmRSS")
        record["hwm_after_load_kib"] = _status_kib("VmHWM")
        return out

    trainer.Trainer._load_base_model = timed_load

    def at_start(ctx, progress):
        events["start_wall"] = time.time()
        events["start_sched"] = _schedstat()
        parts = ctx.parts
        record["trainable_params"] = {
            name: sum(p.numel() for p in getattr(parts, name).parameters() if p.requires_grad)
            for name in ("unet", "text_encoder", "vae")
        }
        record["dtypes"] = {name: str(next(getattr(parts, name).parameters()).dtype) for name in ("unet", "text_encoder")}
        record["device"] = str(ctx.device)
        record["optimizer"] = ctx.optimizer_description
        record["rss_at_start_kib"] = _status_kib("VmRSS")
        record["hwm_at_start_kib"] = _status_kib("VmHWM")
        record["torch_threads"] = torch.get_num_threads()
        if cuda:
            record["cuda_device"] = torch.cuda.get_device_name()
            record["cuda_allocated_at_start_bytes"] = torch.cuda.memory_allocated()

    def after_step(ctx, progress):
        events["step_wall"].append(time.time())
        events["step_sched"].append(_schedstat())
        if len(events["step_wall"]) == 1:
            record["rss_after_step1_kib"] = _status_kib("VmRSS")  # optimizer states exist from step 1 on

    class BenchRecipe(train_db.DreamBoothRecipe):
        def hooks(self, args):
            return [*super().hooks(args), Hooks(at_start=at_start, after_step=after_step)]

        def save(self, folder, name, ctx, progress):
            start = time.perf_counter()
            out = super().save(folder, name, ctx, progress)
            record.setdefault("save_s", []).append(time.perf_counter() - start)
            return out

    rc = run_recipe(BenchRecipe(), train_argv)
    end_wall = time.time()

    steps, start = events["step_wall"], events.get("start_wall")
    record["rc"] = rc
    record["steps_done"] = len(steps)
    record.update(step_timings(start, steps, create_time, end_wall))
    if start is not None and steps:
        sched = [events["start_sched"], *events["step_sched"]]
        record["step_cpu_s"] = [b[0] - a[0] for a, b in zip(sched, sched[1:])]
        record["step_runqueue_wait_s"] = [b[1] - a[1] for a, b in zip(sched, sched[1:])]
        record["cpu_s_per_step"] = statistics.median(record["step_cpu_s"][MEASURED_FROM - 1 :] or [0])
        record["runqueue_wait_s_per_step"] = statistics.median(record["step_runqueue_wait_s"][MEASURED_FROM - 1 :] or [0])
    if cuda:
        record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    record["total_s"] = end_wall - create_time
    record["ru_maxrss_self_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record["vmhwm_kib"] = _status_kib("VmHWM")
    Path(json_path).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rc


def sd_child_main(json_path: str, sd_dir: str, train_argv: list[str], script: str = "train_db.py") -> int:
    """Run one of sd-scripts' training scripts (in its own interpreter: standard library and its own packages only),
    timing the update calls of its "steps" progress bar."""
    sys.path.insert(0, str(ROOT))  # for bench.* (standard library only); sd-scripts' own path replaces it below
    from bench.bench_train_network import step_timings

    sys.path.remove(str(ROOT))

    import resource
    import runpy

    try:
        import psutil

        create_time = psutil.Process().create_time()
    except ImportError:  # from /proc: boot time + start ticks
        with open("/proc/stat") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime"))
        with open("/proc/self/stat") as file:
            ticks = int(file.read().rsplit(")", 1)[1].split()[19])
        create_time = boot + ticks / os.sysconf("SC_CLK_TCK")
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [sd_dir] + [p for p in sys.path if p not in ("", here)]
    os.chdir(sd_dir)
    record: dict = {"process_create_wall": create_time, "argv": train_argv, "implementation": "sd-scripts"}
    events: dict = {"step_wall": []}

    import tqdm

    class TimedTqdm(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._bench_steps = kwargs.get("desc") == "steps"
            if self._bench_steps:
                events["start_wall"] = time.time()  # created right before its training loop

        def update(self, n=1):
            if getattr(self, "_bench_steps", False):
                events["step_wall"].extend([time.time()] * int(n))
            return super().update(n)

    tqdm.tqdm = TimedTqdm
    sys.argv = [str(Path(sd_dir) / script), *train_argv]
    rc = 0
    try:
        runpy.run_path(str(Path(sd_dir) / script), run_name="__main__")
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    end_wall = time.time()
    steps, start = events["step_wall"], events.get("start_wall")
    record["rc"] = rc
    record["steps_done"] = len(steps)
    record.update(step_timings(start, steps, create_time, end_wall))
    record["total_s"] = end_wall - create_time
    record["ru_maxrss_self_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record["vmhwm_kib"] = _vmhwm_kib()
    Path(json_path).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rc


# ====================================================================== parent


def train_argv(model: Path, data: Path, out: Path, resolution: int, steps: int, extra: list[str]) -> list[str]:
    """The options both implementations take alike (sd-scripts' train_db.py accepts every one)."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--caption_extension", ".txt",
        "--resolution", str(resolution),
        "--output_dir", str(out),
        "--output_name", "bench",
        "--save_model_as", "safetensors",
        "--save_precision", "fp16",
        "--learning_rate", "1e-6",
        "--train_batch_size", "1",
        "--mixed_precision", "no",
        "--cache_latents",
        "--sdpa",
        "--max_train_steps", str(steps),
        "--max_data_loader_n_workers", "0",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run_measured(command: list[str], json_path: Path, log_path: Path, cwd: Path, env: dict, nice: int = 0) -> dict:
    """Run one measuring child (it writes json_path); add its peak RSS from os.wait4 and the load around it."""
    from bench.bench_train_network import _raise_priority, load_average

    json_path.unlink(missing_ok=True)
    load_before = load_average()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        preexec = (lambda: _raise_priority(nice)) if nice else None
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone (ru_maxrss in KiB)
        returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if returncode != 0 or not json_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"child failed (exit {returncode}); log {log_path}:\n{tail}")
    record = json.loads(json_path.read_text())
    if record.get("rc"):
        raise RuntimeError(f"training exited {record['rc']}; log {log_path}")
    record.update(wait4_maxrss_kib=usage.ru_maxrss, wall_s=wall, nice=nice, load_before=load_before,
                  load_after=load_average())  # fmt: skip
    return record


def tokenizer_cache(base: Path, work: Path) -> Path:
    """A --tokenizer_cache_dir for sd-scripts holding the base model's own CLIP tokenizer (no hub)."""
    folder = base if base.is_dir() else base.with_suffix("")  # the diffusers folder beside the single file
    cache = work / f"sd_scripts_tokenizer_{folder.name}"
    target = cache / "openai_clip-vit-large-patch14"
    if not (target / "vocab.json").is_file():
        shutil.copytree(folder / "tokenizer", target, dirs_exist_ok=True)
    return cache


def summarize(label: dict, runs: list[dict]) -> dict:
    from bench.bench_train_network import median_of

    out = dict(label, runs=len(runs))
    for key in ("s_per_step", "first_step_begins_s", "first_step_ends_s", "wait4_maxrss_kib", "load_s",
                "latent_cache_s", "after_last_step_to_exit_s", "total_s", "cpu_s_per_step",
                "runqueue_wait_s_per_step", "cuda_max_allocated_bytes"):  # fmt: skip
        out[key] = median_of(runs, key)
    out["s_per_step_range"] = [min(r["s_per_step"] for r in runs), max(r["s_per_step"] for r in runs)]
    out["fastest_step_s"] = min(min(r["step_s"][MEASURED_FROM - 1 :]) for r in runs)
    out["load_averages"] = [r["load_before"] for r in runs]
    for key in ("trainable_params", "optimizer", "device", "cuda_device"):
        if key in runs[0]:
            out[key] = runs[0][key]
    return out


def _num(value, digits: int, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    gib = 2**20
    lines = [
        "| impl | model | base | variant | s/step (range) | fastest step s | step 1 begins / ends s | peak RSS GiB "
        "| CUDA peak GiB | load s | latent cache s | last step to exit s | load avg 1 min |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        lo, hi = r["s_per_step_range"]
        lines.append(
            f"| {r['impl']} | {r['model']} | {r['base']} | {r['variant']} "
            f"| {r['s_per_step']:.2f} ({lo:.2f}–{hi:.2f}) | {r['fastest_step_s']:.2f} "
            f"| {r['first_step_begins_s']:.1f} / {r['first_step_ends_s']:.1f} | {r['wait4_maxrss_kib'] / gib:.2f} "
            f"| {_num(r.get('cuda_max_allocated_bytes'), 2, 2**30)} | {_num(r.get('load_s'), 1)} "
            f"| {_num(r.get('latent_cache_s'), 1)} | {_num(r.get('after_last_step_to_exit_s'), 1)} "
            f"| {', '.join(a.split()[0] for a in r['load_averages'])} |"
        )
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    """ours / sd-scripts for each configuration both ran."""
    theirs = {(r["model"], r["base"], r["variant"]): r for r in rows if r["impl"] == "sd-scripts"}
    lines = ["| model | base | variant | s/step ours / theirs | peak RSS ours / theirs | step 1 ends ours / theirs |",
             "|" + "---|" * 6]  # fmt: skip
    for r in rows:
        t = theirs.get((r["model"], r["base"], r["variant"]))
        if r["impl"] != "ours" or t is None:
            continue
        lines.append(
            f"| {r['model']} | {r['base']} | {r['variant']} | {r['s_per_step'] / t['s_per_step']:.2f} "
            f"| {r['wait4_maxrss_kib'] / t['wait4_maxrss_kib']:.2f} | {r['first_step_ends_s'] / t['first_step_ends_s']:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def row_key(r: dict) -> tuple:
    return r["impl"], r["model"], r["base"], r["variant"]


def save_results(json_path: Path, rows: list[dict], runs: list[dict], failures: list[dict], old: dict | None):
    """Write --json (with the other configurations of `old`, the file before this invocation, under --append)."""
    if old is not None:
        mine = {row_key(r) for r in rows}
        rows = [r for r in old["summary"] if row_key(r) not in mine] + rows
        runs = [r for r in old["runs"] if row_key(r) not in mine] + runs
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data = {"cpus": os.cpu_count(), "summary": rows, "runs": runs, "failures": failures}
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return rows, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15"], choices=list(RESOLUTION))
    parser.add_argument("--bases", nargs="+", default=["file"], choices=["file", "folder"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", default=str(RESULTS / "models"), help="where the model files are (built if missing)")
    parser.add_argument("--json", default=str(RESULTS / "train_db.json"))
    parser.add_argument("--append", action="store_true", help="keep the other configurations already in --json")
    parser.add_argument("--nice", type=int, default=0, help="as in bench_train_network.py (shared machines, root)")
    parser.add_argument("--allow_cpu", action="store_true", help="run CUDA variants without a GPU too")
    parser.add_argument("--no_ours", action="store_true", help="run only sd-scripts (with --sd_scripts)")
    parser.add_argument("--sd_scripts", metavar="DIR", help="a kohya-ss/sd-scripts checkout: run its train_db.py too")
    parser.add_argument("--sd_python", metavar="PY", help="the interpreter of sd-scripts' own venv")
    parser.add_argument("--sd_pythonpath", metavar="DIR", nargs="*", default=[],
                        help="folders put on PYTHONPATH for sd-scripts (e.g. a torchvision stand-in)")  # fmt: skip
    parser.add_argument("--table_only", action="store_true", help="print the table of the runs already in --json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bench.bench_train_network import ensure_models, load_average, warm_page_cache, write_dataset

    json_path = Path(args.json)
    if args.table_only:
        saved = json.loads(json_path.read_text(encoding="utf-8"))
        print(format_table(saved["summary"]))
        print(format_ratios(saved["summary"]))
        return
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        cuda_only = [v for v in args.variants if VARIANTS[v][1]]
        if cuda_only:
            parser.error(f"{', '.join(cuda_only)}: CUDA-only variants, and this machine has no GPU (--allow_cpu runs them)")
    if args.sd_scripts and not args.sd_python:
        parser.error("--sd_scripts needs --sd_python (the interpreter of its own venv)")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = RESULTS / "train_db_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(work, args.models)
    ours_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    impls = ([] if args.no_ours else ["ours"]) + (["sd-scripts"] if args.sd_scripts else [])
    print(f"machine: {os.cpu_count()} CPU(s), cuda {torch.cuda.is_available()}, load average {load_average()}")
    rows, all_runs, failures = [], [], []
    old = json.loads(json_path.read_text(encoding="utf-8")) if args.append and json_path.is_file() else None
    for model in args.models:
        data = write_dataset(RESULTS / f"train_data_{RESOLUTION[model]}px", RESOLUTION[model])
        for base in args.bases:
            path = models[model, base]
            warm_page_cache(path)
            for variant in args.variants:
                for impl in impls:
                    name = f"{impl}_{model}_{base}_{variant}"
                    runs = []
                    for repeat in range(args.repeats):
                        out = runs_dir / f"{name}_out"
                        shutil.rmtree(out, ignore_errors=True)
                        argv = train_argv(path, data, out, RESOLUTION[model], args.steps, VARIANTS[variant][0])
                        json_out, log = runs_dir / f"{name}_{repeat}.json", runs_dir / f"{name}_{repeat}.log"
                        if impl == "ours":
                            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--json", str(json_out),
                                       "--", *argv]  # fmt: skip
                            r = run_measured(command, json_out, log, ROOT, ours_env, args.nice)
                        else:
                            sd_dir = Path(args.sd_scripts).resolve()
                            argv += ["--tokenizer_cache_dir", str(tokenizer_cache(models[model, "folder"], work))]
                            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "sd_scripts_hf_home"),
                                   "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in args.sd_pythonpath)}
                            command = [os.path.abspath(args.sd_python), str(Path(__file__).resolve()), "--sd_child", "--sd_dir", str(sd_dir),
                                       "--json", str(json_out), "--", *argv]  # fmt: skip
                            try:
                                r = run_measured(command, json_out, log, sd_dir, env, args.nice)
                            except (RuntimeError, OSError) as err:  # theirs failing must not lose our figures
                                print(f"{name} #{repeat + 1}: FAILED ({str(err).splitlines()[0]})", flush=True)
                                failures.append({"name": name, "repeat": repeat, "error": str(err)[-2000:]})
                                break
                        shutil.rmtree(out, ignore_errors=True)  # the saved model (2 GB): not kept
                        if r.get("s_per_step") is None:
                            raise RuntimeError(f"{name}: no timed steps (steps done: {r.get('steps_done')}); log {log}")
                        r.update(impl=impl, model=model, base=base, variant=variant, repeat=repeat)
                        runs.append(r)
                        print(
                            f"{name} #{repeat + 1}: {r['s_per_step']:.2f} s/step (fastest "
                            f"{min(r['step_s'][MEASURED_FROM - 1:]):.2f}), step 1 ends at {r['first_step_ends_s']:.1f} s, "
                            f"peak {r['wait4_maxrss_kib'] / 2**20:.2f} GiB, load avg {r['load_before']} -> {r['load_after']}",
                            flush=True,
                        )
                    if not runs:
                        continue
                    all_runs += runs
                    rows.append({**summarize({"impl": impl, "model": model, "base": base, "variant": variant}, runs),
                                 "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps})  # fmt: skip
                    save_results(json_path, rows, all_runs, failures, old)  # after each configuration
    rows, all_runs = save_results(json_path, rows, all_runs, failures, old)
    print()
    print(format_table(rows))
    ratios = format_ratios(rows)
    if ratios:
        print()
        print(ratios)
    for failure in failures:
        print(f"failed: {failure['name']} #{failure['repeat'] + 1}")
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--child", "--sd_child"):
        child = argparse.ArgumentParser()
        child.add_argument("--child", action="store_true")
        child.add_argument("--sd_child", action="store_true")
        child.add_argument("--sd_dir")
        child.add_argument("--json", required=True)
        child.add_argument("--sd_script", default="train_db.py")
        split = sys.argv.index("--")
        opts = child.parse_args(sys.argv[1:split])
        if opts.sd_child:
            sys.exit(sd_child_main(opts.json, opts.sd_dir, sys.argv[split + 1 :], opts.sd_script))
        sys.exit(child_main(opts.json, sys.argv[split + 1 :]))
    main()
