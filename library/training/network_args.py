"""Options of train_network.py (reference/cli.md §10) and their early checks.

The checks run before any model is loaded, so a typo in --network_args costs seconds, not the
minutes of loading a base model. The network module judges its own --network_args through an
optional `network_args_problems(kwargs) -> list[str]` function (networks.lora has one).
"""

from __future__ import annotations

import argparse
import importlib
import os

from library.training.metadata import parse_network_kwargs

DEFAULT_NETWORK_MODULE = "networks.lora"


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The network options (the --metadata_* options are shared: library/args.py)."""
    group = parser.add_argument_group("network (LoRA)")
    opt = group.add_argument
    opt("--network_module", type=str, default=None,
        help=f"Python module of the network to train (default {DEFAULT_NETWORK_MODULE})")
    opt("--network_dim", type=int, default=None, help="rank of the network (default 4)")
    # default=1 (an int, as upstream) so an unset alpha is recorded as "1" in the metadata
    opt("--network_alpha", type=float, default=1, help="alpha: the LoRA output is scaled by alpha/dim (default 1)")
    opt("--network_dropout", type=float, default=None, help="dropout on the LoRA's rank activations while training")
    opt("--network_args", type=str, default=None, nargs="*",
        help="network options key=value, e.g. conv_dim=4 conv_alpha=1 rank_dropout=0.1")
    opt("--network_weights", type=str, default=None, help="start from these network weights")
    opt("--dim_from_weights", action="store_true",
        help="take ranks and alphas from --network_weights (ignores --network_dim)")
    opt("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    opt("--network_train_text_encoder_only", action="store_true", help="train only the text-encoder part")
    opt("--unet_lr", type=float, default=None, help="U-Net part learning rate (default --learning_rate)")
    opt("--text_encoder_lr", type=float, default=None, nargs="*",
        help="text-encoder part learning rate (default --learning_rate); one value for SD1/SD2")
    opt("--scale_weight_norms", type=float, default=None,
        help="max-norm regularization: shrink LoRAs whose weight norm exceeds this (1.0 is typical)")
    opt("--training_comment", type=str, default=None, help="free text stored in the metadata")
    opt("--no_metadata", action="store_true", help="store only the metadata needed to load the network")
    opt("--base_weights", type=str, default=None, nargs="*", help="network files merged into the base model first")
    opt("--base_weights_multiplier", type=float, default=None, nargs="*",
        help="strength of each --base_weights file (default 1.0)")
    from library.training.scaling_args import add_fp8_base_unet_argument

    add_fp8_base_unet_argument(group)


def network_option_problems(args: argparse.Namespace) -> list[str]:
    """Every problem with the network options, each a complete sentence."""
    problems = []
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if get("network_train_unet_only") and get("network_train_text_encoder_only"):
        problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if get("dim_from_weights") and not get("network_weights"):
        problems.append("--dim_from_weights needs --network_weights (the file to take the ranks from)")
    if get("network_dim") is not None and get("network_dim") < 1:
        problems.append("--network_dim must be at least 1")
    dropout = get("network_dropout")
    if dropout is not None and not 0 <= dropout < 1:
        problems.append("--network_dropout must be in [0, 1)")
    te_lr = get("text_encoder_lr")
    if isinstance(te_lr, (list, tuple)) and len(te_lr) > 1:
        problems.append("--text_encoder_lr: SD1.x/SD2.x have one text encoder; give one value")
    multipliers, bases = get("base_weights_multiplier") or [], get("base_weights") or []
    if len(multipliers) > len(bases):
        problems.append("--base_weights_multiplier has more values than --base_weights has files")
    problems += [f"--base_weights {path}: file not found" for path in bases if not os.path.isfile(path)]
    problems += _network_args_problems(get("network_args"), get("network_module") or DEFAULT_NETWORK_MODULE)
    return problems


def _network_args_problems(network_args, module_name: str) -> list[str]:
    problems = []
    for item in network_args or ():
        key, sep, _ = str(item).partition("=")
        if not sep or not key.strip():
            problems.append(f"--network_args '{item}': expected key=value, e.g. conv_dim=4")
    if problems or not network_args:
        return problems
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []  # the recipe reports an unimportable --network_module itself
    check = getattr(module, "network_args_problems", None)
    return list(check(parse_network_kwargs(network_args))) if check else []
