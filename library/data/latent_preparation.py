"""Latents written to disk before training, from a dataset described as a training run describes it.

finetune/prepare_buckets_latents.py and tools/cache_latents.py both come here: the dataset is built by
the same code a training run uses (so buckets, sizes and crops are the ones training will ask for), and
the `.npz` files are the training cache's own (formats.md §4), so `fine_tune.py` / `train_network.py`
with `--cache_latents_to_disk` find them valid and encode nothing again.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from library.data.config_schema import DatasetSupport
from library.data.latent_cache import LatentCacheResult, cache_latents
from library.data.pipeline import prepare_datasets


def vae_for_caching(source: str, mixed_precision: str, no_half_vae: bool = False):
    """The VAE of `source` (a VAE file, a full model or a hub id), on the GPU when there is one.

    fp16 keeps the VAE in float32 as training does (fp16 VAEs can overflow to NaN latents)."""
    from library.models.loading import load_vae
    from library.training.diffusion_step import vae_dtype_for

    dtype = vae_dtype_for(mixed_precision, no_half_vae=no_half_vae)
    vae = load_vae(source, dtype=torch.float32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return vae.to(device, dtype=dtype).eval().requires_grad_(False)


def cache_dataset_latents(
    args: argparse.Namespace,
    support: DatasetSupport,
    load_vae: Callable[[], Any],
    batch_size: int,
    reencode: bool = False,
    seed: int = 0,
):
    """(dataset group, what was cached): every image of the dataset encoded to its training cache file.

    The dataset is checked before `load_vae()` runs, so a data mistake costs no model load; only the decode check
    of the images goes on while the VAE loads (a bad image is still the error shown)."""
    group = prepare_datasets(args, support)
    with group.while_checking_images():
        vae = load_vae()
    subsets = [s for d in group.datasets for s in d.blueprint.subsets]
    result: LatentCacheResult = cache_latents(
        group.cache_items(),
        vae,
        batch_size=batch_size,
        to_disk=True,
        flip_aug=any(s.flip_aug for s in subsets),
        alpha_mask=any(s.alpha_mask for s in subsets),
        generator=torch.Generator().manual_seed(seed),
        reencode=reencode,
    )
    return group, result
