"""Aspect-ratio bucketing: bucket sets, per-image assignment, crops and the ``bucket_info`` summary.

Pure functions of their arguments (reference/dataset-config.md §9, formats.md §2.2). Sizes are always
``(width, height)``. Rounding is "half up" (``int(x + 0.5)``) like upstream, not Python's banker's ``round``.
Each scalar rule has a vectorised twin (``assign_buckets``, ``no_upscale_buckets``) for large datasets;
the tests check that both give identical results.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]

# Rows per vectorised chunk: bounds the (rows x buckets) distance matrix to a few MiB.
_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: the bucket, the size it is resized to before cropping, and bucket_ar - image_ar."""

    bucket: Size
    resized_size: Size
    ar_error: float


@dataclass(frozen=True, eq=False)
class BucketAssignments:
    """Many assignments as arrays: ``buckets`` and ``resized_sizes`` are (N, 2) int64, ``ar_errors`` (N,) float64."""

    buckets: np.ndarray
    resized_sizes: np.ndarray
    ar_errors: np.ndarray

    def __len__(self) -> int:
        return len(self.ar_errors)

    def __getitem__(self, i: int) -> BucketAssignment:
        bucket = (int(self.buckets[i, 0]), int(self.buckets[i, 1]))
        resized = (int(self.resized_sizes[i, 0]), int(self.resized_sizes[i, 1]))
        return BucketAssignment(bucket, resized, float(self.ar_errors[i]))

    def __iter__(self) -> Iterator[BucketAssignment]:
        return (self[i] for i in range(len(self)))


# ---------------------------------------------------------------------------------------------------
# Bucket sets (§9.2)
# ---------------------------------------------------------------------------------------------------


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """Sorted bucket set whose areas stay within ``max_reso``'s area, sides in [min_size, max_size]."""
    if divisible <= 0:
        raise ValueError(f"bucket step must be positive, got {divisible}")
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (max_area // width) // divisible * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


# ---------------------------------------------------------------------------------------------------
# Assignment to a predefined set (§9.2) and the fixed bucket (§9.1)
# ---------------------------------------------------------------------------------------------------


def assign_bucket(image_size: Size, buckets: Sequence[Size]) -> BucketAssignment:
    """Exact size match first, else the bucket with the nearest aspect ratio (first one on ties)."""
    width, height = image_size
    candidates = [(int(b[0]), int(b[1])) for b in buckets]
    if not candidates:
        raise ValueError("cannot assign a bucket from an empty bucket set")
    aspect = width / height
    if (width, height) in candidates:
        bucket = (width, height)
    else:
        bucket = min(candidates, key=lambda b: abs(b[0] / b[1] - aspect))
    return BucketAssignment(bucket, cover_size(image_size, bucket), bucket[0] / bucket[1] - aspect)


def cover_size(image_size: Size, bucket: Size) -> Size:
    """Scale so one side equals the bucket and the other is at least the bucket (enlarging if needed)."""
    width, height = image_size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # wider than the bucket: match heights, crop width
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def fixed_bucket(image_size: Size, resolution: Size) -> BucketAssignment:
    """Bucketing off: the single bucket is ``resolution``; the image is scaled to cover it, then cropped."""
    return assign_bucket(image_size, [resolution])


def assign_buckets(sizes: np.ndarray | Sequence[Size], buckets: Sequence[Size]) -> BucketAssignments:
    """Vectorised ``assign_bucket`` for an (N, 2) array of image sizes; results are identical."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    table = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
    if len(table) == 0:
        raise ValueError("cannot assign a bucket from an empty bucket set")
    bucket_ar = table[:, 0] / table[:, 1]
    index = np.empty(len(sizes), dtype=np.int64)
    for start in range(0, len(sizes), _CHUNK_ROWS):
        chunk = sizes[start : start + _CHUNK_ROWS]
        exact = (chunk[:, None, :] == table[None, :, :]).all(axis=2)
        nearest = np.abs(bucket_ar[None, :] - (chunk[:, 0] / chunk[:, 1])[:, None]).argmin(axis=1)
        index[start : start + len(chunk)] = np.where(exact.any(axis=1), exact.argmax(axis=1), nearest)
    chosen = table[index]
    return BucketAssignments(chosen, _cover_sizes(sizes, chosen), bucket_ar[index] - sizes[:, 0] / sizes[:, 1])


def _cover_sizes(sizes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    width, height = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    wider = width / height > buckets[:, 0] / buckets[:, 1]
    scale = np.where(wider, buckets[:, 1] / height, buckets[:, 0] / width)
    return np.stack([_round_half_up(width * scale), _round_half_up(height * scale)], axis=1)


def _round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# bucket_no_upscale (§9.3)
# ---------------------------------------------------------------------------------------------------


def no_upscale_bucket(image_size: Size, max_area: int, step: int) -> BucketAssignment:
    """Per-image bucket that never enlarges: shrink to ``max_area`` if larger, then floor sides to ``step``.

    Unlike upstream, bucket sides are never below ``step``: an image too thin or too small for that gets
    its short side scaled to ``step`` (the only case that enlarges) and its long side capped by the area.
    """
    width, height = image_size
    resized = _shrink_to_area(width, height, max_area, step) if width * height > max_area else (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if min(bucket) < step:
        bucket, resized = _short_side_bucket(width, height, max_area, step)
    return BucketAssignment(bucket, resized, bucket[0] / bucket[1] - width / height)


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def _ratio_error(width: int, height: int, aspect: float) -> float:
    return abs(width / height - aspect) if height > 0 else math.inf


def _shrink_to_area(width: int, height: int, max_area: int, step: int) -> Size:
    """Size with area about ``max_area`` and the image's aspect: round the width or the height to the step,
    whichever keeps the aspect ratio better."""
    aspect = width / height
    ideal_width = math.sqrt(max_area * aspect)
    ideal_height = max_area / ideal_width
    width_first = _round_to_step(ideal_width, step)
    height_for_width = _round_to_step(width_first / aspect, step)
    height_first = _round_to_step(ideal_height, step)
    width_for_height = _round_to_step(height_first * aspect, step)
    if _ratio_error(width_first, height_for_width, aspect) < _ratio_error(width_for_height, height_first, aspect):
        return width_first, int(width_first / aspect + 0.5)
    return int(height_first * aspect + 0.5), height_first


def _short_side_bucket(width: int, height: int, max_area: int, step: int) -> tuple[Size, Size]:
    """(bucket, resized) for images whose no-upscale bucket would have a side below ``step``."""
    scale = step / min(width, height)
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    longest = max(step, max_area // step // step * step)  # long side allowed with the short side at `step`
    long_side = min(max(resized) - max(resized) % step, longest)
    bucket = (long_side, step) if width >= height else (step, long_side)
    return bucket, resized


def no_upscale_buckets(sizes: np.ndarray | Sequence[Size], max_area: int, step: int) -> BucketAssignments:
    """Vectorised ``no_upscale_bucket``; identical results (rare degenerate rows use the scalar rule)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    width, height = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    aspect = width / height
    resized = sizes.copy()
    large = sizes[:, 0] * sizes[:, 1] > max_area
    if large.any():
        resized[large] = _shrink_to_area_array(aspect[large], max_area, step)
    buckets = resized - resized % step
    for i in np.flatnonzero(buckets.min(axis=1) < step):
        bucket, fallback = _short_side_bucket(int(sizes[i, 0]), int(sizes[i, 1]), max_area, step)
        buckets[i], resized[i] = bucket, fallback
    return BucketAssignments(buckets, resized, buckets[:, 0] / buckets[:, 1] - aspect)


def _shrink_to_area_array(aspect: np.ndarray, max_area: int, step: int) -> np.ndarray:
    def to_step(values: np.ndarray) -> np.ndarray:
        rounded = _round_half_up(values)
        return rounded - rounded % step

    def ratio_error(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        safe = np.where(h > 0, h, 1)
        return np.where(h > 0, np.abs(w / safe - aspect), np.inf)

    ideal_width = np.sqrt(max_area * aspect)
    ideal_height = max_area / ideal_width
    width_first = to_step(ideal_width)
    height_first = to_step(ideal_height)
    width_wins = ratio_error(width_first, to_step(width_first / aspect)) < ratio_error(
        to_step(height_first * aspect), height_first
    )
    out_width = np.where(width_wins, width_first, _round_half_up(height_first * aspect))
    out_height = np.where(width_wins, _round_half_up(width_first / aspect), height_first)
    return np.stack([out_width, out_height], axis=1)


# ---------------------------------------------------------------------------------------------------
# Cropping
# ---------------------------------------------------------------------------------------------------


def crop_box(resized_size: Size, bucket: Size, random_crop: bool, rng: random.Random | None = None) -> Size:
    """(left, top) of the bucket-sized crop inside the resized image: centred, or uniform with ``random_crop``."""
    if random_crop and rng is None:
        raise ValueError("random_crop needs a random.Random")
    offsets = []
    for resized, target in zip(resized_size, bucket):  # x first, then y
        excess = max(resized - target, 0)
        offsets.append(rng.randint(0, excess) if random_crop and excess else excess // 2)
    return offsets[0], offsets[1]


# ---------------------------------------------------------------------------------------------------
# bucket_info (formats.md §2.2) and the table printed before training
# ---------------------------------------------------------------------------------------------------


def bucket_info(
    assignments_with_repeats: Iterable[tuple[BucketAssignment, int]], buckets: Sequence[Size] | None = None
) -> dict:
    """``{"buckets": {"<i>": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": float}``.

    Counts include repeats; the mean |ar_error| counts each image once. ``<i>`` is the bucket's position in
    ``buckets`` (the predefined set, so indices can have gaps where buckets are empty, as upstream), or in
    the sorted list of used buckets when no set is given (bucket_no_upscale). Images with repeats < 1 are
    not part of the dataset and are skipped.
    """
    counts: dict[Size, int] = {}
    errors: list[float] = []
    for assignment, repeats in assignments_with_repeats:
        if repeats < 1:
            continue
        counts[assignment.bucket] = counts.get(assignment.bucket, 0) + repeats
        errors.append(abs(assignment.ar_error))
    order = [(int(b[0]), int(b[1])) for b in buckets] if buckets is not None else sorted(counts)
    position = {bucket: i for i, bucket in enumerate(order)}
    unknown = [bucket for bucket in counts if bucket not in position]
    if unknown:
        raise ValueError(f"assignments use buckets not in the given bucket set: {sorted(unknown)}")
    entries = {
        str(position[bucket]): {"resolution": [bucket[0], bucket[1]], "count": counts[bucket]}
        for bucket in sorted(counts, key=position.__getitem__)
    }
    mean_error = float(np.mean(errors)) if errors else 0.0
    return {"buckets": entries, "mean_img_ar_error": mean_error}


def format_bucket_table(info: dict) -> str:
    """Readable table of a ``bucket_info`` dict: index, resolution, image count (with repeats)."""
    rows = [(index, f"{entry['resolution'][0]}x{entry['resolution'][1]}", entry["count"])
            for index, entry in info["buckets"].items()]
    total = sum(count for _, _, count in rows)
    lines = [f"{'bucket':>6}  {'resolution':>10}  {'count':>8}"]
    lines += [f"{index:>6}  {resolution:>10}  {count:>8}" for index, resolution, count in rows]
    lines.append(f"{'total':>6}  {'':>10}  {total:>8}")
    lines.append(f"mean aspect-ratio error (without repeats): {info['mean_img_ar_error']:.4f}")
    return "\n".join(lines)
