"""LoRA (or DreamBooth) training with our script and sd-scripts' beside it, runs alternating.

    .venv/bin/python bench/bench_vs_sd_scripts.py --sd_scripts DIR --sd_python PY [--sd_pythonpath DIR ...]
        [--script train_network|train_db] [--variants plain te gc] [--repeats 3] [--steps 12]
        [--mixed_precision no|bf16]

The reference configuration of issue 19 (docs/benchmarks.md): the full-size SD1.5 single file with
random weights (bench_model_loading.py's, built if missing), 12 generated 128x128 images with .txt
captions, LoRA rank 4 / alpha 1, batch 1, fp32, cached latents, 12 steps, no data-loader workers; the
same command line for both (sd-scripts gets `--tokenizer_cache_dir` holding the model's own tokenizer,
as it cannot reach the hub). Each run is a fresh process; runs alternate ours, theirs, ours, theirs...
so that a slow minute of the machine hits both. Ours is timed by bench_train_network.py's child (the
clock at each `after_step`), theirs by bench_train_db.py's sd-scripts child (the updates of its "steps"
progress bar); s/step is the median of steps 3-12 of a run, and a configuration's figure the median
over its runs. Variants: `te` trains the text encoder's LoRA too (no --network_train_unet_only),
`gc` adds --gradient_checkpointing. `--script train_db` runs both train_db.py with
bench_train_db.py's options instead (the whole U-Net trained, lr 1e-6, sdpa).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_train_db  # noqa: E402
from bench.bench_train_db import run_measured, tokenizer_cache  # noqa: E402
from bench.bench_train_network import (  # noqa: E402
    MEASURED_FROM,
    RESULTS,
    ensure_models,
    load_average,
    train_argv,
    warm_page_cache,
    write_dataset,
)

VARIANTS = {"plain": [], "te": [], "gc": ["--gradient_checkpointing"]}


def argv_for(script: str, variant: str, model: Path, data: Path, out: Path, steps: int, mixed_precision: str) -> list[str]:
    if script == "train_db":
        extra = VARIANTS[variant] if variant == "te" else bench_train_db.FROZEN_TE + VARIANTS[variant]
        argv = bench_train_db.train_argv(model, data, out, 128, steps, extra)
    else:
        argv = train_argv(model, data, out, 128, steps, VARIANTS[variant])
        if variant == "te":
            argv.remove("--network_train_unet_only")
    argv[argv.index("--mixed_precision") + 1] = mixed_precision
    return argv


def one_run(impl: str, argv: list[str], name: str, args, work: Path, folder: Path) -> dict:
    script = f"{args.script}.py"
    runs_dir = RESULTS / "vs_sd_scripts_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    json_out, log = runs_dir / f"{name}.json", runs_dir / f"{name}.log"
    if impl == "ours":
        child = "bench_train_network.py" if args.script == "train_network" else "bench_train_db.py"
        command = [sys.executable, str(ROOT / "bench" / child), "--child", "--json", str(json_out), "--", *argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        return run_measured(command, json_out, log, ROOT, env)
    sd_dir = Path(args.sd_scripts).resolve()
    argv = [*argv, "--tokenizer_cache_dir", str(tokenizer_cache(folder, work))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "sd_scripts_hf_home"),
           "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in args.sd_pythonpath)}  # fmt: skip
    command = [os.path.abspath(args.sd_python), str(ROOT / "bench" / "bench_train_db.py"), "--sd_child",
               "--sd_dir", str(sd_dir), "--sd_script", script, "--json", str(json_out), "--", *argv]  # fmt: skip
    return run_measured(command, json_out, log, sd_dir, env)


def summary(runs: list[dict]) -> dict:
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "runs": len(runs),
        "s_per_step": med("s_per_step"),
        "s_per_step_each": [round(r["s_per_step"], 3) for r in runs],
        "fastest_step_s": min(min(r["step_s"][MEASURED_FROM - 1 :]) for r in runs),
        "first_step_ends_s": med("first_step_ends_s"),
        "peak_rss_gib": med("wait4_maxrss_kib") / 2**20,
        "load_before": [r["load_before"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd_scripts", required=True, metavar="DIR", help="a kohya-ss/sd-scripts checkout")
    parser.add_argument("--sd_python", required=True, metavar="PY", help="the interpreter of its own venv")
    parser.add_argument("--sd_pythonpath", metavar="DIR", nargs="*", default=[],
                        help="folders put on PYTHONPATH for sd-scripts (e.g. a torchvision stand-in)")  # fmt: skip
    parser.add_argument("--script", choices=["train_network", "train_db"], default="train_network")
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--work", default=str(RESULTS / "models"), help="where the model files are (built if missing)")
    parser.add_argument("--json", default=str(RESULTS / "vs_sd_scripts.json"))
    args = parser.parse_args()

    work = Path(args.work)
    models = ensure_models(work, ["sd15"])
    model, folder = models["sd15", "file"], models["sd15", "folder"]
    data = write_dataset(RESULTS / "train_data_128px", 128)
    warm_page_cache(model)
    print(f"machine: {os.cpu_count()} CPU(s), load average {load_average()}", flush=True)
    results = {}
    for variant in args.variants:
        runs: dict[str, list[dict]] = {"ours": [], "sd-scripts": []}
        for repeat in range(args.repeats):
            for impl in ("ours", "sd-scripts"):
                out = RESULTS / "vs_sd_scripts_runs" / f"{impl}_out"
                argv = argv_for(args.script, variant, model, data, out, args.steps, args.mixed_precision)
                name = f"{args.script}_{impl}_{variant}_{args.mixed_precision}_{repeat}"
                r = one_run(impl, argv, name, args, work, folder)
                shutil.rmtree(out, ignore_errors=True)
                runs[impl].append(r)
                print(f"{variant} {impl} #{repeat + 1}: {r['s_per_step']:.3f} s/step, step 1 ends at "
                      f"{r['first_step_ends_s']:.1f} s, peak {r['wait4_maxrss_kib'] / 2**20:.2f} GiB, "
                      f"load {r['load_before']}", flush=True)  # fmt: skip
        results[variant] = {impl: summary(rs) for impl, rs in runs.items()}
        results[variant]["ratio_s_per_step"] = results[variant]["ours"]["s_per_step"] / results[variant]["sd-scripts"]["s_per_step"]
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "script": args.script, "mixed_precision": args.mixed_precision,
                                           "cpus": os.cpu_count(), "results": results}, indent=1))  # fmt: skip
    print("\n| variant | s/step ours | s/step sd-scripts | ratio | step 1 ends ours / theirs s | peak RSS ours / theirs GiB |")
    print("|---|---|---|---|---|---|")
    for variant, r in results.items():
        o, t = r["ours"], r["sd-scripts"]
        print(f"| {variant} | {o['s_per_step']:.2f} {o['s_per_step_each']} | {t['s_per_step']:.2f} {t['s_per_step_each']} "
              f"| **{r['ratio_s_per_step']:.2f}** | {o['first_step_ends_s']:.1f} / {t['first_step_ends_s']:.1f} "
              f"| {o['peak_rss_gib']:.2f} / {t['peak_rss_gib']:.2f} |")  # fmt: skip
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
