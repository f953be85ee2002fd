"""Each 3x3 convolution of the SD1.5 U-Net on the CPU: torch's own path against the product path.

    .venv/bin/python bench/bench_cpu_convolutions.py [--latent 16 64] [--batch 1 8] [--repeats 7]

For every distinct (weight shape, input shape) the U-Net applies at the given latent size and
batch, times forward + backward (input gradient only, as in LoRA training: the base weights are
frozen) through `F.conv2d` (torch's choice: oneDNN or its own im2col) and through
`library.training.cpu_convolutions.conv3x3_as_product`, and says which the routing rule picks.
The totals weigh each shape by how often the U-Net calls it. The table is the evidence for
`MIN_WEIGHT_ELEMENTS` / `MAX_POSITIONS`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sd15_configs import SD15_UNET  # noqa: E402
from library.training.cpu_convolutions import conv3x3_as_product, routable, takes_product_path  # noqa: E402


def conv_calls(latent: int, batch: int) -> Counter:
    """(out, in, input h, input w, batch) of every routable-shaped 3x3 convolution call of one U-Net forward."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    calls: Counter = Counter()

    def record(module, inputs):
        x = inputs[0]
        calls[(module.out_channels, module.in_channels, x.shape[2], x.shape[3], x.shape[0])] += 1

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        unet(torch.zeros(batch, 4, latent, latent, device="meta"), 500, torch.zeros(batch, 77, 768, device="meta"))
    return calls


def time_ms(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        fn(x, weight, bias).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
        x.grad = None
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[16, 64], help="latent sizes (image size / 8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and inputs (bf16: as under autocast)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    for latent in args.latent:
        for batch in args.batch:
            calls = conv_calls(latent, batch)
            print(f"\n## latent {latent}x{latent} ({latent * 8} px), batch {batch}, {args.dtype}\n")
            print("| weight (out x in x 3 x 3) | input h x w | calls | torch ms | product ms | ratio | routed |")
            print("|---|---|---|---|---|---|---|")
            total_torch = total_routed = 0.0
            for (out_ch, in_ch, h, w, n), count in sorted(calls.items(), key=lambda kv: (-kv[0][1] * kv[0][0], kv[0])):
                conv = torch.nn.Conv2d(in_ch, out_ch, 3, padding=1).requires_grad_(False).to(dtype)
                x = torch.randn(n, in_ch, h, w, dtype=dtype, requires_grad=True)
                default = time_ms(lambda x, wt, b: F.conv2d(x, wt, b, 1, 1), x, conv.weight, conv.bias, args.repeats)
                product = time_ms(conv3x3_as_product, x, conv.weight, conv.bias, args.repeats)
                routed = routable(conv) and takes_product_path(x, conv.weight)
                total_torch += count * default
                total_routed += count * (product if routed else default)
                print(f"| {out_ch} x {in_ch} | {h} x {w} | {count} | {default:.1f} | {product:.1f} | "
                      f"{product / default:.2f} | {'yes' if routed else ''} |", flush=True)
            print(f"\nall 3x3 convolutions, forward + input backward: torch {total_torch:.0f} ms, "
                  f"with the routing {total_routed:.0f} ms ({total_routed / total_torch:.2f})")


if __name__ == "__main__":
    main()
