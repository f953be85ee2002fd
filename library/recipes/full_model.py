"""Training the base model's own weights (DreamBooth, fine-tuning): the U-Net always, the text
encoder when asked; saved as whole models in the four formats of `--save_model_as`.

The two recipes differ in their data, their options and what they ask to train, not in how the
weights train or are saved: both build on `FullModelRecipe`, which implements the saving and state
half of the `Recipe` protocol (library/recipe.py) and a `train_full_model` helper for `attach`.
Formats and keys: reference/formats.md §6 (LDM single file) and diffusers folders that
`from_pretrained` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.recipe import Attached, Hooks, PartStop, TrainingContext
from library.training.checkpoints import Progress

UNET_PREFIX, TEXT_ENCODER_PREFIX = "unet.", "text_encoder."
SINGLE_FILE_FORMATS = ("ckpt", "safetensors")


def add_full_model_arguments(parser: argparse.ArgumentParser, group_title: str) -> argparse._ArgumentGroup:
    """--learning_rate_te, shared by DreamBooth and fine-tuning; returns the group for more options."""
    group = parser.add_argument_group(group_title)
    group.add_argument(
        "--learning_rate_te", type=float, default=None,
        help="learning rate of the text encoder when it trains (default: --learning_rate)",
    )
    return group


def full_model_option_problems(args: argparse.Namespace, text_encoder_trains: bool, how_to_freeze: str) -> list[str]:
    """Checks both full-model recipes share; `how_to_freeze` names the recipe's option that freezes the text encoder."""
    problems = []
    if getattr(args, "cache_text_encoder_outputs", False) and text_encoder_trains:
        problems.append(
            "--cache_text_encoder_outputs: the text encoder trains in this run, so its outputs change every step; "
            f"{how_to_freeze} or drop the option"
        )
    return problems


def save_format(args: argparse.Namespace, source_format: str, source: str) -> str:
    """--save_model_as, else the base model's own format (`--use_safetensors` picks safetensors weights)."""
    if args.save_model_as:
        return args.save_model_as
    if source_format == "single_file":
        return "safetensors" if args.use_safetensors or source.lower().endswith(".safetensors") else "ckpt"
    return "diffusers_safetensors" if args.use_safetensors else "diffusers"


class FullModelRecipe:
    """The part of a recipe that trains the base model's own weights and saves whole models.

    A subclass adds its description (`info`), its options and checks, `find_unused_parameters`, and
    `attach`, which calls `train_full_model` with what the method trains."""

    def __init__(self) -> None:
        self.parts = None
        self.format = "safetensors"
        self.text_encoder_trains = False
        self._source_extras: tuple[dict[str, torch.Tensor], int, int] | None = None

    def dataset_problems(self, args: argparse.Namespace, group) -> list[str]:
        return []

    def hooks(self, args: argparse.Namespace) -> list[Hooks]:
        return []

    def train_full_model(
        self, ctx: TrainingContext, *, train_text_encoder: bool, stop_text_encoder_after: int | None = None
    ) -> Attached:
        """U-Net (and text encoder) trainable; one optimizer group each so each has its LR and log line."""
        args, parts = ctx.args, ctx.parts
        self.parts = parts
        self.format = save_format(args, parts.source_format, parts.source)
        self.text_encoder_trains = train_text_encoder
        parts.unet.requires_grad_(True)
        groups = [{"params": list(parts.unet.parameters()), "lr": args.learning_rate, "name": "unet"}]
        stops: tuple[PartStop, ...] = ()
        if train_text_encoder:
            parts.text_encoder.requires_grad_(True)
            te_lr = args.learning_rate if args.learning_rate_te is None else args.learning_rate_te
            groups.append({"params": list(parts.text_encoder.parameters()), "lr": te_lr, "name": "textencoder"})
            if stop_text_encoder_after is not None:
                stops = (PartStop("text encoder", parts.text_encoder, stop_text_encoder_after, text_encoder=True),)
        if ctx.accelerator.is_main_process:
            trained = "U-Net and text encoder" if train_text_encoder else "U-Net (text encoder frozen)"
            count = sum(p.numel() for g in groups for p in g["params"])
            print(f"training the {trained}: {count / 1e6:.1f}M parameters; saving as {self.format}")
        return Attached(
            param_groups=groups,
            unet_weights_train=True,
            text_encoder_weights_train=train_text_encoder,
            text_encoder_trains=train_text_encoder,
            stops=stops,
        )

    # ---- training states

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        state = {UNET_PREFIX + k: v for k, v in self.parts.unet.state_dict().items()}
        if self.text_encoder_trains:
            state.update({TEXT_ENCODER_PREFIX + k: v for k, v in self.parts.text_encoder.state_dict().items()})
        return state

    def load_trained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from library.training.checkpoints import ResumeError

        modules = [(UNET_PREFIX, self.parts.unet)]
        if self.text_encoder_trains:
            modules.append((TEXT_ENCODER_PREFIX, self.parts.text_encoder))
        for prefix, module in modules:
            own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not own:
                raise ResumeError(
                    f"the training state holds no {prefix[:-1]} weights: it was saved by a run that did not train "
                    "them (another script, or the text encoder frozen); resume with the same options"
                )
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as err:
                raise ResumeError(
                    f"the training state's {prefix[:-1]} weights do not fit this base model ({str(err)[:200]}); "
                    "resume with the --pretrained_model_name_or_path the state was trained from"
                ) from None

    # ---- saving

    def output_path(self, folder: Path, name: str) -> Path:
        if self.format in SINGLE_FILE_FORMATS:
            return Path(folder) / f"{name}.{self.format}"
        return Path(folder) / name  # a diffusers folder

    def save(self, folder: Path, name: str, ctx: TrainingContext, progress: Progress) -> Path:
        from library.models.saving import save_model
        from library.training.metadata import modelspec_from_args

        args, parts = ctx.args, self.parts
        path = self.output_path(folder, name)
        if self.format in SINGLE_FILE_FORMATS:
            extras, epoch, step = self._extras_from_source(parts)
            metadata = modelspec_from_args(args, kind="checkpoint", timestamp=ctx.started_at)
            save_model(
                path, parts, self.format, precision=args.save_precision, metadata=metadata,
                epoch=epoch + progress.epoch, global_step=step + progress.global_step, source_state_dict=extras,
            )
        else:
            save_model(path, parts, self.format, precision=args.save_precision)
        return path

    def _extras_from_source(self, parts) -> tuple[dict[str, torch.Tensor], int, int]:
        """Tensors of a single-file base that we do not train (EMA copies, schedule buffers, SD2's unused
        last text block) are carried into saved single files, with the .ckpt's epoch and step counters.
        Read once, at the first save, keeping only those tensors."""
        if self._source_extras is None:
            self._source_extras = ({}, 0, 0)
            if parts.source_format == "single_file" and Path(parts.source).is_file():
                self._source_extras = _read_extras(Path(parts.source), parts)
        return self._source_extras


def _read_extras(source: Path, parts) -> tuple[dict[str, torch.Tensor], int, int]:
    from library.models.checkpoint_io import read_checkpoint
    from library.models.saving import ldm_state_dict

    ours = set(ldm_state_dict(parts.unet, parts.vae, parts.text_encoder, parts.v2))
    if source.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in ours}, 0, 0
    tensors, epoch, step = read_checkpoint(source)
    return {k: v for k, v in tensors.items() if k not in ours}, epoch, step
