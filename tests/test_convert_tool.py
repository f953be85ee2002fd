"""tools/convert_diffusers20_original_sd.py with the arguments sd-scripts users type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.models.checkpoint_io import read_checkpoint_counters, read_state_dict
from library.models.loading import load_base_model
from tools.convert_diffusers20_original_sd import main as convert


def test_folder_to_fp16_ckpt_and_back_with_reference_model(tmp_path, tiny_models):
    ckpt = tmp_path / "model.ckpt"
    assert convert([str(tiny_models["sd1"]), str(ckpt), "--fp16", "--epoch", "2", "--global_step", "50"]) == 0
    assert read_checkpoint_counters(ckpt) == (2, 50)
    assert {v.dtype for v in read_state_dict(ckpt).values()} == {torch.float16}

    out = tmp_path / "back"
    assert convert([str(ckpt), str(out), "--v1", "--reference_model", str(tiny_models["sd1"]), "--use_safetensors"]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    original, converted = load_base_model(str(tiny_models["sd1"])), load_base_model(str(out))
    for key, value in original.unet.state_dict().items():
        torch.testing.assert_close(converted.unet.state_dict()[key], value, atol=2e-3, rtol=0)


def test_sd2_file_to_folder_keeps_weights(tmp_path, tiny_models):
    out = tmp_path / "sd2"
    assert convert([str(tiny_models["sd2_file"]), str(out), "--v2", "--v_parameterization"]) == 0
    original = load_base_model(str(tiny_models["sd2"]), v2=True)
    converted = load_base_model(str(out), v2=True)
    for key, value in original.text_encoder.state_dict().items():
        assert torch.equal(converted.text_encoder.state_dict()[key], value), key


def test_single_file_source_needs_v1_or_v2(tmp_path, tiny_models):
    with pytest.raises(SystemExit, match="--v1 or --v2"):
        convert([str(tiny_models["sd1_file"]), str(tmp_path / "x")])


def test_extra_keys_of_a_single_file_source_are_carried_over(tmp_path, tiny_models):
    from library.models.checkpoint_io import write_state_dict

    source = read_state_dict(tiny_models["sd1_file"])
    source["model_ema.decay"] = torch.tensor(0.9999)
    with_ema = tmp_path / "with_ema.safetensors"
    write_state_dict(with_ema, source)
    out = tmp_path / "out.safetensors"
    assert convert([str(with_ema), str(out), "--v1"]) == 0
    assert torch.equal(read_state_dict(out)["model_ema.decay"], torch.tensor(0.9999))


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A tiny SD1 model whose GroupNorms have 16 groups, which tensor shapes cannot tell.

    Inference assumes SD's 32: the U-Net would load silently with the wrong count, and the VAE
    (16 channels at its first level) cannot be built at all. {"folder": diffusers, "file": LDM}.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library.models.saving import save_model
    from tools.build_tiny_models import (
        build_tiny_parts,
        tiny_unet_config,
        tiny_vae_config,
    )

    out = tmp_path_factory.mktemp("odd_model")
    parts = build_tiny_parts(v2=False)
    torch.manual_seed(1)
    parts.unet = UNet2DConditionModel(**{**tiny_unet_config(False), "norm_num_groups": 16}).eval()
    vae_config = {**tiny_vae_config(), "block_out_channels": [16, 16, 32, 32], "norm_num_groups": 16}
    parts.vae = AutoencoderKL(**vae_config).eval()
    return {
        "folder": save_model(out / "odd", parts, "diffusers_safetensors"),
        "file": save_model(out / "odd.safetensors", parts, "safetensors"),
    }


def test_non_inferable_config_is_taken_from_reference_model(tmp_path, odd_model):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    reference = str(odd_model["folder"])
    assert convert([str(odd_model["file"]), str(out), "--v1", "--reference_model", reference, "--use_safetensors"]) == 0
    source = StableDiffusionPipeline.from_pretrained(str(odd_model["folder"]), local_files_only=True)
    converted = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert converted.unet.config.norm_num_groups == 16 and converted.vae.config.norm_num_groups == 16
    for part in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(source, part).state_dict(), getattr(converted, part).state_dict()
        assert expected.keys() == actual.keys(), part
        for key, value in expected.items():
            assert torch.equal(actual[key], value), f"{part}.{key}"


def test_non_inferable_config_without_reference_model_fails_in_one_line(tmp_path, odd_model):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "tools/convert_diffusers20_original_sd.py", str(odd_model["file"]), str(out), "--v1"],
        capture_output=True, text=True, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "could not be inferred from its weights" in errors[0]
    assert "--reference_model <a diffusers folder of the same architecture>" in errors[0]
    assert not out.exists()


def test_reference_model_of_another_architecture_is_explained(tmp_path, capsys, tiny_models, odd_model):
    out = tmp_path / "out"
    assert convert([str(odd_model["file"]), str(out), "--v1", "--reference_model", str(tiny_models["sd1"])]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and "\n" not in message
    assert "VAE weights do not fit" in message and "same architecture" in message
    assert not out.exists()
