"""--deepspeed: the configuration built from the options, option conflicts, and ZeRO-2 and ZeRO-3 on two
CPU processes (training, --save_state, --resume) with train_network.py on the tiny SD1 model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.recipe_infos import info as recipe_info
from tests.recipe_infos import parser_for
from tests.training_helpers import ROOT, assert_ok, dreambooth_folders, lora_args, run_script

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def options(**given) -> argparse.Namespace:
    """The parsed defaults of train_network.py with `given` replaced."""
    args = parser_for("train_network").parse_args(["--output_dir", "x"])
    for key, value in given.items():
        setattr(args, key, value)
    return args


def test_plugin_holds_the_options():
    from library.training.deepspeed_setup import deepspeed_config

    config = deepspeed_config(options(deepspeed=True, train_batch_size=3, max_grad_norm=0.5, mixed_precision="bf16"), 4)
    zero = config["zero_optimization"]
    assert zero["stage"] == 2  # sd-scripts' default
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["train_batch_size"] == 12
    assert config["gradient_accumulation_steps"] == 1  # the trainer accumulates (see deepspeed_setup.py)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False

    config = deepspeed_config(options(
        deepspeed=True, zero_stage=2, mixed_precision="fp16", offload_optimizer_device="cpu",
        fp16_master_weights_and_gradients=True, max_grad_norm=0.0,
    ), 2)  # fmt: skip
    assert config["fp16"]["enabled"] is True and config["fp16"]["initial_scale_power"] == 0
    assert config["fp16"]["fp16_master_weights_and_grads"] is True
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False  # --optimizer_type's optimizer, not only DeepSpeed's
    assert "gradient_clipping" not in config

    config = deepspeed_config(options(
        deepspeed=True, zero_stage=3, offload_param_device="nvme", offload_param_nvme_path="/nvme",
        offload_optimizer_device="nvme", offload_optimizer_nvme_path="/nvme2", zero3_save_16bit_model=True,
    ), 1)  # fmt: skip
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/nvme"}
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme2"}


@pytest.mark.parametrize("given, expected", [
    ({"zero_stage": 2}, "--zero_stage needs --deepspeed; add --deepspeed or drop it"),
    ({"offload_optimizer_device": "cpu", "zero3_init_flag": True}, "--offload_optimizer_device, --zero3_init_flag need --deepspeed"),
    ({"deepspeed": True, "offload_optimizer_nvme_path": "/n"}, "--offload_optimizer_nvme_path needs --offload_optimizer_device nvme"),
    ({"deepspeed": True, "offload_param_device": "nvme", "zero_stage": 3}, "--offload_param_device nvme needs --offload_param_nvme_path"),
    ({"deepspeed": True, "offload_param_device": "cpu"}, "--offload_param_device needs --zero_stage 3 (now 2)"),
    ({"deepspeed": True, "offload_optimizer_device": "cpu", "zero_stage": 1}, "needs --zero_stage 2 or 3 (now 1)"),
    ({"deepspeed": True, "zero3_save_16bit_model": True}, "--zero3_save_16bit_model needs --zero_stage 3"),
    ({"deepspeed": True, "zero_stage": 3, "sample_prompts": "p.txt"}, "--sample_prompts with --zero_stage 3"),
    ({"deepspeed": True, "zero_stage": 3, "scale_weight_norms": 1.0}, "--scale_weight_norms with --zero_stage 3"),
    ({"deepspeed": True, "fp16_master_weights_and_gradients": True}, "needs --mixed_precision fp16, --zero_stage 2"),
    ({"deepspeed": True, "fp8_base": True, "mixed_precision": "bf16"}, "do not work with --deepspeed"),
])  # fmt: skip
def test_option_conflicts(given, expected):
    from library.training.scaling_args import scaling_option_problems

    problems = scaling_option_problems(options(**given), recipe_info("train_network"))
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize("script", ["train_db", "fine_tune", "train_textual_inversion", "train_textual_inversion_XTI"])
def test_zero_stage_3_is_refused_where_the_recipe_reads_split_weights(script):
    from library.training.scaling_args import scaling_option_problems

    args = parser_for(script).parse_args(["--output_dir", "x"])
    args.deepspeed, args.zero_stage = True, 3
    problems = scaling_option_problems(args, recipe_info(script))
    assert any(p.startswith(f"--zero_stage 3: {script}.py does not support it yet") for p in problems), problems


def test_zero_stage_3_lora_options_have_no_problems():
    from library.training.scaling_args import scaling_option_problems

    args = options(deepspeed=True, zero_stage=3, zero3_init_flag=True, zero3_save_16bit_model=True,
                   offload_param_device="cpu", offload_optimizer_device="cpu")  # fmt: skip
    expected = [] if importlib.util.find_spec("deepspeed") else ["--deepspeed needs the deepspeed package: pip install deepspeed==0.19.8"]
    assert scaling_option_problems(args, recipe_info("train_network")) == expected


def test_valid_deepspeed_options_have_no_problems():
    from library.training.scaling_args import scaling_option_problems

    args = options(deepspeed=True, zero_stage=2, offload_optimizer_device="cpu", mixed_precision="fp16",
                   fp16_master_weights_and_gradients=True)  # fmt: skip
    assert scaling_option_problems(args, recipe_info("train_network")) == (
        [] if importlib.util.find_spec("deepspeed") else ["--deepspeed needs the deepspeed package: pip install deepspeed==0.19.8"]
    )


def test_conflict_stops_before_the_model_loads(tmp_path):
    result = run_script(
        "train_db.py", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--zero_stage", "1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "--zero_stage needs --deepspeed; add --deepspeed or drop it" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("ds_data"), count=4)


def deepspeed_launcher() -> list[str]:
    """Two processes under torch's launcher (via accelerate); no ACCELERATE_USE_CPU: DeepSpeed picks the CPU."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(29300 + random.randrange(200)),
        "--num_cpu_threads_per_process", "1",
    ]  # fmt: skip


@needs_deepspeed
def test_zero2_on_two_cpu_processes_trains_saves_states_and_resumes(tiny_models, data, tmp_path):
    """ZeRO-2, 2 processes x batch 1 x 2 accumulated batches per step, SGD:

    * it runs as DeepSpeed with 2 processes, and every process ends with the same weights;
    * a state saved at step 2 holds DeepSpeed's per-process optimizer shards, and resuming from it
      ends exactly where the straight run ends;
    * the update equals one plain process accumulating the same 4 batches per step (what makes
      sure DeepSpeed neither steps per micro-batch nor scales the loss a second time)."""
    env = {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "0"}
    common = ["--max_train_steps", "4", "--optimizer_type", "SGD", "--learning_rate", "0.05", "--lr_scheduler", "linear"]
    straight = tmp_path / "straight"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, straight, *common, "--gradient_accumulation_steps", "2",
                   "--save_every_n_steps", "2", "--save_state", "--deepspeed"),
        launcher=deepspeed_launcher(), env=env,
    )  # fmt: skip
    assert_ok(result)
    assert "2 process(es)" in result.stdout and "distributed type DEEPSPEED" in result.stdout
    assert "trained weights identical on all 2 processes" in result.stdout
    state = straight / "tiny-step00000002-state"
    shards = sorted(p.name for p in (state / "deepspeed" / "state").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ]  # fmt: skip
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 2

    resumed = tmp_path / "resumed"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, resumed, *common, "--gradient_accumulation_steps", "2",
                   "--resume", str(state), "--deepspeed"),
        launcher=deepspeed_launcher(), env=env,
    )  # fmt: skip
    assert_ok(result)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    straight_weights = load_file(straight / "tiny.safetensors")
    resumed_weights = load_file(resumed / "tiny.safetensors")
    assert max(float((straight_weights[k] - resumed_weights[k]).abs().max()) for k in straight_weights) <= 1e-6

    one = tmp_path / "one"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, one, *common, "--gradient_accumulation_steps", "4")))

    def update(weights):  # lora_up starts at zero, so its weights are the whole update
        return torch.cat([weights[k].flatten().float() for k in sorted(weights) if "lora_up" in k])

    one_weights = load_file(one / "tiny.safetensors")
    assert float(update(straight_weights).abs().max()) > 1e-4  # it trained
    # Same global batches, another summation order: measured 0.006 relative (the DDP test in test_train_network
    # allows 0.2 for the same float noise through a cancelling gradient; different batches give ~1.3).
    assert float((update(one_weights) - update(straight_weights)).norm() / update(one_weights).norm()) <= 0.2


def split_everything(tmp_path) -> str:
    """A folder with a sitecustomize.py that sets DeepSpeed's stage3_param_persistence_threshold to 0 in the runs:
    by default ZeRO-3 keeps tensors under 100k elements whole on every process, which is every tensor of the
    tiny model's LoRA (and of most real LoRAs); with 0 each is split, as the base model's large weights are."""
    folder = tmp_path / "split_everything"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "from library.training import deepspeed_setup\n"
        "_plugin = deepspeed_setup.deepspeed_plugin\n"
        "def deepspeed_plugin(args, world_size):\n"
        "    plugin = _plugin(args, world_size)\n"
        "    plugin.deepspeed_config['zero_optimization']['stage3_param_persistence_threshold'] = 0\n"
        "    return plugin\n"
        "deepspeed_setup.deepspeed_plugin = deepspeed_plugin\n"
    )
    return str(folder)


@needs_deepspeed
def test_zero3_on_two_cpu_processes_trains_saves_whole_files_states_and_resumes(tiny_models, data, tmp_path):
    """ZeRO-3 (every weight split over the 2 processes), 2 processes x batch 1 x 2 accumulated batches, SGD:

    * the LoRA file is whole (every tensor has the shape of a one-process run's file, none is a shard);
    * a state saved at step 2 holds DeepSpeed's per-process shards, and resuming from it ends exactly where
      the straight run ends;
    * the update equals one plain process accumulating the same 4 batches per step."""
    env = {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "0", "PYTHONPATH": f"{split_everything(tmp_path)}{os.pathsep}{ROOT}"}
    common = ["--max_train_steps", "4", "--optimizer_type", "SGD", "--learning_rate", "0.05", "--lr_scheduler", "linear"]
    zero3 = ["--deepspeed", "--zero_stage", "3"]
    straight = tmp_path / "straight"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, straight, *common, "--gradient_accumulation_steps", "2",
                   "--save_every_n_steps", "2", "--save_state", *zero3),
        launcher=deepspeed_launcher(), env=env,
    )  # fmt: skip
    assert_ok(result)
    assert "2 process(es)" in result.stdout and "distributed type DEEPSPEED" in result.stdout
    assert "trained weights identical on all 2 processes" in result.stdout
    state = straight / "tiny-step00000002-state"
    shards = sorted(p.name for p in (state / "deepspeed" / "state").iterdir())
    assert [n for n in shards if "optim_states" in n] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ], shards  # fmt: skip
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 2

    resumed = tmp_path / "resumed"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, resumed, *common, "--gradient_accumulation_steps", "2",
                   "--resume", str(state), *zero3),
        launcher=deepspeed_launcher(), env=env,
    )  # fmt: skip
    assert_ok(result)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    straight_weights = load_file(straight / "tiny.safetensors")
    resumed_weights = load_file(resumed / "tiny.safetensors")
    assert max(float((straight_weights[k] - resumed_weights[k]).abs().max()) for k in straight_weights) <= 1e-6

    # A rescued state lacks deepspeed/: under stage 3 it is refused in one line (it could not resume exactly)
    rescued = tmp_path / "rescued-state"
    shutil.copytree(state, rescued, ignore=shutil.ignore_patterns("deepspeed"))
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, tmp_path / "from_rescued", *common, "--gradient_accumulation_steps", "2",
                   "--resume", str(rescued), *zero3),
        launcher=deepspeed_launcher(), env=env,
    )  # fmt: skip
    assert result.returncode != 0
    assert "under --zero_stage 3 that cannot resume exactly; resume it with --zero_stage 2" in result.stderr, (
        result.stderr[-3000:])

    one = tmp_path / "one"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, one, *common, "--gradient_accumulation_steps", "4")))
    one_weights = load_file(one / "tiny.safetensors")
    assert {k: v.shape for k, v in straight_weights.items()} == {k: v.shape for k, v in one_weights.items()}
    assert all(v.numel() > 0 for v in straight_weights.values())
    step2 = load_file(straight / "tiny-step00000002.safetensors")
    assert {k: v.shape for k, v in step2.items()} == {k: v.shape for k, v in one_weights.items()}

    def update(weights):  # lora_up starts at zero, so its weights are the whole update
        return torch.cat([weights[k].flatten().float() for k in sorted(weights) if "lora_up" in k])

    assert float(update(straight_weights).abs().max()) > 1e-4  # it trained
    assert float((update(one_weights) - update(straight_weights)).norm() / update(one_weights).norm()) <= 0.2
