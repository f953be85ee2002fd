"""sd-scripts options and protocols a user brings along: a third-party network module's optional calls,
--initial_step/--initial_epoch/--skip_until_initial_step, the console log options,
--cpu_offload_checkpointing, and --dataset_class (refused with the reason).

In-process runs of the real train_network.py entry point on the tiny SD1 model (2 images: 2 steps per epoch).
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.training.entry import run_recipe
from tests.training_helpers import dreambooth_folders, lora_args, run_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("upstream_options_data"), count=2)


def train(model, data, out, *extra: str, recipe=None) -> int:
    return run_recipe(recipe or train_network.NetworkRecipe(), lora_args(model, data, out, *extra))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def steps_of(path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_steps"]


def test_a_third_party_network_module_gets_its_optional_calls(tiny_models, data, tmp_path):
    """The calls sd-scripts makes, when it makes them: once, per epoch, per batch, per step."""
    recipe = train_network.NetworkRecipe()
    # 3 epochs of 2 steps, accumulation 2: 6 steps of 2 batches each
    code = train(tiny_models["sd1"], data, tmp_path / "out", "--network_module", "tests.hooked_network",
                 "--max_train_epochs", "3", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
                 "--scale_weight_norms", "0.01", "--gradient_checkpointing", recipe=recipe)
    assert code == 0
    calls = recipe.network.calls
    assert calls["prepare_network"] == calls["prepare_grad_etc"] == calls["prepare_optimizer_params"] == 1
    assert calls["enable_gradient_checkpointing"] == 1
    assert calls["on_epoch_start"] == 3
    assert calls["on_step_start"] == 6 and calls["update_norms"] == 6 and calls["apply_max_norm_regularization"] == 6
    saved = load_file(str(tmp_path / "out" / "tiny.safetensors"))
    assert saved and all(float(t.norm()) <= 0.01 + 1e-6 for t in saved.values())  # max-norm kept every offset small
    assert any(float(t.abs().max()) > 0 for t in saved.values())


def test_scale_weight_norms_refused_for_a_network_without_it(tiny_models, data, tmp_path, capsys, monkeypatch):
    from tests import hooked_network

    monkeypatch.delattr(hooked_network.OffsetNetwork, "apply_max_norm_regularization")
    code = train(tiny_models["sd1"], data, tmp_path / "out", "--network_module", "tests.hooked_network",
                 "--max_train_steps", "1", "--scale_weight_norms", "1.0")
    assert code == 1
    assert "--scale_weight_norms" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


def test_initial_step_with_and_without_skipping_the_data(tiny_models, data, tmp_path, capsys):
    common = ["--max_train_steps", "6"]
    assert train(tiny_models["sd1"], data, tmp_path / "straight", *common, "--save_every_n_steps", "3", "--save_state") == 0
    straight = load_file(str(tmp_path / "straight" / "tiny.safetensors"))
    state = str(tmp_path / "straight" / "tiny-step00000003-state")

    # from the state at step 3, counting from step 3 and skipping the batches before it: the same run
    assert train(tiny_models["sd1"], data, tmp_path / "skip", *common, "--resume", state, "--initial_step", "3",
                 "--skip_until_initial_step") == 0
    assert max_diff(straight, load_file(str(tmp_path / "skip" / "tiny.safetensors"))) <= 1e-6
    # without skipping, step 3 starts at the beginning of epoch 2's data: other batches, other weights
    capsys.readouterr()
    assert train(tiny_models["sd1"], data, tmp_path / "noskip", *common, "--resume", state, "--initial_step", "3") == 0
    assert "counting from step 3 (instead of the state's step 3), epoch 2, from the start of that epoch's data" in (
        capsys.readouterr().out)
    assert max_diff(straight, load_file(str(tmp_path / "noskip" / "tiny.safetensors"))) > 1e-6

    # a fresh run counting from epoch 2: 4 steps trained, saves named and recorded by the counted step
    out = tmp_path / "epoch2"
    assert train(tiny_models["sd1"], data, out, *common, "--initial_epoch", "2", "--save_every_n_steps", "4") == 0
    assert (out / "tiny-step00000004.safetensors").is_file() and not (out / "tiny-step00000002.safetensors").exists()
    assert steps_of(out / "tiny.safetensors") == "6"


def test_initial_step_past_the_end_is_an_error(tiny_models, data, tmp_path, capsys):
    assert train(tiny_models["sd1"], data, tmp_path / "out", "--max_train_steps", "4", "--initial_step", "4") == 1
    err = capsys.readouterr().err
    assert "error: --initial_step 4: the run has 4 steps" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


def test_cpu_offload_checkpointing_trains_the_same_weights(tiny_models, data, tmp_path):
    common = ["--max_train_steps", "2", "--gradient_checkpointing"]
    assert train(tiny_models["sd1"], data, tmp_path / "a", *common) == 0
    assert train(tiny_models["sd1"], data, tmp_path / "b", *common, "--cpu_offload_checkpointing") == 0
    a, b = (load_file(str(tmp_path / name / "tiny.safetensors")) for name in "ab")
    assert max_diff(a, b) <= 1e-6


def test_dataset_class_is_refused_with_the_reason(tiny_models, data, tmp_path, capsys):
    assert train(tiny_models["sd1"], data, tmp_path / "out", "--dataset_class", "mypkg.MyDataset") == 1
    err = capsys.readouterr().err
    assert "error: --dataset_class mypkg.MyDataset:" in err and "--dataset_config" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_console_log_file_and_level(tiny_models, data, tmp_path):
    log = tmp_path / "run.log"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "out", "--max_train_steps", "1",
                        "--console_log_file", str(log), "--console_log_level", "debug"))
    assert result.returncode == 0, result.stderr[-3000:]
    text = log.read_text(encoding="utf-8")
    assert " INFO saved " in text and " DEBUG " in text  # the log went to the file, at the level asked for
    assert "INFO saved" not in result.stderr
    assert "finished at step 1" in result.stdout  # results still print
    before = len(text)
    assert run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "out2", "--max_train_steps", "1",
                      "--console_log_file", str(log))).returncode == 0
    assert log.read_text(encoding="utf-8")[:before] == text  # appended, the first run's log is kept


def test_recorded_options_include_the_new_ones(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    assert train(tiny_models["sd1"], data, out, "--max_train_steps", "2", "--save_state", "--initial_step", "1") == 0
    options = json.loads((out / "tiny-state" / "train_state.json").read_text())["options"]
    assert options["initial_step"] == 1
