"""Which images a dataset holds out for the validation loss (--validation_split / validation_split key).

The held-out images are never trained on; library/data/datasets.py builds them into their own group and
library/training/validation.py computes their loss.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from library.data.config import DatasetBlueprint
from library.data.dataset_scan import ImageRecord


def split_validation(
    blueprint: DatasetBlueprint, records_per_subset: Sequence[list[ImageRecord]], seed: int
) -> tuple[list[list[ImageRecord]], list[list[ImageRecord]]]:
    """(training, held-out) records per subset: `validation_split` of each subset's images is held out.

    As upstream: each subset's images (in name order) are shuffled with Python's `random` seeded by
    `validation_seed` (else the run seed); the first ceil(n * (1 - split)) train, the rest validate.
    Regularization subsets are never split. The same seed gives the same split in every run and process."""
    split = blueprint.validation_split or 0.0
    if split <= 0:
        return [list(records) for records in records_per_subset], [[] for _ in records_per_subset]
    split_seed = blueprint.validation_seed if blueprint.validation_seed is not None else seed
    train, held_out = [], []
    for subset, records in zip(blueprint.subsets, records_per_subset):
        if subset.is_reg or not records:
            train.append(list(records))
            held_out.append([])
            continue
        order = list(range(len(records)))
        random.Random(split_seed).shuffle(order)
        keep = math.ceil(len(records) * (1 - split))
        chosen = set(order[:keep])
        train.append([r for i, r in enumerate(records) if i in chosen])
        held_out.append([r for i, r in enumerate(records) if i not in chosen])
    return train, held_out
