"""Merge LoRA files into a Stable Diffusion model, or into one LoRA file (sd-scripts' merge_lora.py arguments).

    # into a model: W + ratio·ΔW per layer, saved as an LDM file (.safetensors/.ckpt) or a diffusers folder
    python networks/merge_lora.py --sd_model base.safetensors --save_to merged.safetensors \
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    # into one LoRA: exactly Σ ratio·ΔW with --concat (ranks add up); without it, the best approximation
    # at the largest input rank (exact for a single LoRA)
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 0.5 --concat
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.errors import UserError
from library.lora_tools import merge
from library.lora_tools.files import PRECISION_CHOICES, check_output_name, minimum_metadata, write_lora
from library.tool_entry import run_tool

logger = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (read from a .safetensors file's keys)")
    parser.add_argument("--v_parameterization", action="store_true", help="the model predicts v (metadata only)")
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision of the saved file; default: --precision")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="precision of the merge (the model is held in it; each sum is done in it)")
    parser.add_argument("--sd_model", default=None,
                        help="model to merge into: .safetensors/.ckpt file or diffusers folder; omit to merge the LoRAs "
                             "into one LoRA")
    parser.add_argument("--save_to", default=None,
                        help="output: .safetensors/.ckpt (a model: any other name writes a diffusers folder)")
    parser.add_argument("--models", nargs="*", help="LoRA files to merge (.safetensors/.ckpt/.pt)")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio of each LoRA (default 1 each)")
    parser.add_argument("--no_metadata", action="store_true", help="only the minimum ss_* metadata, no modelspec.*")
    parser.add_argument("--concat", action="store_true",
                        help="LoRAs into one LoRA exactly: ranks are concatenated (the rank is the sum of the ranks)")
    parser.add_argument("--shuffle", action="store_true",
                        help="with --concat, permute the ranks (ΔW is unchanged)")
    parser.add_argument("--device", default=None, help="where the math runs, e.g. cuda (default cpu)")
    return parser


def run(args) -> int:
    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    if args.shuffle and not args.concat:
        logger.warning("--shuffle only matters with --concat; ignored")
    save_precision = args.save_precision or args.precision
    inputs = merge.load_inputs(args.models, args.ratios)
    if args.sd_model:
        if not args.save_to:
            raise UserError("--save_to is required: the merged model to write")
        parts = merge.load_model(args.sd_model, args.v2, args.v_parameterization, args.precision)
        merge.merge_into_parts(parts, inputs, args.precision, args.device)
        written = merge.save_model(parts, args.sd_model, args.save_to, save_precision)
        print(f"saved the merged model to {written}")
        return 0
    save_to = check_output_name(args.save_to)
    described = ", ".join(f"{Path(i.path).name} x {i.ratio:g}" for i in inputs)
    if args.concat:
        modules = merge.merge_loras_concat(inputs, shuffle=args.shuffle)
        comment = f"merged (ranks concatenated, exact) from {described}"
    else:
        modules, report = merge.merge_loras_svd(inputs, None, None, args.device, keep_scale=True)
        lowest = min(report.items(), key=lambda kv: kv[1].fro)
        comment = f"merged (SVD to the input ranks) from {described}"
        if lowest[1].fro < 0.9999:
            logger.warning(
                "the sum has a higher rank than the inputs; the best approximation at their rank keeps down to %.2f%% "
                "of a module's ΔW (%s). Use --concat for an exact merge.", 100 * lowest[1].fro, lowest[0],
            )  # fmt: skip
    metadata = minimum_metadata(modules, inputs[0].metadata, comment, args.no_metadata, title=save_to.stem)
    write_lora(save_to, modules, metadata, save_precision)
    print(f"saved the merged LoRA ({len(modules)} modules) to {save_to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
