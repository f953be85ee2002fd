"""Peak memory and time to load a full-size SD1.5 model (random weights) from an LDM single file and a diffusers folder.

    .venv/bin/python bench/bench_model_loading.py [--work DIR]

Builds the files once in DIR (about 8.6 GB of disk), then loads each in a fresh
process and reports peak resident memory (VmHWM) against the file size and
against the same process's memory just before loading (imports only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# VmHWM (peak RSS) is per address space, so unlike ru_maxrss it does not inherit the parent's peak.
LOADER = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from library.models.loading import load_base_model
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
before = status("VmRSS")
t = time.perf_counter()
parts = load_base_model({path!r})
elapsed = time.perf_counter() - t
after_load = status("VmHWM")
# safetensors tensors are memory-mapped: pages count once touched. Touch every weight so the
# figure is the footprint of a model in use, not of a lazily mapped file.
with torch.no_grad():
    for m in (parts.unet, parts.vae, parts.text_encoder):
        for p in m.parameters():
            p.sum()
peak = status("VmHWM")
params = sum(p.numel() * p.element_size() for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters())
print(json.dumps({{"seconds": elapsed, "rss_before_kib": before, "rss_after_load_kib": after_load, "rss_peak_kib": peak, "weights_bytes": params}}))
"""


def build_files(work: Path) -> tuple[Path, Path]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.sd15_configs import SD15_TEXT, SD15_UNET, SD15_VAE
    from library.models.components import StableDiffusionParts
    from library.models.loading import make_noise_scheduler
    from library.models.saving import save_model
    from library.models.tokenizer import build_clip_tokenizer

    single, folder = work / "sd15_random.safetensors", work / "sd15_random"
    if single.is_file() and folder.is_dir():
        return single, folder
    torch.manual_seed(0)
    parts = StableDiffusionParts(
        tokenizer=build_clip_tokenizer(work / "tok"),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        unet=UNet2DConditionModel(**SD15_UNET),
        vae=AutoencoderKL(**SD15_VAE),
        noise_scheduler=make_noise_scheduler(False),
        v2=False,
        v_parameterization=False,
        source="random",
        source_format="diffusers",
    )
    save_model(single, parts, "safetensors")
    save_model(folder, parts, "diffusers_safetensors")
    return single, folder


def measure(path: Path) -> dict:
    code = LOADER.format(root=str(ROOT), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "models"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    single, folder = build_files(work)
    print(f"files ready in {time.perf_counter() - t:.1f} s; single file {single.stat().st_size / 2**30:.2f} GiB")
    for label, path in (("LDM single file", single), ("diffusers folder", folder)):
        r = measure(path)
        gib = 2**20
        weights = r["weights_bytes"] / 2**30
        print(
            f"{label:17s} load {r['seconds']:5.1f} s | peak RSS after load {r['rss_after_load_kib'] / gib:.2f} GiB, "
            f"with every weight touched {r['rss_peak_kib'] / gib:.2f} GiB (imports {r['rss_before_kib'] / gib:.2f} GiB) "
            f"| weights {weights:.2f} GiB | peak / weights = {r['rss_peak_kib'] / gib / weights:.2f}"
        )


if __name__ == "__main__":
    main()
