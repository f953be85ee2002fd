"""Textual Inversion: learn new token embeddings for Stable Diffusion 1.x/2.x."""

import sys

from library.data.config_schema import DatasetSupport
from library.recipe import RecipeInfo

INFO = RecipeInfo(
    script="train_textual_inversion",
    description="Textual Inversion: learn new token embeddings for Stable Diffusion 1.x/2.x.",
    datasets=DatasetSupport(
        "train_textual_inversion", dreambooth=True, fine_tuning=True, masked_loss=True, dropout=False
    ),
    save_formats=("ckpt", "pt", "safetensors"),
    default_save_format="pt",
    tracker_name="textual_inversion",
    weighted_captions=False,
)

if __name__ == "__main__":
    from library.recipe_stub import run

    sys.exit(run(INFO))
