"""XTI / P+: Textual Inversion with one embedding per U-Net cross-attention layer (SD 1.x/2.x).

The story of this recipe: as in train_textual_inversion.py a new word (`--token_string`, N vectors)
names the concept, but it gets 16 sets of vectors, one for each cross-attention layer of the U-Net
(IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03…OUT11). Each caption is encoded once per layer with that
layer's vectors, and each layer attends to its own encoding (`Attached.predict`, also used for sample
images). Only the vectors train; the text encoder's table and every model weight are untouched. The
file holds the 16 tensors `{IN01: [N, width], …}` as upstream's XTI writes them.

    accelerate launch train_textual_inversion_XTI.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --token_string xyzcat --init_word cat \\
        --num_vectors_per_token 2 --learning_rate 5e-3 --max_train_steps 1000 --save_model_as safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from library.models.saving import SAVE_PRECISIONS
from library.recipe import Attached, Hooks
from library.recipes import textual_inversion as ti
from library.recipes import xti

INFO = ti.embedding_recipe_info(
    "train_textual_inversion_XTI",
    "XTI / P+: Textual Inversion with one embedding per U-Net cross-attention layer (SD 1.x/2.x).",
    default_save_format="safetensors",
    tracker_name="textual_inversion_XTI",
)


class XTIRecipe(ti.TokenOptions):
    info = INFO

    def __init__(self) -> None:
        self.layer_vectors: xti.LayerVectors | None = None
        self.suffix = INFO.default_save_format

    # ---- training

    def attach(self, ctx) -> Attached:
        args, parts = ctx.args, ctx.parts
        names = ti.token_names(args.token_string, args.num_vectors_per_token)
        init_ids = ti.init_word_ids(parts.tokenizer, args.init_word, len(names))
        ids = ti.add_tokens(parts.tokenizer, parts.text_encoder, names)
        table = parts.text_encoder.get_input_embeddings()
        if args.weights:
            start = xti.read_xti_file(args.weights)
            ti.check_weights_fit(args.weights, start[0], len(names), table.embedding_dim)
        else:
            start = xti.initial_layer_vectors(ti.initial_vectors(table, init_ids, len(names)), len(names),
                                              table.embedding_dim)
        self.layer_vectors = xti.LayerVectors(table, ids, start)
        xti.install_lookup(parts.text_encoder, self.layer_vectors)
        contexts = xti.LayerContexts(parts.unet)
        self.suffix = args.save_model_as or INFO.default_save_format
        if not args.output_name:
            args.output_name = args.token_string
        if ctx.accelerator.is_main_process:
            print(f"XTI: tokens {' '.join(names)}, {len(contexts.layers)} of the 16 layers in this U-Net "
                  f"({', '.join(contexts.layers)})")
        return Attached(
            param_groups=[{"params": [self.layer_vectors.vectors], "lr": args.learning_rate, "name": "xti"}],
            trained=self.layer_vectors,
            text_encoder_trains=True,
            caption=ti.expand_token(args.token_string, names),
            train_caption=self.train_caption(args),
            predict=xti.per_layer_predict(self.layer_vectors, contexts),
        )

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.layer_vectors.vectors.detach()}

    def load_trained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.layer_vectors.vectors.copy_(state_dict["vectors"])

    def hooks(self, args: argparse.Namespace) -> list[Hooks]:
        return []

    # ---- saving

    def output_path(self, folder: Path, name: str) -> Path:
        return Path(folder) / f"{name}.{self.suffix}"

    def save(self, folder: Path, name: str, ctx, progress) -> Path:
        from library.models.checkpoint_io import write_state_dict
        from library.training.metadata import modelspec_from_args

        path = self.output_path(folder, name)
        tensors = xti.xti_state_dict(self.layer_vectors.vectors, SAVE_PRECISIONS.get(ctx.args.save_precision))
        metadata = modelspec_from_args(ctx.args, kind="textual-inversion", timestamp=ctx.started_at)
        write_state_dict(path, tensors, metadata=metadata if self.suffix == "safetensors" else None)
        return path


if __name__ == "__main__":
    from library.training.entry import run_recipe

    sys.exit(run_recipe(XTIRecipe()))
