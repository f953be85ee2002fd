"""--lr_scheduler and friends: option group, checks, and building the scheduler like sd-scripts' `get_scheduler_fix`.

Step counting. The trainer steps the scheduler once per optimizer step through accelerate's
AcceleratedScheduler, which (split_batches off, the default) steps the wrapped scheduler `num_processes`
times each time. So, as in sd-scripts, the schedule is built over `total_steps * num_processes` scheduler
steps; warmup/decay given as a ratio are taken of that number. Warmup/decay given as a step count are in
optimizer steps and are multiplied by `num_processes` too, so the curve is the same on one or many
processes (sd-scripts leaves counts unscaled, which shortens warmup on multi-GPU runs). A custom
--lr_scheduler_type class gets its --lr_scheduler_args unchanged (e.g. StepLR's step_size counts scheduler steps).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
from typing import Any

import torch

from library.training.optimizers import BuiltOptimizer, OptionError, adafactor_relative_step, parse_key_value_args

LOGGER = logging.getLogger(__name__)

# the classic names come from diffusers (as sd-scripts used to), the newer ones from transformers
_DIFFUSERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant")
_TRANSFORMERS = ("inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
SCHEDULER_NAMES = _DIFFUSERS[:6] + ("adafactor",) + _TRANSFORMERS + ("piecewise_constant",)
_NO_WARMUP = ("constant", "adafactor")  # sd-scripts refuses warmup for these


def add_lr_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate scheduler")
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="scheduler: linear, cosine, cosine_with_restarts, polynomial, constant (default), constant_with_warmup, "
        "adafactor; also inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay, "
        "piecewise_constant",
    )
    group.add_argument(
        "--lr_warmup_steps",
        type=str,
        default="0",
        help="warmup steps: a step count, or a ratio of the total steps as a number below 1 (0.1) or a percentage (10%%)",
    )
    group.add_argument(
        "--lr_decay_steps",
        type=str,
        default="0",
        help="decay steps for warmup_stable_decay: a step count, a ratio below 1 or a percentage",
    )
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial scheduler")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None, help="timescale of inverse_sqrt (default: warmup steps)")
    group.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="minimum LR as a ratio of the initial LR, for cosine_with_min_lr and warmup_stable_decay",
    )
    group.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="",
        help="custom scheduler: a torch.optim.lr_scheduler class name (StepLR) or module.Class",
    )
    group.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=None,
        nargs="*",
        help='arguments of the custom scheduler as key=value Python literals, e.g. "step_size=10" "gamma=0.5"',
    )


def parse_step_count(value: Any, option_name: str) -> int | float:
    """An int step count, or a float ratio in [0, 1): "10" -> 10, "0.1" -> 0.1, "10%" -> 0.1."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise OptionError(f"{option_name}: expected a step count or a ratio, got {value!r}")
    text = str(value).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent < 100:
                raise OptionError(f"{option_name}: a percentage must be from 0% to below 100%, got {text}")
            return percent / 100.0
        number = float(text)
    except ValueError:
        raise OptionError(f"{option_name}: expected a step count (100), a ratio (0.1) or a percentage (10%), got {text!r}") from None
    if number < 0:
        raise OptionError(f"{option_name}: must not be negative, got {text}")
    if number < 1 and number != 0:
        return number
    if not number.is_integer():
        raise OptionError(f"{option_name}: a step count must be a whole number (a ratio must be below 1), got {text}")
    return int(number)


def scheduler_steps(value: Any, option_name: str, total_steps: int, num_processes: int) -> int:
    """Warmup/decay in scheduler steps (see the module docstring for why counts are scaled by num_processes)."""
    parsed = parse_step_count(value, option_name)
    if isinstance(parsed, float):
        return int(parsed * total_steps * num_processes)
    return parsed * num_processes


def _resolve_scheduler_class(name: str) -> type:
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise OptionError(f"--lr_scheduler_type {name}: module '{err.name}' is not installed") from err
        cls = getattr(module, class_name, None)
    else:
        cls = getattr(torch.optim.lr_scheduler, name, None)
    if not isinstance(cls, type):
        raise OptionError(
            f"--lr_scheduler_type {name!r} is not a class in torch.optim.lr_scheduler (e.g. StepLR, LinearLR, "
            "OneCycleLR); give a class from another package as module.Class"
        )
    return cls


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    cls = type(optimizer)
    if cls.__name__ != "Adafactor" or not cls.__module__.startswith("transformers"):
        return False
    return all(group.get("relative_step") for group in optimizer.param_groups)


def _unknown_name(name: str) -> OptionError:
    return OptionError(
        f"--lr_scheduler {name!r} is unknown. Supported: {', '.join(SCHEDULER_NAMES)}; "
        "or a custom class with --lr_scheduler_type (torch.optim.lr_scheduler name or module.Class)"
    )


def _named_schedule(
    name: str, args: argparse.Namespace, warmup: int, decay: int, training_steps: int, num_processes: int,
    kwargs: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The diffusers/transformers schedule function for `name` and the arguments sd-scripts gives it."""
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    timescale = getattr(args, "lr_scheduler_timescale", None)
    steps = {"num_warmup_steps": warmup, "num_training_steps": training_steps}
    if name in _DIFFUSERS:
        from diffusers import optimization as schedules

        func = getattr(schedules, {
            "constant": "get_constant_schedule",
            "constant_with_warmup": "get_constant_schedule_with_warmup",
            "linear": "get_linear_schedule_with_warmup",
            "cosine": "get_cosine_schedule_with_warmup",
            "cosine_with_restarts": "get_cosine_with_hard_restarts_schedule_with_warmup",
            "polynomial": "get_polynomial_decay_schedule_with_warmup",
            "piecewise_constant": "get_piecewise_constant_schedule",
        }[name])
        return func, {
            "constant": {}, "piecewise_constant": {},
            "constant_with_warmup": {"num_warmup_steps": warmup},
            "cosine_with_restarts": {**steps, "num_cycles": num_cycles},
            "polynomial": {**steps, "power": getattr(args, "lr_scheduler_power", 1.0)},
        }.get(name, steps)
    from transformers import optimization as schedules

    func = getattr(schedules, {
        "inverse_sqrt": "get_inverse_sqrt_schedule",
        "cosine_with_min_lr": "get_cosine_with_min_lr_schedule_with_warmup",
        "cosine_warmup_with_min_lr": "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        "warmup_stable_decay": "get_wsd_schedule",
    }[name])
    if name == "inverse_sqrt":  # timescale is in optimizer steps like the warmup (None: the warmup length)
        return func, {"num_warmup_steps": warmup, "timescale": timescale * num_processes if timescale else None}
    if name == "warmup_stable_decay":
        return func, {
            "num_warmup_steps": warmup, "num_stable_steps": training_steps - warmup - decay, "num_decay_steps": decay,
            "num_cycles": num_cycles / 2, "min_lr_ratio": min_lr_ratio or 0.0,
        }
    min_lr = {} if "min_lr" in kwargs else {"min_lr_rate": min_lr_ratio}  # both cosine_*_min_lr
    return func, {**steps, "num_cycles": num_cycles / 2, **min_lr}


def build_lr_scheduler(
    args: argparse.Namespace, built_optimizer: BuiltOptimizer, total_steps: int, num_processes: int = 1,
    logger: logging.Logger | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for `total_steps` optimizer steps (`max_train_steps`) on `num_processes` processes."""
    log = logger or LOGGER
    optimizer = built_optimizer.optimizer
    if not total_steps or total_steps < 1:
        raise OptionError(f"the LR scheduler needs the number of training steps, got {total_steps!r}")
    num_processes = max(1, int(num_processes))
    training_steps = total_steps * num_processes
    name = (getattr(args, "lr_scheduler", None) or "constant").strip().lower()
    custom = (getattr(args, "lr_scheduler_type", None) or "").strip()
    kwargs = parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    warmup = scheduler_steps(getattr(args, "lr_warmup_steps", 0), "--lr_warmup_steps", total_steps, num_processes)
    decay = scheduler_steps(getattr(args, "lr_decay_steps", 0), "--lr_decay_steps", total_steps, num_processes)

    from diffusers.optimization import get_constant_schedule  # transformers' import is slower (peft, bitsandbytes)

    if built_optimizer.is_schedule_free:
        if name != "constant" or warmup or custom:
            log.info(f"{built_optimizer.name} schedules its own LR (warmup via --optimizer_args warmup_steps=N): "
                     "the LR scheduler options are ignored")
        return get_constant_schedule(optimizer)  # a real LRScheduler, so accelerate can save and restore it
    if built_optimizer.forced_scheduler == "adafactor" and (name != "adafactor" or custom):
        log.info("Adafactor with relative_step=True: using the adafactor scheduler")
        name, custom = "adafactor", ""
    if warmup + decay > training_steps:
        log.warning(f"warmup ({warmup}) and decay ({decay}) scheduler steps exceed the {training_steps} total")

    if custom:
        if warmup:
            raise OptionError(f"--lr_scheduler_type {custom} does not use --lr_warmup_steps: set it to 0 "
                              "(pass warmup through --lr_scheduler_args if the class has such an argument)")
        cls = _resolve_scheduler_class(custom)
        log.info(f"use {custom} | {kwargs} as LR scheduler")
        try:
            return cls(optimizer, **kwargs)
        except (TypeError, ValueError) as err:
            raise OptionError(f"--lr_scheduler_type {custom} refused --lr_scheduler_args {kwargs}: {err}") from err

    if name.startswith("adafactor"):
        if not _is_relative_step_adafactor(optimizer):
            raise OptionError("--lr_scheduler adafactor works only with --optimizer_type Adafactor and relative_step=True"
                              " (with relative_step=False use constant_with_warmup)")
        if warmup:
            raise OptionError("the adafactor scheduler does not use --lr_warmup_steps (Adafactor warms up by itself "
                              "with relative_step=True): set it to 0")
        _, _, given = name.partition(":")  # sd-scripts' internal form "adafactor:<initial lr>"
        initial_lr = float(given) if given else float(built_optimizer.initial_lr or 0.0)
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr)

    if name not in SCHEDULER_NAMES:
        raise _unknown_name(name)
    if name in _NO_WARMUP and warmup:
        raise OptionError(f"--lr_scheduler {name} does not use --lr_warmup_steps: set it to 0, "
                          "or use constant_with_warmup")
    if name == "piecewise_constant" and warmup:
        log.warning("--lr_scheduler piecewise_constant ignores --lr_warmup_steps (write the ramp into step_rules)")
    func, named = _named_schedule(name, args, warmup, decay, training_steps, num_processes, kwargs)
    try:
        return func(optimizer, **{**named, **kwargs})
    except (TypeError, ValueError) as err:
        raise OptionError(f"--lr_scheduler {name}: {err}") from err


def lr_scheduler_option_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the scheduler options, found before any model is loaded."""
    problems: list[str] = []
    warmup = 0
    for option, attr in (("--lr_warmup_steps", "lr_warmup_steps"), ("--lr_decay_steps", "lr_decay_steps")):
        try:
            parsed = parse_step_count(getattr(args, attr, 0), option)
            if attr == "lr_warmup_steps":
                warmup = parsed
        except OptionError as err:
            problems.append(str(err))
    try:
        kwargs = parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    except OptionError as err:
        problems.append(str(err))
        kwargs = {}
    optimizer_type = (getattr(args, "optimizer_type", "") or "").strip().lower()
    if optimizer_type.endswith("schedulefree"):
        return problems  # schedule-free optimizers ignore the scheduler options
    custom = (getattr(args, "lr_scheduler_type", None) or "").strip()
    name = (getattr(args, "lr_scheduler", None) or "constant").strip().lower()
    if custom:
        top = custom.rpartition(".")[0].split(".")[0]
        if "." in custom and importlib.util.find_spec(top) is None:
            problems.append(f"--lr_scheduler_type {custom}: module '{top}' is not installed")
        elif "." not in custom and not isinstance(getattr(torch.optim.lr_scheduler, custom, None), type):
            problems.append(f"--lr_scheduler_type {custom!r} is not a class in torch.optim.lr_scheduler "
                            "(e.g. StepLR, LinearLR); give a class from another package as module.Class")
        if warmup:
            problems.append(f"--lr_scheduler_type {custom} does not use --lr_warmup_steps: set it to 0")
        return problems
    base = name.partition(":")[0]
    if optimizer_type == "adafactor" and warmup:
        try:
            relative = adafactor_relative_step(parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args"))
        except OptionError:
            relative = False  # reported by optimizer_option_problems
        if relative:
            problems.append("Adafactor with relative_step=True uses the adafactor scheduler, which does not use "
                            "--lr_warmup_steps: set it to 0 (or pass --optimizer_args relative_step=False)")
            return problems
    if base not in SCHEDULER_NAMES:
        problems.append(str(_unknown_name(name)))
    elif base in _NO_WARMUP and warmup:
        problems.append(f"--lr_scheduler {name} does not use --lr_warmup_steps: set it to 0, or use constant_with_warmup")
    if base == "adafactor" and optimizer_type.rpartition(".")[2] != "adafactor":
        problems.append("--lr_scheduler adafactor works only with --optimizer_type Adafactor")
    if base in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and getattr(args, "lr_scheduler_min_lr_ratio", None) is None \
            and "min_lr" not in kwargs:
        problems.append(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    if base == "piecewise_constant" and "step_rules" not in kwargs:
        problems.append('--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01"')
    return problems
