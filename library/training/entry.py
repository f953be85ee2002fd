"""What every script does around its work: parse, check everything, prepare data, train.

`run_script` is the one start-up path (logging, options with --config_file / --output_config,
user errors as one line, Ctrl-C); `run_recipe` adds the training path every recipe shares. A
recipe is an object satisfying library.recipe.Recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable

from library.args import build_parser, parse_args, write_config_file
from library.console_logging import configure_console_logging
from library.errors import UserError
from library.recipe import Recipe, RecipeInfo
from library.tool_entry import run_reporting_user_errors

logger = logging.getLogger(__name__)


def option_problems(args: argparse.Namespace, recipe: Recipe) -> list[str]:
    """Every problem the options have, found before any data or model is read."""
    from library.models.loading import model_source_problem
    from library.training.hub import hub_option_problems
    from library.training.lr_schedulers import lr_scheduler_option_problems
    from library.training.metadata import modelspec_option_problems
    from library.training.noise import NoiseSettings, noise_option_problems
    from library.training.optimizers import optimizer_option_problems
    from library.training.sampling import sampling_option_problems
    from library.training.tracking import tracking_problems
    from library.training.training_args import training_option_problems
    from library.training.validation import validation_option_problems

    problems = training_option_problems(args)
    problems += noise_option_problems(NoiseSettings.from_args(args))
    problems += optimizer_option_problems(args)
    problems += lr_scheduler_option_problems(args)
    problems += tracking_problems(args)
    problems += sampling_option_problems(args)
    problems += hub_option_problems(args)
    problems += modelspec_option_problems(args)
    problems += validation_option_problems(args)
    from library.training.scaling_args import scaling_option_problems

    problems += scaling_option_problems(args, recipe.info)
    problems += recipe.option_problems(args)
    if not args.pretrained_model_name_or_path and not args.debug_dataset:
        problems.append("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file, diffusers folder or hub id)")
    for option, value in (("--pretrained_model_name_or_path", args.pretrained_model_name_or_path), ("--vae", args.vae)):
        problem = model_source_problem(option, value)
        if problem:
            problems.append(problem)
    return problems


class OptionProblems(UserError, ValueError):
    """Everything wrong with the options, found before any data or model is read (one line each)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            listed = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"the options need fixing before training can start:\n{listed}")


def is_main_launch_process() -> bool:
    """Rank 0 of an `accelerate launch` run (or a plain run), known before accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def run_script(
    info: RecipeInfo,
    body: Callable[[argparse.Namespace], int],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Start-up shared by every script: parse, then run `body(args)`; user errors print one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # bitsandbytes (imported by diffusers) warns about an optional CPU kernel package on every start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser(info)
    if add_arguments is not None:
        add_arguments(parser)
    args = parse_args(parser, argv)
    if args.output_config:
        print(f"wrote {write_config_file(parser, args)}")
        return 0

    def configured_body(args: argparse.Namespace) -> int:
        configure_console_logging(args)  # inside: an unwritable --console_log_file is a one-line error
        return body(args)

    return run_reporting_user_errors(configured_body, args)


def run_recipe(recipe: Recipe, argv: list[str] | None = None) -> int:
    """What a recipe script's `__main__` calls."""
    return run_script(recipe.info, lambda args: _train(recipe, args), recipe.add_arguments, argv)


def _train(recipe: Recipe, args: argparse.Namespace) -> int:
    from library.data.pipeline import prepare_datasets, wants_datasets
    from library.training.output_folder import (
        clean_interrupted_saves,
        hold_output_folder,
        latent_cache_folder_problems,
        output_folder_problems,
    )
    from library.training.sampling import make_sampling_hook
    from library.training.trainer import Trainer, resolve_seed
    from library.training.validation import make_validation_hooks

    if args.xformers:
        from library.models.attention import check_xformers_usable

        check_xformers_usable()
    if getattr(args, "dataset_class", None):
        raise UserError(
            f"--dataset_class {args.dataset_class}: sd-scripts' custom dataset classes build batches in its internal "
            "format, which this trainer does not share; describe the images and captions with --dataset_config "
            "instead (docs/datasets.md)"
        )
    if not wants_datasets(args):
        raise UserError("no training data: give --dataset_config, or --train_data_dir (see docs/datasets.md)")
    if args.debug_dataset:
        from library.data.preview import run_debug_dataset

        run_debug_dataset(prepare_datasets(args, recipe.info.datasets), None)
        return 0
    problems = option_problems(args, recipe)
    if not problems:  # a missing --output_dir is already among the problems
        problems = output_folder_problems(args)
    if problems:
        raise OptionProblems(problems)
    main = is_main_launch_process()
    with hold_output_folder(args.output_dir, recipe.info.script, enabled=main):
        if main:
            for action in clean_interrupted_saves(args.output_dir):
                logger.info(action)
        if args.resume_from_huggingface:
            from library.training.hub import download_state

            args.resume = str(download_state(args.resume, token=args.huggingface_token))
        args.seed = resolve_seed(args)
        group = prepare_datasets(args, recipe.info.datasets)
        problems = recipe.dataset_problems(args, group)
        problems += latent_cache_folder_problems(group, bool(args.cache_latents_to_disk))
        if problems:
            raise OptionProblems(problems)
        sampling = make_sampling_hook(args)
        extra_hooks = [sampling.hooks()] if sampling is not None else []
        extra_hooks += make_validation_hooks(args, group)
        return Trainer(recipe, args, group, args.seed, extra_hooks).run()
