"""How many epochs and steps a run has, which batches each process takes, and per-batch seeds.

Pure functions. The seeds are what make resume exact: every random draw of a training batch
(timesteps, noise, dropout) comes from a generator seeded by (run seed, epoch, batch index in the
epoch), so a resumed run draws exactly what the uninterrupted run would have, and N processes with
batch b draw what one process with gradient accumulation N draws for the same global batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np

from library.data.sample_plan import batches_per_process, shard_batches  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Schedule:
    batches_per_epoch: int  # per process, after sharding
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int

    def describe(self, num_processes: int, accumulation: int) -> str:
        return (
            f"{self.num_epochs} epoch(s) x {self.steps_per_epoch} step(s) = {self.max_train_steps} steps "
            f"({self.batches_per_epoch} batches per epoch per process, {num_processes} process(es), "
            f"gradient accumulation {accumulation})"
        )


def plan_schedule(
    num_batches: int, num_processes: int, accumulation: int, max_train_steps: int | None, max_train_epochs: int | None
) -> Schedule:
    """--max_train_epochs wins over --max_train_steps; a partial last epoch counts as an epoch."""
    per_process = batches_per_process(num_batches, num_processes)
    if per_process == 0:
        raise ValueError("the dataset has no batches to train on (no images, or every subset has num_repeats 0)")
    steps_per_epoch = math.ceil(per_process / accumulation)
    if max_train_epochs:
        max_steps = max_train_epochs * steps_per_epoch
        epochs = max_train_epochs
    else:
        max_steps = int(max_train_steps or 1600)
        epochs = math.ceil(max_steps / steps_per_epoch)
    return Schedule(per_process, steps_per_epoch, max_steps, epochs)


def batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """A 63-bit seed for one batch of one epoch; independent streams for different batches."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, batch_index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def micro_batch_group(local_index: int, total: int, accumulation: int) -> tuple[int, bool]:
    """(size of the accumulation group local batch `local_index` belongs to, whether it is its last)."""
    start = (local_index // accumulation) * accumulation
    size = min(accumulation, total - start)
    return size, local_index - start == size - 1
