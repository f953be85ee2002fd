"""GPU training-step benchmark: SD1.5 U-Net (random weights), LoRA and full fine-tune, bf16, 512 px.

    python bench/bench_gpu.py                        # the default matrix on CUDA (what bench/gpu.sh runs)
    python bench/bench_gpu.py --configs lora-b8-sdpa-adamw full-b8-sdpa-adamw8bit-fullbf16
    python bench/bench_gpu.py --smoke                # same code on the CPU: tiny U-Net, 64 px, 2 steps
    python bench/bench_gpu.py --prepare_wheels .whl  # here, with network: the wheels the GPU machine lacks

What one configuration is (the step train_network.py / train_db.py / fine_tune.py run, without the data
pipeline): a U-Net built on the fly from bench/sd15_configs.py with random weights (no files, no hub);
random latents (batch, 4, res/8, res/8), noise, timesteps and random encoder hidden states
(batch, 77, 768) stand in for the VAE and the text encoder, which do not run per step. Timed: the
U-Net forward under bf16 autocast, the MSE loss, backward, gradient clipping (--max_grad_norm 1.0,
the default), the optimizer step and zero_grad, then torch.cuda.synchronize.

- `lora`: networks.lora (rank --lora_rank, alpha 1, the 192 Linear/1x1 U-Net sites), U-Net only
  (--network_train_unet_only): the frozen U-Net in bf16, the LoRA weights in fp32, as the trainer
  places them.
- `full`: every U-Net weight trains (train_db.py / fine_tune.py): fp32 weights, gradients and
  optimizer state under bf16 autocast (`--mixed_precision bf16`); `-fullbf16` is `--full_bf16`
  (weights, gradients and optimizer state in bf16).
- attention through our own switch (library.models.attention.set_attention_backend): `sdpa`,
  `xformers`, `sliced` (--mem_eff_attn); optimizer through our own builder
  (library.training.optimizers.build_optimizer): `adamw`, `adamw8bit` (bitsandbytes); `-gc` adds
  --gradient_checkpointing.

Reported per configuration: s/step (median of the timed steps after the warm-up steps, with the
range), it/s, images/s, peak GPU memory (torch.cuda.max_memory_allocated, reset after the model is
built, so it holds weights, gradients, optimizer state and activations), FLOPs per step counted by
torch.utils.flop_counter.FlopCounterMode over one forward + backward with sdpa attention and without
gradient checkpointing (model FLOPs: recomputation and the optimizer are not counted; xformers rows
use the same count), achieved TFLOP/s and MFU against the card's dense bf16 peak (a small table by
device name, or --peak_tflops). A configuration that cannot run here (xformers or bitsandbytes
missing, out of memory) gets a row saying why; each one stops at --config_timeout seconds and the
run skips what is left after --budget seconds. Results: gpu_bench.json and gpu_bench.md in $OUT if
set, else bench/results/, rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = (
    "lora-b1-sdpa-adamw",
    "lora-b8-sdpa-adamw",
    "full-b1-sdpa-adamw",
    "full-b8-sdpa-adamw",
    "lora-b8-xformers-adamw",
    "full-b8-xformers-adamw",
    "lora-b8-sdpa-adamw8bit",
    "full-b8-sdpa-adamw8bit",
    "full-b8-sdpa-adamw-fullbf16",
    "full-b8-sdpa-adamw8bit-fullbf16",
    "lora-b8-sdpa-adamw",  # the second config again: its spread against the first is the noise
)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; first match on the name wins.
PEAK_BF16_TFLOPS = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("a10", 125.0),
    ("l4", 121.0),
)

CONFIG_RE = re.compile(
    r"^(?P<mode>lora|full)-b(?P<batch>\d+)-(?P<attn>sdpa|xformers|sliced)-(?P<optim>adamw8bit|adamw)"
    r"(?P<flags>(-fullbf16|-gc)*)$"
)
HIDDEN_TOKENS = 77


# ---------------------------------------------------------------- configurations


def parse_config(name: str) -> dict:
    match = CONFIG_RE.match(name)
    if not match:
        raise SystemExit(
            f"unknown configuration {name!r}: write MODE-bBATCH-ATTENTION-OPTIMIZER[-fullbf16][-gc], "
            "MODE lora|full, ATTENTION sdpa|xformers|sliced, OPTIMIZER adamw|adamw8bit (e.g. full-b8-sdpa-adamw8bit)"
        )
    flags = match.group("flags").split("-")[1:]
    config = {
        "name": name,
        "mode": match.group("mode"),
        "batch": int(match.group("batch")),
        "attention": match.group("attn"),
        "optimizer": {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}[match.group("optim")],
        "full_bf16": "fullbf16" in flags,
        "gradient_checkpointing": "gc" in flags,
    }
    if config["full_bf16"] and config["mode"] != "full":
        raise SystemExit(f"{name}: -fullbf16 is for full fine-tuning (LoRA's frozen U-Net is bf16 already)")
    return config


def unet_config(model: str) -> dict:
    from bench.sd15_configs import SD15_UNET

    if model == "sd15":
        return dict(SD15_UNET)
    # the SD1.5 structure shrunk to the tiny test model's widths (tools/build_tiny_models.py)
    return dict(
        SD15_UNET, block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32, sample_size=8
    )


def peak_tflops_for(device_name: str) -> tuple[float | None, str]:
    lowered = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in lowered:
            return tflops, f"table entry '{key}'"
    return None, "unknown device: MFU not computed (give --peak_tflops)"


# ---------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device_name=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    for name in ("diffusers", "bitsandbytes", "xformers", "accelerate", "safetensors", "peft"):
        env[name] = package_version(name)
    return env


def print_environment(env: dict) -> None:
    print("== environment")
    for key, value in env.items():
        shown = value if value is not None else "NOT INSTALLED" if key in _PACKAGE_ROLES else "-"
        role = f"  ({_PACKAGE_ROLES[key]})" if key in _PACKAGE_ROLES and value is None else ""
        print(f"  {key:16s} {shown}{role}")


_PACKAGE_ROLES = {
    "diffusers": "needed for every row: carry it as a wheel (bench/gpu.sh --prepare)",
    "bitsandbytes": "AdamW8bit rows are skipped",
    "xformers": "xformers rows say 'not installed'",
    "accelerate": "not used by this benchmark",
    "safetensors": "diffusers needs it",
    "peft": "not used by this benchmark",
}


def matmul_tflops(device: str) -> float | None:
    """A large bf16 matrix product on random data, median of 10 after 3 warm-ups: the card's practical ceiling."""
    import torch

    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------- one configuration


class ConfigTimeout(Exception):
    pass


def build(config: dict, model: str, device: str, lora_rank: int, learning_rate: float):
    """U-Net (+ LoRA) placed as the trainer places them, and the optimizer from our builder."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from library.training.optimizers import build_optimizer

    diffusers_logging.set_verbosity_error()  # not the "modules kept in float32" notice at every cast
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(model))
    network = None
    if config["mode"] == "lora":
        import networks.lora as lora

        unet.to(dtype=torch.bfloat16)  # frozen weights in the compute dtype
        unet.requires_grad_(False)
        network = lora.create_network(1.0, lora_rank, 1.0, None, None, unet)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        network.to(device, dtype=torch.float32)  # trained weights in fp32
        groups = network.prepare_optimizer_params(None, learning_rate, learning_rate)
        network.prepare_grad_etc(None, unet)
        network.train()
        trainable = [p for group in groups for p in group["params"]]
    else:
        if config["full_bf16"]:
            unet.to(dtype=torch.bfloat16)
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
        groups = [{"params": trainable, "lr": learning_rate, "name": "unet"}]
    unet.train()
    opt_args = argparse.Namespace(
        optimizer_type=config["optimizer"], optimizer_args=None, learning_rate=learning_rate, max_grad_norm=1.0,
        use_8bit_adam=False, use_lion_optimizer=False, lr_scheduler="constant",
    )  # fmt: skip
    optimizer = build_optimizer(opt_args, groups).optimizer
    return unet, network, trainable, optimizer


def make_inputs(config: dict, unet, device: str, resolution: int, count: int = 2) -> list[tuple]:
    """`count` sets of (noisy latents, timesteps, hidden states, noise) on the device, drawn at random."""
    import torch

    batch, side = config["batch"], resolution // 8
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=device) ** 2  # SD's scaled_linear schedule
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    context_dim = unet.config.cross_attention_dim
    sets = []
    for _ in range(count):
        latents = torch.randn(batch, 4, side, side, device=device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = torch.randn(batch, HIDDEN_TOKENS, context_dim, device=device)
        # the trainer feeds the U-Net in the compute dtype (noisy.to(weight_dtype), hidden.to(noisy.dtype))
        sets.append((noisy.to(torch.bfloat16), timesteps, hidden.to(torch.bfloat16), noise))
    return sets


def forward_backward(unet, inputs, device: str):
    import torch

    noisy, timesteps, hidden, noise = inputs
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        prediction = unet(noisy, timesteps, hidden).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
    loss.backward()
    return loss


def count_flops(unet, inputs, device: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(unet, inputs, device)
    return int(counter.get_total_flops())


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_config(config: dict, args, peak_tflops: float | None, ceiling: float | None) -> dict:
    import torch

    from library.models.attention import AttentionBackendError, set_attention_backend

    row = dict(config, status="ok", note="")
    device = args.device
    started = time.perf_counter()
    if config["optimizer"] == "AdamW8bit" and package_version("bitsandbytes") is None:
        return dict(row, status="skipped", note="bitsandbytes not installed: AdamW8bit skipped")
    if config["attention"] == "xformers":
        from library.models.attention import check_xformers_usable

        try:
            check_xformers_usable()
        except AttentionBackendError as err:
            if package_version("xformers") is None:
                return dict(row, status="not installed", note="xformers is not installed")
            return dict(row, status="not usable", note=str(err).split(". Leave out")[0])
    unet = network = trainable = optimizer = None
    times: list[float] = []
    try:
        unet, network, trainable, optimizer = build(config, args.model, device, args.lora_rank, args.learning_rate)
        row["trained_params_m"] = round(sum(p.numel() for p in trainable) / 1e6, 2)
        if network is not None:
            row["lora_modules"] = len(network.unet_loras)
        inputs = make_inputs(config, unet, device, args.resolution)
        # model FLOPs: sdpa (FlopCounterMode does not see xformers' kernels), no recomputation
        set_attention_backend(unet)
        row["flops_per_step"] = count_flops(unet, inputs[0], device)
        optimizer.zero_grad(set_to_none=True)
        set_attention_backend(unet, xformers=config["attention"] == "xformers",
                              mem_eff_attn=config["attention"] == "sliced")  # fmt: skip
        if config["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        if device == "cuda":
            synchronize(device)
            row["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if time.perf_counter() - started > args.config_timeout:
                raise ConfigTimeout(f"stopped at {args.config_timeout:.0f} s after {i} step(s)")
            synchronize(device)
            t0 = time.perf_counter()
            loss = forward_backward(unet, inputs[i % len(inputs)], device)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss.detach()):
            row["note"] = "loss not finite"
    except ConfigTimeout as err:
        row.update(status="cut" if times else "timeout", note=str(err))
    except torch.cuda.OutOfMemoryError as err:
        times = []
        row.update(status="OOM", note=str(err).splitlines()[0][:160])
    except Exception as err:  # noqa: BLE001 - one failing configuration must not end the run
        times = []
        row.update(status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    if device == "cuda" and row["status"] in ("ok", "cut"):
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del unet, network, trainable, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if times:
        median = statistics.median(times)
        row.update(
            steps_timed=len(times), s_per_step=median, s_min=min(times), s_max=max(times),
            it_per_s=1 / median, images_per_s=config["batch"] / median,
        )  # fmt: skip
        if row.get("flops_per_step"):
            achieved = row["flops_per_step"] / median / 1e12
            row["tflops_per_s"] = achieved
            row["mfu"] = achieved / peak_tflops if peak_tflops else None
            row["of_matmul"] = achieved / ceiling if ceiling else None
    return row


# ---------------------------------------------------------------- output


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| config | status | s/step (min–max) | it/s | img/s | peak GiB | TFLOP/step | TFLOP/s | MFU | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "s_per_step" in row:
            step = f"{row['s_per_step']:.4f} ({row['s_min']:.4f}–{row['s_max']:.4f})"
        else:
            step = "–"
        flops = row.get("flops_per_step")
        mfu = row.get("mfu")
        lines.append(
            f"| {row['name']} | {row['status']} | {step} | {_fmt(row.get('it_per_s'), '.2f')} | "
            f"{_fmt(row.get('images_per_s'), '.2f')} | {_fmt(row.get('peak_mem_gib'), '.2f')} | "
            f"{_fmt(flops / 1e12 if flops else None, '.4g')} | {_fmt(row.get('tflops_per_s'), '.4g')} | "
            f"{_fmt(mfu * 100 if mfu is not None else None, '.1f')}{'%' if mfu is not None else ''} | "
            f"{row.get('note', '')} |"
        )
    return "\n".join(lines)


def write_results(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = [
        f"# bench/bench_gpu.py, {meta['date']}",
        "",
        f"{meta['env'].get('device_name')} | torch {meta['env']['torch']} (CUDA {meta['env']['torch_cuda']}) | "
        f"diffusers {meta['env']['diffusers']} | bitsandbytes {meta['env']['bitsandbytes']} | "
        f"xformers {meta['env']['xformers']}",
        f"U-Net {meta['model']} (random weights), {meta['resolution']} px, bf16 autocast, "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps; MFU against {_fmt(meta['peak_tflops'], '.0f')} "
        f"TFLOP/s dense bf16 ({meta['peak_source']}); bf16 matmul measured "
        f"{_fmt(meta['matmul_tflops'], '.0f')} TFLOP/s",
        "",
        "",
    ]
    (out_dir / "gpu_bench.md").write_text("\n".join(header) + markdown_table(rows) + "\n")


# ---------------------------------------------------------------- wheels for the GPU machine


BNB_KEEP_DEFAULT = "cpu,cuda130,cuda132"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


def pinned(name: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise SystemExit(f"{name} is not pinned in requirements.txt")


def trim_bitsandbytes_wheel(src: Path, dest: Path, keep: list[str]) -> None:
    """Copy of bitsandbytes' wheel with only the native libraries named in `keep` (e.g. cuda130); RECORD follows."""
    lib = re.compile(r"^bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        dropped = {i.filename for i in zin.infolist() if (m := lib.match(i.filename)) and m.group(1) not in keep}
        for info in zin.infolist():
            if info.filename in dropped:
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",")[0] not in dropped).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)


def prepare_wheels(dest: Path, bnb_keep: list[str]) -> None:
    """Download (pip, here) the pinned diffusers and bitsandbytes for the GPU machine's Python 3.12; trim the latter."""
    dest = dest if dest.is_absolute() else Path.cwd() / dest
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [pinned("diffusers"), pinned("bitsandbytes")]
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", tmp, *wanted]  # fmt: skip
        print("$", " ".join(cmd))
        subprocess.run(cmd, check=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            for old in dest.glob(wheel.name.split("-")[0] + "-*.whl"):
                old.unlink()  # one version of each
            if wheel.name.startswith("bitsandbytes-"):
                trim_bitsandbytes_wheel(wheel, dest / wheel.name, bnb_keep)
                trimmed = (dest / wheel.name).stat().st_size / 2**20
                print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, trimmed to {trimmed:.1f} MiB "
                      f"(native libraries kept: {', '.join(bnb_keep)})")  # fmt: skip
            else:
                shutil.copy2(wheel, dest / wheel.name)
                print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")
    wheels = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"wheels in {dest}: {wheels / 2**20:.1f} MiB")
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")  # fmt: skip
        inside = dest.name + "/" if dest.parent == ROOT else None  # the wheels, if git does not ignore them yet
        tree = sum((ROOT / f).stat().st_size for f in files
                   if f and (ROOT / f).is_file() and not (inside and f.startswith(inside)))  # fmt: skip
        print(f"working tree that travels: {tree / 2**20:.1f} MiB; with the wheels {(tree + wheels) / 2**20:.1f} MiB "
              "(the limit is 64 MiB)")  # fmt: skip
        if dest.parent == ROOT:
            exclude = ROOT / subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, check=True,
                                            capture_output=True, text=True).stdout.strip()  # fmt: skip
            line = f"/{dest.name}/"
            if line not in (exclude.read_text().splitlines() if exclude.exists() else []):
                exclude.parent.mkdir(parents=True, exist_ok=True)
                with exclude.open("a") as f:
                    f.write(line + "\n")
                print(f"added {line} to {exclude} (git ignores the wheels; the device call carries them)")
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"(could not size the working tree: {err})")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--resolution", type=int, default=512, help="image size in pixels (latents are /8)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="MODE-bBATCH-ATTENTION-OPTIMIZER[-fullbf16][-gc] names (default: --list)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-6)
    parser.add_argument("--config_timeout", type=float, default=60.0, help="seconds one configuration may take")
    parser.add_argument("--budget", type=float, default=330.0, help="no configuration starts after this many seconds")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: table)")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else bench/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny U-Net, 64 px, 1 warm-up + 2 timed steps: checks the code only")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the default configurations and exit")
    parser.add_argument("--prepare_wheels", metavar="DIR", default=None,
                        help="(here, with network) diffusers + trimmed bitsandbytes wheels into DIR")  # fmt: skip
    parser.add_argument("--bnb_keep", default=BNB_KEEP_DEFAULT,
                        help=f"bitsandbytes libraries --prepare_wheels keeps (default {BNB_KEEP_DEFAULT})")  # fmt: skip
    args = parser.parse_args()
    if args.list:
        print("\n".join(DEFAULT_CONFIGS))
        return 0
    if args.prepare_wheels:
        prepare_wheels(Path(args.prepare_wheels), [k.strip() for k in args.bnb_keep.split(",") if k.strip()])
        return 0
    if args.smoke:
        args.device, args.model, args.resolution, args.steps, args.warmup = "cpu", "tiny", 64, 2, 1
    configs = [parse_config(name) for name in args.configs]

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU visible to torch {torch.__version__}: nothing to measure (--smoke runs on the CPU)")
        return 2
    env = environment(args.device)
    print_environment(env)
    if env["diffusers"] is None:
        print("diffusers is missing: every row needs its UNet2DConditionModel. Here, run bench/gpu.sh --prepare "
              "and carry .whl with the device call (docs/benchmarks.md, 'GPU (bench/gpu.sh)').")  # fmt: skip
        return 2
    peak, source = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else peak_tflops_for(env["device_name"])
    print(f"peak dense bf16 used for MFU: {_fmt(peak, '.0f', 'none')} TFLOP/s ({source})")
    ceiling = matmul_tflops(args.device)
    if ceiling:
        print(f"bf16 8192^3 matmul on random data: {ceiling:.0f} TFLOP/s (the practical ceiling)")
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "env": env, "model": args.model, "resolution": args.resolution,
        "steps": args.steps, "warmup": args.warmup, "lora_rank": args.lora_rank, "peak_tflops": peak,
        "peak_source": source, "matmul_tflops": ceiling, "smoke": args.smoke,
        "inputs": "random latents, noise, timesteps and encoder hidden states (no VAE / text encoder per step)",
    }  # fmt: skip
    rows: list[dict] = []
    started = time.perf_counter()
    print(f"== {len(configs)} configuration(s), {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.config_timeout:.0f} s each at most, none started after {args.budget:.0f} s")  # fmt: skip
    for config in configs:
        if time.perf_counter() - started > args.budget:
            row = dict(config, status="skipped", note=f"budget of {args.budget:.0f} s spent")
        else:
            row = run_config(config, args, peak, ceiling)
        if any(done["name"] == config["name"] for done in rows):
            row["note"] = "; ".join(filter(None, ["the same again: the spread is the noise", row["note"]]))
        rows.append(row)
        step = f"{row['s_per_step']:.4f} s/step" if "s_per_step" in row else row["note"]
        extra = f", peak {row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else ""
        mfu = f", MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else ""
        wall = f"[{row.get('wall_s', 0):.1f} s]"
        print(f"{config['name']:34s} {row['status']:13s} {step}{extra}{mfu}  {wall}", flush=True)
        write_results(out_dir, meta, rows)
    print(f"== done in {time.perf_counter() - started:.0f} s; results in {out_dir}/gpu_bench.json and gpu_bench.md\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
