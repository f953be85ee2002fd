"""Full-size SD1.5 U-Net (random weights) on CUDA: one training-shaped step per attention backend and dtype.

    python bench/bench_attention_cuda.py [--sizes 512] [--batches 1 4] [--steps 6]

For each backend (sdpa, sliced, xformers when usable) and dtype (fp16, bf16) it runs
forward + backward with the weights frozen except a small trainable input adapter
(the shape of LoRA training: gradients flow through the frozen U-Net), and reports
the median seconds per step over the steps after two warm-ups and the peak VRAM.
Needs a CUDA GPU; prints why and exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_case(unet, backend: str, dtype, size: int, batch: int, steps: int) -> tuple[float, float]:
    import torch

    from library.models.attention import set_attention_backend

    set_attention_backend(unet, xformers=backend == "xformers", mem_eff_attn=backend == "sliced")
    latents = torch.randn(batch, 4, size // 8, size // 8, device="cuda", dtype=dtype)
    context = torch.randn(batch, 77, 768, device="cuda", dtype=dtype)
    adapter = torch.zeros(1, device="cuda", dtype=dtype, requires_grad=True)
    timesteps = torch.randint(0, 1000, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = unet(latents + adapter, timesteps, context).sample
        out.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return
    from diffusers import UNet2DConditionModel

    from bench.sd15_configs import SD15_UNET
    from library.models.attention import AttentionBackendError, check_xformers_usable

    backends = ["sdpa", "sliced"]
    try:
        check_xformers_usable()
        backends.append("xformers")
    except AttentionBackendError as err:
        print(f"xformers skipped: {err}")
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for dtype in (torch.float16, torch.bfloat16):
        unet = UNet2DConditionModel(**SD15_UNET).to("cuda", dtype)
        unet.requires_grad_(False)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        for size in args.sizes:
            for batch in args.batches:
                for backend in backends:
                    seconds, vram = run_case(unet, backend, dtype, size, batch, args.steps)
                    print(
                        f"{str(dtype).split('.')[-1]:9s} {size}px batch {batch} {backend:8s} "
                        f"{seconds * 1000:7.1f} ms/step  {batch / seconds:6.2f} img/s  peak VRAM {vram:5.2f} GiB"
                    )
        del unet
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
