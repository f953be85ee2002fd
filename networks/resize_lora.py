"""Resize a LoRA to a new rank, fixed or chosen per module from its singular values (sd-scripts' arguments).

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \
        --dynamic_method sv_fro --dynamic_param 0.95 --verbose

Each module becomes the best approximation of its ΔW at the new rank, so the effective weight of what is kept
stays the same: at a fixed rank alpha is rescaled to keep alpha/rank; with a dynamic method alpha is kept and the
factors carry the scale (diffusers ignores per-module alphas of attention layers). Dynamic methods (the rank is
at most --new_rank):
sv_ratio t keeps the singular values within a factor t of the largest; sv_cumulative t the fewest whose sum
reaches t of the total; sv_fro t the fewest that keep t of the Frobenius norm. The share of each module's
ΔW kept is reported. sd-scripts (lora_down/lora_up), PEFT (lora_A/lora_B) and ControlLoRA (down/up) keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.lora_tools.factors import DYNAMIC_METHODS
from library.lora_tools.files import PRECISION_CHOICES, check_output_name, read_lora, updated_metadata, write_lora
from library.lora_tools.resize import report_lines, resize_lora
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="resize_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision of the saved file (default float)")
    parser.add_argument("--new_rank", type=int, default=4, help="new rank; the most a module keeps with --dynamic_method")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    parser.add_argument("--save_to", default=None, help="output LoRA: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--model", default=None, required=True, help="LoRA file to resize")
    parser.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default cpu)")
    parser.add_argument("--verbose", action="store_true", help="print rank, alpha and ΔW share kept per module")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values (--new_rank is the limit)")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="target of --dynamic_method: a ratio (sv_ratio) or a share in (0, 1]")
    return parser


def run(args) -> int:
    save_to = check_output_name(args.save_to)
    state_dict, metadata = read_lora(args.model)
    result = resize_lora(state_dict, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
                         args.device, source=args.model)  # fmt: skip
    if args.verbose:
        print("\n".join(report_lines(result)))
    print(result.summary())
    old = sorted(set(result.old_ranks.values()))
    old_text = str(old[0]) if len(old) == 1 else f"{old[0]}..{old[-1]}"
    conv = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    how = (f"dynamic resize with {args.dynamic_method} {args.dynamic_param} (at most {args.new_rank})"
           if args.dynamic_method else f"rank resized to {args.new_rank}" + ("" if conv == args.new_rank else f" (conv {conv})"))
    metadata = updated_metadata(metadata, result.modules, f"{how} from {old_text}")
    write_lora(save_to, result.modules, metadata, args.save_precision, result.other)
    print(f"saved the resized LoRA to {save_to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
