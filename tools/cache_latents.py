"""Write the VAE latents of a training dataset to disk, outside training, from the training run's own options.

    python tools/cache_latents.py --config_file train.toml
    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml

Takes the options of train_network.py (a --config_file written for any recipe works; options that do not
describe the data or the VAE are ignored) and writes each image's training cache file
(`<image>_<W>x<H>_sd.npz`). A later run with `--cache_latents_to_disk` and the same dataset options then
encodes nothing. Files that are still valid are kept unless `--reencode`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_network
from library.args import build_parser, parse_args
from library.data.latent_preparation import cache_dataset_latents, vae_for_caching
from library.errors import UserError
from library.tool_entry import run_tool


class _Parser:
    """train_network.py's parser plus --reencode, parsed with --config_file support."""

    def __init__(self) -> None:
        self.parser = build_parser(train_network.INFO)
        self.parser.prog = "cache_latents.py"
        self.parser.description = __doc__.split("\n\n")[0]
        train_network.NetworkRecipe.add_arguments(self.parser)
        self.parser.add_argument("--reencode", action="store_true", help="encode every image again, even valid files")

    def parse_args(self, argv=None):
        return parse_args(self.parser, argv)


def cache(args) -> int:
    source = args.vae or args.pretrained_model_name_or_path
    if not source:
        raise UserError("--pretrained_model_name_or_path (or --vae) is required: its VAE encodes the images")
    _, result = cache_dataset_latents(
        args, train_network.INFO.datasets, lambda: vae_for_caching(source, args.mixed_precision, args.no_half_vae),
        args.vae_batch_size, reencode=args.reencode, seed=args.seed or 0,
    )
    print(f"latents: {result.encoded} image(s) encoded, {result.reused} still valid and kept")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(_Parser(), cache, argv)


if __name__ == "__main__":
    sys.exit(main())
