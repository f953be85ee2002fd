"""--optimizer_type and friends: option group, checks, and building the optimizer the way sd-scripts does.

Names, defaults and argument rewriting follow kohya-ss/sd-scripts' `get_optimizer` (train_util.py), so a
command line and the `ss_optimizer` metadata it produces stay the same. Optimizer packages (bitsandbytes
is slow and noisy to import) are imported only for the optimizer actually chosen.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from library.errors import UserError

LOGGER = logging.getLogger(__name__)


class OptionError(UserError, ValueError):
    """A command-line value the user has to fix; reported as one line."""


@dataclass(frozen=True)
class OptimizerChoice:
    """Where the class for an --optimizer_type lives, before anything is imported."""

    name: str  # canonical name ("AdamW8bit"), or the user's text for torch.optim / module.Class names
    module: str
    class_name: str
    package: str | None = None  # pip package to suggest when the module is missing
    nesterov: bool = False  # SGDNesterov*: nesterov=True and momentum added


_BNB, _BNB_PIP = "bitsandbytes.optim", "bitsandbytes"
_KNOWN = tuple(
    OptimizerChoice(name, module, cls, package, nesterov)
    for name, module, cls, package, nesterov in (
        ("AdamW", "torch.optim", "AdamW", None, False),
        ("AdamW8bit", _BNB, "AdamW8bit", _BNB_PIP, False),
        ("PagedAdamW8bit", _BNB, "PagedAdamW8bit", _BNB_PIP, False),
        ("PagedAdamW", _BNB, "PagedAdamW", _BNB_PIP, False),
        ("PagedAdamW32bit", _BNB, "PagedAdamW32bit", _BNB_PIP, False),
        ("Lion", "lion_pytorch", "Lion", "lion-pytorch", False),
        ("Lion8bit", _BNB, "Lion8bit", _BNB_PIP, False),
        ("PagedLion8bit", _BNB, "PagedLion8bit", _BNB_PIP, False),
        ("SGDNesterov", "torch.optim", "SGD", None, True),
        ("SGDNesterov8bit", _BNB, "SGD8bit", _BNB_PIP, True),
        ("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", False),
        ("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", False),
        ("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation", False),
        ("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation", False),
        ("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation", False),
        ("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation", False),
        ("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation", False),
        ("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation", False),
        ("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", False),
        ("Adafactor", "transformers.optimization", "Adafactor", "transformers", False),
        ("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree", False),
        ("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree", False),
        ("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree", False),
    )
)
_PIP_NAMES = (("lion_pytorch", "lion-pytorch"),)

SUPPORTED_OPTIMIZERS = tuple(choice.name for choice in _KNOWN)


@dataclass
class BuiltOptimizer:
    """The optimizer plus what the trainer and the metadata need to know about it."""

    optimizer: torch.optim.Optimizer
    name: str  # canonical name, e.g. "AdamW8bit"
    description: str  # ss_optimizer: "module.Class" plus "(k=v,...)" when there are optimizer args
    is_schedule_free: bool = False  # trainer calls optimizer.train()/eval() around sampling and saving
    forced_scheduler: str | None = None  # "adafactor" when Adafactor computes its own (relative-step) LR
    notes: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the optimizer args after defaults were added
    initial_lr: float | None = None  # --learning_rate; the adafactor scheduler reports it before step 1
    lr_is_multiplier: bool = False  # D-Adaptation / Prodigy: the LR multiplies the adapted step d


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="optimizer (case-insensitive, default AdamW): " + ", ".join(SUPPORTED_OPTIMIZERS)
        + "; or a torch.optim class name (RMSprop), or module.Class",
    )
    group.add_argument("--learning_rate", type=float, default=2e-6, help="learning rate")
    group.add_argument(
        "--optimizer_args",
        type=str,
        default=None,
        nargs="*",
        help='optimizer arguments as key=value Python literals, e.g. "weight_decay=0.01" "betas=.9,.999"',
    )
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="max gradient norm for clipping, 0 = no clipping")
    group.add_argument("--use_8bit_adam", action="store_true", help="(legacy) same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="(legacy) same as --optimizer_type Lion")
    group.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="fuse the optimizer step into the backward pass (Adafactor only; not supported yet)",
    )


# ---------------------------------------------------------------- key=value arguments


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false", "none"):  # a string "false" would silently be truthy
        return {"true": True, "false": False, "none": None}[lowered]
    return ast.literal_eval(text)


def _parse_value(raw: str) -> Any:
    try:
        return _literal(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if "," in raw:
        try:
            return tuple(_literal(part.strip()) for part in raw.split(",") if part.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return raw  # plain words (e.g. a mode name) are kept as strings


def parse_key_value_args(items: list[str] | None, option_name: str) -> dict[str, Any]:
    """`k=v` items -> {k: Python literal}; comma lists become tuples, other text stays a string."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise OptionError(f"{option_name}: {item!r} has no '=' (write key=value)")
        if not key.isidentifier():
            raise OptionError(f"{option_name}: {item!r} needs a name before '=' (write key=value)")
        if not raw:
            raise OptionError(f"{option_name}: {item!r} has no value after '=' (write key=value)")
        result[key] = _parse_value(raw)
    return result


# ---------------------------------------------------------------- choosing the class


def _requested_type(args: argparse.Namespace) -> str:
    """--optimizer_type with the legacy flags folded in (sd-scripts refuses mixing them)."""
    requested = (getattr(args, "optimizer_type", "") or "").strip()
    use_8bit, use_lion = getattr(args, "use_8bit_adam", False), getattr(args, "use_lion_optimizer", False)
    if use_8bit and use_lion:
        raise OptionError("--use_8bit_adam and --use_lion_optimizer cannot be used together; use --optimizer_type")
    for flag, legacy, name in ((use_8bit, "--use_8bit_adam", "AdamW8bit"), (use_lion, "--use_lion_optimizer", "Lion")):
        if flag:
            if requested and requested.lower() != name.lower():
                raise OptionError(f"{legacy} means --optimizer_type {name}; it conflicts with --optimizer_type {requested}")
            return name
    return requested or "AdamW"


def _unknown(name: str) -> OptionError:
    return OptionError(
        f"--optimizer_type {name!r} is unknown. Supported: {', '.join(SUPPORTED_OPTIMIZERS)}; "
        "or any torch.optim class name (e.g. RMSprop), or a class from another package as module.Class "
        "(e.g. bitsandbytes.optim.lamb.LAMB)"
    )


def resolve_optimizer_choice(args: argparse.Namespace) -> OptimizerChoice:
    """Which class --optimizer_type means, without importing optimizer packages."""
    requested = _requested_type(args)
    for choice in _KNOWN:
        if choice.name.lower() == requested.lower():
            return choice
    if "." in requested:
        module, _, class_name = requested.rpartition(".")
        if not module or not class_name:
            raise _unknown(requested)
        top = module.split(".")[0]
        return OptimizerChoice(requested, module, class_name, dict(_PIP_NAMES).get(top, top))
    for attr in dir(torch.optim):  # sd-scripts looks bare names up in torch.optim
        cls = getattr(torch.optim, attr)
        is_optimizer = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
        if attr.lower() == requested.lower() and is_optimizer:
            return OptimizerChoice(attr, "torch.optim", attr)
    raise _unknown(requested)


def _missing_package(choice: OptimizerChoice, module: str) -> OptionError:
    package = choice.package or module.split(".")[0]
    return OptionError(
        f"--optimizer_type {choice.name} needs the Python package '{package}', which is not installed "
        f"(no module '{module}'): pip install {package}"
    )


def _import_class(choice: OptimizerChoice) -> type:
    try:
        module = importlib.import_module(choice.module)
    except ModuleNotFoundError as err:
        raise _missing_package(choice, err.name or choice.module) from err
    cls = getattr(module, choice.class_name, None)
    if cls is None or not callable(cls):
        if choice in _KNOWN:
            raise OptionError(
                f"--optimizer_type {choice.name}: {choice.module} has no {choice.class_name}; "
                f"the installed '{choice.package}' is too old, upgrade it (pip install -U {choice.package})"
            )
        raise OptionError(f"--optimizer_type {choice.name}: module {choice.module} has no class {choice.class_name}")
    return cls


def optimizer_option_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the optimizer options, found before any model is loaded."""
    problems: list[str] = learning_rate_problems(args)
    if getattr(args, "fused_backward_pass", False):
        problems.append(
            "--fused_backward_pass is not supported yet (it saves memory with Adafactor only); remove it"
        )
    try:
        choice = resolve_optimizer_choice(args)
    except OptionError as err:
        problems.append(str(err))
        choice = None
    if choice is not None:
        top = choice.module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            problems.append(str(_missing_package(choice, top)))
    try:
        kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    except OptionError as err:
        problems.append(str(err))
        kwargs = {}
    if choice is not None and choice.name == "Adafactor" and not adafactor_relative_step(kwargs):
        if getattr(args, "learning_rate", None) is None:
            problems.append("Adafactor with relative_step=False needs a learning rate: set --learning_rate")
    return problems


def learning_rate_problems(args: argparse.Namespace) -> list[str]:
    """Every learning-rate option a recipe has must be a finite number >= 0 (0 freezes that part)."""
    import math

    problems = []
    for name in ("learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te"):
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and (not math.isfinite(v) or v < 0):
                problems.append(f"--{name} {v}: a learning rate must be a number >= 0 (typical: 1e-4 for LoRA, 1e-6 for DreamBooth)")
    return problems


# ---------------------------------------------------------------- building


def adafactor_relative_step(kwargs: dict[str, Any]) -> bool:
    """sd-scripts' rule: relative_step defaults to True, and warmup_init needs it."""
    return bool(kwargs.get("relative_step", True)) or bool(kwargs.get("warmup_init", False))


def _normalise_groups(param_groups: list) -> list[dict]:
    """Copies of the groups (the caller's dicts are not edited); a bare parameter list is one group."""
    if not param_groups:
        raise OptionError("no parameters to train: the optimizer got an empty parameter list")
    if not isinstance(param_groups[0], dict):
        return [{"params": list(param_groups)}]
    return [dict(group, params=list(group["params"])) for group in param_groups]


def build_optimizer(args: argparse.Namespace, param_groups: list, logger: logging.Logger | None = None) -> BuiltOptimizer:
    """The optimizer for --optimizer_type/--optimizer_args over `param_groups` ({"params", "lr", "name"} dicts)."""
    log = logger or LOGGER
    notes: list[str] = []

    def note(message: str, level: int = logging.INFO) -> None:
        notes.append(message)
        log.log(level, message)

    choice = resolve_optimizer_choice(args)
    kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    groups = _normalise_groups(param_groups)
    lr = getattr(args, "learning_rate", None)
    lowered = choice.name.lower()
    forced_scheduler = None
    lr_is_multiplier = lowered.startswith("dadapt") or lowered == "prodigy"

    if choice.nesterov and "momentum" not in kwargs:
        kwargs["momentum"] = 0.9
        note(f"{choice.name} needs momentum: set momentum=0.9")

    if lr_is_multiplier:
        first_lr = groups[0].get("lr", lr)
        if first_lr is not None and first_lr <= 0.1:
            note(
                f"learning rate {first_lr} is low for {choice.name}: with D-Adaptation or Prodigy the learning rate "
                "multiplies the adapted step size, so set it around 1.0",
                logging.WARNING,
            )
        if len({group.get("lr", lr) for group in groups}) > 1:
            # sd-scripts only warns; most of these classes then raise at the first step, so make the warning true
            for group in groups:
                if group.get("lr", lr) != 0.0:  # lr 0 (a frozen group) is the one other value they accept
                    group["lr"] = first_lr
            note(
                f"{choice.name} supports one learning rate only: when several are given (e.g. text encoder and "
                f"U-Net) only the first one takes effect: lr={first_lr}",
                logging.WARNING,
            )

    if choice.name == "Adafactor":
        if "relative_step" not in kwargs:
            kwargs["relative_step"] = True  # sd-scripts' default; scale_parameter/warmup_init keep Adafactor's defaults
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
            note("Adafactor: warmup_init=True needs relative_step=True, so relative_step is set to True")
        if kwargs["relative_step"]:
            if lr:
                note(f"Adafactor computes its own learning rate (relative_step=True): --learning_rate {lr} is only "
                     "the initial value the scheduler reports")
            if [group.pop("lr", None) for group in groups] != [None] * len(groups):  # pop from every group
                note("Adafactor with relative_step=True ignores per-group learning rates (unet_lr, text_encoder_lr)",
                     logging.WARNING)
            if getattr(args, "lr_scheduler", "constant") != "adafactor":
                note("Adafactor with relative_step=True: the LR scheduler is set to 'adafactor'")
            forced_scheduler = "adafactor"
            call_lr = None
        else:
            call_lr = lr
            if call_lr is None and any(group.get("lr") is None for group in groups):
                raise OptionError("Adafactor with relative_step=False needs a learning rate: set --learning_rate")
            if getattr(args, "max_grad_norm", 0.0) != 0.0:
                note("Adafactor: gradient clipping is on (--max_grad_norm); consider --max_grad_norm 0", logging.WARNING)
            if getattr(args, "lr_scheduler", None) != "constant_with_warmup":
                note("Adafactor with relative_step=False works well with --lr_scheduler constant_with_warmup",
                     logging.WARNING)
            if kwargs.get("clip_threshold", 1.0) != 1.0:
                note("Adafactor: clip_threshold=1.0 is recommended", logging.WARNING)
    else:
        call_lr = lr

    cls = _import_class(choice)
    log.info(f"use {choice.name} optimizer | {kwargs}")
    call_kwargs = dict(kwargs)
    if choice.nesterov:
        call_kwargs.setdefault("nesterov", True)
    if call_lr is not None or choice.name == "Adafactor":
        call_kwargs["lr"] = call_lr
    try:
        optimizer = cls(groups, **call_kwargs)
    except (TypeError, ValueError) as err:
        raise OptionError(f"--optimizer_type {choice.name} ({cls.__module__}.{cls.__name__}) refused its arguments "
                          f"{kwargs}: {err}") from err

    is_schedule_free = lowered.endswith("schedulefree") or cls.__module__.startswith("schedulefree")
    if is_schedule_free and callable(getattr(optimizer, "train", None)):
        optimizer.train()  # schedule-free optimizers refuse to step in eval mode

    args_text = ",".join(f"{key}={value}" for key, value in kwargs.items())
    description = f"{cls.__module__}.{cls.__name__}" + (f"({args_text})" if args_text else "")
    return BuiltOptimizer(
        optimizer=optimizer,
        name=choice.name,
        description=description,
        is_schedule_free=is_schedule_free,
        forced_scheduler=forced_scheduler,
        notes=notes,
        kwargs=kwargs,
        initial_lr=lr,
        lr_is_multiplier=lr_is_multiplier,
    )


def current_lrs(optimizer: Any, built: BuiltOptimizer) -> list[float]:
    """LR per param group for logging, as sd-scripts logs it.

    D-Adaptation/Prodigy: d*lr (the step actually taken; sd-scripts' `lr/d*lr`). Adafactor with a relative
    step: the LR it computes from its state (what transformers' AdafactorSchedule reports), or the initial LR
    before the first step. Otherwise the group's `lr`. `optimizer` may be wrapped by accelerate.
    """
    lrs: list[float] = []
    for group in optimizer.param_groups:
        if built.lr_is_multiplier and "d" in group:
            lrs.append(float(group["d"]) * float(group["lr"]))
        elif built.forced_scheduler == "adafactor":
            state = optimizer.state.get(group["params"][0], {})
            if "step" in state and "RMS" in state:
                from transformers.optimization import Adafactor

                lrs.append(float(Adafactor._get_lr(group, state)))
            else:
                lrs.append(float(built.initial_lr or 0.0))
        else:
            lrs.append(float(group["lr"]))
    return lrs
