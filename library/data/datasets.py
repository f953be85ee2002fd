"""Blueprints -> datasets -> batches (dataset-config.md §6-§9).

``build_dataset_group`` scans every subset, checks that every image decodes (one error listing them
all), balances regularization images, assigns buckets, and returns a ``DatasetGroup``. The group plans
the batches of an epoch deterministically from (seed, epoch) and loads any batch on its own, seeded by
its position, so a resumed run (``start_batch``) sees the same batches, captions and augmentations.

Per dataset the images live in parallel arrays (paths, captions, sizes, buckets, repeats) rather than
one object per image, which keeps 100k-image datasets cheap to build and to send to loader workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from library.data.buckets import assign_buckets, format_bucket_table, make_bucket_resolutions, no_upscale_buckets
from library.data.captions import CaptionSettings, count_tags, process_caption, resolve_token_warmup_step
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.dataset_checks import (
    NoTrainingDataError,
    regularization_warnings,
    resize_warnings,
    subset_label,
    unused_subset_message,
)
from library.data.dataset_scan import (
    ImageRecord,
    MetadataFileError,
    ScanReport,
    SubsetFindings,
    UnreadableImagesError,
    face_crop_warnings,
    paused_garbage_collection,
    scan_subset,
)
from library.data.image_check import ImageCheck, PendingCheck, check_images_readable
from library.data.images import (
    center_crop_left_top,
    color_augment,
    face_crop_window,
    face_from_name,
    flip_horizontal,
    load_image_with_alpha,
    random_crop_left_top,
    resize_and_crop,
    to_tensor,
)
from library.data.info_cache import checked_images, save_info_caches
from library.data.latent_cache import (
    LATENT_CACHE_FORBIDS,
    LATENT_CACHE_FORBIDS_REASON,
    LatentCacheItem,
    LatentCacheResult,
    read_alpha_mask,
    read_cache,
)
from library.data.masks import mask_files_of, mask_for_image
from library.data.sample_plan import (
    BatchPlan,
    balance_regularization,
    batches_per_process,
    bucket_info_from_arrays,
    count_batches,
    epoch_generator,
    plan_dataset_batches,
    sample_generator,
    sample_random,
    shard_batches,
)
from library.data.validation_split import split_validation

__all__ = [
    "BatchPlan",
    "DatasetGroup",
    "EpochBatches",
    "ImageRecord",
    "MetadataFileError",
    "NoTrainingDataError",
    "PreparedDataset",
    "UnreadableImagesError",
    "build_dataset_group",
    "make_dataloader",
    "scan_subset",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """One dataset after scanning, balancing and bucketing. Arrays are indexed by image (N rows)."""

    blueprint: DatasetBlueprint
    paths: list[str]
    captions: list[str]
    subset_ids: np.ndarray  # (N,) index into blueprint.subsets
    sizes: np.ndarray  # (N, 2) original (w, h)
    repeats: np.ndarray  # (N,) samples per epoch after reg balancing (0 = unused reg image)
    loss_weights: np.ndarray  # (N,) prior_loss_weight for reg images, else 1.0
    buckets: np.ndarray  # (N, 2) bucket (w, h)
    resized_sizes: np.ndarray  # (N, 2) size before the crop
    ar_errors: np.ndarray  # (N,)
    bucket_ids: np.ndarray  # (N,) index into bucket_list
    bucket_list: list[tuple[int, int]]
    bucket_info: dict
    caption_settings: tuple[CaptionSettings, ...]  # per subset
    num_train_images: int  # T, with repeats
    num_reg_images: int  # R, with repeats, before balancing
    reg_report: str
    mask_paths: list[str | None] | None = None  # (N,) --masked_loss mask image per image; None: no mask images

    @property
    def bucket_table(self) -> str:
        return format_bucket_table(self.bucket_info)


# ---------------------------------------------------------------- building


def caption_settings_for(subset: SubsetBlueprint, max_train_steps: int | None) -> CaptionSettings:
    warmup = subset.token_warmup_step or 0
    if 0 < warmup < 1:
        if max_train_steps is None:
            raise ValueError(f"token_warmup_step={warmup} is a fraction of the training steps; pass max_train_steps")
        warmup = resolve_token_warmup_step(warmup, max_train_steps)
    return CaptionSettings(
        shuffle_caption=subset.shuffle_caption,
        caption_separator=subset.caption_separator or ",",
        keep_tokens=subset.keep_tokens,
        keep_tokens_separator=subset.keep_tokens_separator or "",
        secondary_separator=subset.secondary_separator,
        enable_wildcard=subset.enable_wildcard,
        caption_prefix=subset.caption_prefix,
        caption_suffix=subset.caption_suffix,
        caption_dropout_rate=subset.caption_dropout_rate,
        caption_dropout_every_n_epochs=subset.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=subset.caption_tag_dropout_rate,
        token_warmup_min=subset.token_warmup_min,
        token_warmup_step=int(warmup),
    )


def assign_dataset_buckets(blueprint: DatasetBlueprint, sizes: np.ndarray):
    """(assignments, predefined bucket set or None) for the dataset's bucketing mode (§9)."""
    width, height = blueprint.resolution
    if not blueprint.enable_bucket:
        return assign_buckets(sizes, [(width, height)]), [(width, height)]
    if blueprint.bucket_no_upscale:
        return no_upscale_buckets(sizes, width * height, blueprint.bucket_reso_steps), None
    bucket_set = make_bucket_resolutions(
        (width, height), blueprint.min_bucket_reso, blueprint.max_bucket_reso, blueprint.bucket_reso_steps
    )
    return assign_buckets(sizes, bucket_set), bucket_set


def prepare_dataset(
    blueprint: DatasetBlueprint,
    records_per_subset: Sequence[list[ImageRecord]],
    prior_loss_weight: float,
    max_train_steps: int | None = None,
    masks_per_subset: Sequence[dict[str, str]] | None = None,
) -> PreparedDataset:
    """Arrays, repeats, reg balance and buckets of one dataset from its scanned records.

    `masks_per_subset`: image path -> mask image path per subset (subsets with conditioning_data_dir)."""
    paths, captions, widths, heights, subset_ids, repeats, is_reg = [], [], [], [], [], [], []
    mask_paths: list[str | None] = []
    for index, (subset, records) in enumerate(zip(blueprint.subsets, records_per_subset)):
        if not records:
            continue
        masks = masks_per_subset[index] if masks_per_subset else {}
        mask_paths += [masks.get(record.path) for record in records]
        columns = list(zip(*records))
        paths += columns[0]
        captions += columns[1]
        widths += columns[2]
        heights += columns[3]
        count = len(records)
        subset_ids.append(np.full(count, index, dtype=np.int64))
        repeats.append(np.full(count, subset.num_repeats, dtype=np.int64))
        is_reg.append(np.full(count, subset.is_reg, dtype=bool))
    subset_ids = np.concatenate(subset_ids) if subset_ids else np.zeros(0, dtype=np.int64)
    repeats = np.concatenate(repeats) if repeats else np.zeros(0, dtype=np.int64)
    is_reg = np.concatenate(is_reg) if is_reg else np.zeros(0, dtype=bool)
    sizes = np.stack([np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)], axis=1)

    num_train = int(repeats[~is_reg].sum())
    num_reg = int(repeats[is_reg].sum())
    reg_report = ""
    if is_reg.any():
        repeats[is_reg], reg_report = balance_regularization(repeats[is_reg], num_train)
    loss_weights = np.where(is_reg, prior_loss_weight, 1.0).astype(np.float32)

    assignments, bucket_set = assign_dataset_buckets(blueprint, sizes.reshape(-1, 2))
    # = np.unique(buckets, axis=0, return_inverse=True) (rows by width, then height), ~20x faster: each
    # (w, h) row packed into one int64, w << 32 | h, which sorts the same for sides below 2**31
    keys = (assignments.buckets[:, 0].astype(np.int64) << 32) | assignments.buckets[:, 1].astype(np.int64)
    unique_keys, bucket_ids = np.unique(keys, return_inverse=True)
    bucket_list = np.stack([unique_keys >> 32, unique_keys & 0xFFFFFFFF], axis=1)
    info = bucket_info_from_arrays(assignments.buckets, repeats, assignments.ar_errors, bucket_set)
    return PreparedDataset(
        blueprint=blueprint,
        paths=paths,
        captions=captions,
        subset_ids=subset_ids,
        sizes=sizes.reshape(-1, 2),
        repeats=repeats,
        loss_weights=loss_weights,
        buckets=assignments.buckets,
        resized_sizes=assignments.resized_sizes,
        ar_errors=assignments.ar_errors,
        bucket_ids=np.asarray(bucket_ids, dtype=np.int64).reshape(-1),
        bucket_list=[(int(w), int(h)) for w, h in bucket_list],
        bucket_info=info,
        caption_settings=tuple(caption_settings_for(s, max_train_steps) for s in blueprint.subsets),
        num_train_images=num_train,
        num_reg_images=num_reg,
        reg_report=reg_report,
        mask_paths=mask_paths if any(s.conditioning_data_dir for s in blueprint.subsets) else None,
    )


def _drop_paths(records: list[ImageRecord], bad: set[str] | dict[str, str]) -> list[ImageRecord]:
    return [record for record in records if record.path not in bad] if bad else records


def build_dataset_group(
    blueprints: Sequence[DatasetBlueprint],
    *,
    prior_loss_weight: float = 1.0,
    seed: int = 0,
    skip_unreadable: bool = False,
    check_readable: bool = True,
    max_train_steps: int | None = None,
    workers: int | None = None,
    defer_readability_check: bool = False,
) -> "DatasetGroup":
    """Scan, check, balance and bucket every dataset. Raises ``UnreadableImagesError`` listing every
    unreadable image (unless ``skip_unreadable``) and every unusable caption file, ``MetadataFileError``
    for a metadata file that cannot be read, and ``NoTrainingDataError`` (saying per subset what was
    found) when no image is left to train on. Warnings are not logged here but returned in
    ``group.warnings`` for the caller to show (once).

    The decode check of every image (image_check.py: remembered between runs, in parallel) is finished here,
    unless ``defer_readability_check``: then, when its answer cannot change the group (no unreadable image or
    caption file found by the scan, no ``skip_unreadable``), it goes on in the background and
    ``group.finish_readability_check()`` waits for it and raises the same ``UnreadableImagesError``."""
    # Scanning allocates a few objects per image and makes no reference cycles; with the collector on,
    # its full passes over every live object (the trainer's imports included) cost ~25% of the build.
    with paused_garbage_collection():
        report = ScanReport()
        scanned = [[scan_subset(s, bp, report, workers) for s in bp.subsets] for bp in blueprints]
        pending = None
        if check_readable:
            paths = {record.path for per_dataset in scanned for records in per_dataset for record in records}
            paths = sorted(paths - checked_images(report.info_caches.values()))  # cache_info: decoded before
            if defer_readability_check and not (skip_unreadable or report.unreadable or report.caption_errors):
                check = ImageCheck(paths, workers, background=True)  # a CPU left for loading the model
                pending = PendingCheck(check, list(report.info_caches.values()))
            else:
                report.unreadable += [(str(p), reason) for p, reason in check_images_readable(paths, workers)]
        if pending is None:
            unreadable = report.unreadable if check_readable else None
            report.warnings += save_info_caches(report.info_caches.values(), unreadable)
        try:
            group = _group_from_scan(blueprints, scanned, report, prior_loss_weight, seed, skip_unreadable,
                                     check_readable, max_train_steps, workers)
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        group._pending_check = pending
        return group


def _group_from_scan(
    blueprints: Sequence[DatasetBlueprint],
    scanned: list[list[list[ImageRecord]]],
    report: ScanReport,
    prior_loss_weight: float,
    seed: int,
    skip_unreadable: bool,
    check_readable: bool,
    max_train_steps: int | None,
    workers: int | None,
) -> "DatasetGroup":
    """build_dataset_group after the scan and the decode check (or while the check goes on: nothing unreadable)."""
    if report.caption_errors or (report.unreadable and not skip_unreadable):
        raise UnreadableImagesError(report.unreadable, report.caption_errors)
    if report.unreadable:
        report.warnings.append(
            f"--skip_unreadable_images: {len(report.unreadable)} unreadable image(s) left out: "
            + "; ".join(f"{path} ({reason})" for path, reason in report.unreadable)
        )
    bad = dict(report.unreadable)  # path -> reason
    for bp, per_dataset in zip(blueprints, scanned):
        report.warnings += face_crop_warnings(bp, per_dataset)
    kept = [[_drop_paths(records, bad) for records in per_dataset] for per_dataset in scanned]
    masks = mask_files_of(blueprints, kept, check_readable, workers)
    splits = [split_validation(bp, per_dataset, seed) for bp, per_dataset in zip(blueprints, kept)]
    datasets = [
        prepare_dataset(bp, train, prior_loss_weight, max_train_steps, per_dataset_masks)
        for bp, (train, _), per_dataset_masks in zip(blueprints, splits, masks)
    ]
    group = DatasetGroup(datasets, seed, report.warnings)  # the caller shows group.warnings
    group.validation = _validation_group(blueprints, splits, masks, seed, max_train_steps)
    unused = _unused_subset_messages(datasets, scanned, report.findings, bad)
    if group.num_batches_per_epoch == 0:
        raise NoTrainingDataError(unused or ["no subset gives an image to train on"], report.warnings)
    group.warnings += unused + regularization_warnings(datasets) + resize_warnings(datasets)
    return group


def _validation_group(
    blueprints: Sequence[DatasetBlueprint],
    splits: Sequence[tuple[list, list]],
    masks: Sequence[list[dict[str, str]]],
    seed: int,
    max_train_steps: int | None,
) -> "DatasetGroup | None":
    """The held-out images as their own group (each image once: num_repeats 1), or None without any."""
    datasets = []
    for bp, (_, held_out), per_dataset_masks in zip(blueprints, splits, masks):
        if not any(held_out):
            continue
        once = dataclasses.replace(bp, subsets=tuple(dataclasses.replace(s, num_repeats=1) for s in bp.subsets))
        datasets.append(prepare_dataset(once, held_out, 1.0, max_train_steps, per_dataset_masks))
    if not datasets:
        return None
    seeds = [bp.validation_seed for bp in blueprints if bp.validation_seed is not None]
    return DatasetGroup(datasets, seeds[0] if seeds else seed)


def _unused_subset_messages(
    datasets: Sequence[PreparedDataset],
    scanned: Sequence[Sequence[list[ImageRecord]]],
    findings: Sequence[SubsetFindings],
    bad: dict[str, str],
) -> list[str]:
    """One message per subset that gives no sample per epoch, saying what its scan found and what to do."""
    messages, position = [], 0
    for i, (d, per_dataset) in enumerate(zip(datasets, scanned)):
        samples = np.bincount(d.subset_ids, weights=d.repeats, minlength=len(d.blueprint.subsets))
        for j, (subset, records) in enumerate(zip(d.blueprint.subsets, per_dataset)):
            found = findings[position]
            position += 1
            if samples[j] > 0:
                continue
            paths = found.unreadable + [record.path for record in records if record.path in bad]
            skipped = [(path, bad.get(path, "unreadable")) for path in paths]
            label = subset_label(subset, i, j)
            message = unused_subset_message(found, label, skipped, d.num_train_images)
            if message:
                messages.append(message)
    return messages


# ---------------------------------------------------------------- the group


class DatasetGroup:
    """All datasets of a run: counts, bucket tables, epoch batch plans and batch loading.

    Built with ``defer_readability_check``, the group may come while its images are still being decoded:
    ``finish_readability_check()`` waits for that (``batches_for_epoch`` calls it, so no batch is planned before).
    """

    def __init__(self, datasets: Sequence[PreparedDataset], seed: int = 0, warnings: Sequence[str] = ()) -> None:
        self.datasets = list(datasets)
        self.seed = seed
        self.warnings = list(warnings)
        self._latents: LatentCacheResult | None = None
        self.validation: DatasetGroup | None = None  # the held-out images (validation_split), if any
        self._pending_check: PendingCheck | None = None  # the decode check, while it runs in the background

    # ---- the decode check

    @property
    def readability_check_pending(self) -> bool:
        return self._pending_check is not None

    def finish_readability_check(self) -> None:
        """Wait for the decode check left running by ``build_dataset_group(defer_readability_check=True)``, if any:
        raises the ``UnreadableImagesError`` the build would have raised (every bad file, and the fix), and logs
        the warnings of writing cache_info files. Does nothing when no check is pending."""
        pending, self._pending_check = self._pending_check, None
        if pending is not None:
            for warning in pending.finish():
                logger.warning(warning)

    @contextlib.contextmanager
    def while_checking_images(self) -> Iterator[None]:
        """Run the block (loading a model) while the decode check goes on, then finish the check; also when the
        block fails: a bad image is then the error raised, as when the check came before the block."""
        try:
            yield
        except Exception:
            self.finish_readability_check()
            raise
        self.finish_readability_check()

    # ---- counts and tables

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(count_batches(d.bucket_ids, d.repeats, d.blueprint.batch_size) for d in self.datasets)

    def summary(self) -> str:
        """Per dataset: counts, the reg-balancing report and the bucket table (printed before training)."""
        parts = []
        for i, d in enumerate(self.datasets):
            parts.append(
                f"dataset {i} ({d.blueprint.kind}): {d.num_train_images} training samples/epoch, "
                f"{d.num_reg_images} reg samples, batch size {d.blueprint.batch_size}"
            )
            if d.reg_report:
                parts.append(d.reg_report)
            parts.append(d.bucket_table)
        if self.validation is not None:
            parts.append(f"validation: {self.validation.num_images} image(s) held out (validation_split), not trained on")
        return "\n".join(parts)

    @property
    def num_images(self) -> int:
        """Distinct images (without repeats) of every dataset."""
        return sum(int(np.count_nonzero(d.repeats > 0)) for d in self.datasets)

    # ---- plans

    def batches_for_epoch(self, epoch: int) -> list[BatchPlan]:
        """Every batch of an epoch, in training order: same (seed, epoch) -> same list."""
        self.finish_readability_check()  # no batch of images that may not decode
        rng = epoch_generator(self.seed, epoch)
        batches = []
        for index, d in enumerate(self.datasets):
            for bucket_id, images in plan_dataset_batches(d.bucket_ids, d.repeats, d.blueprint.batch_size, rng):
                batches.append((index, d.bucket_list[bucket_id], images))
        order = rng.permutation(len(batches))
        return [BatchPlan(*batches[i], position) for position, i in enumerate(order)]

    # ---- latents

    @property
    def uses_cached_latents(self) -> bool:
        return self._latents is not None

    def cache_items(self) -> list[LatentCacheItem]:
        """One item per image (duplicates across subsets/datasets removed by the cache itself)."""
        items = []
        for d in self.datasets:
            for i in np.flatnonzero(d.repeats > 0):
                items.append(
                    LatentCacheItem(
                        image_path=Path(d.paths[i]),
                        bucket=tuple(d.buckets[i]),
                        resized_size=tuple(d.resized_sizes[i]),
                        original_size=tuple(d.sizes[i]),
                        interpolation=self._interpolation(d, int(d.subset_ids[i])),
                    )
                )
        if self.validation is not None:  # held-out images are cached too, for the validation loss
            items += self.validation.cache_items()
        return items

    def set_latents(self, result: LatentCacheResult) -> None:
        """Serve cached latents instead of pixels from now on."""
        forbidden = [
            f"{s.image_dir}: {name}"
            for d in self.datasets
            for s in d.blueprint.subsets
            for name in LATENT_CACHE_FORBIDS
            if getattr(s, name)
        ]
        if forbidden:
            raise ValueError(f"{LATENT_CACHE_FORBIDS_REASON} ({'; '.join(forbidden)})")
        known = set(result.latents) | set(result.npz_paths)
        missing = [p for item in self.cache_items() if (p := item.image_path) not in known]
        if missing:
            raise ValueError(f"{len(missing)} image(s) have no cached latents, e.g. {missing[0]}")
        self._latents = result
        if self.validation is not None:
            self.validation.set_latents(result)

    # ---- loading

    @staticmethod
    def _interpolation(d: PreparedDataset, subset_id: int) -> str:
        return d.blueprint.subsets[subset_id].resize_interpolation or d.blueprint.resize_interpolation or "auto"

    def load_batch(self, plan: BatchPlan, epoch: int, step: int = 0) -> dict:
        """Pixels (or latents), processed captions and loss weights of one planned batch."""
        d = self.datasets[plan.dataset]
        captions, flips, pixels, masks = [], [], [], []
        with_masks = d.mask_paths is not None or any(s.alpha_mask for s in d.blueprint.subsets)
        for index, image in enumerate(int(i) for i in plan.images):
            subset_id = int(d.subset_ids[image])
            subset = d.blueprint.subsets[subset_id]
            rng = sample_random(self.seed, epoch, plan.position, step, index)
            captions.append(process_caption(d.captions[image], d.caption_settings[subset_id], rng, epoch=epoch, step=step))
            generator = sample_generator(self.seed, epoch, plan.position, index)
            flip = bool(subset.flip_aug and generator.random() < 0.5)
            flips.append(flip)
            if self._latents is None:
                picture, mask = self._load_pixels(d, image, subset, generator, flip)
                pixels.append(picture)
                masks.append(mask)
        batch = {
            "captions": captions,
            "loss_weights": torch.from_numpy(d.loss_weights[plan.images].astype(np.float32)),
            "image_paths": [d.paths[int(i)] for i in plan.images],
            "bucket": plan.bucket,
            "network_multiplier": d.blueprint.network_multiplier,
            "flipped": flips,
        }
        if self._latents is None:
            batch["images"] = torch.stack(pixels)
            if with_masks:
                batch["alpha_masks"] = torch.stack(masks)
        else:
            batch["latents"], mask_list = self._load_latents(d, plan.images, flips)
            if with_masks:
                batch["alpha_masks"] = torch.stack(mask_list)
        return batch

    def _load_pixels(
        self, d: PreparedDataset, image: int, subset: SubsetBlueprint, generator: np.random.Generator, flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bucket = (int(d.buckets[image, 0]), int(d.buckets[image, 1]))
        face = None
        if subset.face_crop_aug_range is not None and not d.blueprint.enable_bucket:  # as sd-scripts
            face = face_from_name(d.paths[image])  # the box in "<name>_<cx>_<cy>_<w>_<h>.png", if any
        if face is not None:  # scale and crop around the face
            original = (int(d.sizes[image, 0]), int(d.sizes[image, 1]))
            resized, crop = face_crop_window(
                original, bucket, face, subset.face_crop_aug_range, subset.random_crop, generator
            )
        else:
            resized = (int(d.resized_sizes[image, 0]), int(d.resized_sizes[image, 1]))
            if subset.random_crop:
                crop = random_crop_left_top(resized, bucket, generator)
            else:
                crop = center_crop_left_top(resized, bucket)
        rgb, alpha = load_image_with_alpha(d.paths[image], max_side=max(resized))
        interpolation = self._interpolation(d, int(d.subset_ids[image]))
        rgb = resize_and_crop(rgb, resized, bucket, crop, interpolation)
        if subset.color_aug:
            rgb = color_augment(rgb, generator)
        mask = None
        mask_path = d.mask_paths[image] if d.mask_paths is not None else None
        if mask_path is not None:
            mask = mask_for_image(mask_path, resized, bucket, crop, flip, interpolation)
        elif subset.alpha_mask:
            if alpha is None:
                mask = torch.ones(bucket[1], bucket[0])
            else:
                alpha = resize_and_crop(alpha, resized, bucket, crop, interpolation)
                mask = torch.from_numpy((flip_horizontal(alpha) if flip else alpha).astype(np.float32) / 255.0)
        elif d.mask_paths is not None or any(s.alpha_mask for s in d.blueprint.subsets):
            mask = torch.ones(bucket[1], bucket[0])
        if flip:
            rgb = flip_horizontal(rgb)
        return to_tensor(rgb), mask

    def _load_latents(
        self, d: PreparedDataset, images: np.ndarray, flips: list[bool]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        result = self._latents
        latents, masks = [], []
        for image, flip in zip((int(i) for i in images), flips):
            path = Path(d.paths[image])
            mask_path = d.mask_paths[image] if d.mask_paths is not None else None
            if mask_path is not None:  # mask images are read per batch, resized and cropped as the cache item was
                latents.append(self._cached_latents(path, flip))
                bucket = (int(d.buckets[image, 0]), int(d.buckets[image, 1]))
                resized = (int(d.resized_sizes[image, 0]), int(d.resized_sizes[image, 1]))
                crop = center_crop_left_top(resized, bucket)
                interpolation = self._interpolation(d, int(d.subset_ids[image]))
                masks.append(mask_for_image(mask_path, resized, bucket, crop, flip, interpolation))
                continue
            if path in result.latents:
                source = result.latents_flipped if flip else result.latents
                latents.append(source[path])
                mask = result.alpha_masks.get(path)
            else:
                latents.append(read_cache(result.npz_paths[path], flipped=flip))
                mask = read_alpha_mask(result.npz_paths[path])
            if mask is None:
                bucket = d.buckets[image]
                mask = torch.ones(int(bucket[1]), int(bucket[0]))
            masks.append(torch.flip(mask, dims=[-1]) if flip else mask)
        return torch.stack(latents), masks

    def _cached_latents(self, path: Path, flip: bool) -> torch.Tensor:
        result = self._latents
        if path in result.latents:
            return (result.latents_flipped if flip else result.latents)[path]
        return read_cache(result.npz_paths[path], flipped=flip)

    # ---- metadata (formats.md §2.2)

    def metadata(self) -> dict:
        """Dataset description pieces: ss_datasets-style list, tag frequency, dataset dirs, bucket info."""
        datasets, tag_frequency, dirs = [], {}, {}
        for d in self.datasets:
            tags_by_source = self._tag_frequency(d)
            for name, counts in tags_by_source.items():
                tag_frequency.setdefault(name, counts)  # first occurrence of a dir wins
            datasets.append(self._dataset_description(d, tags_by_source))
            for i, s in enumerate(d.blueprint.subsets):
                # as upstream: fine-tuning subsets are named by their metadata file, others by their
                # image folder; regularization subsets are left out
                source = (s.metadata_file or s.image_dir) if d.blueprint.kind == "fine_tuning" else s.image_dir
                if s.is_reg or not source:
                    continue
                name = base = os.path.basename(os.path.normpath(source))
                suffix = 2
                while name in dirs:
                    name, suffix = f"{base} ({suffix})", suffix + 1
                dirs[name] = {"n_repeats": s.num_repeats, "img_count": int(np.count_nonzero(d.subset_ids == i))}
        return {
            "ss_datasets": datasets,
            "ss_tag_frequency": tag_frequency,
            "ss_dataset_dirs": dirs,
            "ss_bucket_info": self.datasets[0].bucket_info if len(self.datasets) == 1 else None,
        }

    @staticmethod
    def _tag_frequency(d: PreparedDataset) -> dict[str, dict[str, int]]:
        result = {}
        for i, s in enumerate(d.blueprint.subsets):
            source = s.metadata_file or s.image_dir or ""
            name = os.path.basename(os.path.normpath(source)) if source else ""
            captions = (d.captions[j] for j in np.flatnonzero(d.subset_ids == i))
            counts = result.setdefault(name, {})
            for tag, n in count_tags(captions).items():
                counts[tag] = counts.get(tag, 0) + n
        return result

    @staticmethod
    def _dataset_description(d: PreparedDataset, tags: dict) -> dict:
        bp = d.blueprint
        subsets = []
        for i, s in enumerate(bp.subsets):
            entry = {
                "img_count": int(np.count_nonzero(d.subset_ids == i)),
                "num_repeats": s.num_repeats,
                "color_aug": s.color_aug,
                "flip_aug": s.flip_aug,
                "random_crop": s.random_crop,
                "shuffle_caption": s.shuffle_caption,
                "keep_tokens": s.keep_tokens,
                "keep_tokens_separator": s.keep_tokens_separator,
                "secondary_separator": s.secondary_separator,
                "enable_wildcard": s.enable_wildcard,
                "caption_prefix": s.caption_prefix,
                "caption_suffix": s.caption_suffix,
                "resize_interpolation": s.resize_interpolation,
                "image_dir": os.path.basename(os.path.normpath(s.image_dir)) if s.image_dir else None,
            }
            if bp.kind == "fine_tuning":
                entry["metadata_file"] = os.path.basename(s.metadata_file) if s.metadata_file else None
            else:
                entry["class_tokens"] = s.class_tokens
                entry["is_reg"] = s.is_reg
            subsets.append(entry)
        return {
            "is_dreambooth": bp.kind != "fine_tuning",
            "batch_size_per_device": bp.batch_size,
            "num_train_images": d.num_train_images,
            "num_reg_images": d.num_reg_images,
            "resolution": list(bp.resolution),
            "enable_bucket": bp.enable_bucket,
            "min_bucket_reso": bp.min_bucket_reso,
            "max_bucket_reso": bp.max_bucket_reso,
            "tag_frequency": tags,
            "bucket_info": d.bucket_info,
            "resize_interpolation": bp.resize_interpolation,
            "subsets": subsets,
        }


# ---------------------------------------------------------------- torch loading


class EpochBatches(Dataset):
    """The batches of one epoch that one process trains on, from ``start`` on.

    ``batches`` are (index in the epoch, plan) pairs, by default every batch of the epoch; a
    multi-process run passes its shard. Item i is ``batches[start + i]`` loaded, with its epoch index
    under "batch_index". ``step`` given to caption processing (token warm-up) is
    ``first_step + i // batches_per_step``: pass the global optimizer step at ``start`` and the
    gradient-accumulation count.
    """

    def __init__(
        self,
        group: DatasetGroup,
        epoch: int,
        start_batch: int = 0,
        first_step: int = 0,
        batches_per_step: int = 1,
        batches: Sequence[tuple[int, BatchPlan]] | None = None,
    ) -> None:
        self.group = group
        self.epoch = epoch
        if batches is None:
            batches = list(enumerate(group.batches_for_epoch(epoch)))
        self.batches = list(batches)[start_batch:]
        self.first_step = first_step
        self.batches_per_step = max(1, batches_per_step)

    @property
    def plans(self) -> list[BatchPlan]:
        return [plan for _, plan in self.batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        step = self.first_step + index // self.batches_per_step
        batch_index, plan = self.batches[index]
        batch = self.group.load_batch(plan, self.epoch, step)
        batch["batch_index"] = batch_index
        return batch


def make_dataloader(
    group: DatasetGroup,
    epoch: int,
    workers: int,
    persistent: bool = False,
    start_batch: int = 0,
    first_step: int = 0,
    batches_per_step: int = 1,
    batches: Sequence[tuple[int, BatchPlan]] | None = None,
) -> DataLoader:
    """A loader yielding ready batches of one epoch in plan order (workers capped at the CPU count)."""
    workers = max(0, min(workers, os.cpu_count() or 1))
    dataset = EpochBatches(group, epoch, start_batch, first_step, batches_per_step, batches)
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        collate_fn=_keep_batch,
    )


class RunBatches(Dataset):
    """Every batch one process trains on for the rest of a run, across epochs, in order.

    One loader for the whole run keeps its worker processes alive between epochs (what
    --persistent_data_loader_workers asks for) and lets a resumed run start in the middle of an
    epoch. Items carry "epoch", "batch_index" (index in the epoch, the same on every process
    count) and "local_index" (position in this process's shard).
    """

    def __init__(
        self,
        group: DatasetGroup,
        num_epochs: int,
        start_epoch: int = 0,
        start_batch: int = 0,
        first_step: int = 0,
        batches_per_step: int = 1,
        rank: int = 0,
        num_processes: int = 1,
    ) -> None:
        self.group = group
        self.rank = rank
        self.num_processes = num_processes
        per_epoch = batches_per_process(group.num_batches_per_epoch, num_processes)
        epochs, locals_, steps = [], [], []
        step = first_step
        accumulation = max(1, batches_per_step)
        for epoch in range(start_epoch, num_epochs):
            first = start_batch if epoch == start_epoch else 0
            local = np.arange(first, per_epoch)
            epochs.append(np.full(len(local), epoch))
            locals_.append(local)
            steps.append(step + (local - first) // accumulation)
            step += -(-(per_epoch - first) // accumulation)
        self._epochs = np.concatenate(epochs) if epochs else np.zeros(0, dtype=int)
        self._locals = np.concatenate(locals_) if locals_ else np.zeros(0, dtype=int)
        self._steps = np.concatenate(steps) if steps else np.zeros(0, dtype=int)
        self._shard_epoch: int | None = None
        self._shard: list[tuple[int, BatchPlan]] = []

    def __len__(self) -> int:
        return len(self._epochs)

    def shard(self, epoch: int) -> list[tuple[int, BatchPlan]]:
        """This process's (index in the epoch, plan) pairs of `epoch` (kept for the current epoch)."""
        if self._shard_epoch != epoch:
            self._shard = shard_batches(self.group.batches_for_epoch(epoch), self.rank, self.num_processes)
            self._shard_epoch = epoch
        return self._shard

    def __getitem__(self, index: int) -> dict:
        epoch, local, step = int(self._epochs[index]), int(self._locals[index]), int(self._steps[index])
        batch_index, plan = self.shard(epoch)[local]
        batch = self.group.load_batch(plan, epoch, step)
        batch.update(epoch=epoch, batch_index=batch_index, local_index=local)
        return batch


def make_run_dataloader(dataset: RunBatches, workers: int, persistent: bool = False) -> DataLoader:
    """The run's loader (workers capped at the CPU count, batches already collated)."""
    workers = max(0, min(workers, os.cpu_count() or 1))
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        collate_fn=_keep_batch,
        prefetch_factor=2 if workers > 0 else None,
    )


def _keep_batch(batch: dict) -> dict:
    """Batches are already tensors and lists; leave them as they are."""
    return batch
