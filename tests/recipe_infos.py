"""The recipes' descriptions (RecipeInfo), for tests that build a script's parser or dataset support."""

from __future__ import annotations

import fine_tune
import train_db
import train_network
import train_textual_inversion
import train_textual_inversion_XTI

INFOS = {
    info.script: info
    for info in (train_network.INFO, train_db.INFO, fine_tune.INFO, train_textual_inversion.INFO,
                 train_textual_inversion_XTI.INFO)
}
SCRIPTS = tuple(INFOS)


def info(script: str):
    return INFOS[script]


def support(script: str):
    return INFOS[script].datasets


def parser_for(script: str):
    """The script's full parser, its own options included, as the script builds it."""
    from library.args import build_parser

    parser = build_parser(INFOS[script])
    recipe = {"train_network": train_network.NetworkRecipe, "train_db": train_db.DreamBoothRecipe,
              "fine_tune": fine_tune.FineTuneRecipe,
              "train_textual_inversion": train_textual_inversion.TextualInversionRecipe,
              "train_textual_inversion_XTI": train_textual_inversion_XTI.XTIRecipe}.get(script)
    if recipe is not None:
        recipe.add_arguments(parser)
    return parser
