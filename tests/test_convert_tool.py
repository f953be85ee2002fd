"""tools/convert_diffusers20_original_sd.py with the arguments sd-scripts users type."""

from __future__ import annotations

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
