"""Fine-tune Stable Diffusion 1.x/2.x on a captioned dataset described by a metadata file.

The story of this recipe: a metadata JSON/JSONL (`--in_json`, or `metadata_file` in a dataset
TOML, written by the finetune/ tools) gives every image its caption and tags; keys may be image
stems or full paths. The whole U-Net trains on it; the text encoder trains only with
`--train_text_encoder` (at `--learning_rate_te`). Latents can be cached by the run or reused from
`.npz` files written earlier. The result is a whole model (LDM single file or diffusers folder).
Everything else (data, noise, steps, saves, resume) is the shared trainer's.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir images --in_json meta_lat.json --output_dir out --output_name tuned \\
        --resolution 512 --learning_rate 5e-6 --max_train_steps 10000 --cache_latents
"""

from __future__ import annotations

import argparse
import sys

from library.data.config_schema import DatasetSupport
from library.recipe import Attached, RecipeInfo, TrainingContext
from library.recipes.full_model import FullModelRecipe, add_full_model_arguments, full_model_option_problems

INFO = RecipeInfo(
    script="fine_tune",
    description="Fine-tune a Stable Diffusion 1.x/2.x model from a metadata file.",
    datasets=DatasetSupport("fine_tune", dreambooth=False, fine_tuning=True, masked_loss=False, dropout=True),
    save_formats=("ckpt", "safetensors", "diffusers", "diffusers_safetensors"),
    default_save_format=None,
    tracker_name="finetuning",
)


class FineTuneRecipe(FullModelRecipe):
    info = INFO

    # ---- options

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = add_full_model_arguments(parser, "fine-tuning")
        group.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too (default: U-Net only)")
        # sd-scripts' separate diffusers attention path is gone; this spelling just switches --xformers on.
        group.add_argument(
            "--diffusers_xformers", dest="xformers", action="store_true", help="same as --xformers (sd-scripts' name)"
        )

    @staticmethod
    def option_problems(args: argparse.Namespace) -> list[str]:
        problems = full_model_option_problems(
            args, text_encoder_trains=args.train_text_encoder, how_to_freeze="drop --train_text_encoder"
        )
        if args.learning_rate_te is not None and not args.train_text_encoder:
            problems.append("--learning_rate_te needs --train_text_encoder (the text encoder is frozen otherwise)")
        return problems

    @staticmethod
    def find_unused_parameters(args: argparse.Namespace) -> bool:
        return False

    # ---- training

    def attach(self, ctx: TrainingContext) -> Attached:
        return self.train_full_model(ctx, train_text_encoder=ctx.args.train_text_encoder)


if __name__ == "__main__":
    from library.training.entry import run_recipe

    sys.exit(run_recipe(FineTuneRecipe()))
