"""Options of the shared training loop: schedule, precision, saving cadence, resume, logging, distributed.

Names, defaults and meaning follow kohya-ss/sd-scripts (reference/cli.md §4, §6, §8); docs/options.md
lists them. Recipe-specific options live with the recipe's parts (network_args, ...).
"""

from __future__ import annotations

import argparse


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps to train (default 1600)")
    group.add_argument(
        "--max_train_epochs", type=int, default=None, help="epochs to train; overrides --max_train_steps"
    )
    group.add_argument("--seed", type=int, default=None, help="seed for data order, noise and dropout (default: random)")
    group.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)"
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches whose gradients add up to one step"
    )
    group.add_argument(
        "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
        help="compute dtype: no (fp32), fp16 or bf16; frozen weights are stored in it",
    )
    group.add_argument("--full_fp16", action="store_true", help="trained weights and gradients in fp16 too")
    group.add_argument("--full_bf16", action="store_true", help="trained weights and gradients in bf16 too")
    group.add_argument("--lowram", action="store_true", help="accepted for compatibility; loading is already lean")
    group.add_argument(
        "--cache_text_encoder_outputs", action="store_true",
        help="when the text encoder does not train: encode each distinct caption once and reuse it",
    )
    group.add_argument(
        "--cpu_offload_checkpointing", action="store_true",
        help="with --gradient_checkpointing: keep the saved activations in CPU memory until the backward pass",
    )
    group.add_argument(
        "--highvram", action="store_true",
        help="accepted for sd-scripts compatibility: latent caching here never empties the GPU cache between batches",
    )
    group.add_argument("--ddp_timeout", type=int, default=None, help="distributed timeout in minutes")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    group.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs, checkpoints and resume")
    group.add_argument("--output_dir", type=str, default=None, help="folder for models, states and samples")
    group.add_argument("--output_name", type=str, default=None, help="base name of the saved files")
    group.add_argument("--save_every_n_epochs", type=int, default=None, help="save a model every N epochs")
    group.add_argument("--save_every_n_steps", type=int, default=None, help="save a model every N steps")
    group.add_argument(
        "--save_n_epoch_ratio", type=int, default=None, help="save about N times over the run (sets --save_every_n_epochs)"
    )
    group.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    group.add_argument("--save_last_n_steps", type=int, default=None, help="keep only step saves of the last N steps")
    group.add_argument("--save_last_n_epochs_state", type=int, default=None, help="like --save_last_n_epochs, for states")
    group.add_argument("--save_last_n_steps_state", type=int, default=None, help="like --save_last_n_steps, for states")
    group.add_argument(
        "--save_state", action="store_true", help="with every save, also write a resumable training state folder"
    )
    group.add_argument("--save_state_on_train_end", action="store_true", help="write a training state at the end only")
    group.add_argument("--resume", type=str, default=None, help="training state folder to continue from")
    group.add_argument(
        "--initial_epoch", type=int, default=None,
        help="count epochs from this one (1 = the first); the LR schedule still starts at 0 unless --resume",
    )
    group.add_argument(
        "--initial_step", type=int, default=None,
        help="count steps from this one (0 = the first; overrides --initial_epoch and a --resume state's step)",
    )
    group.add_argument(
        "--skip_until_initial_step", action="store_true",
        help="with --initial_step/--initial_epoch: also skip the batches of the steps before it (same data as a run "
        "that got there)",
    )


def add_logging_arguments(parser: argparse.ArgumentParser, tracker_name: str) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--logging_dir", type=str, default=None, help="write TensorBoard logs to <dir>/<prefix><date-time>/"
    )
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the log run folder")
    group.add_argument(
        "--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
        help="tracker (default: tensorboard when --logging_dir is given)",
    )
    group.add_argument(
        "--log_tracker_name", type=str, default=None, help=f"tracker project name (default {tracker_name})"
    )
    group.add_argument("--log_tracker_config", type=str, default=None, help="TOML of extra tracker init arguments")
    group.add_argument("--wandb_run_name", type=str, default=None, help="W&B run name")
    group.add_argument("--wandb_api_key", type=str, default=None, help="W&B API key (logs in before the run)")
    group.add_argument("--log_config", action="store_true", help="log the options (secrets removed) to the tracker")


def training_option_problems(args: argparse.Namespace) -> list[str]:
    """Bad combinations of the options above, found before anything loads."""
    problems = []
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        problems.append("--max_train_steps must be at least 1")
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        problems.append("--max_train_epochs must be at least 1")
    if args.gradient_accumulation_steps < 1:
        problems.append("--gradient_accumulation_steps must be at least 1")
    if args.full_fp16 and args.full_bf16:
        problems.append("--full_fp16 and --full_bf16 exclude each other")
    if args.full_fp16 and args.mixed_precision != "fp16":
        problems.append("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 needs --mixed_precision bf16")
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1")
    if args.resume and not getattr(args, "resume_from_huggingface", False) and not _is_state_folder(args.resume):
        problems.append(
            f"--resume {args.resume}: not a training state folder (expected a folder with train_state.json, "
            "written by --save_state)"
        )
    if not args.output_dir:
        problems.append("--output_dir is required (the folder to write models and states to)")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        problems.append("--initial_epoch must be at least 1 (1 is the first epoch)")
    if args.initial_step is not None and args.initial_step < 0:
        problems.append("--initial_step must be at least 0 (0 is the first step)")
    if args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        problems.append("--skip_until_initial_step needs --initial_step or --initial_epoch (where to skip to)")
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        problems.append("--cpu_offload_checkpointing needs --gradient_checkpointing (it offloads what checkpointing keeps)")
    return problems


def _is_state_folder(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "train_state.json").is_file()
