"""Loading and saving whole models: diffusers folders, LDM single files, hub ids, --vae, precision, safety."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.models.checkpoint_io import UnsafeCheckpointError, read_state_dict, write_state_dict
from library.models.loading import ModelLoadError, load_base_model, load_vae
from library.models.saving import save_model

PARTS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b, exact=True, atol=0.0):
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            if exact:
                assert torch.equal(sa[key], sb[key]), f"{part}.{key} differs"
            else:
                torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=0, msg=f"{part}.{key}")


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {
        "sd1": load_base_model(str(tiny_models["sd1"])),
        "sd2": load_base_model(str(tiny_models["sd2"]), v2=True, v_parameterization=True),
    }


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_loads_bit_identical_to_folder(tiny_models, loaded, name):
    v2 = name == "sd2"
    from_file = load_base_model(str(tiny_models[f"{name}_file"]), v2=v2, v_parameterization=v2)
    assert from_file.source_format == "single_file"
    assert_same_weights(loaded[name], from_file)
    assert dict(from_file.unet.config)["block_out_channels"] == dict(loaded[name].unet.config)["block_out_channels"]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_folder_to_file_to_folder_round_trip(tmp_path, tiny_models, loaded, name):
    v2 = name == "sd2"
    file_path = save_model(tmp_path / "model.safetensors", loaded[name], "safetensors")
    from_file = load_base_model(str(file_path), v2=v2, v_parameterization=v2)
    folder = save_model(tmp_path / "folder", from_file, "diffusers_safetensors")
    again = load_base_model(str(folder), v2=v2, v_parameterization=v2)
    assert_same_weights(loaded[name], again)
    # the tokenizer travels too
    text = "a photo of a cat"
    assert again.tokenizer(text).input_ids == loaded[name].tokenizer(text).input_ids


def test_safetensors_checkpoint_carries_modelspec(tmp_path, loaded):
    from library.models.checkpoint_io import read_safetensors_metadata

    meta = read_safetensors_metadata(save_model(tmp_path / "m.safetensors", loaded["sd2"], "safetensors"))
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_ckpt_round_trip_keeps_counters(tmp_path, loaded):
    from library.models.checkpoint_io import read_checkpoint_counters

    path = save_model(tmp_path / "model.ckpt", loaded["sd1"], "ckpt", epoch=3, global_step=120)
    assert read_checkpoint_counters(path) == (3, 120)
    assert_same_weights(loaded["sd1"], load_base_model(str(path)))


def test_diffusers_bin_format_loads(tmp_path, loaded):
    folder = save_model(tmp_path / "bin", loaded["sd1"], "diffusers")
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert_same_weights(loaded["sd1"], load_base_model(str(folder)))


def test_fp16_halves_the_file_and_round_trips(tmp_path, loaded):
    full = save_model(tmp_path / "full.safetensors", loaded["sd1"], "safetensors", precision="float")
    half = save_model(tmp_path / "half.safetensors", loaded["sd1"], "safetensors", precision="fp16")
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.49 < ratio < 0.51, ratio
    assert {v.dtype for v in read_state_dict(half).values()} == {torch.float16}
    reloaded = load_base_model(str(half))
    assert reloaded.unet.dtype == torch.float32  # training weights come back in fp32
    assert_same_weights(loaded["sd1"], reloaded, exact=False, atol=2e-3)


def test_diffusers_from_single_file_reads_our_file(tmp_path, tiny_models, loaded):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_models["sd1_file"]), config=str(tiny_models["sd1"]), local_files_only=True
    )
    assert_same_weights(loaded["sd1"], pipe)


def test_saved_scheduler_is_sds_ddim_config_and_loads_without_steps_offset_warning(tmp_path, loaded):
    import json
    import warnings

    from diffusers import StableDiffusionPipeline

    def load_warnings(folder):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        return pipe, [str(w.message) for w in caught if "steps_offset" in str(w.message)]

    folder = save_model(tmp_path / "m", loaded["sd1"], "diffusers_safetensors")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    assert config["_class_name"] == "DDIMScheduler"
    expected = {
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
    }
    assert {k: config.get(k) for k in expected} == expected
    pipe, steps_offset_warnings = load_warnings(folder)
    assert steps_offset_warnings == [] and pipe.scheduler.config.steps_offset == 1
    # the check sees the warning diffusers gives for the config we used to write
    config_file.write_text(json.dumps({**config, "steps_offset": 0}))
    assert load_warnings(folder)[1]

    sd2_folder = save_model(tmp_path / "v", loaded["sd2"], "diffusers_safetensors")
    sd2 = json.loads((sd2_folder / "scheduler" / "scheduler_config.json").read_text())
    assert sd2["prediction_type"] == "v_prediction" and sd2["steps_offset"] == 1


def test_saved_text_encoder_uses_transformers4_layout_and_5_reads_it(tmp_path, loaded):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    folder = save_model(tmp_path / "m", loaded["sd1"], "diffusers_safetensors")
    keys = load_file(str(folder / "text_encoder" / "model.safetensors")).keys()
    assert keys and all(k.startswith("text_model.") for k in keys)
    # A fresh transformers-5 model saves without the level: that is what 4.x would silently re-initialise.
    fresh = CLIPTextModel(loaded["sd1"].text_encoder.config)
    if not any(k.startswith("text_model.") for k in fresh.state_dict()):
        fresh.save_pretrained(str(tmp_path / "native"))
        assert not any(k.startswith("text_model.") for k in load_file(str(tmp_path / "native" / "model.safetensors")))
    reread = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    for key, value in loaded["sd1"].text_encoder.state_dict().items():
        assert torch.equal(reread.state_dict()[key], value), key


def test_v2_flag_mismatch_is_explained(tiny_models):
    with pytest.raises(ModelLoadError, match="add --v2"):
        load_base_model(str(tiny_models["sd2_file"]))
    with pytest.raises(ModelLoadError, match="remove --v2"):
        load_base_model(str(tiny_models["sd1_file"]), v2=True)


def test_missing_path_and_wrong_file_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing file nor a folder"):
        load_base_model(str(tmp_path / "nope.safetensors"))
    lora_like = tmp_path / "lora.safetensors"
    write_state_dict(lora_like, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_base_model(str(lora_like))
    with pytest.raises(ModelLoadError, match="not a diffusers Stable Diffusion folder"):
        load_base_model(str(tmp_path))


def test_hub_id_offline_fails_with_one_clear_sentence(tmp_path):
    # a fresh process, so huggingface_hub reads HF_HUB_OFFLINE and the empty cache at import
    from tests.training_helpers import dreambooth_folders

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "train_network.py", "--pretrained_model_name_or_path", "someone/some-sd-model",
         "--train_data_dir", str(dreambooth_folders(tmp_path, count=1)), "--resolution", "64",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "someone/some-sd-model" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_vae_from_file_full_checkpoint_and_folder(tmp_path, tiny_models, loaded):
    from library.models.ldm_conversion import vae_diffusers_to_ldm

    reference = loaded["sd1"].vae.state_dict()
    vae_only = tmp_path / "vae.safetensors"
    write_state_dict(vae_only, vae_diffusers_to_ldm(dict(reference), dict(loaded["sd1"].vae.config)))
    for spec in (vae_only, tiny_models["sd1_file"], tiny_models["sd1"]):
        vae = load_vae(str(spec))
        for key, value in reference.items():
            assert torch.equal(vae.state_dict()[key], value), (spec, key)
    # --vae replaces the model's own VAE
    other = load_vae(str(tiny_models["sd2"]))
    parts = load_base_model(str(tiny_models["sd1"]), vae=str(tiny_models["sd2"]))
    assert torch.equal(parts.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, str(evil))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(evil)
    message = str(info.value)
    assert "evil.ckpt" in message and "could run code" in message and "system" in message
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_base_model(str(evil))
    assert not marker.exists()


def test_lightning_callback_in_old_ckpt_is_tolerated(tmp_path):
    import types

    # Simulate an old SD .ckpt: weights next to a pickled Lightning ModelCheckpoint object.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    cls = type("ModelCheckpoint", (), {})
    cls.__module__ = module.__name__
    module.ModelCheckpoint = cls
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:-1]:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[module.__name__] = module
    try:
        callback = cls()
        callback.best_model_path = "x"
        path = tmp_path / "old.ckpt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {cls: callback}}, str(path))
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
