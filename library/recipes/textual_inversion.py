"""The mechanics of Textual Inversion, shared by the TI and XTI recipes.

New tokens are added to the tokenizer (`tok`, `tok1`, … `tok{N-1}`), the text encoder's token table
grows by their rows, and only those rows train: `RowGuard` puts every other row back after each
optimizer step, bit for bit (weight decay and momentum would otherwise move rows without gradient).
Captions name the concept by the token string, expanded here to the N tokens.
"""

from __future__ import annotations

import argparse
import logging
import re

import torch

from library.data.config_schema import DatasetSupport
from library.errors import UserError
from library.recipe import RecipeInfo
from library.recipes.ti_templates import OBJECT_TEMPLATES, STYLE_TEMPLATES

logger = logging.getLogger(__name__)


class TokenError(UserError, ValueError):
    """A --token_string / --init_word / --weights that cannot be used with this tokenizer."""


def token_names(token_string: str, num_vectors: int) -> list[str]:
    """`tok`, `tok1`, … `tok{N-1}`: the tokens upstream adds for N vectors (file and prompt compatible)."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def add_tokens(tokenizer, text_encoder, names: list[str]) -> list[int]:
    """Add `names` as new tokens and grow the text encoder's table to hold them; returns their ids."""
    known = [name for name in names if name in tokenizer.get_vocab()]
    if known:
        raise TokenError(
            f"--token_string {names[0]}: the tokenizer already has the token(s) {', '.join(known)}; choose a new, "
            "made-up word (e.g. 'xyzcat') so the embedding does not replace an existing one"
        )
    single = tokenizer(names[0], add_special_tokens=False).input_ids
    if len(single) == 1:
        logger.warning(
            "--token_string %s is a word the tokenizer already knows: in captions and prompts it will now mean the "
            "trained embedding instead", names[0],
        )  # fmt: skip
    before = len(tokenizer)
    added = tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(before, before + len(names))):
        raise TokenError(f"--token_string {names[0]}: the tokenizer did not add {names} as new tokens (got ids {ids})")
    table = text_encoder.get_input_embeddings()
    if table.num_embeddings < len(tokenizer):
        # The new rows are set right after (init word, --weights or left random): no mean-resizing init.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def init_word_ids(tokenizer, init_word: str | None, num_vectors: int) -> list[int]:
    """The token ids whose embeddings start the N vectors (cyclically); a length mismatch is warned."""
    if not init_word:
        return []
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise TokenError(f"--init_word {init_word!r}: it encodes to no token; give a word such as 'cat'")
    if len(ids) > 1 and len(ids) != num_vectors:
        logger.warning(
            "--init_word %r is %d tokens but --num_vectors_per_token is %d: the vectors start from its tokens "
            "cyclically (give --num_vectors_per_token %d to use each once)", init_word, len(ids), num_vectors, len(ids),
        )  # fmt: skip
    return ids


def initial_vectors(table: torch.nn.Embedding, source_ids: list[int], num_vectors: int) -> torch.Tensor | None:
    """Rows `source_ids[i % len]` of the table, or None (keep the new rows as the resize made them)."""
    if not source_ids:
        return None
    rows = [source_ids[i % len(source_ids)] for i in range(num_vectors)]
    return table.weight.detach()[rows].clone()


def check_weights_fit(path: str, vectors: torch.Tensor, num_vectors: int, width: int) -> None:
    if vectors.shape[0] != num_vectors:
        raise TokenError(
            f"--weights {path}: it holds {vectors.shape[0]} vector(s), this run trains {num_vectors}; give "
            f"--num_vectors_per_token {vectors.shape[0]}"
        )
    if vectors.shape[1] != width:
        family = {768: "SD1.x", 1024: "SD2.x"}
        raise TokenError(
            f"--weights {path}: its vectors are {vectors.shape[1]} wide ({family.get(vectors.shape[1], 'another model')}"
            f"), this model's text encoder is {width} wide ({family.get(width, 'this model')}); use the embedding with "
            "the model family it was trained for"
        )


def expand_token(token_string: str, names: list[str]) -> "callable":
    """caption -> caption with each whole-word `token_string` replaced by all N token names."""
    if len(names) == 1:
        return lambda caption: caption
    pattern = re.compile(rf"(?<![\w]){re.escape(token_string)}(?![\w])")
    replacement = " ".join(names)
    return lambda caption: pattern.sub(replacement, caption)


def mentions_token(caption: str, token_string: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(token_string)}(?![\w])", caption) is not None


class RowGuard:
    """Keeps every row of a token table except `trained_ids` at its starting value (call `restore()`)."""

    def __init__(self, table: torch.nn.Embedding, trained_ids: list[int]) -> None:
        self.table = table
        keep = torch.ones(table.num_embeddings, dtype=torch.bool)
        keep[trained_ids] = False
        self.keep = keep
        self.kept = table.weight.detach()[keep].clone()

    @torch.no_grad()
    def restore(self) -> None:
        weight = self.table.weight
        if self.kept.device != weight.device or self.kept.dtype != weight.dtype:  # the trainer placed the model
            self.keep, self.kept = self.keep.to(weight.device), self.kept.to(weight.device, weight.dtype)
        weight[self.keep] = self.kept


# ---------------------------------------------------------------- options (TI and XTI)


def add_textual_inversion_arguments(parser) -> None:
    group = parser.add_argument_group("textual inversion")
    group.add_argument("--token_string", type=str, default=None,
                       help="the new token to train (a made-up word, new to the tokenizer); also the default --output_name")
    group.add_argument("--init_word", type=str, default=None,
                       help="word(s) whose token embeddings start the vectors (copied cyclically)")
    group.add_argument("--num_vectors_per_token", type=int, default=1,
                       help="vectors for the concept: tokens tok, tok1, ... tok{N-1} (a prompt uses just tok)")
    group.add_argument("--weights", type=str, default=None,
                       help="continue from an embedding file (.pt/.safetensors; ours, A1111's or diffusers' format)")
    group.add_argument("--use_object_template", action="store_true",
                       help="ignore the captions: 'a photo of a {token}' style templates (an object)")
    group.add_argument("--use_style_template", action="store_true",
                       help="ignore the captions: 'a painting in the style of {token}' style templates (a style)")


def textual_inversion_option_problems(args) -> list[str]:
    from pathlib import Path

    from library.models.checkpoint_io import checkpoint_file_problem

    problems = []
    token = args.token_string
    if not token:
        problems.append("--token_string is required: the new word that will stand for the concept (e.g. 'xyzcat')")
    elif not re.fullmatch(r"[^\s,()\[\]:]+", token):
        problems.append(f"--token_string {token!r}: use one word without spaces, commas, brackets or colons")
    if args.num_vectors_per_token < 1:
        problems.append(f"--num_vectors_per_token {args.num_vectors_per_token}: must be at least 1")
    if args.use_object_template and args.use_style_template:
        problems.append("--use_object_template and --use_style_template exclude each other; pick one")
    if args.weights:
        if not Path(args.weights).is_file():
            problems.append(f"--weights {args.weights}: file not found")
        elif checkpoint_file_problem(args.weights):
            problems.append(f"--weights {checkpoint_file_problem(args.weights)}")
    if getattr(args, "cache_text_encoder_outputs", False):
        problems.append("--cache_text_encoder_outputs: the trained embedding changes the text encoder's outputs every "
                        "step; drop the option")
    return problems


def captions_without_token_problem(args, group) -> str | None:
    """TI trains nothing when no caption names the token (sd-scripts#728): say so before training."""
    if args.use_object_template or args.use_style_template or not args.token_string:
        return None
    captions = [caption for dataset in group.datasets for caption in dataset.captions]
    affixes = [
        text
        for dataset in group.datasets
        for subset in dataset.blueprint.subsets
        for text in (subset.caption_prefix, subset.caption_suffix)
        if text
    ]
    if any(mentions_token(text, args.token_string) for text in captions + affixes):
        return None
    example = next((c for c in captions if c), "(empty)")
    return (
        f"--token_string {args.token_string}: no caption contains it (e.g. {example[:60]!r}), so nothing would be "
        "learned; put the token in the captions (or the folder name's class part, or caption_prefix), or use "
        "--use_object_template / --use_style_template"
    )


def template_caption(templates, token_string: str):
    """caption -> a template chosen with torch's per-batch random stream, holding the (unexpanded) token."""
    def pick(_caption: str) -> str:
        return templates[int(torch.randint(len(templates), (1,)))].format(token_string)

    return pick


# ---------------------------------------------------------------- what the TI and XTI recipes share


def embedding_recipe_info(script: str, description: str, default_save_format: str, tracker_name: str) -> RecipeInfo:
    """The description of an embedding recipe: DreamBooth or metadata datasets, no caption dropout or weights."""
    return RecipeInfo(
        script=script,
        description=description,
        datasets=DatasetSupport(script, dreambooth=True, fine_tuning=True, masked_loss=True, dropout=False),
        save_formats=("ckpt", "pt", "safetensors"),
        default_save_format=default_save_format,
        tracker_name=tracker_name,
        weighted_captions=False,
    )


class TokenOptions:
    """The option half of the Recipe protocol that Textual Inversion and XTI share."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_textual_inversion_arguments(parser)

    @staticmethod
    def option_problems(args: argparse.Namespace) -> list[str]:
        return textual_inversion_option_problems(args)

    @staticmethod
    def dataset_problems(args: argparse.Namespace, group) -> list[str]:
        problem = captions_without_token_problem(args, group)
        return [problem] if problem else []

    @staticmethod
    def find_unused_parameters(args: argparse.Namespace) -> bool:
        return False

    @staticmethod
    def train_caption(args: argparse.Namespace):
        """`Attached.train_caption`: the chosen templates, or None (the dataset's captions)."""
        templates = OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES if args.use_style_template else None
        return template_caption(templates, args.token_string) if templates else None
