"""fine_tune.py run as a user runs it, on the tiny SD1 model: metadata keys as stems or full paths,
JSON and JSONL, caption + tags, the text encoder frozen or trained, latents reused from disk, exact
resume, and the upstream crash without --cache_latents not reproduced."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from library.models.checkpoint_io import read_checkpoint
from tests.training_helpers import assert_ok, run_script, write_image_folder
from tests.training_helpers import max_state_diff as max_diff

TE = "cond_stage_model."


def ft_args(model, images, meta, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--in_json", str(meta),
        "--resolution", "64", "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-4",
        "--seed", "5", "--max_data_loader_n_workers", "0", *extra,
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("ft") / "images", count=4)


def write_metadata(images, path, jsonl: bool = False):
    """Keys of both kinds: bare stems (merge_captions_to_metadata's default) and full paths (--full_path)."""
    entries = {}
    for i, image in enumerate(sorted(images.glob("*.png"))):
        key = str(image) if i % 2 else image.stem
        entries[key] = {"caption": f"a red square number {i}", "tags": "square, red"}
    if jsonl:
        lines = [json.dumps({"image_path": k, **v}) for k, v in entries.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def test_stem_and_full_path_keys_train_the_unet_and_text_encoder_without_cached_latents(tiny_models, images, tmp_path):
    meta = write_metadata(images, tmp_path / "meta.json")
    out = tmp_path / "out"
    result = run_script("fine_tune.py", *ft_args(tiny_models["sd1"], images, meta, out, "--max_train_steps", "3",
                                                 "--train_text_encoder", "--learning_rate_te", "1e-5",
                                                 "--dataset_repeats", "2"))
    assert_ok(result)
    assert "dataset 0 (fine_tuning): 8 training samples/epoch" in result.stdout  # 4 images x 2 repeats
    tuned = StableDiffusionPipeline.from_pretrained(str(out / "ft"), safety_checker=None)  # the base's format
    base = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd1"]), safety_checker=None)
    for name in ("unet", "text_encoder"):
        assert max_diff(getattr(tuned, name).state_dict(), getattr(base, name).state_dict()) > 0, name


def test_jsonl_latents_reused_from_disk_and_exact_resume(tiny_models, images, tmp_path):
    meta = write_metadata(images, tmp_path / "meta.jsonl", jsonl=True)
    common = ["--max_train_steps", "4", "--cache_latents_to_disk", "--save_model_as", "ckpt"]
    straight = tmp_path / "straight"
    first = run_script("fine_tune.py", *ft_args(tiny_models["sd1_file"], images, meta, straight, *common,
                                                "--save_every_n_steps", "2", "--save_state"))
    assert_ok(first)
    assert "latents: 4 image(s) encoded, 0 reused" in first.stdout
    resumed = tmp_path / "resumed"
    second = run_script("fine_tune.py", *ft_args(tiny_models["sd1_file"], images, meta, resumed, *common,
                                                 "--resume", str(straight / "ft-step00000002-state")))
    assert_ok(second)
    assert "latents: 0 image(s) encoded, 4 reused" in second.stdout  # the .npz files written by the first run
    a, b = read_checkpoint(straight / "ft.ckpt")[0], read_checkpoint(resumed / "ft.ckpt")[0]
    assert max_diff(a, b) == 0
    assert max_diff(a, read_checkpoint(tiny_models["sd1_file"])[0], TE) == 0  # text encoder frozen by default


def test_learning_rate_te_without_train_text_encoder_is_refused(tiny_models, images, tmp_path):
    meta = write_metadata(images, tmp_path / "meta.json")
    result = run_script("fine_tune.py", *ft_args(tiny_models["sd1"], images, meta, tmp_path / "out",
                                                 "--learning_rate_te", "1e-5"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--learning_rate_te needs --train_text_encoder" in result.stderr


def test_sd2_v_prediction_saves_a_diffusers_folder_that_loads(tiny_models, images, tmp_path):
    meta = write_metadata(images, tmp_path / "meta.json")
    out = tmp_path / "out"
    result = run_script("fine_tune.py", *ft_args(tiny_models["sd2"], images, meta, out, "--v2", "--v_parameterization",
                                                 "--max_train_steps", "2", "--use_safetensors", "--save_precision", "fp16"))
    assert_ok(result)
    assert (out / "ft" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # the base's format, safetensors
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "ft"), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    weights = load_file(out / "ft" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}  # --save_precision fp16
