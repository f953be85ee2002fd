"""Command-line options shared by the recipes, `--config_file` handling and early checks.

Each `add_*_arguments` adds one group, with the names, defaults and meaning of
kohya-ss/sd-scripts (see docs/options.md). A recipe builds its parser from the
groups it owns,
shaped by its `RecipeInfo` (library/recipe.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from library.errors import print_user_error

if TYPE_CHECKING:
    from library.recipe import RecipeInfo


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one `error:` line (not the whole usage) and exits like every user error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        code = print_user_error(f"{message} (see {self.prog} --help)")
        self.exit(code)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("base model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="base model: an SD checkpoint file (.ckpt/.safetensors), a diffusers folder, or a Hugging Face model id",
    )
    group.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    group.add_argument(
        "--v_parameterization", action="store_true", help="the model predicts v (SD2 768-v models); use with --v2"
    )
    group.add_argument(
        "--vae", type=str, default=None, help="replacement VAE: a VAE file, a full checkpoint, a diffusers folder or a hub id"
    )
    group.add_argument(
        "--tokenizer_cache_dir", type=str, default=None, help="folder to keep the tokenizer in (written once, read after)"
    )
    group.add_argument(
        "--no_half_vae", action="store_true",
        help="keep the VAE in float32 under --mixed_precision (fp16 VAEs can overflow to NaN latents)",
    )


def add_text_encoding_arguments(parser: argparse.ArgumentParser, weighted_captions: bool = True) -> None:
    group = parser.add_argument_group("text encoding")
    group.add_argument(
        "--clip_skip", type=int, default=None, help="use the output of the n-th last text-encoder layer (2 = penultimate)"
    )
    group.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=[75, 150, 225],
        help="tokens per caption: 75 (default), 150 or 225 (split into 75-token chunks)",
    )
    if weighted_captions:
        group.add_argument(
            "--weighted_captions", action="store_true", help="enable (word:1.2) / [word] weights in captions"
        )


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attention")
    group.add_argument("--xformers", action="store_true", help="use xformers attention (needs xformers and a CUDA GPU)")
    group.add_argument("--mem_eff_attn", action="store_true", help="memory-saving sliced attention (slower)")
    group.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")


def add_model_saving_arguments(parser: argparse.ArgumentParser, info: "RecipeInfo") -> None:
    choices, default = info.save_formats, info.default_save_format
    group = parser.add_argument_group("saving")
    group.add_argument(
        "--save_model_as",
        type=str,
        default=default,
        choices=choices,
        help=f"format of saved models (default: {default or 'same as the base model'})",
    )
    group.add_argument(
        "--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"], help="dtype of saved weights"
    )
    if info.saves_full_models:
        group.add_argument(
            "--use_safetensors", action="store_true",
            help="without --save_model_as: save the model's own format with .safetensors weights",
        )
    add_modelspec_arguments(parser)


def add_modelspec_arguments(parser: argparse.ArgumentParser) -> None:
    """--metadata_* options: the modelspec.* keys written into saved .safetensors files."""
    group = parser.add_argument_group("model metadata (modelspec)")
    for field, text in (
        ("title", "title (default: --output_name)"),
        ("author", "author"),
        ("description", "description"),
        ("license", "license"),
        ("tags", "comma-separated tags"),
        ("usage_hint", "usage hint (how to prompt it)"),
        ("thumbnail", "thumbnail: an image file, stored as a data: URI"),
        ("merged_from", "models this one was merged from"),
        ("trigger_phrase", "trigger phrase"),
        ("preprocessor", "preprocessor"),
    ):
        group.add_argument(f"--metadata_{field}", type=str, default=None, help=f"modelspec {text}")
    group.add_argument("--metadata_is_negative_embedding", action="store_true",
                       help="modelspec: the embedding is meant for negative prompts")


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration file")
    group.add_argument(
        "--config_file", type=str, default=None, help="TOML file of options (keys = option names); the command line wins"
    )
    group.add_argument(
        "--output_config", action="store_true", help="write the given options to --config_file's path and exit"
    )


def build_parser(info: "RecipeInfo") -> argparse.ArgumentParser:
    """The parser of one recipe: the shared option groups, shaped by the recipe's description."""
    parser = ArgumentParser(prog=f"{info.script}.py", description=info.description)
    from library.console_logging import add_console_log_arguments
    from library.data.dataset_args import add_dataset_arguments

    add_model_arguments(parser)
    add_dataset_arguments(parser, info.datasets)
    add_text_encoding_arguments(parser, weighted_captions=info.weighted_captions)
    add_attention_arguments(parser)
    add_model_saving_arguments(parser, info)
    add_training_groups(parser, info.tracker_name)
    from library.training.scaling_args import add_scaling_arguments

    add_scaling_arguments(parser)  # --deepspeed / ZeRO, --torch_compile, --fp8_base
    add_console_log_arguments(parser)
    add_config_file_arguments(parser)
    return parser


def add_training_groups(parser: argparse.ArgumentParser, tracker_name: str) -> None:
    """The shared training loop's options: schedule, precision, noise/loss, optimizer, LR, outputs, logging."""
    from library.training.hub import add_hub_arguments
    from library.training.lr_schedulers import add_lr_scheduler_arguments
    from library.training.noise import add_noise_arguments
    from library.training.optimizers import add_optimizer_arguments
    from library.training.sampling import add_sampling_arguments
    from library.training.training_args import add_logging_arguments, add_output_arguments, add_training_arguments
    from library.training.validation import add_validation_arguments

    add_training_arguments(parser)
    add_noise_arguments(parser)
    add_optimizer_arguments(parser)
    add_lr_scheduler_arguments(parser)
    add_output_arguments(parser)
    add_logging_arguments(parser, tracker_name)
    add_sampling_arguments(parser)
    add_validation_arguments(parser)
    add_hub_arguments(parser)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv, filling options from `--config_file` (command line > file > defaults)."""
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        args = apply_config_file(parser, args, argv)
    return args


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """Flatten the TOML tables, check every key is a known option, and let the command line win."""
    import toml

    path = Path(args.config_file)
    if not path.suffix:
        path = path.with_suffix(".toml")
    if not path.is_file():
        parser.error(f"--config_file {path}: file not found")
    try:
        table = toml.load(path)
    except toml.TomlDecodeError as err:
        parser.error(f"--config_file {path}: not valid TOML ({err})")
    values = {}
    for key, value in table.items():
        if isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    # Keys are option names; an alias spelling (--diffusers_xformers) stores into its option's dest.
    dests = {a.dest: a.dest for a in parser._actions}
    dests.update({name.lstrip("-"): a.dest for a in parser._actions for name in a.option_strings})
    unknown = sorted(k for k in values if k not in dests)
    if unknown:
        parser.error(f"--config_file {path}: unknown option(s) {', '.join(unknown)}")
    values = {dests[k]: v for k, v in values.items()}
    # Parse again with file values as defaults so command-line values still take precedence
    # and argparse applies its type conversions and choice checks to both.
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """`--output_config`: save the options that differ from their defaults to `--config_file` (never overwrite)."""
    import toml

    if not args.config_file:
        parser.error("--output_config needs --config_file PATH to write to")
    path = Path(args.config_file)
    if not path.suffix:
        path = path.with_suffix(".toml")
    if path.exists():
        parser.error(f"--output_config: {path} already exists; choose another --config_file")
    skip = {"config_file", "output_config", "wandb_api_key", "help"}
    values = {
        a.dest: getattr(args, a.dest)
        for a in parser._actions
        if a.dest not in skip and getattr(args, a.dest, None) not in (None, a.default)
    }
    path.write_text(toml.dumps(values), encoding="utf-8")
    return path
