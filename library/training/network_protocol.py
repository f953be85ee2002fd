"""What train_network.py calls on a network module: the sd-scripts protocol, optional methods included.

Any module that works with sd-scripts' `--network_module` works here: ours (networks.lora, dylora,
oft, lora_fa) and third-party ones such as LyCORIS (`lycoris.kohya`: LoHa, LoKr, DoRA, ...). The
module gives `create_network(multiplier, dim, alpha, vae, text_encoder, unet, **network_args)` and
`create_network_from_weights(multiplier, file, vae, text_encoder, unet, **kwargs)`; the network gives
`apply_to`, `load_weights`, `prepare_optimizer_params`, `save_weights`, `state_dict`. These are
optional, and called when present, at the moments sd-scripts calls them:

  prepare_network(args)                       right after creation
  enable_gradient_checkpointing()             with --gradient_checkpointing
  prepare_optimizer_params_with_multiple_te_lrs(te_lrs, unet_lr, lr)   preferred over the next one
  prepare_optimizer_params(te_lr, unet_lr, lr) -> groups | (groups, descriptions)
  prepare_grad_etc(text_encoder, unet)        once the optimizer groups exist
  on_epoch_start(text_encoder, unet)          before each epoch's first batch
  on_step_start(text_encoder, unet)           before each batch
  update_grad_norms(), update_norms()         when the gradients are final
  apply_max_norm_regularization(max, device)  after each optimizer step, with --scale_weight_norms
  merge_to(text_encoder, unet, weights, dtype, device)   --base_weights
"""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

import torch

from library.errors import UserError
from library.recipe import Hooks

logger = logging.getLogger(__name__)


class NetworkModuleError(UserError, ValueError):
    """The network module cannot do what the options ask of it."""


def create_network(module, args: argparse.Namespace, parts, network_kwargs: dict):
    """The network of `--network_module`, built from the options or (--dim_from_weights) from a file."""
    if args.dim_from_weights:
        network = module.create_network_from_weights(
            1.0, args.network_weights, parts.vae, parts.text_encoder, parts.unet, **network_kwargs
        )
        return network[0] if isinstance(network, tuple) else network  # sd-scripts returns (network, weights)
    network_kwargs = {**network_kwargs, "neuron_dropout": args.network_dropout}
    # as sd-scripts: LyCORIS reads --network_dropout from its "dropout" argument
    network_kwargs.setdefault("dropout", args.network_dropout)
    try:
        network = module.create_network(
            1.0, args.network_dim, args.network_alpha, parts.vae, parts.text_encoder, parts.unet, **network_kwargs
        )
    except AssertionError as err:
        if "duplicated lora name" not in str(err):
            raise
        # lycoris-lora 4.x lists the time embedding both as a class and by name; SD1/SD2 U-Nets have it
        raise NetworkModuleError(
            f"--network_module {args.network_module}: the module targets one layer twice ({err}); with LyCORIS "
            "this is lycoris-lora 4.x on an SD1/SD2 U-Net: install lycoris-lora==3.4.0 (the tested version)"
        ) from None
    if network is None:
        raise NetworkModuleError(f"--network_module {args.network_module}: create_network returned no network")
    return network


def prepare_network(network, args: argparse.Namespace) -> None:
    """The optional set-up calls made before the network is applied."""
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        raise NetworkModuleError(
            f"--scale_weight_norms: the network of {args.network_module} has no apply_max_norm_regularization; "
            "drop the option for this module"
        )


def enable_gradient_checkpointing(network, args: argparse.Namespace) -> None:
    if args.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()  # most networks have nothing to do here


def optimizer_groups(network, text_encoder_lrs: list[float] | None, unet_lr, learning_rate) -> list[dict]:
    """The network's parameter groups as the optimizer takes them: lists of tensors, each group named.

    sd-scripts' own LoRA and LyCORIS return `(groups, descriptions)`; older modules a list of groups
    or plain parameters, and some take only (text_encoder_lr, unet_lr).
    """
    first_te_lr = text_encoder_lrs[0] if text_encoder_lrs else None
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        result = network.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lrs, unet_lr, learning_rate)
    elif len(inspect.signature(network.prepare_optimizer_params).parameters) >= 3:
        result = network.prepare_optimizer_params(first_te_lr, unet_lr, learning_rate)
    else:
        result = network.prepare_optimizer_params(first_te_lr, unet_lr)
    groups, descriptions = result if isinstance(result, tuple) else (result, None)
    groups = list(groups)
    if groups and isinstance(groups[0], torch.Tensor):
        groups = [{"params": groups}]
    named = []
    for i, group in enumerate(groups):
        group = dict(group)
        group["params"] = list(group["params"])
        description = descriptions[i] if descriptions and i < len(descriptions) else None
        if description and "name" not in group:
            group["name"] = description.replace(" ", "_")
        named.append(group)
    return [g for g in named if g["params"]]


def prepare_grad_etc(network, parts) -> None:
    """Once the optimizer groups exist, as sd-scripts calls it (networks set requires_grad on their weights)."""
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc(parts.text_encoder, parts.unet)


def network_hooks(network, args: argparse.Namespace) -> Hooks:
    """The network's per-epoch, per-step and post-step calls as trainer hooks (only those it has)."""
    on_epoch_start = getattr(network, "on_epoch_start", None)
    on_step_start = getattr(network, "on_step_start", None)
    norm_updates = [getattr(network, name) for name in ("update_grad_norms", "update_norms") if hasattr(network, name)]

    def at_epoch_start(ctx, progress) -> None:
        on_epoch_start(ctx.parts.text_encoder, ctx.parts.unet)

    def before_batch(ctx, progress) -> None:
        on_step_start(ctx.parts.text_encoder, ctx.parts.unet)

    def before_optimizer_step(ctx, progress) -> None:
        for update in norm_updates:
            update()

    def after_optimizer_step(ctx, progress) -> None:
        scaled, mean_norm, max_norm = network.apply_max_norm_regularization(args.scale_weight_norms, ctx.device)
        if ctx.accelerator.trackers:
            ctx.accelerator.log(
                {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm},
                step=progress.global_step + 1,
            )

    return Hooks(
        at_epoch_start=at_epoch_start if on_epoch_start else None,
        before_batch=before_batch if on_step_start else None,
        before_optimizer_step=before_optimizer_step if norm_updates else None,
        after_optimizer_step=after_optimizer_step if args.scale_weight_norms else None,
    )


def merge_base_weights(module, args: argparse.Namespace, parts) -> None:
    """--base_weights: bake other networks into the frozen base before this one is created."""
    multipliers = list(args.base_weights_multiplier or [])
    for i, path in enumerate(args.base_weights or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        network, weights = module.create_network_from_weights(
            multiplier, path, parts.vae, parts.text_encoder, parts.unet, for_inference=True
        )
        dtype = next(parts.unet.parameters()).dtype
        network.merge_to(parts.text_encoder, parts.unet, weights, dtype, "cpu")
        print(f"merged --base_weights {path} (multiplier {multiplier}) into the base model")


def save_network(network, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> None:
    """`network.save_weights`, made atomic for modules that write in place (a crash keeps the old file)."""
    from library.fileio import atomic_file_named_as

    with atomic_file_named_as(path) as tmp:
        network.save_weights(str(tmp), dtype, dict(metadata))
