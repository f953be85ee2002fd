"""train_network.py run as a user runs it, on the tiny SD1 model: files written, exact resume,
interrupts, divergence, data-loader determinism, caching variants and option errors."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.training_helpers import ROOT, assert_ok, dreambooth_folders, lora_args, run_script


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("lora_data"), count=4)


def test_writes_lora_files_with_keys_and_metadata(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "4", "--save_every_n_steps", "2"))
    assert_ok(result)
    assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000002.safetensors", "tiny.safetensors"]
    weights = load_file(out / "tiny.safetensors")
    assert any(k.startswith("lora_unet_") for k in weights) and any(k.startswith("lora_te_text_model_encoder_") for k in weights)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights)
    # LoRA up weights start at zero: after training they must have moved.
    assert max(float(v.abs().max()) for k, v in weights.items() if k.endswith("lora_up.weight")) > 0
    meta = metadata(out / "tiny.safetensors")
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata(out / "tiny-step00000002.safetensors")["ss_steps"] == "2"
    assert "finished at step 4" in result.stdout


def test_resume_continues_exactly(tiny_models, data, tmp_path):
    """8 steps straight == 3 steps, --resume, 5 more (state saved mid-epoch; cosine LR with warm-up)."""
    common = ["--max_train_steps", "8", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--flip_aug", "--shuffle_caption"]
    straight = tmp_path / "straight"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, straight, *common, "--save_every_n_steps", "3", "--save_state")))
    state = straight / "tiny-step00000003-state"
    info = json.loads((state / "train_state.json").read_text())
    assert (info["current_step"], info["current_epoch"], info["batch_in_epoch"]) == (3, 0, 3)

    resumed = tmp_path / "resumed"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, resumed, *common, "--resume", str(state)))
    assert_ok(result)
    assert "resumed from" in result.stdout and "step 3" in result.stdout
    a, b = load_file(straight / "tiny.safetensors"), load_file(resumed / "tiny.safetensors")
    assert max_diff(a, b) <= 1e-6
    meta_a, meta_b = metadata(straight / "tiny.safetensors"), metadata(resumed / "tiny.safetensors")
    assert meta_b["ss_steps"] == "8" and meta_b["ss_epoch"] == meta_a["ss_epoch"] == "2"


def test_sigint_saves_a_state_that_resumes(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    stderr_path = tmp_path / "stderr.txt"
    args = lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "400")
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train_network.py"), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        )
        deadline = time.time() + 120
        while "steps:" not in stderr_path.read_text() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(random.uniform(0.0, 1.5))
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stderr_path.read_text()[-3000:]
    states = sorted(out.glob("tiny-step*-state"))
    assert len(states) == 1, stdout
    step = json.loads((states[0] / "train_state.json").read_text())["current_step"]
    assert 1 <= step < 400
    assert f"resume with: --resume {states[0]}" in stdout
    resumed = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", str(step + 2), "--resume", str(states[0])))
    assert_ok(resumed)
    assert metadata(out / "tiny.safetensors")["ss_steps"] == str(step + 2)


def test_divergence_stops_and_keeps_the_last_good_file(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "6", "--save_every_n_steps", "1",
                   "--optimizer_type", "SGD", "--max_grad_norm", "0"),
        "--learning_rate", "1e36",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error:" in result.stderr and ("loss became" in result.stderr or "NaN/inf" in result.stderr)
    assert "Traceback" not in result.stderr
    assert not (out / "tiny.safetensors").exists()
    for saved in out.glob("*.safetensors"):  # whatever was written is finite
        assert all(torch.isfinite(t).all() for t in load_file(saved).values())


def test_loader_workers_do_not_change_the_result(tiny_models, data, tmp_path):
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        extra = ["--max_train_steps", "5", "--flip_aug", "--persistent_data_loader_workers"]
        args = lora_args(tiny_models["sd1"], data, out, *extra) + ["--max_data_loader_n_workers", workers]
        assert_ok(run_script("train_network.py", *args))
        runs[workers] = load_file(out / "tiny.safetensors")
    assert max_diff(runs["0"], runs["2"]) == 0.0


def test_cached_text_encoder_outputs_and_checkpointing_match(tiny_models, data, tmp_path):
    """Caching TE outputs is exact; gradient checkpointing recomputes the same numbers."""
    base = ["--max_train_steps", "4", "--cache_latents", "--network_train_unet_only"]
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, plain, *base)))
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, fast, *base, "--cache_text_encoder_outputs", "--gradient_checkpointing"),
    )
    assert_ok(result)
    a, b = load_file(plain / "tiny.safetensors"), load_file(fast / "tiny.safetensors")
    assert not any(k.startswith("lora_te") for k in a)
    assert max_diff(a, b) <= 1e-6


def test_option_problems_are_listed_together(tiny_models, data, tmp_path):
    result = run_script(
        "train_network.py",
        "--pretrained_model_name_or_path", str(tiny_models["sd1"]), "--train_data_dir", str(data),
        "--full_fp16", "--network_train_unet_only", "--network_train_text_encoder_only", "--optimizer_type", "NoSuchOpt",
    )
    assert result.returncode == 1
    for expected in ("--output_dir is required", "--full_fp16 needs --mixed_precision fp16", "NoSuchOpt"):
        assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cache_text_encoder_outputs_refused_when_the_text_encoder_trains(tiny_models, data, tmp_path):
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, tmp_path / "o", "--max_train_steps", "1", "--cache_text_encoder_outputs"))
    assert result.returncode == 1
    assert "--cache_text_encoder_outputs" in result.stderr and "--network_train_unet_only" in result.stderr


def two_process_launcher() -> list[str]:
    import os
    import shutil

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(29600 + random.randrange(300)),
        "--num_cpu_threads_per_process", "1",
    ]


def test_two_process_run_resumes_exactly(tiny_models, data, tmp_path):
    """A 2-process state saved mid-run, resumed with 2 processes, ends where the straight run ends."""
    env = {"ACCELERATE_USE_CPU": "1"}
    common = ["--max_train_steps", "4", "--lr_scheduler", "linear"]
    straight = tmp_path / "straight"
    assert_ok(run_script(
        "train_network.py", *lora_args(tiny_models["sd1"], data, straight, *common, "--save_every_n_steps", "1", "--save_state"),
        launcher=two_process_launcher(), env=env,
    ))
    state = straight / "tiny-step00000001-state"
    assert json.loads((state / "train_state.json").read_text())["num_processes"] == 2
    resumed = tmp_path / "resumed"
    result = run_script(
        "train_network.py", *lora_args(tiny_models["sd1"], data, resumed, *common, "--resume", str(state)),
        launcher=two_process_launcher(), env=env,
    )
    assert_ok(result)
    assert "resumed from" in result.stdout and "2 process(es)" in result.stdout
    assert max_diff(load_file(straight / "tiny.safetensors"), load_file(resumed / "tiny.safetensors")) <= 1e-6


def test_two_processes_match_one_process_with_accumulation(tiny_models, data, tmp_path):
    """2 CPU processes (gloo DDP), batch 1 each == 1 process with 2 accumulated batches per step.

    The two runs do the same arithmetic in a different order (all-reduce vs accumulation, and DDP's
    copies of the weights take slightly different kernel paths: outputs differ by ~1e-6 relative).
    Gradients of a LoRA at its start are sums with heavy cancellation, so that noise shows up in
    individual near-zero gradients; what must match is the update as a whole. SGD keeps the update
    linear in the gradient (Adam's normalisation would turn near-zero noise into full-size steps)."""
    import os
    import shutil

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    port = str(29600 + random.randrange(300))
    launcher = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", port, "--num_cpu_threads_per_process", "1",
    ]
    two = tmp_path / "two"
    sgd = ["--max_train_steps", "4", "--optimizer_type", "SGD", "--learning_rate", "0.05"]
    result = run_script(
        "train_network.py", *lora_args(tiny_models["sd1"], data, two, *sgd),
        launcher=launcher, env={"ACCELERATE_USE_CPU": "1"},
    )
    assert_ok(result)
    assert "2 process(es)" in result.stdout and "distributed type MULTI_CPU" in result.stdout
    assert "trained weights identical on all 2 processes" in result.stdout
    one = tmp_path / "one"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, one, *sgd, "--gradient_accumulation_steps", "2")))
    one_weights, two_weights = load_file(one / "tiny.safetensors"), load_file(two / "tiny.safetensors")
    assert max(float(v.abs().max()) for k, v in two_weights.items() if "lora_up" in k) > 1e-4  # it trained
    other = tmp_path / "other"  # same seed, but 1 batch per step: different global batches
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, other, *sgd)))

    def update(weights):  # lora_up starts at zero, so its weights are the whole update
        return torch.cat([weights[k].flatten() for k in sorted(weights) if "lora_up" in k])

    def relative(a, b):
        return float((update(a) - update(b)).norm() / update(a).norm())

    # Measured: ~0.07 for the same global batches (float noise through a cancelling gradient),
    # ~1.26 for the run that saw different batches.
    assert relative(one_weights, two_weights) <= 0.2
    assert relative(one_weights, load_file(other / "tiny.safetensors")) >= 0.6
