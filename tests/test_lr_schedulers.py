"""LR scheduler options: curve shapes over 100 steps, warmup forms, multi-process counting, resume, errors."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.training.lr_schedulers import (
    SCHEDULER_NAMES,
    add_lr_scheduler_arguments,
    build_lr_scheduler,
    lr_scheduler_option_problems,
    parse_step_count,
    scheduler_steps,
)
from library.training.optimizers import OptionError, add_optimizer_arguments, build_optimizer, current_lrs

TOTAL = 100


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    add_lr_scheduler_arguments(parser)
    return parser.parse_args(list(argv))


def build(*argv: str, total: int = TOTAL, num_processes: int = 1):
    args = parse("--optimizer_type", "SGD", "--learning_rate", "1.0", *argv)
    model = torch.nn.Linear(2, 1)
    built = build_optimizer(args, [{"params": list(model.parameters())}])
    return built, build_lr_scheduler(args, built, total, num_processes)


def curve(*argv: str, total: int = TOTAL, num_processes: int = 1) -> list[float]:
    """LR in effect at optimizer steps 0..total (stepping the way accelerate does: num_processes per step)."""
    built, scheduler = build(*argv, total=total, num_processes=num_processes)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total):
        built.optimizer.step()  # no gradients: a no-op that keeps torch from warning about the order
        for _ in range(num_processes):
            scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def diffs(values: list[float]) -> list[float]:
    return [b - a for a, b in zip(values, values[1:])]


def test_constant_is_flat():
    assert curve() == [1.0] * (TOTAL + 1)


def test_constant_with_warmup():
    lrs = curve("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10")
    assert lrs[:11] == pytest.approx([i / 10 for i in range(11)])
    assert lrs[10:] == [1.0] * (TOTAL - 9)


def test_linear_rises_then_falls_to_zero():
    lrs = curve("--lr_scheduler", "linear", "--lr_warmup_steps", "10")
    assert lrs[:11] == pytest.approx([i / 10 for i in range(11)])
    assert diffs(lrs[10:]) == pytest.approx([-1 / 90] * 90)
    assert lrs[TOTAL] == 0.0


def test_cosine_is_monotone_after_warmup_and_ends_near_zero():
    lrs = curve("--lr_scheduler", "cosine", "--lr_warmup_steps", "10")
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert all(d <= 1e-12 for d in diffs(lrs[10:]))
    assert lrs[TOTAL] == pytest.approx(0.0, abs=1e-9)


def test_cosine_with_restarts_goes_back_up_once():
    lrs = curve("--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "10", "--lr_scheduler_num_cycles", "2")
    rises = [i for i, d in enumerate(diffs(lrs[10:])) if d > 1e-9]
    assert len(rises) == 1 and lrs[10 + rises[0] + 1] == pytest.approx(1.0)
    assert min(lrs[10:56]) == pytest.approx(0.0, abs=0.01)


def test_polynomial_power_two_is_convex_and_ends_at_lr_end():
    lrs = curve("--lr_scheduler", "polynomial", "--lr_warmup_steps", "10", "--lr_scheduler_power", "2")
    assert lrs[10] == pytest.approx(1.0)
    assert all(d2 >= -1e-12 for d2 in diffs(diffs(lrs[10:])))
    assert all(d < 0 for d in diffs(lrs[10:]))
    assert lrs[TOTAL] == pytest.approx(1e-7)  # diffusers' default lr_end
    assert curve("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.1")[TOTAL] == pytest.approx(0.1)


@pytest.mark.parametrize("warmup", ["10%", "0.1", "10"])
def test_warmup_forms(warmup):
    assert scheduler_steps(warmup, "--lr_warmup_steps", TOTAL, 1) == 10
    lrs = curve("--lr_scheduler", "linear", "--lr_warmup_steps", warmup)
    assert lrs[9] < lrs[10] == pytest.approx(1.0)


def test_parse_step_count():
    assert parse_step_count("0", "x") == 0 and parse_step_count(None, "x") == 0
    assert parse_step_count("25", "x") == 25 and parse_step_count(25, "x") == 25 and parse_step_count("25.0", "x") == 25
    assert parse_step_count("0.05", "x") == 0.05 and parse_step_count(0.05, "x") == 0.05
    assert parse_step_count("12.5%", "x") == 0.125
    for bad in ("1.5", "-3", "abc", "150%", "x%"):
        with pytest.raises(OptionError, match="--lr_warmup_steps"):
            parse_step_count(bad, "--lr_warmup_steps")


def test_multi_process_curve_matches_single_process():
    """accelerate steps the scheduler num_processes times per optimizer step; the curve must not change."""
    one = curve("--lr_scheduler", "linear", "--lr_warmup_steps", "10")
    for warmup in ("10", "0.1"):
        two = curve("--lr_scheduler", "linear", "--lr_warmup_steps", warmup, num_processes=2)
        assert two == pytest.approx(one)


def test_adafactor_scheduler_reports_the_optimizer_lr():
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "1e-3", "--lr_scheduler", "cosine")
    model = torch.nn.Linear(4, 2)
    built = build_optimizer(args, list(model.parameters()))
    scheduler = build_lr_scheduler(args, built, TOTAL)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-3]  # the initial LR until Adafactor has stepped
    for _ in range(3):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        built.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx(current_lrs(built.optimizer, built))
    assert scheduler.get_last_lr()[0] != 1e-3


def test_adafactor_scheduler_errors():
    args = parse("--optimizer_type", "Adafactor", "--lr_warmup_steps", "10")
    built = build_optimizer(args, list(torch.nn.Linear(2, 1).parameters()))
    with pytest.raises(OptionError, match="does not use --lr_warmup_steps"):
        build_lr_scheduler(args, built, TOTAL)
    assert any("relative_step=True" in p for p in lr_scheduler_option_problems(args))
    with pytest.raises(OptionError, match="only with --optimizer_type Adafactor"):
        build("--lr_scheduler", "adafactor")
    assert lr_scheduler_option_problems(parse("--lr_scheduler", "adafactor")) == [
        "--lr_scheduler adafactor works only with --optimizer_type Adafactor"
    ]


def test_schedule_free_gets_a_constant_scheduler():
    args = parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "0.01", "--lr_scheduler", "cosine",
                 "--lr_warmup_steps", "10")
    built = build_optimizer(args, list(torch.nn.Linear(2, 1).parameters()))
    scheduler = build_lr_scheduler(args, built, TOTAL)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    for _ in range(5):
        built.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [0.01] and "last_epoch" in scheduler.state_dict()
    assert lr_scheduler_option_problems(args) == []


def test_custom_scheduler_type():
    lrs = curve("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5")
    assert lrs[9] == 1.0 and lrs[10] == 0.5 and lrs[25] == 0.25
    lrs = curve("--lr_scheduler_type", "torch.optim.lr_scheduler.LinearLR", "--lr_scheduler_args", "start_factor=0.5",
                "total_iters=10")
    assert lrs[0] == 0.5 and lrs[10] == pytest.approx(1.0)
    with pytest.raises(OptionError, match="does not use --lr_warmup_steps"):
        build("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10", "--lr_warmup_steps", "5")
    with pytest.raises(OptionError, match="not a class in torch.optim.lr_scheduler"):
        build("--lr_scheduler_type", "NoSuchLR")
    with pytest.raises(OptionError, match="refused"):
        build("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "bogus=1")


def test_other_named_schedulers():
    lrs = curve("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1")
    assert lrs[0] == 1.0 and lrs[TOTAL] == pytest.approx(0.1)
    lrs = curve("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "20%")
    assert lrs[10:81] == pytest.approx([1.0] * 71) and lrs[TOTAL] == pytest.approx(0.0) and lrs[90] < 1.0
    lrs = curve("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10")
    assert lrs[10] == pytest.approx(1.0) and lrs[40] == pytest.approx(0.5)
    lrs = curve("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:10,0.1:20,0.01")
    assert (lrs[9], lrs[10], lrs[25]) == pytest.approx((1.0, 0.1, 0.01))


@pytest.mark.parametrize(
    "argv",
    [("--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "10", "--lr_scheduler_num_cycles", "3"),
     ("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=7", "gamma=0.8")],
)
def test_state_dict_round_trip_continues_the_curve(argv):
    built, scheduler = build(*argv)
    uninterrupted = []
    saved = None
    for step in range(TOTAL):
        built.optimizer.step()
        scheduler.step()
        uninterrupted.append(scheduler.get_last_lr()[0])
        if step == 36:  # what accelerate.save_state keeps: optimizer and scheduler state dicts
            saved = (built.optimizer.state_dict(), scheduler.state_dict())
    resumed_built, resumed = build(*argv)
    resumed_built.optimizer.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    continued = []
    for _ in range(37, TOTAL):
        resumed_built.optimizer.step()
        resumed.step()
        continued.append(resumed.get_last_lr()[0])
    assert continued == uninterrupted[37:]


def test_unknown_scheduler_lists_names():
    with pytest.raises(OptionError) as err:
        build("--lr_scheduler", "cosine_annealing")
    assert all(name in str(err.value) for name in ("linear", "cosine_with_restarts", "adafactor", "--lr_scheduler_type"))
    assert lr_scheduler_option_problems(parse("--lr_scheduler", "cosine_annealing")) == [str(err.value)]


def test_option_problems():
    args = parse()
    assert (args.lr_scheduler, args.lr_warmup_steps, args.lr_decay_steps, args.lr_scheduler_num_cycles,
            args.lr_scheduler_power, args.lr_scheduler_timescale, args.lr_scheduler_min_lr_ratio,
            args.lr_scheduler_type, args.lr_scheduler_args) == ("constant", "0", "0", 1, 1.0, None, None, "", None)
    assert lr_scheduler_option_problems(args) == []
    assert lr_scheduler_option_problems(parse("--lr_scheduler", "cosine", "--lr_warmup_steps", "5%")) == []
    problems = lr_scheduler_option_problems(parse("--lr_warmup_steps", "ten", "--lr_scheduler_args", "gamma"))
    assert len(problems) == 2 and "--lr_warmup_steps" in problems[0] and "has no '='" in problems[1]
    assert "use constant_with_warmup" in lr_scheduler_option_problems(parse("--lr_warmup_steps", "10"))[0]
    assert "min_lr_ratio" in lr_scheduler_option_problems(parse("--lr_scheduler", "cosine_with_min_lr"))[0]
    assert "step_rules" in lr_scheduler_option_problems(parse("--lr_scheduler", "piecewise_constant"))[0]
    assert "not installed" in lr_scheduler_option_problems(parse("--lr_scheduler_type", "no_such_pkg.MyLR"))[0]
    assert set(SCHEDULER_NAMES) >= {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                    "constant_with_warmup", "adafactor"}
