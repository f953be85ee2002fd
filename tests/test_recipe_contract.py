"""The recipe seam (library/recipe.py) driven by two small dummy recipes, so it cannot drift.

One trains the whole U-Net; the other trains a few rows of the token-embedding table the way
Textual Inversion does (caption hook, row restore after each optimizer step) and stops after
step 2 through the generic PartStop. Each runs 3 steps of the real trainer in this process.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from library.data.config_schema import DatasetSupport
from library.recipe import Attached, Hooks, PartStop, Recipe, RecipeInfo
from library.training.entry import run_recipe
from tests.training_helpers import dreambooth_folders

INFO = RecipeInfo(
    script="dummy", description="a dummy recipe", save_formats=("safetensors",), default_save_format="safetensors",
    datasets=DatasetSupport("dummy", dreambooth=True, fine_tuning=False, masked_loss=False, dropout=True),
    tracker_name="dummy",
)


class WholeUNet:
    """Trains every U-Net weight; saves them as one file."""

    info = INFO

    def __init__(self):
        self.calls = []

    def add_arguments(self, parser): pass
    def option_problems(self, args): return []
    def dataset_problems(self, args, group): return []
    def find_unused_parameters(self, args): return False

    def attach(self, ctx):
        self.unet = ctx.parts.unet.requires_grad_(True)
        self.start = {k: v.clone() for k, v in self.unet.state_dict().items()}
        return Attached([{"params": list(self.unet.parameters()), "lr": 1e-3, "name": "unet"}], unet_weights_train=True)

    def trained_state_dict(self): return self.unet.state_dict()
    def load_trained_state_dict(self, sd): self.unet.load_state_dict(sd)
    def output_path(self, folder, name): return Path(folder) / f"{name}.safetensors"

    def save(self, folder, name, ctx, progress):
        save_file({k: v.contiguous() for k, v in self.unet.state_dict().items()}, self.output_path(folder, name))
        return self.output_path(folder, name)

    def hooks(self, args):
        return [Hooks(after_optimizer_step=lambda ctx, p: self.calls.append(("opt", p.global_step)),
                      after_step=lambda ctx, p: self.calls.append(("step", p.global_step)),
                      after_epoch=lambda ctx, p: self.calls.append(("epoch", p.epoch)))]


class EmbeddingRows(WholeUNet):
    """Trains the embedding rows of the caption's words (TI-style restore), stopping after step 2."""

    def find_unused_parameters(self, args): return True

    def attach(self, ctx):
        self.seen = []
        self.ROWS = ctx.parts.tokenizer("sks square", add_special_tokens=False).input_ids
        self.table = ctx.parts.text_encoder.get_input_embeddings().requires_grad_(True)
        self.start = self.table.weight.detach().clone()
        self.history = []
        keep = torch.ones(len(self.start), dtype=torch.bool)
        keep[self.ROWS] = False
        self.keep = keep

        def caption(text):
            self.seen.append(text)
            return text.replace("sks", "sks sks")

        return Attached([{"params": [self.table.weight], "lr": 1e-2}], text_encoder_trains=True, caption=caption,
                        stops=(PartStop("embeddings", self.table, 2, text_encoder=True),))

    def restore_rows(self, ctx, progress):
        with torch.no_grad():
            self.table.weight[self.keep] = self.start[self.keep]
        self.history.append(self.table.weight.detach().clone())

    def trained_state_dict(self): return {"rows": self.table.weight.detach()}
    def load_trained_state_dict(self, sd): self.table.weight.data.copy_(sd["rows"])

    def save(self, folder, name, ctx, progress):
        save_file({"rows": self.table.weight.detach()[self.ROWS].contiguous()}, self.output_path(folder, name))
        return self.output_path(folder, name)

    def hooks(self, args):
        return [Hooks(after_optimizer_step=self.restore_rows)]


def run(recipe: Recipe, tiny_models, tmp_path) -> Path:
    data = dreambooth_folders(tmp_path / "data", count=3)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_models["sd1"]), "--train_data_dir", str(data),
            "--resolution", "64", "--output_dir", str(out), "--output_name", "d", "--max_train_steps", "3",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--optimizer_type", "SGD"]
    assert run_recipe(recipe, argv) == 0
    return out


def test_a_recipe_training_the_whole_unet(tiny_models, tmp_path):
    recipe = WholeUNet()
    out = run(recipe, tiny_models, tmp_path)
    # 3 images, batch 1: one epoch of 3 steps; hooks in order, each with the step just done
    assert recipe.calls == [("opt", 1), ("step", 1), ("opt", 2), ("step", 2), ("opt", 3), ("epoch", 1), ("step", 3)]
    saved = load_file(out / "d.safetensors")
    changed = [k for k, v in saved.items() if not torch.equal(v, recipe.start[k])]
    assert len(changed) > 0.9 * len(saved)  # (almost) every U-Net tensor moved


def test_a_recipe_training_embedding_rows_with_a_caption_hook_and_a_stop(tiny_models, tmp_path):
    recipe = EmbeddingRows()
    out = run(recipe, tiny_models, tmp_path)
    assert recipe.seen and all("sks square" in text for text in recipe.seen)  # the caption hook saw training captions
    first, second, third = recipe.history
    assert torch.equal(first[recipe.keep], recipe.start[recipe.keep])  # untouched rows restored
    assert not torch.equal(first[recipe.ROWS], recipe.start[recipe.ROWS])  # the trained rows moved in step 1
    assert not torch.equal(second[recipe.ROWS], first[recipe.ROWS])
    assert torch.equal(third, second)  # stopped after step 2: step 3 changed nothing
    assert not recipe.table.weight.requires_grad and not recipe.table.training
    assert torch.equal(load_file(out / "d.safetensors")["rows"], third[recipe.ROWS])


def test_the_info_describes_the_parser():
    from library.args import build_parser

    names = {s for a in build_parser(replace(INFO, save_formats=("a", "b"))).__dict__["_actions"] for s in a.option_strings}
    assert "--reg_data_dir" in names and "--in_json" not in names and "--use_safetensors" not in names
