"""Train a LoRA / LoCon network for Stable Diffusion 1.x/2.x.

The story of this recipe: the base model stays frozen; a network module (`--network_module`,
networks.lora by default) wraps chosen Linear/Conv layers of the U-Net and the text encoder; only
the network's weights train; the saved file holds the network alone, with sd-scripts' keys and
ss_* metadata so every LoRA loader reads it. Everything else (data, noise, steps, saving cadence,
resume) is the shared trainer's.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config data.toml --output_dir out --output_name mylora --network_dim 8
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from library.data.config_schema import DatasetSupport
from library.recipe import Attached, Hooks, RecipeInfo

DEFAULT_NETWORK_MODULE = "networks.lora"
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

INFO = RecipeInfo(
    script="train_network",
    description="Train a LoRA / LoCon network for Stable Diffusion 1.x/2.x.",
    datasets=DatasetSupport("train_network", dreambooth=True, fine_tuning=True, masked_loss=True, dropout=True),
    save_formats=("ckpt", "pt", "safetensors"),
    default_save_format="safetensors",
    tracker_name="network_train",
    zero_stage_3=True,
)


class NetworkRecipe:
    info = INFO

    def __init__(self) -> None:
        self.network = None
        self.suffix = "safetensors"
        self._metadata: dict[str, str] | None = None

    # ---- options

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from library.training.network_args import add_network_arguments

        add_network_arguments(parser)

    @staticmethod
    def option_problems(args: argparse.Namespace) -> list[str]:
        from library.training.network_args import network_option_problems

        problems = network_option_problems(args)
        module = args.network_module or DEFAULT_NETWORK_MODULE
        try:
            importlib.import_module(module)
        except ImportError as err:
            problems.append(f"--network_module {module}: cannot import it ({err})")
        if args.cache_text_encoder_outputs and not args.network_train_unet_only:
            problems.append(
                "--cache_text_encoder_outputs: the text encoder's LoRA trains in this run, so its outputs change "
                "every step; add --network_train_unet_only or drop the option"
            )
        from library.models.checkpoint_io import checkpoint_file_problem

        for option, paths in (("--network_weights", [args.network_weights]), ("--base_weights", args.base_weights)):
            for path in paths or []:
                if path and not Path(path).is_file():
                    problems.append(f"{option} {path}: file not found")
                elif path and checkpoint_file_problem(path):
                    problems.append(f"{option} {checkpoint_file_problem(path)}")
        return problems

    @staticmethod
    def dataset_problems(args: argparse.Namespace, group) -> list[str]:
        return []

    @staticmethod
    def find_unused_parameters(args: argparse.Namespace) -> bool:
        # module_dropout skips whole modules in some steps, DyLoRA all rank units but the drawn one: DDP must not
        # wait for their gradients. A network module says so with SKIPS_PARAMETERS_IN_A_STEP = True.
        if any(str(a).startswith("module_dropout=") for a in (args.network_args or [])):
            return True
        try:
            module = importlib.import_module(args.network_module or DEFAULT_NETWORK_MODULE)
        except ImportError:
            return False  # reported by option_problems
        return bool(getattr(module, "SKIPS_PARAMETERS_IN_A_STEP", False))

    # ---- training

    def attach(self, ctx):
        from library.training import network_protocol as protocol
        from library.training.metadata import parse_network_kwargs

        args, parts = ctx.args, ctx.parts
        if not args.network_module:
            args.network_module = DEFAULT_NETWORK_MODULE  # recorded as such in the metadata
            print(f"--network_module not given: using {DEFAULT_NETWORK_MODULE}")
        module = importlib.import_module(args.network_module)
        protocol.merge_base_weights(module, args, parts)
        network = protocol.create_network(module, args, parts, parse_network_kwargs(args.network_args))
        protocol.prepare_network(network, args)
        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        network.apply_to(parts.text_encoder, parts.unet, train_text_encoder, train_unet)
        if args.network_weights:
            _check_network_weights_fit(args, network)
            info = network.load_weights(args.network_weights)
            if ctx.accelerator.is_main_process:
                print(f"continuing from --network_weights {args.network_weights}: {info}")
        protocol.enable_gradient_checkpointing(network, args)
        if ctx.accelerator.is_main_process:
            print(
                f"network: {len(network.unet_loras)} U-Net module(s), {len(network.text_encoder_loras)} "
                "text-encoder module(s)"
            )
        groups = protocol.optimizer_groups(network, _text_encoder_lrs(args), args.unet_lr, args.learning_rate)
        protocol.prepare_grad_etc(network, parts)
        self.network = network
        self.suffix = args.save_model_as or "safetensors"
        return Attached(
            param_groups=groups,
            trained=network,
            text_encoder_trains=train_text_encoder and bool(network.text_encoder_loras),
            hooks=(protocol.network_hooks(network, args),),
        )

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    def load_trained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state_dict)

    # ---- saving

    def output_path(self, folder: Path, name: str) -> Path:
        return Path(folder) / f"{name}.{self.suffix}"

    def save(self, folder: Path, name: str, ctx, progress) -> Path:
        from library.training.metadata import finalize_metadata, minimal_metadata, network_modelspec

        args = ctx.args
        path = self.output_path(folder, name)
        metadata = finalize_metadata(
            self._training_metadata(ctx), epoch=progress.epoch, step=progress.global_step, finished_at=time.time()
        )
        if args.no_metadata:
            metadata = minimal_metadata(metadata)
        metadata.update(network_modelspec(args, timestamp=ctx.started_at))
        from library.training.network_protocol import save_network

        save_network(self.network, path, SAVE_DTYPES.get(args.save_precision), metadata)
        return path

    def _training_metadata(self, ctx) -> dict[str, str]:
        """Built once, at the first save: hashing the base model never delays the first step."""
        if self._metadata is None:
            from library.training.metadata import network_training_metadata

            group, schedule = ctx.group, ctx.schedule
            self._metadata = network_training_metadata(
                ctx.args,
                dataset_metadata=group.metadata(),
                counts={
                    "num_train_images": group.num_train_images,
                    "num_reg_images": group.num_reg_images,
                    "num_batches_per_epoch": group.num_batches_per_epoch,
                    "num_epochs": schedule.num_epochs,
                    "max_train_steps": schedule.max_train_steps,
                    "optimizer": ctx.optimizer_description,
                    "num_processes": ctx.accelerator.num_processes,
                },
                session_id=ctx.session_id,
                started_at=ctx.started_at,
                uses_dataset_config=bool(ctx.args.dataset_config),
            )
        return self._metadata

    def hooks(self, args: argparse.Namespace) -> list[Hooks]:
        return []  # the network's own calls come with attach() (Attached.hooks)


def _check_network_weights_fit(args: argparse.Namespace, network) -> None:
    """Another rank or another base model is said plainly, before torch's size-mismatch report."""
    from library.training.network_file_check import NetworkWeightsMismatch, network_weights_problem

    shapes = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    problem = network_weights_problem("--network_weights", args.network_weights, shapes, bool(args.dim_from_weights))
    if problem:
        raise NetworkWeightsMismatch(problem)


def _text_encoder_lrs(args: argparse.Namespace) -> list[float] | None:
    """--text_encoder_lr as a list (a config file may give one number)."""
    value = args.text_encoder_lr
    if value is None or isinstance(value, (list, tuple)):
        return list(value) if value else None
    return [value]


if __name__ == "__main__":
    from library.training.entry import run_recipe

    sys.exit(run_recipe(NetworkRecipe()))
