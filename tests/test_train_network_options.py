"""train_network.py options a user combines: epoch saves and keep-last pruning, formats and precision,
LoCon, continuing from weights, SD2 v-prediction from a single file, TensorBoard logs, config files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("lora_opts_data"), count=2)


def test_epoch_saves_keep_last_and_states(tiny_models, data, tmp_path):
    """4 epochs of 2 steps, a save every epoch keeping the last 2, states too; pt format in fp16."""
    out = tmp_path / "out"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, out, "--max_train_epochs", "4", "--save_every_n_epochs", "1",
                   "--save_last_n_epochs", "2", "--save_state", "--save_model_as", "pt", "--save_precision", "fp16"),
    )
    assert_ok(result)
    names = sorted(p.name for p in out.iterdir())
    # epoch 1 pruned when epoch 3 was saved; epoch 4 is the final file ("tiny.pt"), not an epoch save
    assert names == sorted(["tiny-000002.pt", "tiny-000002-state", "tiny-000003.pt", "tiny-000003-state", "tiny-state", "tiny.pt"])
    weights = torch.load(out / "tiny.pt", weights_only=True)
    assert all(t.dtype == torch.float16 for t in weights.values())
    assert "training: 4 epoch(s) x 2 step(s) = 8 steps" in result.stdout


def test_locon_continue_from_weights_and_dim_from_weights(tiny_models, data, tmp_path):
    first = tmp_path / "first"
    assert_ok(run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, first, "--max_train_steps", "2", "--network_args", "conv_dim=2", "conv_alpha=1"),
    ))
    locon = load_file(first / "tiny.safetensors")
    conv_keys = [k for k in locon if "_resnets_0_conv1.lora_down" in k]
    assert conv_keys and locon[conv_keys[0]].shape[0] == 2  # 3x3 conv sites at conv_dim
    with safe_open(str(first / "tiny.safetensors"), "pt") as f:
        assert '"conv_dim": "2"' in f.metadata()["ss_network_args"]

    second = tmp_path / "second"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, second, "--max_train_steps", "2", "--network_weights",
                   str(first / "tiny.safetensors"), "--dim_from_weights"),
    )
    assert_ok(result)
    continued = load_file(second / "tiny.safetensors")
    assert continued.keys() == locon.keys()
    assert continued[conv_keys[0]].shape == locon[conv_keys[0]].shape


def test_sd2_v_prediction_from_a_single_file_with_tensorboard(tiny_models, data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd2_file"], data, out, "--max_train_steps", "3", "--v2", "--v_parameterization",
                   "--logging_dir", str(logs), "--log_prefix", "run_", "--min_snr_gamma", "5", "--noise_offset", "0.05"),
    )
    assert_ok(result)
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "0.05"
    runs = list(logs.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run_")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(p.parent for p in runs[0].rglob("events.out.tfevents*"))))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/current", "loss/average"} <= set(tags) and any(t.startswith("lr/") for t in tags)
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2, 3]


def test_config_file_options_and_command_line_wins(tiny_models, data, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        "[model]\n"
        f'pretrained_model_name_or_path = "{tiny_models["sd1"]}"\n'
        "[training]\n"
        "max_train_steps = 5\n"
        "network_dim = 2\n"
        'optimizer_type = "Lion"\n'
        'lr_scheduler = "linear"\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = run_script(
        "train_network.py", "--config_file", str(config), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cfg", "--max_train_steps", "2", "--max_data_loader_n_workers", "0",
    )
    assert_ok(result)
    with safe_open(str(out / "cfg.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "2"  # command line beat the file's 5
    assert meta["ss_network_dim"] == "2" and meta["ss_lr_scheduler"] == "linear"
    assert "Lion" in meta["ss_optimizer"]


def test_base_weights_are_merged_before_training(tiny_models, data, tmp_path):
    """A LoRA merged with --base_weights changes the base: training on top starts from another loss."""
    first = tmp_path / "first"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, first, "--max_train_steps", "3", "--learning_rate", "5e-2")))
    plain = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "plain", "--max_train_steps", "1"))
    merged = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, tmp_path / "merged", "--max_train_steps", "1", "--base_weights",
                   str(first / "tiny.safetensors"), "--base_weights_multiplier", "1.0"),
    )
    assert_ok(plain)
    assert_ok(merged)
    assert "merged --base_weights" in merged.stdout

    def first_loss(result):
        import re

        return re.search(r"loss=([0-9.]+)", result.stderr).group(1)

    assert first_loss(plain) != first_loss(merged)


def test_disk_latent_cache_is_written_then_reused(tiny_models, tmp_path):
    data = dreambooth_folders(tmp_path / "data", count=2)
    args = ["--max_train_steps", "2", "--cache_latents_to_disk", "--vae_batch_size", "2", "--flip_aug"]
    first = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "a", *args))
    assert_ok(first)
    caches = sorted((data / "1_sks square").glob("*_0064x0064_sd.npz"))
    assert len(caches) == 2
    assert "latents: 2 image(s) encoded, 0 reused from disk" in first.stdout
    second = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "b", *args))
    assert_ok(second)
    assert "latents: 0 image(s) encoded, 2 reused from disk" in second.stdout
    a, b = load_file(tmp_path / "a" / "tiny.safetensors"), load_file(tmp_path / "b" / "tiny.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the reused cache holds exactly what was encoded
