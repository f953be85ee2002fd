"""How often each image is seen and in which batches: reg balancing (dataset-config.md §7), the per-dataset
``bucket_info``, and the batch plan of an epoch. Pure functions of arrays and seeds.
"""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence, TypeVar

import numpy as np

Size = tuple[int, int]

__all__ = [
    "BatchPlan",
    "balance_regularization",
    "batches_per_process",
    "shard_batches",
    "bucket_info_from_arrays",
    "count_batches",
    "epoch_generator",
    "plan_dataset_batches",
    "sample_random",
    "sample_generator",
]

T = TypeVar("T")


class BatchPlan(NamedTuple):
    """One batch: which dataset, which bucket (w, h), which images (indices into the dataset's records),
    and its position in the epoch (used to seed per-sample randomness)."""

    dataset: int
    bucket: Size
    images: np.ndarray
    position: int


# ---------------------------------------------------------------- seeds


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders an epoch: same (seed, epoch) -> same order, on every machine."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch])


def sample_random(seed: int, epoch: int, position: int, step: int, index: int) -> random.Random:
    """Caption randomness of one sample; a string seed is hashed (SHA-512) identically in every process."""
    return random.Random(f"{seed}:{epoch}:{position}:{step}:{index}")


def sample_generator(seed: int, epoch: int, position: int, index: int) -> np.random.Generator:
    """Image augmentation randomness (flip, crop, colour) of one sample."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, position, index])


# ---------------------------------------------------------------- regularization balancing (§7)


def balance_regularization(reg_repeats: Sequence[int], num_train: int) -> tuple[np.ndarray, str]:
    """Repeats of each reg image (in order) so that reg samples per epoch == ``num_train``, and a report.

    R > T: images are used in order until their repeats reach T; the last one used is trimmed so the
    total is exactly T (upstream may overshoot by up to repeats-1) and the rest get 0.
    R < T: all are used, then repeats grow by 1 round-robin until the total is T.
    """
    repeats = np.asarray(reg_repeats, dtype=np.int64).copy()
    total = int(repeats.sum())
    if len(repeats) == 0:
        return repeats, "no regularization images"
    if num_train == 0:
        return np.zeros_like(repeats), f"regularization images ({total}) unused: there are no training images"
    if total >= num_train:
        cumulative = np.cumsum(repeats)
        last = int(np.searchsorted(cumulative, num_train))  # first image whose cumulative sum reaches T
        repeats[last] -= int(cumulative[last]) - num_train
        repeats[last + 1 :] = 0
        used = int(np.count_nonzero(repeats))
        if total == num_train:
            return repeats, f"regularization: {total} reg samples = {num_train} training samples, used as they are"
        return repeats, (
            f"regularization: more reg samples ({total}) than training samples ({num_train}); "
            f"the first {used} of {len(repeats)} reg images are used ({total - num_train} reg samples unused)"
        )
    missing = num_train - total
    rounds, extra = divmod(missing, len(repeats))
    repeats += rounds
    repeats[:extra] += 1
    return repeats, (
        f"regularization: fewer reg samples ({total}) than training samples ({num_train}); "
        f"reg repeats raised round-robin by {missing} in total to balance 1:1"
    )


# ---------------------------------------------------------------- bucket_info (formats.md §2.2)


def bucket_info_from_arrays(
    buckets: np.ndarray, repeats: np.ndarray, ar_errors: np.ndarray, bucket_set: Sequence[Size] | None
) -> dict:
    """Vectorised ``buckets.bucket_info``: identical dict, without one Python object per image."""
    used = repeats >= 1
    buckets, weights = buckets[used], repeats[used]
    unique, inverse = np.unique(buckets, axis=0, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique)).astype(np.int64)
    found = [(int(w), int(h)) for w, h in unique]
    order = [(int(b[0]), int(b[1])) for b in bucket_set] if bucket_set is not None else sorted(found)
    position = {bucket: i for i, bucket in enumerate(order)}
    entries = {
        str(position[bucket]): {"resolution": [bucket[0], bucket[1]], "count": int(count)}
        for bucket, count in sorted(zip(found, counts), key=lambda pair: position[pair[0]])
    }
    errors = np.abs(ar_errors[used])
    return {"buckets": entries, "mean_img_ar_error": float(np.mean(errors)) if len(errors) else 0.0}


# ---------------------------------------------------------------- batch plans


def plan_dataset_batches(
    bucket_ids: np.ndarray, repeats: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """(bucket id, image indices) for every batch of one dataset in one epoch, grouped by bucket.

    Each image appears ``repeats`` times; images are shuffled inside their bucket; the last batch of a
    bucket may be short. The caller shuffles the batch order across buckets and datasets.
    """
    samples = np.repeat(np.arange(len(repeats)), repeats)
    samples = samples[rng.permutation(len(samples))]
    samples = samples[np.argsort(bucket_ids[samples], kind="stable")]  # group by bucket, keep shuffle inside
    sample_buckets = bucket_ids[samples]
    starts = np.flatnonzero(np.r_[True, sample_buckets[1:] != sample_buckets[:-1]]) if len(samples) else []
    ends = list(starts[1:]) + [len(samples)]
    batches = []
    for start, end in zip(starts, ends):
        bucket = int(sample_buckets[start])
        batches += [(bucket, samples[i : min(i + batch_size, end)]) for i in range(start, end, batch_size)]
    return batches


def count_batches(bucket_ids: np.ndarray, repeats: np.ndarray, batch_size: int) -> int:
    """Σ over buckets of ceil(samples in bucket / batch_size)."""
    if len(repeats) == 0:
        return 0
    per_bucket = np.bincount(bucket_ids, weights=repeats).astype(np.int64)
    return int(np.sum(-(-per_bucket // batch_size)))


def batches_per_process(num_batches: int, num_processes: int) -> int:
    """Each process gets the same number of batches (the last few are repeated to fill the round)."""
    return -(-num_batches // num_processes) if num_batches else 0


def shard_batches(batches: Sequence[T], rank: int, num_processes: int) -> list[tuple[int, T]]:
    """(index in the epoch, batch) pairs of one process: batches rank, rank+N, ... with the list padded
    by wrapping around so every process has the same count."""
    if num_processes == 1:
        return list(enumerate(batches))
    total = batches_per_process(len(batches), num_processes) * num_processes
    return [(i, batches[i % len(batches)]) for i in range(rank, total, num_processes)]
