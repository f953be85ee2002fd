"""Loss masks: `--masked_loss` mask images (a subset's `conditioning_data_dir`) and the checks around them.

A mask image has the same stem as its training image (`cat.png` -> `<conditioning_data_dir>/cat.png`, any
image extension); its first channel, 0..255, is the loss weight 0..1 of each pixel (white trains, black
is ignored). It goes through the same resize, crop and flip as its image, so mask pixels stay on the
image pixels they describe, with or without cached latents (the mask files are read per batch, as
upstream reads its conditioning images). `alpha_mask` (the image's own transparency) is the other source
of masks; it is handled in library/data/datasets.py and stored in the latent cache.

Everything that can be checked before the model loads is: a `--masked_loss` run with a subset that has
no mask source (`masked_loss_problems`), and images without a readable mask of a matching shape
(`find_mask_files`, raising `MaskFilesError` with every problem at once).
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np
import torch

from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.config_schema import DatasetConfigError
from library.data.dataset_scan import ImageRecord
from library.data.image_headers import size_or_reason
from library.data.images import (
    check_images_readable,
    flip_horizontal,
    image_extensions,
    load_mask_channel,
    resize_and_crop,
)

__all__ = [
    "MaskFilesError",
    "find_mask_files",
    "mask_files_of",
    "mask_for_image",
    "mask_option_problems",
    "masked_loss_problems",
]

EXAMPLES = 5
ASPECT_TOLERANCE = 0.02  # relative difference of width/height between an image and its mask


class MaskFilesError(DatasetConfigError):
    """Images of a `--masked_loss` run without a usable mask image; one line per folder."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(problems, source="the mask images (--masked_loss, conditioning_data_dir)")

    def __reduce__(self):
        return (type(self), (self.problems,))


# ---------------------------------------------------------------- options and blueprints


def mask_option_problems(args: argparse.Namespace) -> list[str]:
    """Mask options that cannot work together (checked with the dataset options)."""
    if getattr(args, "conditioning_data_dir", None) and not getattr(args, "masked_loss", False):
        return [
            "--conditioning_data_dir is the folder of mask images for --masked_loss, which is not given; "
            "add --masked_loss, or leave out --conditioning_data_dir"
        ]
    return []


def masked_loss_problems(blueprints: Sequence[DatasetBlueprint], masked_loss: bool) -> list[str]:
    """With --masked_loss every training subset needs a mask source: conditioning_data_dir or alpha_mask.

    Regularization subsets may go without (their images train with full weight)."""
    if not masked_loss:
        return []
    problems = []
    for i, dataset in enumerate(blueprints):
        for j, subset in enumerate(dataset.subsets):
            if subset.is_reg or subset.conditioning_data_dir or subset.alpha_mask:
                continue
            label = subset.origin or f"datasets[{i}].subsets[{j}]"
            folder = f" (images in '{subset.image_dir}')" if subset.image_dir else ""
            problems.append(
                f"{label}{folder}: --masked_loss needs a mask for every training image, but this subset has no "
                "conditioning_data_dir; add conditioning_data_dir = '<folder of mask images named like the images>' "
                "to every subset of its [[datasets]] (with --train_data_dir: pass --conditioning_data_dir), or set "
                "alpha_mask = true (--alpha_mask) to use the images' transparency, or leave out --masked_loss"
            )
    return problems


# ---------------------------------------------------------------- finding the files


def _masks_by_stem(folder: str) -> dict[str, str]:
    """stem -> mask path for the image files directly inside `folder` (first by sorted name wins)."""
    extensions = tuple(image_extensions())
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.name[0] != "." and e.name.lower().endswith(extensions) and e.is_file())
    for name in names:
        found.setdefault(name[: name.rfind(".")], os.path.join(folder, name))
    return found


def _aspect_differs(image_size: tuple[int, int], mask_size: tuple[int, int]) -> bool:
    image_ratio = image_size[0] / image_size[1]
    mask_ratio = mask_size[0] / mask_size[1]
    return abs(image_ratio - mask_ratio) > ASPECT_TOLERANCE * image_ratio


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:EXAMPLES])
    return shown + (f" (+{len(names) - EXAMPLES} more)" if len(names) > EXAMPLES else "")


def find_mask_files(
    subset: SubsetBlueprint, records: Sequence, problems: list[str]
) -> dict[str, str]:
    """image path -> mask path for the records of a subset with conditioning_data_dir ({} without one).

    Appends to `problems` one line per kind of trouble: images without a mask, masks whose header cannot
    be read, masks whose aspect ratio differs from their image's (a mask of another size but the same
    shape is scaled)."""
    if not subset.conditioning_data_dir:
        return {}
    folder = os.path.abspath(subset.conditioning_data_dir)
    by_stem = _masks_by_stem(folder)
    masks, missing, unreadable, mismatched = {}, [], [], []
    for record in records:
        name = os.path.basename(record.path)
        mask = by_stem.get(name[: name.rfind(".")])
        if mask is None:
            missing.append(name)
            continue
        size = size_or_reason(mask)
        if isinstance(size, str):
            unreadable.append(f"{os.path.basename(mask)} ({size})")
        elif _aspect_differs((record.width, record.height), size):
            mismatched.append(f"{os.path.basename(mask)} is {size[0]}x{size[1]}, {name} {record.width}x{record.height}")
        else:
            masks[record.path] = mask
    where = subset.origin or subset.image_dir
    if missing:
        problems.append(
            f"{where}: {len(missing)} image(s) of '{subset.image_dir}' have no mask in conditioning_data_dir "
            f"'{folder}': {_examples(missing)}; put a mask image with the same name (any image extension) there "
            "for each, or move those images out of the folder"
        )
    if unreadable:
        problems.append(
            f"{where}: {len(unreadable)} mask image(s) in '{folder}' cannot be read: {_examples(unreadable)}; "
            "re-save or replace them"
        )
    if mismatched:
        problems.append(
            f"{where}: {len(mismatched)} mask image(s) in '{folder}' do not have the shape of their image: "
            f"{_examples(mismatched)}; a mask must cover the same picture (it may be smaller, with the same "
            "aspect ratio): make it again from the image"
        )
    return masks


# ---------------------------------------------------------------- loading


def mask_for_image(
    path: str | os.PathLike,
    resized_size: tuple[int, int],
    bucket: tuple[int, int],
    crop_left_top: tuple[int, int],
    flip: bool,
    interpolation: str = "auto",
) -> torch.Tensor:
    """The mask of one training image as its pixels are made: resized to `resized_size` (the mask's own size
    does not matter), cropped to `bucket` at `crop_left_top`, flipped; float32 [H_b, W_b] in 0..1."""
    mask = resize_and_crop(load_mask_channel(path, max_side=max(resized_size)), resized_size, bucket, crop_left_top, interpolation)
    if flip:
        mask = flip_horizontal(mask)
    return torch.from_numpy(mask.astype(np.float32) / 255.0)


def mask_files_of(
    blueprints: Sequence[DatasetBlueprint],
    records: Sequence[Sequence[list[ImageRecord]]],
    check_readable: bool,
    workers: int | None,
) -> list[list[dict[str, str]]]:
    """Mask image of every image of the subsets with conditioning_data_dir; ``MaskFilesError`` listing every
    image without a usable mask."""
    problems: list[str] = []
    found = [
        [find_mask_files(subset, subset_records, problems) for subset, subset_records in zip(bp.subsets, per_dataset)]
        for bp, per_dataset in zip(blueprints, records)
    ]
    if check_readable and not problems:
        paths = sorted({path for per_dataset in found for masks in per_dataset for path in masks.values()})
        bad = check_images_readable(paths, workers)
        if bad:
            problems.append(
                f"{len(bad)} mask image(s) cannot be decoded: "
                + "; ".join(f"{path} ({reason})" for path, reason in bad)
                + "; re-save or replace them"
            )
    if problems:
        raise MaskFilesError(problems)
    return found
