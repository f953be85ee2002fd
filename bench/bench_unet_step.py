"""The SD1.5 U-Net's training step alone (forward + backward with our LoRA), for CPU speed experiments.

    .venv/bin/python bench/bench_unet_step.py [--latent 16] [--repeats 5] [--variants fp32 bf16 channels_last ...]
        [--no_routing] [--no_lora] [--profile]

Loads the full-size SD1.5 single file of bench_model_loading.py (random weights; built by
bench_train_network.py if missing), attaches networks.lora rank 4 / alpha 1 to the U-Net, and times
forward + MSE + backward on a random latent and random encoder states (batch 1), the LoRA gradients
dropped after each step. Each variant runs twice untimed, then `--repeats` timed; the medians go to
docs/benchmarks.md ("CPU training speed"). Variants:

- `fp32`: as train_network.py runs it (convolutions routed by library/training/cpu_convolutions.py
  unless --no_routing);
- `bf16`: the frozen U-Net weights cast to bf16, the step under CPU bf16 autocast (as
  `--mixed_precision bf16`; after this variant the weights stay bf16);
- `channels_last`: model and input in channels-last memory format;
- `unmapped`: every weight copied out of the memory-mapped file into ordinary memory first;
- `compile`: torch.compile (inductor) of the U-Net's forward; prints the compile + first-step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train_network import RESULTS, ensure_models  # noqa: E402
from library.models.loading import load_base_model  # noqa: E402
from library.training.cpu_convolutions import route_weight_bound_convolutions  # noqa: E402
from networks.lora import create_network  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["fp32"],
                        choices=["fp32", "bf16", "channels_last", "unmapped", "compile"])  # fmt: skip
    parser.add_argument("--latent", type=int, default=16, help="latent size (image size / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_routing", action="store_true", help="keep torch's own convolution paths")
    parser.add_argument("--no_lora", action="store_true", help="no LoRA: the input requires the gradient instead")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step per variant")
    args = parser.parse_args()

    model = ensure_models(RESULTS / "models", ["sd15"])["sd15", "file"]
    parts = load_base_model(str(model))
    unet = parts.unet.requires_grad_(False)
    if not args.no_routing:
        route_weight_bound_convolutions(unet)
    params = []
    if not args.no_lora:
        network = create_network(1.0, 4, 1, parts.vae, parts.text_encoder, unet)
        network.apply_to(parts.text_encoder, unet, False, True)
        params = [p for p in network.parameters() if p.requires_grad]
    unet.train()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, args.latent, args.latent, generator=generator).requires_grad_(args.no_lora)
    hidden = torch.randn(1, 77, 768, generator=generator)
    timestep = torch.tensor([500])

    def step(autocast: bool = False, channels_last: bool = False) -> None:
        x = latent.to(memory_format=torch.channels_last) if channels_last else latent
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(x, timestep, hidden).sample
        torch.nn.functional.mse_loss(out.float(), latent.detach()).backward()
        for p in params:
            p.grad = None
        latent.grad = None

    def measure(name: str, **kwargs) -> None:
        step(**kwargs)
        step(**kwargs)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(**kwargs)
            times.append(time.perf_counter() - start)
        print(f"{name:16s} median {statistics.median(times):.3f} s, fastest {min(times):.3f} s", flush=True)
        if args.profile:
            with torch.profiler.profile(record_shapes=True) as profile:
                step(**kwargs)
            print(profile.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))

    for variant in args.variants:
        if variant == "fp32":
            measure("fp32")
        elif variant == "bf16":
            for name, module in unet.named_modules():
                if "lora" not in name:
                    for p in module.parameters(recurse=False):
                        p.data = p.data.bfloat16()
            measure("bf16 autocast", autocast=True)
        elif variant == "channels_last":
            unet.to(memory_format=torch.channels_last)
            measure("channels_last", channels_last=True)
            unet.to(memory_format=torch.contiguous_format)
        elif variant == "unmapped":
            with torch.no_grad():
                for p in unet.parameters():
                    p.data = p.data.clone()
            measure("unmapped")
        elif variant == "compile":
            unet.forward = torch.compile(unet.forward)
            start = time.perf_counter()
            step()
            print(f"compile + first step {time.perf_counter() - start:.1f} s", flush=True)
            measure("compiled")


if __name__ == "__main__":
    main()
