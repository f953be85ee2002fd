"""From parsed options to a ready DatasetGroup: blueprints, early checks, scanning, the bucket table.

This is the one place recipes call; everything here runs before any model loads.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from library.data.config import DatasetBlueprint, blueprints_from_args
from library.data.config_schema import DatasetConfigError, DatasetSupport
from library.data.latent_cache import LATENT_CACHE_FORBIDS, LATENT_CACHE_FORBIDS_REASON

logger = logging.getLogger(__name__)


def wants_datasets(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dataset_config", None) or getattr(args, "train_data_dir", None) or getattr(args, "in_json", None))


def latent_caching_problems(blueprints: Sequence[DatasetBlueprint], args: argparse.Namespace) -> list[str]:
    """--cache_latents cannot be combined with per-step image augmentations (the cache holds one encoding)."""
    if not (getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)):
        return []
    problems = []
    for dataset in blueprints:
        for subset in dataset.subsets:
            for option in LATENT_CACHE_FORBIDS:
                if getattr(subset, option, False):
                    problems.append(
                        f"{subset.origin}: {option} is on, but --cache_latents is set: {LATENT_CACHE_FORBIDS_REASON}"
                    )
    return problems


def prepare_datasets(args: argparse.Namespace, support: DatasetSupport, defer_readability_check: bool = True):
    """Validate the dataset options and scan the data; raises one error listing every problem (a
    ``UserError``: bad options or paths, unreadable images or metadata, or nothing to train on).

    The decode check of the images may still be running when the group is returned (``defer_readability_check``,
    see ``build_dataset_group``): the caller loads its model meanwhile, then calls
    ``group.finish_readability_check()``, which raises the unreadable-images error; planning batches waits for it
    anyway."""
    from library.data.datasets import NoTrainingDataError, build_dataset_group
    from library.data.masks import mask_option_problems, masked_loss_problems

    blueprints = blueprints_from_args(args, support)
    problems = latent_caching_problems(blueprints, args)
    if problems:
        raise DatasetConfigError(problems, source="--cache_latents")
    problems = mask_option_problems(args) + masked_loss_problems(blueprints, bool(getattr(args, "masked_loss", False)))
    if problems:
        raise DatasetConfigError(problems, source="the masked loss options")
    try:
        group = build_dataset_group(
            blueprints,
            prior_loss_weight=getattr(args, "prior_loss_weight", 1.0),
            seed=args.seed if getattr(args, "seed", None) is not None else 0,
            skip_unreadable=getattr(args, "skip_unreadable_images", False),
            max_train_steps=getattr(args, "max_train_steps", None),
            defer_readability_check=defer_readability_check,
        )
    except NoTrainingDataError as err:
        for warning in err.warnings:  # what the scan saw first (skipped files, unmatched keys) explains the error
            logger.warning(warning)
        raise
    for warning in group.warnings:
        logger.warning(warning)
    print(group.summary())
    return group
