"""Sort the images of a fine-tuning metadata file into buckets and write their VAE latents to disk.

    python finetune/prepare_buckets_latents.py train_data meta_clean.json meta_lat.json model.safetensors \\
        --batch_size 4 --max_resolution 512,512 --mixed_precision bf16

The dataset is built exactly as `fine_tune.py --in_json meta_lat.json --resolution 512,512 --enable_bucket`
builds it (same bucket options), and each image's latents go to the training cache file beside it
(`<image>_<W>x<H>_sd.npz`), so training with `--cache_latents_to_disk` and the same bucket options
encodes nothing again. `train_resolution` (the bucket) is recorded per key in the output metadata.
`--skip_existing` keeps files that are still valid (same image, bucket and options) and redoes the
others. See docs/guide.md §7.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.data.dataset_scan import resolve_metadata_keys
from library.data.latent_preparation import cache_dataset_latents, vae_for_caching
from library.data.metadata_tools import read_metadata, write_metadata
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="prepare_buckets_latents.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("train_data_dir", help="folder of the images")
    parser.add_argument("in_json", help="metadata file to read")
    parser.add_argument("out_json", help="metadata file to write (with train_resolution per image)")
    parser.add_argument("model_name_or_path", help="model whose VAE encodes: a checkpoint, a diffusers folder, a VAE file or a hub id")
    parser.add_argument("--v2", action="store_true", help="accepted for compatibility (the VAE is the same)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per VAE batch")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None, help="accepted for compatibility")
    parser.add_argument("--max_resolution", default="512,512", help="training size 'width,height' (the buckets' area)")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="one bucket per image size; never enlarge")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="VAE precision (fp16 keeps the VAE in float32, as training does)")
    parser.add_argument("--full_path", action="store_true", help="the metadata's keys are full image paths")
    parser.add_argument("--flip_aug", action="store_true", help="also store the latents of the flipped image")
    parser.add_argument("--alpha_mask", nargs="?", const="true", default=None,
                        help="also store each image's alpha channel as a loss mask")
    parser.add_argument("--skip_existing", action="store_true", help="keep latent files that are still valid")
    parser.add_argument("--recursive", action="store_true", help="accepted for compatibility (the metadata lists the images)")
    return parser


def training_options(args):
    """The options of `fine_tune.py` that describe this dataset (its own parser, so its checks apply)."""
    import fine_tune
    from library.args import build_parser as build_training_parser

    parser = build_training_parser(fine_tune.INFO)
    fine_tune.FineTuneRecipe.add_arguments(parser)
    argv = ["--train_data_dir", args.train_data_dir, "--in_json", args.in_json, "--resolution", args.max_resolution,
            "--enable_bucket", "--min_bucket_reso", str(args.min_bucket_reso), "--max_bucket_reso",
            str(args.max_bucket_reso), "--bucket_reso_steps", str(args.bucket_reso_steps)]
    argv += ["--bucket_no_upscale"] if args.bucket_no_upscale else []
    argv += ["--flip_aug"] if args.flip_aug else []
    argv += ["--alpha_mask"] if args.alpha_mask not in (None, "", "false", "False", "0") else []
    return parser.parse_args(argv)


def prepare(args) -> int:
    import fine_tune

    options = training_options(args)
    group, result = cache_dataset_latents(
        options, fine_tune.INFO.datasets, lambda: vae_for_caching(args.model_name_or_path, args.mixed_precision),
        args.batch_size, reencode=not args.skip_existing,
    )
    buckets = {str(item.image_path): list(item.bucket) for item in group.cache_items()}
    metadata = read_metadata(args.in_json)
    for key, path in resolve_metadata_keys(list(metadata), args.train_data_dir).items():
        if path in buckets:
            metadata[key]["train_resolution"] = buckets[path]
    write_metadata(args.out_json, metadata)
    print(f"latents: {result.encoded} image(s) encoded, {result.reused} still valid and kept; wrote {args.out_json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
