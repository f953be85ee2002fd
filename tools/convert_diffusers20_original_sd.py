"""Convert a Stable Diffusion 1.x/2.x model between a diffusers folder and an LDM single file (.ckpt/.safetensors).

Same arguments as kohya-ss/sd-scripts' tool of this name:

    python tools/convert_diffusers20_original_sd.py model.safetensors out_folder --v1 --reference_model ./some_diffusers_model
    python tools/convert_diffusers20_original_sd.py diffusers_folder model.safetensors --fp16

The direction follows the paths: a file is read/written as an LDM checkpoint, anything
else as a diffusers folder (or a hub id when reading).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.models.checkpoint_io import read_checkpoint
from library.models.loading import (
    HUB_CONFIG_FILES,
    SINGLE_FILE_SUFFIXES,
    ModelConfigError,
    ModelLoadError,
    load_base_model,
    resolve_model_location,
)
from library.tool_entry import run_tool

REFERENCE_HINT = "pass --reference_model <a diffusers folder of the same architecture>"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_to_load", help="source: .ckpt/.safetensors file, diffusers folder or hub id")
    parser.add_argument("model_to_save", help="destination: a .ckpt/.safetensors file, or a folder for diffusers")
    parser.add_argument("--v1", action="store_true", help="the source is SD1.x (needed for single files)")
    parser.add_argument("--v2", action="store_true", help="the source is SD2.x (needed for single files)")
    parser.add_argument("--v_parameterization", action="store_true", help="SD2 768-v model (sets the saved scheduler)")
    parser.add_argument("--unet_use_linear_projection", action="store_true", help="accepted for compatibility (detected)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="load as fp16 (diffusers) / save as fp16 (single file)")
    precision.add_argument("--bf16", action="store_true", help="save as bf16 (single file)")
    precision.add_argument("--float", action="store_true", help="save as float32 (single file)")
    parser.add_argument("--save_precision_as", choices=["fp16", "bf16", "float"], default=None, help="precision of the saved weights")
    parser.add_argument("--epoch", type=int, default=0, help="epoch stored in a .ckpt (added to the source's)")
    parser.add_argument("--global_step", type=int, default=0, help="step stored in a .ckpt (added to the source's)")
    parser.add_argument(
        "--reference_model",
        default=None,
        help="diffusers folder or hub id of the same architecture: its unet/vae/text_encoder configs build a "
        "single-file source's modules (instead of inferring them from the weights), and its scheduler and "
        "tokenizer are copied into a diffusers output",
    )
    parser.add_argument("--use_safetensors", action="store_true", help="diffusers output with .safetensors weights")
    parser.add_argument("--vae", default=None, help="replace the VAE while converting")
    return parser


def save_precision(args) -> str | None:
    if args.save_precision_as:
        return args.save_precision_as
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "float" if args.float else None


def convert(args) -> Path:
    from library.models.saving import save_model

    source_is_file = Path(args.model_to_load).is_file()
    if source_is_file and args.v1 == args.v2:
        raise SystemExit("error: a single-file source needs exactly one of --v1 or --v2")
    reference = resolve_model_location(args.reference_model, HUB_CONFIG_FILES) if args.reference_model else None
    try:
        parts = load_base_model(
            args.model_to_load, v2=args.v2, v_parameterization=args.v_parameterization, vae=args.vae,
            config_folder=reference,
        )
    except ModelConfigError as err:
        raise ModelLoadError(f"{err.reason}; {REFERENCE_HINT}") from None
    target = Path(args.model_to_save)
    if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
        # Keys we do not convert (EMA copies, buffers) are carried over from a single-file source.
        source, epoch, step = read_checkpoint(args.model_to_load) if source_is_file else (None, 0, 0)
        fmt = "safetensors" if target.suffix.lower() == ".safetensors" else "ckpt"
        return save_model(
            target, parts, fmt, precision=save_precision(args),
            epoch=epoch + args.epoch, global_step=step + args.global_step, source_state_dict=source,
        )
    if reference is not None:
        _adopt_reference(parts, reference)
    fmt = "diffusers_safetensors" if args.use_safetensors else "diffusers"
    return save_model(target, parts, fmt, precision=save_precision(args))


def _adopt_reference(parts, folder: Path) -> None:
    from diffusers import DDPMScheduler

    from library.models.tokenizer import load_clip_tokenizer

    if (folder / "tokenizer").is_dir():
        parts.tokenizer = load_clip_tokenizer(folder / "tokenizer")
    if (folder / "scheduler").is_dir():
        parts.noise_scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), _convert_and_report, argv)


def _convert_and_report(args: argparse.Namespace) -> int:
    print(f"saved {convert(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
