"""train_textual_inversion_XTI.py on the tiny SD1 model: each cross-attention layer really attends to its own
encoding, only the vectors train, the 16-key file round-trips through --weights, resume is exact, samples use
the per-layer conditioning, and plain/XTI files are told apart."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_textual_inversion
import train_textual_inversion_XTI
from library.models.embeddings import XTI_LAYERS, read_embedding
from library.models.loading import load_base_model
from library.recipes import textual_inversion as ti
from library.recipes import xti
from library.training.entry import run_recipe
from tests.training_helpers import write_image_folder

TOKEN = "xyzsq"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("xti")
    write_image_folder(root / "train" / f"2_{TOKEN} square", count=2)
    return root / "train"


def xti_args(model, data, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--token_string", TOKEN, "--init_word", "square", "--learning_rate", "5e-2",
        "--num_vectors_per_token", "2", "--seed", "5", "--max_data_loader_n_workers", "0", *extra,
    ]  # fmt: skip


def test_layer_names_follow_the_ldm_layout():
    assert xti.layer_name("down_blocks.0.attentions.1.transformer_blocks.0.attn2") == "IN02"
    assert xti.layer_name("down_blocks.2.attentions.0.transformer_blocks.0.attn2") == "IN07"
    assert xti.layer_name("mid_block.attentions.0.transformer_blocks.0.attn2") == "MID"
    assert xti.layer_name("up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "OUT03"
    assert xti.layer_name("up_blocks.3.attentions.2.transformer_blocks.0.attn2") == "OUT11"


def test_each_layer_attends_to_its_own_vectors(tiny_models):
    parts = load_base_model(str(tiny_models["sd1"]))
    ids = ti.add_tokens(parts.tokenizer, parts.text_encoder, [TOKEN])
    table = parts.text_encoder.get_input_embeddings()
    vectors = xti.LayerVectors(table, ids, xti.initial_layer_vectors(torch.randn(1, table.embedding_dim), 1,
                                                                     table.embedding_dim))
    xti.install_lookup(parts.text_encoder, vectors)
    contexts = xti.LayerContexts(parts.unet)
    predict = xti.per_layer_predict(vectors, contexts)

    def encode(captions):
        tokens = parts.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return parts.text_encoder(tokens)[0]

    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        before = predict(parts.unet, encode, latents, t, [f"a {TOKEN} square"])
        present = next(iter(contexts.layers))
        absent = next(layer for layer in XTI_LAYERS if layer not in contexts.layers)  # the tiny U-Net has 10 of 16
        vectors.vectors[XTI_LAYERS.index(absent)] += 1.0
        assert torch.equal(predict(parts.unet, encode, latents, t, [f"a {TOKEN} square"]), before)
        vectors.vectors[XTI_LAYERS.index(present)] += 1.0
        assert not torch.allclose(predict(parts.unet, encode, latents, t, [f"a {TOKEN} square"]), before)
        assert torch.equal(predict(parts.unet, encode, latents, t, ["a red circle"]),  # no token: no change
                           parts.unet(latents, t, encode(["a red circle"])).sample)


class KeepsParts(train_textual_inversion_XTI.XTIRecipe):
    def attach(self, ctx):
        self.parts = ctx.parts
        return super().attach(ctx)


def test_only_the_vectors_train_and_the_file_continues_and_resumes_exactly(tiny_models, data, tmp_path):
    recipe = KeepsParts()
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a {TOKEN} square --w 64 --h 64 --s 3 --d 2\n", encoding="utf-8")
    assert run_recipe(recipe, xti_args(tiny_models["sd1"], data, out, "--max_train_steps", "4", "--sample_prompts",
                                       str(prompts), "--sample_every_n_steps", "4")) == 0
    assert len(list((out / "sample").glob("*.png"))) == 1  # generated with the per-layer conditioning
    base = load_base_model(str(tiny_models["sd1"]))
    for key, value in base.unet.state_dict().items():
        assert torch.equal(recipe.parts.unet.state_dict()[key], value), key
    trained_te = recipe.parts.text_encoder.state_dict()
    for key, value in base.text_encoder.state_dict().items():
        if key.endswith("token_embedding.weight"):  # the lookup stand-in reads the table it replaced
            assert torch.equal(recipe.layer_vectors.table.weight[: value.shape[0]], value)
        else:
            assert torch.equal(trained_te[key], value), key
    saved = load_file(str(out / f"{TOKEN}.safetensors"))
    assert list(saved) == list(XTI_LAYERS) and all(v.shape == (2, 32) for v in saved.values())
    moved = [layer for layer in XTI_LAYERS if not torch.equal(saved[layer], saved["IN02"])]
    assert set(moved) == set(xti.cross_attention_layers(base.unet)) - {"IN02"}  # layers present in the U-Net moved

    # --weights: the 16-key file continues exactly (lr 0 keeps it)
    again = KeepsParts()
    assert run_recipe(again, xti_args(tiny_models["sd1"], data, tmp_path / "again", "--max_train_steps", "1",
                                      "--weights", str(out / f"{TOKEN}.safetensors"), "--learning_rate", "0")) == 0
    assert torch.equal(again.layer_vectors.vectors.detach(), torch.stack([saved[layer] for layer in XTI_LAYERS]))

    # resume: 2 + 2 steps equal 4 in one go
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_recipe(train_textual_inversion_XTI.XTIRecipe(), xti_args(
        tiny_models["sd1"], data, first, "--max_train_steps", "2", "--save_state")) == 0  # fmt: skip
    assert run_recipe(train_textual_inversion_XTI.XTIRecipe(), xti_args(
        tiny_models["sd1"], data, second, "--max_train_steps", "4", "--resume", str(first / f"{TOKEN}-state"),
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")) == 0  # fmt: skip
    resumed = load_file(str(second / f"{TOKEN}.safetensors"))
    assert max(float((resumed[k] - saved[k]).abs().max()) for k in XTI_LAYERS) < 1e-6


def test_plain_and_xti_files_are_told_apart(tiny_models, data, tmp_path, capsys):
    xti_file = tmp_path / "xti.safetensors"
    save_file({layer: torch.randn(2, 32) for layer in XTI_LAYERS}, str(xti_file))
    plain = tmp_path / "plain.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(plain))
    with pytest.raises(Exception, match="an XTI embedding"):
        read_embedding(xti_file)
    code = run_recipe(train_textual_inversion.TextualInversionRecipe(), xti_args(
        tiny_models["sd1"], data, tmp_path / "a", "--max_train_steps", "1", "--weights", str(xti_file)))  # fmt: skip
    assert code == 1 and "train_textual_inversion_XTI.py" in capsys.readouterr().err
    code = run_recipe(train_textual_inversion_XTI.XTIRecipe(), xti_args(
        tiny_models["sd1"], data, tmp_path / "b", "--max_train_steps", "1", "--weights", str(plain)))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "not an XTI embedding" in err and "train_textual_inversion.py" in err and "Traceback" not in err


@pytest.mark.parametrize("script", ["train_textual_inversion.py", "train_textual_inversion_XTI.py"])
def test_ctrl_c_saves_a_file_and_a_state_that_resumes(tiny_models, data, tmp_path, script):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.training_helpers import ROOT, assert_ok, run_script

    out, stderr_path = tmp_path / "out", tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / script), *xti_args(tiny_models["sd1"], data, out, "--max_train_steps", "500")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        deadline = time.time() + 120
        while "steps:" not in stderr_path.read_text() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stderr_path.read_text()[-3000:]
    (state,) = out.glob(f"{TOKEN}-step*-state")
    assert list(out.glob(f"{TOKEN}-step*.*")) and f"--resume {state}" in stdout
    step = int(state.name.split("-step")[1][:8])
    resumed = run_script(script, *xti_args(tiny_models["sd1"], data, out, "--max_train_steps", str(step + 1),
                                           "--resume", str(state)))
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and any(out.glob(f"{TOKEN}.*"))
