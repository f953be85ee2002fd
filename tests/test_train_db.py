"""train_db.py run as a user runs it, on the tiny SD1/SD2 models: the four save formats load in
diffusers with the same weights, exact resume across a text-encoder stop, regularization images on
an SD2 v-prediction model, SIGTERM, and option errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.checkpoint_io import read_checkpoint
from tests.training_helpers import ROOT, assert_ok, dreambooth_folders, run_script, write_image_folder
from tests.training_helpers import max_state_diff as max_diff

UNET, TE = "model.diffusion_model.", "cond_stage_model."


def db_args(model, data, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--output_name", "db", "--learning_rate", "1e-4", "--seed", "3",
        "--max_data_loader_n_workers", "0", *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("db_data"), count=4)


def test_single_file_and_folder_load_in_diffusers_with_the_same_weights(tiny_models, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    runs = {}
    for fmt in ("safetensors", "diffusers_safetensors"):
        out = tmp_path / fmt
        result = run_script("train_db.py", *db_args(tiny_models["sd1"], data, out, "--max_train_steps", "4",
                                                     "--save_every_n_steps", "2", "--save_model_as", fmt))
        assert_ok(result)
        runs[fmt] = out
    assert sorted(p.name for p in runs["safetensors"].iterdir()) == ["db-step00000002.safetensors", "db.safetensors"]
    assert sorted(p.name for p in runs["diffusers_safetensors"].iterdir()) == ["db", "db-step00000002"]
    single = StableDiffusionPipeline.from_single_file(str(runs["safetensors"] / "db.safetensors"),
                                                      config=str(tiny_models["sd1"]), safety_checker=None)
    folder = StableDiffusionPipeline.from_pretrained(str(runs["diffusers_safetensors"] / "db"), safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd1"]), safety_checker=None)
    for name in ("unet", "text_encoder", "vae"):
        a, b, c = (getattr(p, name).state_dict() for p in (single, folder, base))
        assert max_diff(a, b) == 0, name  # the same training, saved two ways, loads to the same weights
        assert (max_diff(a, c) > 0) == (name != "vae"), name  # U-Net and text encoder trained, VAE kept
    scheduler = json.loads((runs["diffusers_safetensors"] / "db" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["steps_offset"] == 1
    with safe_open(str(runs["safetensors"] / "db.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "db"


def test_resume_is_exact_across_a_text_encoder_stop(tiny_models, data, tmp_path):
    """6 steps straight == 3 + resume + 3, as .ckpt; the text encoder stops after step 1 in both."""
    common = ["--max_train_steps", "6", "--stop_text_encoder_training", "1", "--save_model_as", "ckpt",
              "--learning_rate_te", "5e-5", "--lr_scheduler", "cosine"]
    straight = tmp_path / "straight"
    result = run_script("train_db.py", *db_args(tiny_models["sd1_file"], data, straight, *common,
                                                "--save_every_n_steps", "3", "--save_state"))
    assert_ok(result)
    assert "text encoder: training stopped after step 1" in result.stdout
    resumed = tmp_path / "resumed"
    result = run_script("train_db.py", *db_args(tiny_models["sd1_file"], data, resumed, *common,
                                                "--resume", str(straight / "db-step00000003-state")))
    assert_ok(result)
    assert "resumed from" in result.stdout and "text encoder: training stopped after step 1" in result.stdout
    base, _, _ = read_checkpoint(tiny_models["sd1_file"])
    mid, _, _ = read_checkpoint(straight / "db-step00000003.ckpt")
    a, epoch, step = read_checkpoint(straight / "db.ckpt")
    b, _, _ = read_checkpoint(resumed / "db.ckpt")
    assert (epoch, step) == (1, 6)  # completed epochs and steps (4 images: 1.5 epochs)
    assert max_diff(a, b) == 0  # U-Net and text encoder: resume is exact
    assert max_diff(base, mid, TE) > 0 and max_diff(mid, a, TE) == 0  # trained in step 1 only
    assert max_diff(mid, a, UNET) > 0


def test_sd2_v_prediction_with_regularization_images_and_a_frozen_text_encoder(tiny_models, tmp_path):
    root = tmp_path / "data"
    dreambooth_folders(root, count=2)
    write_image_folder(root / "reg" / "1_square", count=2)
    out = tmp_path / "out"
    result = run_script("train_db.py", *db_args(
        tiny_models["sd2_file"], root / "train", out, "--v2", "--v_parameterization", "--reg_data_dir", str(root / "reg"),
        "--prior_loss_weight", "0.5", "--stop_text_encoder_training", "-1", "--max_train_steps", "3",
        "--min_snr_gamma", "5", "--clip_skip", "1"))
    assert_ok(result)
    assert "2 reg samples" in result.stdout and "text encoder frozen" in result.stdout
    saved = load_file(out / "db.safetensors")  # the base's own format
    base = load_file(tiny_models["sd2_file"])
    assert saved.keys() == base.keys()  # every key of the source file is kept (SD2's unused last block too)
    assert max_diff(base, saved, TE) == 0 and max_diff(base, saved, UNET) > 0
    with safe_open(str(out / "db.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"


def test_sigterm_leaves_a_state_that_resumes(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    stderr_path = tmp_path / "stderr.txt"
    args = db_args(tiny_models["sd1"], data, out, "--max_train_steps", "400")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "train_db.py"), *args], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.time() + 120
        while "steps:" not in stderr_path.read_text() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stderr_path.read_text()[-3000:]
    (state,) = sorted(out.glob("db-step*-state"))
    step = json.loads((state / "train_state.json").read_text())["current_step"]
    assert (out / f"db-step{step:08d}").is_dir()  # the model as it was, in the base's format (diffusers)
    resumed = run_script("train_db.py", *db_args(tiny_models["sd1"], data, out, "--max_train_steps", str(step + 1),
                                                 "--resume", str(state)))
    assert_ok(resumed)
    assert f"finished at step {step + 1}" in resumed.stdout


def test_option_problems_are_listed_before_loading(tmp_path, data):
    result = run_script("train_db.py", *db_args(tmp_path / "missing", data, tmp_path / "out",
                                                "--stop_text_encoder_training", "-2", "--cache_text_encoder_outputs"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--stop_text_encoder_training -2" in result.stderr
    assert "--cache_text_encoder_outputs" in result.stderr and "--stop_text_encoder_training -1" in result.stderr
