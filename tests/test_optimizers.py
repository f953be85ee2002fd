"""Optimizer options: every supported name takes a real step on a tiny model; parsing, metadata, errors."""

from __future__ import annotations

import argparse
import logging
import sys

import pytest
import torch

from library.training.optimizers import (
    SUPPORTED_OPTIMIZERS,
    OptionError,
    add_optimizer_arguments,
    build_optimizer,
    current_lrs,
    optimizer_option_problems,
    parse_key_value_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    parser.add_argument("--lr_scheduler", default="constant")  # Adafactor reads it, as in sd-scripts
    return parser.parse_args(list(argv))


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(3, model.in_features)).pow(2).mean().backward()
    optimizer.step()


def step_changes_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    before = [p.detach().clone() for p in model.parameters()]
    one_step(model, optimizer)
    return any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")  # bitsandbytes falls back
@pytest.mark.parametrize("name", SUPPORTED_OPTIMIZERS + ("rmsprop", "torch.optim.adagrad.Adagrad"))
def test_every_optimizer_steps(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    lr = "1.0" if name.startswith("DAdapt") or name == "Prodigy" else "1e-3"
    built = build_optimizer(parse("--optimizer_type", name, "--learning_rate", lr), [{"params": list(model.parameters())}])
    assert isinstance(built.optimizer, torch.optim.Optimizer)
    if name == "RAdamScheduleFree":
        # RAdam's silent SGD phase: steps 1-4 (beta2=0.999) only update the moments, step 5 moves the weights
        assert [step_changes_weights(model, built.optimizer) for _ in range(5)] == [False] * 4 + [True]
    else:
        assert step_changes_weights(model, built.optimizer)
    assert all(lr_ > 0 for lr_ in current_lrs(built.optimizer, built))


def test_canonical_names_and_classes():
    model = torch.nn.Linear(8, 4)
    built = build_optimizer(parse("--optimizer_type", "adamw8BIT"), [{"params": list(model.parameters())}])
    assert built.name == "AdamW8bit"
    assert built.description == "bitsandbytes.optim.adamw.AdamW8bit"
    built = build_optimizer(parse("--optimizer_type", "DAdaptation", "--learning_rate", "1"), list(model.parameters()))
    assert type(built.optimizer).__name__ == "DAdaptAdamPreprint" and built.lr_is_multiplier
    built = build_optimizer(parse("--optimizer_type", "Adafactor"), list(model.parameters()))
    assert type(built.optimizer).__module__ == "transformers.optimization"


def test_eight_bit_state_is_quantised():
    model = torch.nn.Linear(64, 64, bias=False)  # 4096 elements: bitsandbytes' threshold for 8-bit state
    built = build_optimizer(parse("--use_8bit_adam"), [{"params": list(model.parameters())}])
    assert built.name == "AdamW8bit"
    one_step(model, built.optimizer)
    assert built.optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_default_and_legacy_flags():
    model = torch.nn.Linear(8, 4)
    assert build_optimizer(parse(), list(model.parameters())).name == "AdamW"
    assert build_optimizer(parse("--use_lion_optimizer"), list(model.parameters())).name == "Lion"
    assert build_optimizer(parse("--use_8bit_adam", "--optimizer_type", "AdamW8bit"), list(model.parameters())).name == "AdamW8bit"
    with pytest.raises(OptionError, match="--use_8bit_adam means --optimizer_type AdamW8bit"):
        build_optimizer(parse("--use_8bit_adam", "--optimizer_type", "Lion"), list(model.parameters()))
    assert any("cannot be used together" in p for p in optimizer_option_problems(parse("--use_8bit_adam", "--use_lion_optimizer")))


def test_sgd_nesterov_gets_momentum(caplog):
    model = torch.nn.Linear(8, 4)
    with caplog.at_level(logging.INFO):
        built = build_optimizer(parse("--optimizer_type", "SGDNesterov"), list(model.parameters()))
    group = built.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert any("momentum=0.9" in note for note in built.notes) and "momentum=0.9" in caplog.text
    assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    built = build_optimizer(parse("--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0.5"), list(model.parameters()))
    assert built.optimizer.param_groups[0]["momentum"] == 0.5 and not built.notes


def test_parse_key_value_args():
    parsed = parse_key_value_args(
        ["weight_decay=0.01", "betas=.9,.999", "relative_step=False", "decouple=true", "mode=fast",
         "eps=1e-8", "d0=1e-6", "name='x=y'", "growth=inf"],
        "--optimizer_args",
    )
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.999), "relative_step": False, "decouple": True,
                      "mode": "fast", "eps": 1e-8, "d0": 1e-6, "name": "x=y", "growth": "inf"}
    assert parse_key_value_args(None, "--optimizer_args") == {}
    assert parse_key_value_args(["step_rules=1:10,0.1:20,0.01"], "--lr_scheduler_args") == {"step_rules": "1:10,0.1:20,0.01"}
    with pytest.raises(OptionError, match=r"--optimizer_args: 'weight_decay' has no '=' \(write key=value\)"):
        parse_key_value_args(["weight_decay"], "--optimizer_args")
    with pytest.raises(OptionError, match="needs a name"):
        parse_key_value_args(["=1"], "--optimizer_args")
    with pytest.raises(OptionError, match="no value"):
        parse_key_value_args(["eps="], "--optimizer_args")
    assert issubclass(OptionError, ValueError)


def test_description_is_sd_scripts_ss_optimizer():
    model = torch.nn.Linear(8, 4)
    args = parse("--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.01", "betas=.9,.999")
    built = build_optimizer(args, list(model.parameters()))
    assert built.description == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"
    assert built.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert build_optimizer(parse(), list(model.parameters())).description == "torch.optim.adamw.AdamW"


def test_unknown_name_lists_supported():
    with pytest.raises(OptionError) as err:
        build_optimizer(parse("--optimizer_type", "AdamX"), list(torch.nn.Linear(2, 2).parameters()))
    message = str(err.value)
    assert "'AdamX' is unknown" in message and "PagedLion8bit" in message and "module.Class" in message
    assert optimizer_option_problems(parse("--optimizer_type", "AdamX")) == [message]


def test_missing_package_names_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes the import fail like a missing package
    with pytest.raises(OptionError, match="pip install lion-pytorch"):
        build_optimizer(parse("--optimizer_type", "Lion"), list(torch.nn.Linear(2, 2).parameters()))
    problems = optimizer_option_problems(parse("--optimizer_type", "no_such_pkg_xyz.FastOpt"))
    assert len(problems) == 1 and "pip install no_such_pkg_xyz" in problems[0]
    with pytest.raises(OptionError, match="has no class NoSuchOpt"):
        build_optimizer(parse("--optimizer_type", "torch.optim.NoSuchOpt"), list(torch.nn.Linear(2, 2).parameters()))


def test_two_param_groups_keep_their_lrs():
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)
    groups = [{"params": list(a.parameters()), "lr": 1e-4, "name": "unet"}, {"params": list(b.parameters()), "lr": 5e-5}]
    built = build_optimizer(parse("--learning_rate", "1e-3"), groups)
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-4, 5e-5]
    assert built.optimizer.param_groups[0]["name"] == "unet"
    assert current_lrs(built.optimizer, built) == [1e-4, 5e-5]


def test_d_adaptation_warnings_and_d_times_lr(caplog):
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    groups = [{"params": list(a.parameters()), "lr": 0.05}, {"params": list(b.parameters()), "lr": 0.02}]
    with caplog.at_level(logging.WARNING):
        built = build_optimizer(parse("--optimizer_type", "DAdaptAdam"), groups)
    assert "around 1.0" in caplog.text and "only the first one takes effect" in caplog.text
    assert len(built.notes) == 2
    assert [g["lr"] for g in built.optimizer.param_groups] == [0.05, 0.05]  # the first LR, for every group
    one_step(a, built.optimizer)
    expected = [g["d"] * g["lr"] for g in built.optimizer.param_groups]
    assert current_lrs(built.optimizer, built) == pytest.approx(expected)
    built = build_optimizer(parse("--optimizer_type", "Prodigy", "--learning_rate", "1.0"), list(a.parameters()))
    assert not built.notes


def test_adafactor_relative_step_forces_scheduler():
    model, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    groups = [{"params": list(model.parameters()), "lr": 1e-4}, {"params": list(other.parameters()), "lr": 5e-5}]
    built = build_optimizer(parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3"), groups)
    assert built.forced_scheduler == "adafactor" and built.initial_lr == 1e-3
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert [g["lr"] for g in built.optimizer.param_groups] == [None, None]
    assert groups[0]["lr"] == 1e-4  # the caller's dicts are not edited
    assert any("ignores per-group learning rates" in note for note in built.notes)
    assert current_lrs(built.optimizer, built) == [1e-3, 1e-3]  # before the first step: the initial LR
    one_step(model, built.optimizer)
    from transformers.optimization import Adafactor

    group = built.optimizer.param_groups[0]
    expected = float(Adafactor._get_lr(group, built.optimizer.state[group["params"][0]]))
    assert current_lrs(built.optimizer, built) == [pytest.approx(expected), 1e-3]  # the second group has not stepped


def test_adafactor_without_relative_step():
    model = torch.nn.Linear(8, 4)
    args = parse("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                 "--learning_rate", "1e-3")
    built = build_optimizer(args, list(model.parameters()))
    assert built.forced_scheduler is None and built.optimizer.param_groups[0]["lr"] == 1e-3
    assert any("constant_with_warmup" in note for note in built.notes)
    args.learning_rate = None
    with pytest.raises(OptionError, match="needs a learning rate"):
        build_optimizer(args, list(model.parameters()))
    assert any("needs a learning rate" in p for p in optimizer_option_problems(args))
    args = parse("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True")
    assert build_optimizer(args, list(model.parameters())).forced_scheduler == "adafactor"


def test_schedule_free_is_flagged_and_in_train_mode():
    model = torch.nn.Linear(8, 4)
    built = build_optimizer(parse("--optimizer_type", "AdamWScheduleFree"), list(model.parameters()))
    assert built.is_schedule_free and built.optimizer.param_groups[0]["train_mode"]
    assert not build_optimizer(parse(), list(model.parameters())).is_schedule_free


def test_refused_arguments_are_option_errors():
    with pytest.raises(OptionError, match="refused its arguments"):
        build_optimizer(parse("--optimizer_args", "no_such_arg=1"), list(torch.nn.Linear(2, 2).parameters()))


def test_option_problems():
    assert optimizer_option_problems(parse()) == []
    assert optimizer_option_problems(parse("--optimizer_type", "PagedAdamW8bit", "--optimizer_args", "weight_decay=0.1")) == []
    problems = optimizer_option_problems(parse("--optimizer_args", "weight_decay", "--fused_backward_pass"))
    assert len(problems) == 2
    assert any("not supported yet" in p for p in problems) and any("has no '='" in p for p in problems)
    args = parse()
    assert args.learning_rate == 2e-6 and args.max_grad_norm == 1.0 and args.optimizer_type == "" and args.optimizer_args is None
