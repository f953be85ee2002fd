"""The recipe interface: what one training method hands the shared trainer. Documented here and only here.

A recipe script (train_network.py, train_db.py, fine_tune.py, ...) tells the story of one method:
what trains, how captions become conditioning, what is saved. It passes an object satisfying
`Recipe` to `library.training.entry.run_recipe`; the trainer (library/training/trainer.py) owns
everything else: accelerate, data loading, steps and epochs, accumulation, clipping, precision,
the LR schedule, noise and loss, save cadence, exact resume, interrupts, sampling and logging.

A run, and where the recipe comes in:

  1. options   the shared groups, shaped by `recipe.info`, plus `recipe.add_arguments(parser)`
  2. checks    the shared checks plus `recipe.option_problems(args)`, before any data or model loads
  3. data      datasets of the kinds `recipe.info.datasets` accepts, then
               `recipe.dataset_problems(args, group)` (still before the model loads)
  4. DDP       `recipe.find_unused_parameters(args)`: may a trained parameter get no gradient in a step?
  5. attach    the base model is loaded and frozen; `recipe.attach(ctx) -> Attached` makes what
               trains trainable and says how (param groups, stops, caption and prediction hooks)
  6. steps     caption -> `Attached.train_caption` -> `Attached.caption` -> text conditioning -> `Attached.predict` (or the
               U-Net) -> loss -> optimizer step -> due `Attached.stops`; the recipe's `Hooks` are called at
               each epoch's start, before each batch, around the optimizer step and after each step/epoch
  7. saves     `recipe.save(folder, name, ctx, progress)` writes the model at `recipe.output_path`;
               training states hold `recipe.trained_state_dict()` beside optimizer and scheduler
  8. resume    `recipe.load_trained_state_dict(...)`, then the stops already due are applied again

If a new method needs a branch inside the trainer, this interface is missing something: add it
here, generically, and keep the trainer free of method names.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from library.data.config_schema import DatasetSupport
from library.training.checkpoints import Progress


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe's frozen self-description; the wings receive it (or the part they need) instead of
    keeping tables keyed by script name."""

    script: str  # "train_db": the program name in --help and messages
    description: str  # first line of --help
    datasets: DatasetSupport  # which dataset kinds and dataset options the recipe accepts
    save_formats: tuple[str, ...]  # --save_model_as choices
    default_save_format: str | None  # None: the base model's own format (full-model recipes)
    tracker_name: str  # default --log_tracker_name
    weighted_captions: bool = True  # offers --weighted_captions
    # Trains under DeepSpeed ZeRO-3 (--zero_stage 3), where every weight of the prepared model is split over the
    # processes: what the recipe reads or writes whole (`save`, `trained_state_dict`, `load_trained_state_dict`)
    # is gathered by the trainer around the call, and nothing else of it (hooks) reads the trained weights.
    zero_stage_3: bool = False

    @property
    def saves_full_models(self) -> bool:
        return "diffusers" in self.save_formats


@dataclass(frozen=True)
class PartStop:
    """Stop training `module` once optimizer step `after_step` is done (0: before the first step).

    The trainer applies it generically: no more gradients for the module's parameters (the
    optimizer then skips them), eval mode, and, with `text_encoder`, captions are encoded without
    gradients from then on. Recipes that declare a stop must answer True to
    `find_unused_parameters`, so multi-process (DDP) runs accept parameters that stop receiving
    gradients."""

    name: str
    module: torch.nn.Module
    after_step: int
    text_encoder: bool = False  # this part is why gradients flow through the text encoder


@dataclass
class Attached:
    """What `recipe.attach` returns: what trains and how."""

    param_groups: list[dict]  # optimizer groups: {"params", "lr", "name"}; "name" labels lr/<name> logs
    trained: torch.nn.Module | None = None  # trained parameters outside the base model (a LoRA network)
    unet_weights_train: bool = False  # the U-Net's own weights train: kept in the trained dtype
    text_encoder_weights_train: bool = False
    text_encoder_trains: bool = False  # gradients flow through the text encoder (its weights or a network in it)
    stops: tuple[PartStop, ...] = ()
    # Caption text -> the text the text encoder sees; used for training captions and sample prompts
    # alike (Textual Inversion expands its token string here). None: captions are used as they are.
    caption: Callable[[str], str] | None = None
    # Training captions only, before `caption` (TI's templates replace the caption). It may draw from
    # torch's global random stream, which the trainer seeds per batch (so resume repeats the draws).
    train_caption: Callable[[str], str] | None = None
    # (unet, encode, noisy_latents, timesteps, captions) -> prediction, when the recipe conditions the
    # U-Net its own way (XTI: one embedding per cross-attention layer); `encode` turns captions into
    # conditioning (the training conditioner, or the sampler's prompt encoder). None: encode + U-Net.
    predict: Callable[..., torch.Tensor] | None = None
    # Hooks that exist only once attached (a network module's own per-epoch/step calls); called after
    # `recipe.hooks(args)` and before the trainer's own (sample images).
    hooks: tuple[Hooks, ...] = ()


@dataclass
class TrainingContext:
    """What recipes and hooks may look at. Filled by the trainer; read, do not replace, its parts."""

    args: argparse.Namespace
    info: RecipeInfo
    accelerator: Any  # accelerate.Accelerator
    parts: Any  # library.models.components.StableDiffusionParts (tokenizer, text encoder, U-Net, VAE, scheduler)
    group: Any  # library.data.datasets.DatasetGroup
    weight_dtype: torch.dtype  # dtype of frozen weights and of the forward pass
    seed: int
    output_dir: Path
    schedule: Any = None  # library.training.schedule.Schedule, once planned (before the first save)
    optimizer_description: str = ""
    session_id: int = 0
    started_at: float = 0.0
    # The trainer's own: `with ctx.evaluation():` puts every trained module in eval mode and the
    # optimizer in its evaluation mode (schedule-free), and restores both on exit.
    evaluation: Callable[[], AbstractContextManager] | None = None
    caption: Callable[[str], str] = field(default=lambda text: text)
    predict: Callable[..., torch.Tensor] | None = None  # `Attached.predict`, for sample images too

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


HookFunction = Callable[[TrainingContext, Progress], None]


@dataclass(frozen=True)
class Hooks:
    """Optional calls into a recipe (or a helper such as sample images), each with `(ctx, progress)`."""

    at_start: HookFunction | None = None  # after resume, before the first step of this run
    at_epoch_start: HookFunction | None = None  # before the first batch of each epoch this run trains
    before_batch: HookFunction | None = None  # before each (micro-)batch's forward pass
    before_optimizer_step: HookFunction | None = None  # gradients are final (accumulated, clipped)
    after_optimizer_step: HookFunction | None = None  # weights just changed (TI restores untouched rows)
    after_step: HookFunction | None = None  # the step is counted and step saves are done
    after_epoch: HookFunction | None = None  # the epoch is counted and epoch saves are done


class Recipe(Protocol):
    """What every training method implements. See the module docstring for when each is called."""

    info: RecipeInfo

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the recipe's own options (the shared groups are already there)."""

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        """Every problem with the recipe's options, each a sentence naming the option and the fix."""

    def dataset_problems(self, args: argparse.Namespace, group: Any) -> list[str]:
        """Problems only the prepared dataset shows (TI: the token in no caption); [] when none."""

    def find_unused_parameters(self, args: argparse.Namespace) -> bool:
        """True when some trained parameters may get no gradient in a step (module dropout, a PartStop)."""

    def attach(self, ctx: TrainingContext) -> Attached:
        """Make what trains trainable (the base model arrives frozen) and describe it."""

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for training states (not the saved model file)."""

    def load_trained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put tensors from `trained_state_dict` of an earlier run back (resume)."""

    def output_path(self, folder: Path, name: str) -> Path:
        """Where `save(folder, name, ...)` writes (a file or a folder); used to prune old saves."""

    def save(self, folder: Path, name: str, ctx: TrainingContext, progress: Progress) -> Path:
        """Write the model (atomically) at `output_path(folder, name)` and return that path."""

    def hooks(self, args: argparse.Namespace) -> list[Hooks]:
        """The recipe's hooks; an empty list when it needs none."""
