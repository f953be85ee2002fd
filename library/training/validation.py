"""Validation loss on held-out images (--validation_split), as trainer hooks.

The images are held out when the dataset is built (library/data/validation_split.py `split_validation`: never
trained on, not counted in the batches per epoch). Every N steps (--validate_every_n_steps) and every N
epochs (--validate_every_n_epochs; every epoch by default), the loss of each held-out batch is computed
at upstream's fixed set of timesteps (4 evenly spaced between --min_timestep and --max_timestep: 200,
400, 600, 800 by default) with noise seeded by the validation seed and the batch's position, so every
validation measures the same thing and the curve is comparable across validations and runs.

It runs with every trained module in eval mode (`ctx.evaluation()`), under `torch.no_grad`, with the
random states of torch, CUDA, numpy and Python saved and restored: the trained weights, the optimizer
and the training's random streams are exactly those of the same run without validation. With several
processes, each computes its share of the batches (--max_validation_steps is per process, as upstream)
and the sum is reduced, so all print and log the same average. Logged as upstream names it:
`loss/validation/step_average` and `loss/validation/epoch_average`.
"""

from __future__ import annotations

import argparse
import logging
import random
from contextlib import contextmanager

import numpy as np
import torch

from library.recipe import Hooks, TrainingContext
from library.training.checkpoints import Progress
from library.training.schedule import batch_seed

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4  # upstream's fixed count (train_network.py)


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """When the validation loss runs (which images: --validation_split / --validation_seed, dataset options)."""
    group = parser.add_argument_group("validation loss (needs --validation_split or validation_split in the dataset)")
    group.add_argument(
        "--validate_every_n_steps", type=int, default=None,
        help="also compute the validation loss every N steps (default: only at the end of epochs)",
    )
    group.add_argument(
        "--validate_every_n_epochs", type=int, default=None,
        help="compute the validation loss every N epochs (default: every epoch when images are held out)",
    )
    group.add_argument(
        "--max_validation_steps", type=int, default=None,
        help="at most N held-out batches per validation, per process (default: all of them)",
    )


def validation_option_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name} must be 1 or more, got {value}; leave it out for the default")
    split = getattr(args, "validation_split", 0.0) or 0.0
    if not 0 <= split < 1:
        problems.append(f"--validation_split must be from 0 up to (not including) 1, got {split}")
    return problems


def validation_timesteps(num_train_timesteps: int, min_timestep: int | None, max_timestep: int | None) -> list[int]:
    """Upstream's fixed timesteps: NUM_VALIDATION_TIMESTEPS evenly spaced inside [min, max], ends excluded."""
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    points = np.linspace(low, high, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]
    return [min(int(t), num_train_timesteps - 1) for t in points]


@contextmanager
def kept_random_state():
    """Save torch's, CUDA's, numpy's and Python's random states; put them back on exit."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def make_validation_hooks(args: argparse.Namespace, group) -> list[Hooks]:
    """[the validation's Hooks] when the dataset holds images out, else [] (a warning if cadence options were given)."""
    held_out = getattr(group, "validation", None)
    if held_out is None:
        given = [f"--{n}" for n in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")
                 if getattr(args, n, None) is not None]
        if given:
            logger.warning(
                "%s: no images are held out for validation (validation_split is 0), so no validation loss is "
                "computed; give --validation_split 0.1 (or validation_split in the dataset config)", ", ".join(given),
            )
        return []
    return [Validation(args, held_out).hooks()]


class Validation:
    """The validation loss of one run; `hooks()` is what the trainer calls."""

    def __init__(self, args: argparse.Namespace, group) -> None:
        self.args = args
        self.group = group  # the held-out images (a DatasetGroup)
        self.every_n_steps = getattr(args, "validate_every_n_steps", None)
        self.every_n_epochs = getattr(args, "validate_every_n_epochs", None)
        self.max_steps = getattr(args, "max_validation_steps", None)
        self.plans = group.batches_for_epoch(0)  # fixed: the same batches, flips and captions every time
        self._step = None
        self._model = None
        self._last: tuple[int, float] | None = None  # (global step, loss) of the latest validation
        self.history: list[tuple[str, int, float]] = []  # (kind, global step, loss), for tests and callers

    def hooks(self) -> Hooks:
        return Hooks(after_step=self.after_step, after_epoch=self.after_epoch)

    # ---- cadence

    def after_step(self, ctx: TrainingContext, progress: Progress) -> None:
        if self.every_n_steps and progress.global_step % self.every_n_steps == 0:
            loss = self.validate(ctx, progress)
            self._report(ctx, "step", progress, loss)

    def after_epoch(self, ctx: TrainingContext, progress: Progress) -> None:
        if self.every_n_epochs is None or progress.epoch % self.every_n_epochs == 0:
            loss = self.validate(ctx, progress)
            self._report(ctx, "epoch", progress, loss)

    def _report(self, ctx: TrainingContext, kind: str, progress: Progress, loss: float) -> None:
        self.history.append((kind, progress.global_step, loss))
        if ctx.accelerator.trackers:
            ctx.accelerator.log({f"loss/validation/{kind}_average": loss}, step=progress.global_step)
        if ctx.accelerator.is_main_process:
            when = f"epoch {progress.epoch}" if kind == "epoch" else f"step {progress.global_step}"
            print(f"validation loss after {when}: {loss:.6f}")

    # ---- work

    def _prepare(self, ctx: TrainingContext) -> None:
        from library.models.text_encoding import TextEncoding
        from library.training.diffusion_step import DiffusionStep, DiffusionTrainingModel, vae_dtype_for
        from library.training.noise import NoiseSettings, apply_zero_terminal_snr
        from library.training.text_conditioning import TextConditioner

        args, parts = self.args, ctx.parts
        scheduler = parts.noise_scheduler
        if getattr(args, "zero_terminal_snr", False):
            scheduler = apply_zero_terminal_snr(scheduler)
        vae_dtype = vae_dtype_for(args.mixed_precision, no_half_vae=getattr(args, "no_half_vae", False))
        self._step = DiffusionStep(
            scheduler, parts.vae, NoiseSettings.from_args(args), ctx.device, ctx.weight_dtype, vae_dtype
        )
        conditioner = TextConditioner(parts.tokenizer, parts.text_encoder, TextEncoding.from_args(args), trains=False)
        # the trained module acts through hooks inside the U-Net / text encoder; captions as training rewrites them
        self._model = DiffusionTrainingModel(parts.unet, conditioner, None, caption=ctx.caption, predict=ctx.predict)
        self.timesteps = validation_timesteps(
            scheduler.config.num_train_timesteps, getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
        )
        self.seed = next((d.blueprint.validation_seed for d in self.group.datasets
                          if d.blueprint.validation_seed is not None), ctx.seed)

    def validate(self, ctx: TrainingContext, progress: Progress) -> float:
        """The mean loss over this process's share of the held-out batches x the fixed timesteps, averaged
        over processes (every process returns the same number). Computed once per step (an epoch's end
        and a step cadence may fall on the same step)."""
        if self._last is not None and self._last[0] == progress.global_step:
            return self._last[1]
        loss = self._validate(ctx)
        self._last = (progress.global_step, loss)
        return loss

    def _validate(self, ctx: TrainingContext) -> float:
        if self._model is None:
            self._prepare(ctx)
        accelerator = ctx.accelerator
        # batches rank, rank + N, ...: no padding (a repeated batch would count twice in the average)
        mine = [(i, plan) for i, plan in enumerate(self.plans) if i % accelerator.num_processes == accelerator.process_index]
        if self.max_steps is not None:
            mine = mine[: self.max_steps]
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss x samples, samples
        vae = ctx.parts.vae
        vae_device = next(vae.parameters()).device
        needs_vae = not self.group.uses_cached_latents and vae_device != ctx.device
        with ctx.evaluation(), torch.no_grad(), kept_random_state():
            if needs_vae:
                vae.to(ctx.device)
            try:
                for index, plan in mine:
                    batch = self.group.load_batch(plan, 0, 0)
                    size = len(batch["captions"])
                    for t_index, timestep in enumerate(self.timesteps):
                        seed = batch_seed(self.seed, t_index, index)
                        loss = self._step.loss(self._model, batch, seed, accelerator.autocast, timestep=timestep)
                        total[0] += float(loss) * size
                        total[1] += size
            finally:
                if needs_vae:
                    vae.to(vae_device)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, "sum")
        return float(total[0] / total[1]) if float(total[1]) > 0 else float("nan")
