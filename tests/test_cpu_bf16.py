"""`--mixed_precision bf16` on the CPU: autocast runs the U-Net in bf16 (the frozen base in bf16 weights,
the LoRA in fp32, or everything in bf16 with --full_bf16), and the loss of 20 steps follows fp32's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script

STEPS = 20
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %). Measured on the tiny model (same noise
# and timesteps per step): the loss differs from fp32's by 0.27 % on average and 0.8 % at most with
# bf16 autocast, 0.35 % / 1.1 % with --full_bf16. The tolerances allow ~3x that.
MEAN_RELATIVE_TOLERANCE = 0.01
MAX_RELATIVE_TOLERANCE = 0.03


def step_losses(logs) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(p.parent for p in logs.rglob("events.out.tfevents*"))))
    events.Reload()
    return [e.value for e in events.Scalars("loss/current")]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    data = dreambooth_folders(root / "data", count=4)
    results = {}
    for name, extra in {"fp32": ["--mixed_precision", "no"], "bf16": ["--mixed_precision", "bf16"],
                        "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"]}.items():  # fmt: skip
        out, logs = root / name, root / f"{name}_logs"
        result = run_script(
            "train_network.py",
            *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", str(STEPS), "--logging_dir", str(logs),
                       "--save_precision", "float", *extra),  # fmt: skip
        )
        assert_ok(result)
        results[name] = {"losses": step_losses(logs), "weights": load_file(out / "tiny.safetensors")}
    return results


@pytest.mark.parametrize("name", ["bf16", "full_bf16"])
def test_bf16_loss_follows_fp32_over_20_steps(runs, name):
    fp32, other = runs["fp32"]["losses"], runs[name]["losses"]
    assert len(fp32) == len(other) == STEPS
    relative = [abs(a - b) / a for a, b in zip(fp32, other)]
    assert sum(relative) / STEPS < MEAN_RELATIVE_TOLERANCE, relative
    assert max(relative) < MAX_RELATIVE_TOLERANCE, relative
    assert fp32 != other  # bf16 did run: its rounding shows


def test_bf16_keeps_the_trained_lora_in_fp32_and_full_bf16_does_not(runs):
    """Autocast computes in bf16; the trained weights stay fp32 unless --full_bf16 (saved as float here)."""
    ups = [k for k in runs["fp32"]["weights"] if ".lora_up." in k]
    assert ups
    for name in ("bf16", "full_bf16"):
        moved = [float(runs[name]["weights"][k].abs().max()) for k in ups]
        assert max(moved) > 0  # trained
    bf16_values = torch.cat([runs["bf16"]["weights"][k].flatten() for k in ups])
    full_values = torch.cat([runs["full_bf16"]["weights"][k].flatten() for k in ups])
    assert not torch.equal(bf16_values, bf16_values.bfloat16().float())  # fp32 values, not bf16 ones
    assert torch.equal(full_values, full_values.bfloat16().float())  # every value a bf16 number
