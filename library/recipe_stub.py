"""What a recipe script runs until its training loop exists: parse and check options, load the base model, say what is missing."""

from __future__ import annotations

import sys

from library.recipe import RecipeInfo

NOT_BUILT = (
    "{script}.py: training is not built yet in this version. Built so far: option parsing and --config_file, "
    "base-model loading (--pretrained_model_name_or_path, --v2, --v_parameterization, --vae), the dataset "
    "pipeline (--dataset_config or folders, buckets, --debug_dataset), text encoding options, attention backends, "
    "model saving options. Coming next: the training loop."
)


def run(info: RecipeInfo, argv: list[str] | None = None) -> int:
    from library.training.entry import run_script

    return run_script(info, lambda args: _describe(info, args), argv=argv)


def _describe(info: RecipeInfo, args) -> int:
    if args.xformers:
        from library.models.attention import check_xformers_usable

        check_xformers_usable()
    from library.data.pipeline import prepare_datasets, wants_datasets

    if wants_datasets(args):
        group = prepare_datasets(args, info.datasets)
        if args.debug_dataset:
            from library.data.preview import run_debug_dataset

            run_debug_dataset(group, None)
            return 0
    elif args.debug_dataset:
        from library.errors import UserError

        raise UserError("--debug_dataset needs a dataset (--dataset_config or --train_data_dir)")
    if args.pretrained_model_name_or_path:
        _describe_base_model(args)
    print(NOT_BUILT.format(script=info.script), file=sys.stderr)
    return 2


def _describe_base_model(args) -> None:
    from library.models.loading import load_base_model

    parts = load_base_model(
        args.pretrained_model_name_or_path,
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        vae=args.vae,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
    )
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("U-Net", parts.unet), ("VAE", parts.vae), ("text encoder", parts.text_encoder))
    }
    summary = ", ".join(f"{name} {n / 1e6:.1f}M parameters" for name, n in counts.items())
    print(f"loaded {parts.source} ({parts.source_format}, SD{'2' if parts.v2 else '1'}): {summary}")
