"""Merge LoRA files into one LoRA of a chosen rank: Σ ratio·ΔW per module, re-factored by SVD.

    python networks/svd_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors \
        --ratios 0.7 0.3 --new_rank 8 --new_conv_rank 4

Each module of the result is the best approximation of the weighted sum at that rank (Eckart-Young);
the share of each module's ΔW kept is reported. `--lbws` weights blocks per model as LoRA Block Weight
lists (12, 17, 20 or 26 numbers, the first one for the text encoder).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.lora_tools import merge
from library.lora_tools.files import PRECISION_CHOICES, check_output_name, minimum_metadata, write_lora
from library.tool_entry import run_tool

logger = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="svd_merge_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision of the saved file; default: --precision")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="precision of the saved factors when --save_precision is not given (the SVD itself "
                             "always runs in fp32)")
    parser.add_argument("--save_to", default=None, help="output LoRA: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--models", nargs="*", help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio of each LoRA (default 1 each)")
    parser.add_argument("--lbws", nargs="*", help="per-model block weights, JSON lists such as [1,0,0,1,1,1,1,1,1,1,1,1]")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (Linear and 1x1 conv)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    parser.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default cpu)")
    parser.add_argument("--no_metadata", action="store_true", help="only the minimum ss_* metadata, no modelspec.*")
    parser.add_argument("--clamp_quantile", type=float, default=1.0,
                        help="clamp factor entries at this quantile of their magnitudes (upstream always used 0.99, "
                             "which changes ΔW); default 1: no clamping")
    parser.add_argument("--verbose", action="store_true", help="print the share of ΔW kept for every module")
    return parser


def run(args) -> int:
    save_to = check_output_name(args.save_to)
    inputs = merge.load_inputs(args.models, args.ratios, args.lbws)
    new_conv_rank = args.new_rank if args.new_conv_rank is None else args.new_conv_rank
    modules, report = merge.merge_loras_svd(inputs, args.new_rank, new_conv_rank, args.device, args.clamp_quantile)
    if args.verbose:
        for name, kept in report.items():
            print(f"{name:75} | rank {kept.rank} | fro retained {kept.fro:.1%}, sum(S) retained {kept.sum:.1%}")
    fro = [k.fro for k in report.values()]
    lowest = min(report.items(), key=lambda kv: kv[1].fro)
    print(f"Frobenius norm of Σ ratio·ΔW retained: mean {sum(fro) / len(fro):.2%}, lowest {lowest[1].fro:.2%} ({lowest[0]})")
    described = ", ".join(f"{Path(i.path).name} x {i.ratio:g}" for i in inputs)
    comment = f"SVD merge to rank {args.new_rank} (conv {new_conv_rank}) of {described}"
    metadata = minimum_metadata(modules, inputs[0].metadata, comment, args.no_metadata, title=save_to.stem)
    write_lora(save_to, modules, metadata, args.save_precision or args.precision)
    print(f"saved the merged LoRA ({len(modules)} modules) to {save_to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
