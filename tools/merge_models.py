"""Weighted average of Stable Diffusion checkpoints (LDM .safetensors/.ckpt), tensor by tensor.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.7 0.3 --output ab.safetensors
    python tools/merge_models.py --models a.safetensors b.safetensors --unet_only --output ab.safetensors

Ratios default to 1/n each. With --unet_only the VAE and text encoder are the first model's. Keys missing
from a model take the first model's value for that share; keys only in later models are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.errors import UserError
from library.lora_tools.checkpoints import merge_checkpoints
from library.lora_tools.files import PRECISION_CHOICES
from library.models.checkpoint_io import write_state_dict
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="merge_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="checkpoints to merge (.safetensors or .ckpt)")
    parser.add_argument("--output", help="output file (.safetensors is added when it has no .safetensors/.ckpt ending)")
    parser.add_argument("--ratios", nargs="+", type=float, help="ratio of each model (default 1/n each)")
    parser.add_argument("--unet_only", action="store_true", help="merge the U-Net only; VAE and text encoder of the first")
    parser.add_argument("--device", default="cpu", help="where the math runs (default cpu)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float", help="precision of the math")
    parser.add_argument("--saving_precision", "--save_precision", dest="saving_precision", choices=PRECISION_CHOICES,
                        default="float", help="precision of the saved file (default float)")
    parser.add_argument("--show_skipped", action="store_true", help="list the keys skipped (not in the first model)")
    return parser


def run(args) -> int:
    if not args.models or not args.output:
        raise UserError("--models and --output are required")
    output = Path(args.output)
    if output.suffix.lower() not in (".safetensors", ".ckpt"):
        output = output.with_name(output.name + ".safetensors")
    state_dict, metadata = merge_checkpoints(
        args.models, args.ratios, unet_only=args.unet_only, device=args.device, precision=args.precision,
        save_precision=args.saving_precision, show_skipped=args.show_skipped,
    )  # fmt: skip
    is_safetensors = output.suffix.lower() == ".safetensors"
    write_state_dict(output, state_dict, metadata=metadata if is_safetensors else None,
                     ckpt_extra=None if is_safetensors else {"epoch": 0, "global_step": 0})  # fmt: skip
    print(f"saved the merged model to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
