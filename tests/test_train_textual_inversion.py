"""train_textual_inversion.py as a user runs it, on the tiny SD1/SD2 models: only the new rows train (everything
else bit-identical), files load in diffusers with the same text-encoder output, every kind of --weights file,
exact resume, templates, and the upstream trap (token in no caption) stopped before training."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_textual_inversion
from library.models.embeddings import read_embedding
from library.models.loading import load_base_model
from library.recipes.textual_inversion import template_caption
from library.recipes.ti_templates import OBJECT_TEMPLATES
from library.training.entry import run_recipe
from tests.training_helpers import assert_ok, run_script, write_image_folder

TOKEN = "xyzsq"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    write_image_folder(root / "train" / f"2_{TOKEN} square", count=2)
    return root / "train"


def ti_args(model, data, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--token_string", TOKEN, "--init_word", "square", "--learning_rate", "5e-2",
        "--seed", "11", "--max_data_loader_n_workers", "0", *extra,
    ]  # fmt: skip


class KeepsParts(train_textual_inversion.TextualInversionRecipe):
    """The real recipe, remembering the model parts it trained (to compare them with the base after the run)."""

    def attach(self, ctx):
        self.parts = ctx.parts
        return super().attach(ctx)


def test_only_the_new_rows_train_and_everything_else_is_bit_identical(tiny_models, data, tmp_path):
    recipe = KeepsParts()
    out = tmp_path / "out"
    assert run_recipe(recipe, ti_args(tiny_models["sd1"], data, out, "--max_train_steps", "3",
                                      "--num_vectors_per_token", "2")) == 0
    base = load_base_model(str(tiny_models["sd1"]))
    trained_te, base_te = recipe.parts.text_encoder.state_dict(), base.text_encoder.state_dict()
    table_key = next(k for k in trained_te if k.endswith("token_embedding.weight"))
    vocab = base_te[table_key].shape[0]
    for key, value in base_te.items():
        if key == table_key:
            assert torch.equal(trained_te[key][:vocab], value), "an existing token row changed"
        else:
            assert torch.equal(trained_te[key], value), key
    for key, value in base.unet.state_dict().items():
        assert torch.equal(recipe.parts.unet.state_dict()[key], value), key
    saved = torch.load(out / f"{TOKEN}.pt", weights_only=True)
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, base_te[table_key].shape[1])
    assert torch.equal(saved["emb_params"], trained_te[table_key][vocab:])
    square = base.tokenizer("square", add_special_tokens=False).input_ids[0]
    assert not torch.allclose(saved["emb_params"][0], base_te[table_key][square])  # it moved from its init word


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_saved_embedding_loads_in_diffusers_and_encodes_as_in_training(tiny_models, data, tmp_path, model):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    v2 = ["--v2"] if model == "sd2" else []
    result = run_script("train_textual_inversion.py", *ti_args(
        tiny_models[model], data, out, "--max_train_steps", "2", "--num_vectors_per_token", "3",
        "--save_model_as", "safetensors", "--output_name", "emb", *v2))  # fmt: skip
    assert_ok(result)
    path = out / "emb.safetensors"
    vectors = load_file(str(path))["emb_params"]
    assert vectors.shape[0] == 3
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"].endswith("/textual-inversion")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models[model]), safety_checker=None)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    prompt = f"a {TOKEN} square"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
    ours = encode_like_training(tiny_models[model], vectors, prompt, v2=bool(v2))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def encode_like_training(model, vectors, prompt, v2):
    """The text encoder output our trainer computes for `prompt` with the embedding loaded."""
    from library.recipes.textual_inversion import add_tokens, expand_token, token_names

    parts = load_base_model(str(model), v2=v2)
    names = token_names(TOKEN, vectors.shape[0])
    ids = add_tokens(parts.tokenizer, parts.text_encoder, names)
    with torch.no_grad():
        parts.text_encoder.get_input_embeddings().weight[ids] = vectors
        tokens = parts.tokenizer(expand_token(TOKEN, names)(prompt), padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids
        return parts.text_encoder(tokens)[0]


def test_resume_is_exact_and_weights_of_every_format_continue(tiny_models, data, tmp_path):
    whole, first, second = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    assert run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, whole, "--max_train_steps", "4")) == 0
    assert run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, first, "--max_train_steps", "2", "--save_state")) == 0
    assert run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, second, "--max_train_steps", "4",
                              "--resume", str(first / f"{TOKEN}-state"))) == 0
    a = torch.load(whole / f"{TOKEN}.pt", weights_only=True)["emb_params"]
    b = torch.load(second / f"{TOKEN}.pt", weights_only=True)["emb_params"]
    assert (a - b).abs().max() < 1e-6

    # --weights: ours (.pt), A1111's string_to_param .pt, diffusers' learned_embeds (.bin / .safetensors)
    ours = first / f"{TOKEN}.pt"
    vectors = read_embedding(ours)
    a1111 = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
                "name": TOKEN, "step": 100, "sd_checkpoint": "abc", "sd_checkpoint_name": "base"}, a1111)
    learned_bin, learned_st = tmp_path / "learned_embeds.bin", tmp_path / "learned_embeds.safetensors"
    torch.save({f"<{TOKEN}>": vectors[0].clone()}, learned_bin)
    save_file({f"<{TOKEN}>": vectors[0].clone()}, str(learned_st))
    for path in (ours, a1111, learned_bin, learned_st):
        assert torch.equal(read_embedding(path), vectors), path
    recipe = KeepsParts()
    assert run_recipe(recipe, ti_args(tiny_models["sd1"], data, tmp_path / "cont", "--max_train_steps", "1",
                                      "--weights", str(a1111), "--learning_rate", "0")) == 0
    assert torch.equal(recipe.table.weight[recipe.ids].detach(), vectors)  # lr 0: exactly the loaded vectors


def test_weights_problems_are_clear_errors(tiny_models, data, tmp_path, capsys):
    vectors = torch.randn(2, 32)
    two = tmp_path / "two.safetensors"
    save_file({"emb_params": vectors}, str(two))
    code = run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, tmp_path / "a", "--max_train_steps", "1", "--weights", str(two)))
    assert code == 1
    err = capsys.readouterr().err
    assert "holds 2 vector(s), this run trains 1" in err and "--num_vectors_per_token 2" in err and "Traceback" not in err

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"emb_params": Boom()}))
    code = run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, tmp_path / "b", "--max_train_steps", "1", "--weights", str(evil)))
    captured = capsys.readouterr()
    assert code == 1 and "this must never run" not in captured.out
    assert "Refusing to load" in captured.err and "nothing in it was executed" in captured.err


def test_token_in_no_caption_stops_before_the_model_loads_unless_a_template_is_used(tiny_models, tmp_path, capsys):
    data = write_image_folder(tmp_path / "train" / "2_a square", count=2).parent
    not_a_model = tmp_path / "not_an_sd_model.safetensors"  # loading it would fail: the check must come first
    save_file({"x": torch.zeros(1)}, str(not_a_model))
    code = run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(not_a_model, data, tmp_path / "out", "--max_train_steps", "1"))
    assert code == 1
    err = capsys.readouterr().err
    assert f"--token_string {TOKEN}: no caption contains it" in err and "--use_object_template" in err
    code = run_recipe(train_textual_inversion.TextualInversionRecipe(),
                      ti_args(tiny_models["sd1"], data, tmp_path / "out", "--max_train_steps", "2",
                              "--use_object_template"))
    assert code == 0 and (tmp_path / "out" / f"{TOKEN}.pt").is_file()


def test_templates_are_drawn_from_the_per_batch_random_stream():
    pick = template_caption(OBJECT_TEMPLATES, TOKEN)
    torch.manual_seed(3)
    first = [pick("ignored caption") for _ in range(8)]
    torch.manual_seed(3)
    assert [pick("other") for _ in range(8)] == first
    assert all(TOKEN in c and c.replace(TOKEN, "{}") in OBJECT_TEMPLATES for c in first) and len(set(first)) > 1


def test_sample_images_use_the_trained_tokens(tiny_models, data, tmp_path):
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a {TOKEN} square --w 64 --h 64 --s 4 --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_recipe(train_textual_inversion.TextualInversionRecipe(), ti_args(
        tiny_models["sd1"], data, out, "--max_train_steps", "2", "--num_vectors_per_token", "2", "--learning_rate", "0.5",
        "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_steps", "2")) == 0  # fmt: skip
    before, after = (np.asarray(Image.open(next((out / "sample").glob(f"{TOKEN}_{step:06d}_*.png")))) for step in (0, 2))
    assert np.abs(before.astype(int) - after.astype(int)).max() > 0  # the trained vectors condition the samples


def test_token_must_be_new_and_a_multi_token_init_word_is_warned(tiny_models, caplog):
    import logging

    from library.recipes.textual_inversion import TokenError, add_tokens, init_word_ids

    parts = load_base_model(str(tiny_models["sd1"]))
    with pytest.raises(TokenError, match="already has the token"):
        add_tokens(parts.tokenizer, parts.text_encoder, ["<|endoftext|>"])
    ids = add_tokens(parts.tokenizer, parts.text_encoder, [TOKEN, f"{TOKEN}1", f"{TOKEN}2"])
    assert ids == list(range(ids[0], ids[0] + 3)) and parts.text_encoder.get_input_embeddings().num_embeddings > ids[-1]
    with pytest.raises(TokenError, match="already has the token"):  # a second run's token in the same tokenizer
        add_tokens(parts.tokenizer, parts.text_encoder, [TOKEN])
    with caplog.at_level(logging.WARNING):
        words = init_word_ids(parts.tokenizer, "red square", 3)
    assert len(words) == 2 and "cyclically" in caplog.text and "--num_vectors_per_token 2" in caplog.text
