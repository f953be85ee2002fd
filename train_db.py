"""DreamBooth: teach Stable Diffusion 1.x/2.x a subject by training the model's own weights.

The story of this recipe: images of the subject sit in `<repeats>_<identifier> <class>` folders
(or a dataset TOML), optionally beside regularization images of the class whose loss is weighted by
`--prior_loss_weight`, so the model learns "sks dog" without forgetting "dog". The whole U-Net
trains; the text encoder trains too, until `--stop_text_encoder_training` steps (never with -1),
with its own `--learning_rate_te`. The result is a whole model (LDM single file or diffusers
folder) that loads anywhere a base model loads. Everything else (data, noise, steps, saves,
resume) is the shared trainer's.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir train --reg_data_dir reg --output_dir out --output_name sks_dog \\
        --resolution 512 --learning_rate 1e-6 --max_train_steps 1600 --stop_text_encoder_training 400
"""

from __future__ import annotations

import argparse
import sys

from library.data.config_schema import DatasetSupport
from library.recipe import Attached, RecipeInfo, TrainingContext
from library.recipes.full_model import FullModelRecipe, add_full_model_arguments, full_model_option_problems

INFO = RecipeInfo(
    script="train_db",
    description="DreamBooth: train the U-Net (and optionally the text encoder) of Stable Diffusion 1.x/2.x.",
    datasets=DatasetSupport("train_db", dreambooth=True, fine_tuning=False, masked_loss=True, dropout=True),
    save_formats=("ckpt", "safetensors", "diffusers", "diffusers_safetensors"),
    default_save_format=None,
    tracker_name="dreambooth",
)
NEVER = -1  # --stop_text_encoder_training -1: the text encoder never trains


class DreamBoothRecipe(FullModelRecipe):
    info = INFO

    # ---- options

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = add_full_model_arguments(parser, "DreamBooth")
        group.add_argument(
            "--stop_text_encoder_training", type=int, default=None,
            help="stop training the text encoder after this many steps (-1: never train it; default: the whole run)",
        )
        group.add_argument(
            "--no_token_padding", action="store_true",
            help="accepted for compatibility; does nothing (captions are padded to 77 tokens, see docs/train_db.md)",
        )

    @staticmethod
    def option_problems(args: argparse.Namespace) -> list[str]:
        stop = args.stop_text_encoder_training
        problems = []
        if stop is not None and stop < NEVER:
            problems.append(f"--stop_text_encoder_training {stop}: give a step count, or -1 to never train the text encoder")
        problems += full_model_option_problems(
            args, text_encoder_trains=stop != NEVER, how_to_freeze="add --stop_text_encoder_training -1"
        )
        return problems

    @staticmethod
    def find_unused_parameters(args: argparse.Namespace) -> bool:
        # The text encoder stops receiving gradients part-way: DDP must not wait for them.
        stop = args.stop_text_encoder_training
        return stop is not None and stop >= 0

    # ---- training

    def attach(self, ctx: TrainingContext) -> Attached:
        args = ctx.args
        stop = args.stop_text_encoder_training
        if args.no_token_padding and ctx.accelerator.is_main_process:
            print("--no_token_padding does nothing: captions are padded to 77 tokens, as sd-scripts does today")
        return self.train_full_model(
            ctx, train_text_encoder=stop != NEVER, stop_text_encoder_after=stop if stop is not None and stop >= 0 else None
        )


if __name__ == "__main__":
    from library.training.entry import run_recipe

    sys.exit(run_recipe(DreamBoothRecipe()))
