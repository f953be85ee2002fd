"""Checks on a built dataset group that explain a dataset before any model loads.

- ``NoTrainingDataError``: no subset gives an image to train on (an empty folder, a folder of other files,
  metadata whose keys match nothing, every image unreadable, reg images without training images); the
  message says per subset what was found and what to do.
- Warnings for subsets that give nothing while others do, for regularization images left unused by the
  1:1 balance, and for images that their bucket enlarges a lot or crops heavily.

Everything works on what scanning and bucketing already know: no image is opened here.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from library.data.config import SubsetBlueprint
from library.data.config_schema import DatasetConfigError
from library.data.dataset_scan import SubsetFindings, image_extensions_text

if TYPE_CHECKING:
    from library.data.datasets import PreparedDataset

__all__ = [
    "CROP_WARN_FRACTION",
    "NoTrainingDataError",
    "UPSCALE_WARN_FACTOR",
    "regularization_warnings",
    "resize_warnings",
    "subset_label",
    "unused_subset_message",
]

UPSCALE_WARN_FACTOR = 4.0  # linear: a side enlarged more than this to reach its bucket
CROP_WARN_FRACTION = 0.25  # of the resized image's area cut away by the crop into the bucket
EXAMPLES = 3


class NoTrainingDataError(DatasetConfigError):
    """No subset of any dataset gives an image to train on; one line per subset says what was found.

    ``warnings``: what the scan warned about before it gave up (the caller shows them before the error).
    """

    def __init__(self, problems: Sequence[str], warnings: Sequence[str] = ()) -> None:
        super().__init__(problems, source="the dataset")
        self.warnings = list(warnings)

    def __reduce__(self):
        return (type(self), (self.problems, self.warnings))

    def __str__(self) -> str:
        return "\n".join(
            ["nothing to train on: no image of the dataset can be used, so an epoch would have no batches:"]
            + [f"  - {problem}" for problem in self.problems]
        )


def subset_label(subset: SubsetBlueprint, dataset_index: int, subset_index: int) -> str:
    return subset.origin or f"datasets[{dataset_index}].subsets[{subset_index}]"


def dataset_label(origin: str, index: int) -> str:
    return origin or f"datasets[{index}]"


# ---------------------------------------------------------------- subsets that give nothing


def unused_subset_message(
    findings: SubsetFindings, label: str, skipped: Sequence[tuple[str, str]], train_samples: int
) -> str | None:
    """Why a subset gives no sample per epoch, and what to do: `<label>: <what was found>; <fix>`; None for
    a reg subset left out by the balance (``regularization_warnings`` covers it)."""
    subset = findings.subset
    if subset.metadata_file and findings.images == 0:
        return _metadata_message(findings, label)
    if not subset.metadata_file and findings.images == 0:
        return _folder_message(findings, label)
    usable = findings.images - len(skipped)
    source = f"metadata {subset.metadata_file}" if subset.metadata_file else findings.folder
    if usable <= 0:
        return (
            f"{label}: all {findings.images} image(s) of {source} were unreadable and skipped "
            f"(--skip_unreadable_images; e.g. {skipped[0][0]}: {skipped[0][1]}); re-save or replace them "
            "(the --skip_unreadable_images warning lists each with its reason)"
        )
    if subset.is_reg:
        if train_samples:
            return None  # the 1:1 balance needed none of its images: regularization_warnings says so
        return (
            f"{label}: its {usable} regularization image(s) are not used: reg images are balanced 1:1 against "
            "the training images of the same dataset, and it has none; add training images (a subset without "
            "is_reg, or --train_data_dir) to this dataset"
        )
    return f"{label}: gives no image to train on ({findings.images} image(s) in {source}); check its num_repeats"


def _metadata_message(findings: SubsetFindings, label: str) -> str:
    meta = findings.subset.metadata_file
    if findings.keys == 0:
        return f"{label}: metadata {meta} has no entries; make it again from your images and their captions"
    if findings.folder:
        where = f"an image in {findings.folder}"
        fix = (
            "point image_dir (--train_data_dir) at the folder the metadata was made for, or fix the keys "
            f"(a key is <image_dir>/<key>, <key> plus an image extension ({image_extensions_text()}), or an "
            "absolute path)"
        )
    else:
        where = "an image"
        fix = "no image_dir (--train_data_dir) is given, so only absolute paths can match: give the image folder"
    return (
        f"{label}: metadata {meta}: none of its {findings.keys} key(s) matches {where} "
        f"(e.g. key {findings.unmatched[0]!r}); {fix}"
    )


def _folder_message(findings: SubsetFindings, label: str) -> str:
    folder, files, sub_folders = findings.folder, findings.files, findings.sub_folders
    extensions = image_extensions_text()
    if not files and not sub_folders:
        return (
            f"{label}: folder {folder} is empty; put the training images ({extensions}) in it, "
            "or give the folder that holds them"
        )
    held = [f"{files} file(s)"] if files else []
    if sub_folders:
        held.append(f"{len(sub_folders)} sub-folder(s) (e.g. '{sub_folders[0]}')")
    what = f"folder {folder} holds {' and '.join(held)}, none an image this trainer reads ({extensions})"
    fixes = []
    if findings.not_read:
        what += f"; {len(findings.not_read)} look like pictures in another format (e.g. '{findings.not_read[0]}')"
        fixes.append("convert those to PNG (an animated GIF: one frame per PNG)")
    if sub_folders:
        fixes.append("sub-folders are not searched: move their images up into this folder")
    if not fixes:
        fixes.append("put the training images in it, or give the folder that holds them")
    return f"{label}: {what}; {', and '.join(fixes)}"


# ---------------------------------------------------------------- regularization balance


def regularization_warnings(datasets: Sequence["PreparedDataset"]) -> list[str]:
    """More reg images than the 1:1 balance needs: say how many are used, and which are left out."""
    warnings = []
    for index, d in enumerate(datasets):
        subsets = d.blueprint.subsets
        if d.num_train_images == 0 or not len(d.subset_ids):
            continue  # no training images at all: an unused-subset message says so
        is_reg = np.array([s.is_reg for s in subsets], dtype=bool)[d.subset_ids]
        available = int(is_reg.sum())
        used = int((is_reg & (d.repeats > 0)).sum())
        if not available or used == available:
            continue
        unused = np.flatnonzero(is_reg & (d.repeats == 0))
        unused_subsets = sorted({int(d.subset_ids[i]) for i in unused})
        if len(unused_subsets) == 1:
            label = subset_label(subsets[unused_subsets[0]], index, unused_subsets[0])
        else:
            label = dataset_label(d.blueprint.origin, index)
        warnings.append(
            f"{label}: only {used} of the {available} regularization images are used: reg images are balanced "
            f"1:1 against the {d.num_train_images} training samples per epoch and taken in order, so the other "
            f"{available - used} (e.g. {d.paths[int(unused[0])]}) are never trained on; to use them, add "
            "training images or raise the training num_repeats, or else leave out the reg images you do not need"
        )
    return warnings


# ---------------------------------------------------------------- extreme resizing


class _Flagged:
    """Images flagged for one kind of warning: the count, up to three examples and the folders they are in
    (no string is built per flagged image: a dataset of 100k thumbnails flags them all)."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[tuple[str, str]] = []
        self.folders: set[str] = set()

    def add(self, d: "PreparedDataset", indices: np.ndarray, detail: Callable[[int], str]) -> None:
        if not len(indices):
            return
        self.count += len(indices)
        for i in indices[: max(0, EXAMPLES - len(self.examples))]:
            self.examples.append((d.paths[int(i)], detail(int(i))))
        for subset_id in np.unique(d.subset_ids[indices]):
            subset = d.blueprint.subsets[int(subset_id)]
            first = int(indices[np.argmax(d.subset_ids[indices] == subset_id)])
            folder = os.path.abspath(subset.image_dir) if subset.image_dir and not subset.metadata_file else None
            self.folders.add(folder or os.path.dirname(d.paths[first]))

    def where_and_examples(self) -> tuple[str, str]:
        """(the folder that holds every flagged image, the examples named relative to it with details)."""
        folders = sorted(self.folders)
        try:
            where = os.path.commonpath(folders)
        except ValueError:  # paths on different Windows drives
            where = ""
        shown = [f"'{os.path.relpath(path, where) if where else path}' ({detail})" for path, detail in self.examples]
        more = f" and {self.count - len(shown)} more" if self.count > len(shown) else ""
        if len(folders) > 1 and where:
            where = f"{where} ({len(folders)} folders)"
        return where or "the dataset", ", ".join(shown) + more


def resize_warnings(datasets: Sequence["PreparedDataset"]) -> list[str]:
    """One line per kind for the whole group: images enlarged more than 4x to reach their bucket, and
    images that lose more than 25% of their (resized) area to the crop into it."""
    upscaled, cropped = _Flagged(), _Flagged()
    crop_modes: set[str] = set()
    for d in datasets:
        if not len(d.sizes):
            continue
        blueprint = d.blueprint
        used = d.repeats > 0
        sizes = d.sizes.astype(np.float64)
        resized = d.resized_sizes.astype(np.float64)
        buckets = d.buckets.astype(np.float64)
        scale = np.max(resized / np.maximum(sizes, 1), axis=1)
        area = np.maximum(resized[:, 0] * resized[:, 1], 1)
        lost = 1.0 - np.minimum(buckets[:, 0], resized[:, 0]) * np.minimum(buckets[:, 1], resized[:, 1]) / area
        # face crops (fixed resolution only) choose their own window; the centre-crop arithmetic does not apply
        face = np.array(
            [s.face_crop_aug_range is not None and not blueprint.enable_bucket for s in blueprint.subsets], dtype=bool
        )
        plain = ~face[d.subset_ids]
        upscaled.add(d, np.flatnonzero(used & (scale > UPSCALE_WARN_FACTOR)), partial(_enlarged, d, scale))
        flagged = np.flatnonzero(used & plain & (lost > CROP_WARN_FRACTION))
        cropped.add(d, flagged, partial(_cut, d, lost))
        if len(flagged):
            crop_modes.add(_crop_mode(blueprint))
    warnings = []
    if upscaled.count:
        where, examples = upscaled.where_and_examples()
        warnings.append(
            f"{where}: {upscaled.count} image(s) are enlarged more than {UPSCALE_WARN_FACTOR:.0f}x (per side) to fit "
            f"their bucket and will train blurry (e.g. {examples}); use larger images (each side at least a "
            "quarter of the bucket's), or remove them"
        )
    if cropped.count:
        fixes = {
            "fixed": "turn on bucketing (--enable_bucket / enable_bucket = true) so each image gets a bucket of "
            "its own shape, or crop the images to the training resolution's shape yourself",
            "buckets": "crop them to a less extreme shape yourself, or widen the bucket range "
            "(min_bucket_reso / max_bucket_reso) so a bucket of their shape exists",
            "no_upscale": "crop them to a less extreme shape yourself",
        }
        fix = "; or ".join(fixes[mode] for mode in ("fixed", "buckets", "no_upscale") if mode in crop_modes)
        where, examples = cropped.where_and_examples()
        warnings.append(
            f"{where}: {cropped.count} image(s) lose more than {CROP_WARN_FRACTION:.0%} of their area to the crop "
            f"into their bucket, so the model never sees the whole picture (e.g. {examples}); {fix}"
        )
    return warnings


def _enlarged(d: "PreparedDataset", scale: np.ndarray, i: int) -> str:
    (w, h), (rw, rh) = d.sizes[i], d.resized_sizes[i]
    return f"{w}x{h} -> {rw}x{rh}, {scale[i]:.0f}x"


def _cut(d: "PreparedDataset", lost: np.ndarray, i: int) -> str:
    (w, h), (bw, bh) = d.sizes[i], d.buckets[i]
    return f"{w}x{h} into {bw}x{bh}: {lost[i]:.0%} cut away"


def _crop_mode(blueprint) -> str:
    if not blueprint.enable_bucket:
        return "fixed"
    return "no_upscale" if blueprint.bucket_no_upscale else "buckets"
