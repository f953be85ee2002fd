"""Dataset command-line options (reference/cli.md §3), with the names and defaults of kohya-ss/sd-scripts.

Every option here also acts as the last fallback for the values of a `--dataset_config` file
(reference/dataset-config.md §4); `library.data.config` reads them from the parsed namespace.
"""

from __future__ import annotations

import argparse
from typing import Any

from library.data.config_schema import RESIZE_INTERPOLATIONS, DatasetSupport


def add_dataset_arguments(parser: argparse.ArgumentParser, support: DatasetSupport) -> None:
    """Add the dataset options of a script that accepts what `support` describes."""
    group = parser.add_argument_group("dataset")
    # The scripts with DreamBooth datasets are the ones with regularization images; those with
    # fine-tuning datasets take --in_json; textual inversion has no caption dropout.
    _add_sources(group, regularization=support.dreambooth, metadata=support.fine_tuning)
    _add_captions(group, dropout=support.dropout)
    _add_augmentation(group)
    _add_masks(group, masked_loss=support.masked_loss)
    _add_validation_split(group)
    _add_buckets(group)
    _add_caching_and_loading(group)


def _option(group, name: str, kind: type, default: Any, text: str, **extra) -> None:
    group.add_argument(f"--{name}", type=kind, default=default, help=text, **extra)


def _flag(group, name: str, text: str) -> None:
    group.add_argument(f"--{name}", action="store_true", help=text)


def _add_sources(group, regularization: bool, metadata: bool) -> None:
    _option(group, "dataset_config", str, None, "dataset .toml/.json file (then the folder options are ignored)")
    _option(
        group, "train_data_dir", str, None,
        "parent of '<repeats>_<identifier> <class>' image folders (e.g. '10_sls frog'), or with --in_json the images",
    )
    if regularization:
        _option(group, "reg_data_dir", str, None, "parent of '<repeats>_<class>' regularization image folders")
        _option(group, "prior_loss_weight", float, 1.0, "loss weight of regularization images (default 1.0)")
    if metadata:
        _option(group, "in_json", str, None, "metadata .json with the captions (fine-tuning)")
        _option(group, "dataset_repeats", int, 1, "times the --in_json images are repeated per epoch (default 1)")
    _option(group, "resolution", str, None, "training size: '512' or 'width,height' such as '512,768'")
    _option(group, "train_batch_size", int, 1, "images per batch on each device (default 1)")
    _option(
        group, "dataset_class", str, None,
        "sd-scripts' custom dataset class (pkg.module.Class): refused here, describe the data with --dataset_config",
    )


def _add_captions(group, dropout: bool) -> None:
    _option(group, "caption_extension", str, ".caption", "caption file suffix (default .caption; taggers write .txt)")
    _option(group, "caption_extention", str, None, argparse.SUPPRESS)  # upstream's misspelled alias, kept working
    _flag(group, "shuffle_caption", "shuffle the separated tags of each caption")
    _option(group, "caption_separator", str, ",", "tag separator in captions (default ',')")
    _option(group, "keep_tokens", int, 0, "keep the first N tags in place (never shuffled or dropped)")
    _option(
        group, "keep_tokens_separator", str, "",
        "marker between the fixed and the shuffled part of a caption, e.g. '|||' (overrides --keep_tokens)",
    )
    _option(
        group, "secondary_separator", str, None,
        "joins tags that move and drop together; replaced by --caption_separator afterwards",
    )
    _flag(group, "enable_wildcard", "allow {a|b} choices and multi-line captions (one random line per step)")
    _option(group, "caption_prefix", str, None, "text put before every caption")
    _option(group, "caption_suffix", str, None, "text put after every caption")
    if dropout:
        _option(group, "caption_dropout_rate", float, 0.0, "probability of training an image with an empty caption")
        _option(group, "caption_dropout_every_n_epochs", int, 0, "use empty captions every N-th epoch (0 = never)")
        _option(group, "caption_tag_dropout_rate", float, 0.0, "probability of dropping each shuffled tag")
    _option(group, "token_warmup_min", int, 1, "tags used at the first step of the tag warm-up (default 1)")
    _option(
        group, "token_warmup_step", float, 0,
        "step at which all tags are used (below 1: a fraction of --max_train_steps; 0 = no warm-up)",
    )


def _add_augmentation(group) -> None:
    _flag(group, "color_aug", "weak hue/gamma jitter (not with latent caching)")
    _flag(group, "flip_aug", "random horizontal flips")
    _option(group, "face_crop_aug_range", str, None, "face-centred crop scale range such as '2.0,4.0'")
    _flag(group, "random_crop", "crop at random instead of the centre (not with latent caching)")


def _add_masks(group, masked_loss: bool) -> None:
    """Loss masks (docs/datasets.md, "Masked loss"): the images' transparency, or mask images."""
    _flag(
        group, "alpha_mask",
        "use each image's alpha channel as its loss mask (transparent pixels do not train); the default of "
        "every subset's alpha_mask",
    )
    if masked_loss:
        _flag(
            group, "masked_loss",
            "weight the loss by mask images: each subset's conditioning_data_dir holds one mask per image, same "
            "name, its first channel 0..255 = weight 0..1",
        )
        _option(
            group, "conditioning_data_dir", str, None,
            "with --train_data_dir and --masked_loss: the folder of mask images (a sub-folder named like an image "
            "folder, e.g. '10_sks dog', is used for that folder's images)",
        )


def _add_validation_split(group) -> None:
    """Which images are held out for the validation loss (library/training/validation.py runs it)."""
    _option(
        group, "validation_split", float, 0.0,
        "fraction of each dataset's training images held out for the validation loss, never trained on "
        "(default 0: no validation; regularization images are never held out)",
    )
    _option(
        group, "validation_seed", int, None,
        "seed that picks the held-out images and the validation noise (default: --seed); the same seed holds out "
        "the same images in every run",
    )


def _add_buckets(group) -> None:
    _flag(group, "enable_bucket", "aspect-ratio buckets instead of one fixed size")
    _option(group, "min_bucket_reso", int, 256, "smallest bucket side (default 256)")
    _option(group, "max_bucket_reso", int, 1024, "largest bucket side (default 1024)")
    _option(group, "bucket_reso_steps", int, 64, "bucket side step; a multiple of 64 for SD (default 64)")
    _flag(group, "bucket_no_upscale", "one bucket per image size; never enlarge small images")
    _option(
        group, "resize_interpolation", str, None, "resize filter (default: area to shrink, lanczos to enlarge)",
        choices=list(RESIZE_INTERPOLATIONS),
    )


def _add_caching_and_loading(group) -> None:
    _flag(group, "cache_latents", "encode every image with the VAE once and keep the latents in memory")
    _flag(group, "cache_latents_to_disk", "also store latents in .npz files by the images (implies --cache_latents)")
    _option(group, "vae_batch_size", int, 1, "images per VAE batch while caching latents (default 1)")
    _flag(group, "skip_cache_check", "trust existing .npz latent files without checking them")
    _flag(group, "skip_unreadable_images", "skip unreadable or empty image files with a warning instead of stopping")
    _flag(
        group, "cache_info",
        "keep each image folder's captions, image sizes and decode checks in <image_dir>/metadata_cache.json "
        "(sd-scripts' file) and reuse them while the files are unchanged; the default of every DreamBooth/mask "
        "subset's cache_info",
    )
    _flag(group, "debug_dataset", "show the training batches instead of training")
    _option(group, "max_data_loader_n_workers", int, 8, "data loading processes (default 8, at most the CPU count)")
    _flag(group, "persistent_data_loader_workers", "keep the data loading workers alive between epochs")
