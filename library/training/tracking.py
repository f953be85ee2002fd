"""TensorBoard / W&B logging through accelerate's trackers (reference/formats.md §9 for names)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

SECRET_OPTIONS = ("wandb_api_key", "huggingface_token")


def tracker_kinds(args: argparse.Namespace) -> list[str]:
    """Which trackers the options ask for; none without --logging_dir or --log_with."""
    kind = args.log_with or ("tensorboard" if args.logging_dir else None)
    if kind is None:
        return []
    return ["tensorboard", "wandb"] if kind == "all" else [kind]


def log_run_dir(args: argparse.Namespace, now: float | None = None) -> Path | None:
    """`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>` (upstream's layout)."""
    if not args.logging_dir:
        return None
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
    return Path(args.logging_dir) / f"{args.log_prefix or ''}{stamp}"


def tracking_problems(args: argparse.Namespace) -> list[str]:
    kinds = tracker_kinds(args)
    problems = []
    if "tensorboard" in kinds and not args.logging_dir:
        problems.append("--log_with tensorboard needs --logging_dir (the folder for the event files)")
    if "tensorboard" in kinds:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("--logging_dir: TensorBoard logging needs the 'tensorboard' package (pip install tensorboard)")
    if "wandb" in kinds:
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append("--log_with wandb needs the 'wandb' package (pip install wandb)")
    return problems


def accelerator_logging_kwargs(args: argparse.Namespace) -> dict:
    """`log_with` and `project_dir` for the Accelerator constructor."""
    kinds = tracker_kinds(args)
    if not kinds:
        return {}
    run_dir = log_run_dir(args)
    return {"log_with": kinds, "project_dir": str(run_dir) if run_dir is not None else None}


def start_trackers(accelerator, args: argparse.Namespace, tracker_name: str) -> None:
    """Initialise the trackers (accelerate does it on the main process) with the sanitised options."""
    kinds = tracker_kinds(args)
    if not kinds:
        return
    run_dir = accelerator.project_dir
    if "wandb" in kinds:
        if args.wandb_api_key:
            import wandb

            wandb.login(key=args.wandb_api_key)
        if run_dir is not None:
            os.environ.setdefault("WANDB_DIR", str(run_dir))
    init_kwargs = {}
    if args.log_tracker_config:
        import toml

        init_kwargs = toml.load(args.log_tracker_config)
    if args.wandb_run_name:
        init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    config = sanitized_config(args) if args.log_config else {}
    accelerator.init_trackers(args.log_tracker_name or tracker_name, config=config, init_kwargs=init_kwargs)


def sanitized_config(args: argparse.Namespace) -> dict:
    """Options as loggable scalars; secrets dropped."""
    config = {}
    for key, value in vars(args).items():
        if key in SECRET_OPTIONS or value is None:
            continue
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config
