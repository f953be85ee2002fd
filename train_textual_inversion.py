"""Textual Inversion: learn new token embeddings for Stable Diffusion 1.x/2.x.

The story of this recipe: a new word (`--token_string`, N vectors: `tok`, `tok1`, …) is added to the
tokenizer; its rows of the text encoder's token table start from `--init_word` (or `--weights`) and
are the only weights that train: the U-Net, the rest of the text encoder and every other row stay
bit-identical (other rows are put back after each optimizer step). Captions name the concept by the
token string (or templates replace them); the saved file is `{"emb_params": [N, width]}` as `.pt` or
`.safetensors`, the format A1111, ComfyUI and diffusers load. Everything else (data, noise, steps,
saving cadence, resume) is the shared trainer's.

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --token_string xyzcat --init_word cat \\
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from library.models.saving import SAVE_PRECISIONS
from library.recipe import Attached, Hooks
from library.recipes import textual_inversion as ti

INFO = ti.embedding_recipe_info(
    "train_textual_inversion",
    "Textual Inversion: learn new token embeddings for Stable Diffusion 1.x/2.x.",
    default_save_format="pt",
    tracker_name="textual_inversion",
)


class TextualInversionRecipe(ti.TokenOptions):
    info = INFO

    def __init__(self) -> None:
        self.table: torch.nn.Embedding | None = None
        self.ids: list[int] = []
        self.guard: ti.RowGuard | None = None
        self.suffix = INFO.default_save_format

    # ---- training

    def attach(self, ctx) -> Attached:
        args, parts = ctx.args, ctx.parts
        names = ti.token_names(args.token_string, args.num_vectors_per_token)
        init_ids = ti.init_word_ids(parts.tokenizer, args.init_word, len(names))
        self.ids = ti.add_tokens(parts.tokenizer, parts.text_encoder, names)
        table = parts.text_encoder.get_input_embeddings()
        start = ti.initial_vectors(table, init_ids, len(names))
        if args.weights:
            from library.models.embeddings import read_embedding

            start = read_embedding(args.weights)
            ti.check_weights_fit(args.weights, start, len(names), table.embedding_dim)
        if start is not None:
            with torch.no_grad():
                table.weight[self.ids] = start.to(table.weight.dtype)
        self.table = table.requires_grad_(True)
        self.guard = ti.RowGuard(table, self.ids)
        self.suffix = args.save_model_as or INFO.default_save_format
        if not args.output_name:
            args.output_name = args.token_string  # upstream's default file name
        if ctx.accelerator.is_main_process:
            source = f"--weights {args.weights}" if args.weights else f"--init_word {args.init_word!r}" if init_ids else "random"
            print(f"textual inversion: tokens {' '.join(names)} (ids {self.ids[0]}-{self.ids[-1]}), start: {source}")
        return Attached(
            param_groups=[{"params": [table.weight], "lr": args.learning_rate, "name": "textual_inversion"}],
            text_encoder_weights_train=True,  # the token table is the text encoder's own weight: kept in fp32
            text_encoder_trains=True,
            caption=ti.expand_token(args.token_string, names),
            train_caption=self.train_caption(args),
        )

    def _keep_other_rows(self, ctx, progress) -> None:
        self.guard.restore()

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {"emb_params": self.table.weight.detach()[self.ids]}

    def load_trained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.table.weight[self.ids] = state_dict["emb_params"].to(self.table.weight.device, self.table.weight.dtype)

    def hooks(self, args: argparse.Namespace) -> list[Hooks]:
        return [Hooks(after_optimizer_step=self._keep_other_rows)]

    # ---- saving

    def output_path(self, folder: Path, name: str) -> Path:
        return Path(folder) / f"{name}.{self.suffix}"

    def save(self, folder: Path, name: str, ctx, progress) -> Path:
        from library.models.embeddings import write_embedding
        from library.training.metadata import modelspec_from_args

        args = ctx.args
        path = self.output_path(folder, name)
        metadata = modelspec_from_args(args, kind="textual-inversion", timestamp=ctx.started_at)
        vectors = self.table.weight.detach()[self.ids].float()
        return write_embedding(path, vectors, dtype=SAVE_PRECISIONS.get(args.save_precision), metadata=metadata)


if __name__ == "__main__":
    from library.training.entry import run_recipe

    sys.exit(run_recipe(TextualInversionRecipe()))
