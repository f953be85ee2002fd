"""Extract a LoRA from a fine-tuned model: per layer, the best rank-`--dim` approximation of (tuned − original).

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 8 --conv_dim 4

Both models may be LDM files or diffusers folders. The text encoder is kept whenever it changed: the largest
difference is compared with a threshold (0 for full-precision files, the rounding step for fp16/bf16 ones, or
--min_diff), and both are reported. From Python: library.lora_tools.extract.extract_lora(...).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.errors import UserError
from library.lora_tools.extract import extract_lora
from library.lora_tools.files import PRECISION_CHOICES, check_output_name, minimum_metadata, write_lora
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="extract_lora_from_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2", action="store_true", help="the models are SD 2.x (read from .safetensors keys)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="metadata says v-prediction (default: same as --v2)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL models (not supported here: SD1.x/2.x only)")
    parser.add_argument("--load_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision the models are loaded in (default float)")
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision of the saved LoRA (default float)")
    parser.add_argument("--model_org", required=True, help="the original model: .safetensors/.ckpt or diffusers folder")
    parser.add_argument("--model_tuned", required=True, help="the fine-tuned model; the LoRA is tuned − original")
    parser.add_argument("--save_to", required=True, help="output LoRA: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None, help="rank for 3x3 convs (default: none extracted)")
    parser.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default cpu)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp factor entries at this quantile of their magnitudes (default 0.99; 1 = none)")
    parser.add_argument("--min_diff", type=float, default=None,
                        help="the text encoder is extracted when its largest |ΔW| exceeds this (default: automatic, "
                             "0 for full-precision files)")
    parser.add_argument("--no_metadata", action="store_true", help="only the minimum ss_* metadata, no modelspec.*")
    parser.add_argument("--load_original_model_to", default=None, help="accepted for compatibility (SDXL only upstream)")
    parser.add_argument("--load_tuned_model_to", default=None, help="accepted for compatibility (SDXL only upstream)")
    return parser


def run(args) -> int:
    if args.sdxl:
        raise UserError("--sdxl: this project handles SD1.x/2.x models only")
    save_to = check_output_name(args.save_to)
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 0):
        raise UserError("--dim must be at least 1 and --conv_dim not negative")
    result = extract_lora(
        args.model_org, args.model_tuned, args.dim, args.conv_dim, v2=args.v2,
        v_parameterization=args.v_parameterization, device=args.device, clamp_quantile=args.clamp_quantile,
        min_diff=args.min_diff, load_precision=args.load_precision,
    )  # fmt: skip
    print(f"text encoder: largest |ΔW| {result.text_encoder_max_diff:.3g}, threshold "
          f"{result.text_encoder_threshold:.3g}: {'extracted' if result.text_encoder_kept else 'unchanged, left out'}")
    fro = [k.fro for k in result.report.values()]
    print(f"{len(fro)} modules; Frobenius norm of ΔW retained: mean {sum(fro) / len(fro):.2%}, lowest {min(fro):.2%}")
    base = "sd_v2" if result.v2 else "sd_v1"
    source = {"ss_v2": str(result.v2), "ss_base_model_version": base + ("_v" if result.v_parameterization else "")}
    comment = f"extracted from {Path(args.model_tuned).name} − {Path(args.model_org).name}, dim {args.dim}, conv_dim {args.conv_dim}"
    metadata = minimum_metadata(result.modules, source, comment, args.no_metadata, title=save_to.stem)
    write_lora(save_to, result.modules, metadata, args.save_precision)
    print(f"saved the extracted LoRA to {save_to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
