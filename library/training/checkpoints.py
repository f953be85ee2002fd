"""Checkpoint names, save cadence, keep-last pruning and resumable training states.

Names follow sd-scripts (reference/formats.md §7) so tools that look for `name-000002.safetensors`
or `name-step00000500-state/` keep working. A training state is our own folder:

    train_state.json    {"current_epoch", "current_step", "batch_in_epoch", ...} (upstream's two keys + ours)
    trained.safetensors the trained weights (for LoRA: the network only, not the base model)
    optimizer.pt        optimizer state dict
    scheduler.pt        LR scheduler state dict
    scaler.pt           fp16 gradient scaler (only with --mixed_precision fp16)

It is written into a temporary folder and renamed into place, so an interrupted save never leaves
a half state behind and never destroys the previous one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import atomic_path

STATE_FILE = "train_state.json"
TRAINED_FILE = "trained.safetensors"


@dataclass(frozen=True)
class Progress:
    """Where a run stands. `epoch` counts completed epochs; `batch_in_epoch` counts the batches this
    process consumed in the current (unfinished) epoch, always at an optimizer-step boundary."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


# ---------------------------------------------------------------- names


def epoch_name(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}"


def step_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}"


def final_name(output_name: str | None) -> str:
    return output_name or "last"


def state_folder_name(model_name: str) -> str:
    return f"{model_name}-state"


# ---------------------------------------------------------------- cadence


def should_save_at_step(step: int, every_n_steps: int | None, max_steps: int) -> bool:
    """Periodic step save; the last step is covered by the final save."""
    return bool(every_n_steps) and step % every_n_steps == 0 and step < max_steps


def should_save_at_epoch(epoch: int, every_n_epochs: int | None, num_epochs: int) -> bool:
    """Periodic epoch save, skipped on the last epoch (the final file takes its place)."""
    return bool(every_n_epochs) and epoch % every_n_epochs == 0 and epoch < num_epochs


def epoch_to_prune(epoch: int, every_n_epochs: int | None, keep_last: int | None) -> int | None:
    """The epoch save that falls out of the keep-last-N window when `epoch` is saved."""
    if not every_n_epochs or not keep_last:
        return None
    old = epoch - every_n_epochs * keep_last
    return old if old > 0 else None


def step_to_prune(step: int, every_n_steps: int | None, keep_last_steps: int | None) -> int | None:
    """The step save older than `keep_last_steps` steps when `step` is saved (upstream's rule)."""
    if not every_n_steps or not keep_last_steps:
        return None
    old = step - keep_last_steps - 1
    old -= old % every_n_steps
    return old if old > 0 else None


def remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------- training states


def save_training_state(
    folder: Path,
    progress: Progress,
    trained: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    scaler_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a resumable state folder atomically."""
    from safetensors.torch import save_file

    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trained.items()}
        save_file(tensors, str(tmp / TRAINED_FILE))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        if scaler_state is not None:
            torch.save(scaler_state, tmp / "scaler.pt")
        info = {
            "current_epoch": progress.epoch,
            "current_step": progress.global_step,
            "batch_in_epoch": progress.batch_in_epoch,
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


@dataclass
class LoadedState:
    progress: Progress
    trained: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    scaler_state: dict | None
    info: dict


def read_state_info(folder: str | Path) -> dict:
    """train_state.json of a complete state folder (nothing else is read); explains what is missing."""
    folder = Path(folder)
    missing = [n for n in (STATE_FILE, TRAINED_FILE, "optimizer.pt", "scheduler.pt") if not (folder / n).is_file()]
    if missing:
        raise ResumeError(
            f"--resume {folder}: not a complete training state (missing {', '.join(missing)}); "
            "pass a '*-state' folder written by --save_state"
        )
    try:
        info = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ResumeError(f"--resume {folder / STATE_FILE}: not valid JSON ({err}); the state folder is damaged") from None
    if not isinstance(info, dict) or "current_step" not in info:
        raise ResumeError(f"--resume {folder / STATE_FILE}: no current_step in it; the state folder is damaged")
    return info


def state_tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the trained tensors in a state folder, read from the file header only."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / TRAINED_FILE), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load_training_state(folder: str | Path) -> LoadedState:
    """Read a state folder written by `save_training_state`; explains what is missing."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_state_info(folder)
    progress = Progress(
        global_step=int(info["current_step"]),
        epoch=int(info["current_epoch"]),
        batch_in_epoch=int(info.get("batch_in_epoch", 0)),
    )
    scaler = torch.load(folder / "scaler.pt", weights_only=True) if (folder / "scaler.pt").is_file() else None
    return LoadedState(
        progress=progress,
        trained=load_file(str(folder / TRAINED_FILE)),
        optimizer_state=_load_pickle(folder / "optimizer.pt"),
        scheduler_state=_load_pickle(folder / "scheduler.pt"),
        scaler_state=scaler,
        info=info,
    )


def _load_pickle(path: Path):
    """Optimizer/scheduler states hold only tensors and plain values: refuse anything that runs code."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported as a resume problem
        raise ResumeError(f"--resume: cannot read {path} ({type(err).__name__}: {err})") from err


class ResumeError(UserError, ValueError):
    """A --resume folder that cannot be used (named in the message)."""


def progress_dict(progress: Progress) -> dict:
    return asdict(progress)


def parse_state_name(name: str) -> tuple[str, int] | None:
    """('epoch', 2) for 'x-000002-state', ('step', 500) for 'x-step00000500-state', else None."""
    match = re.search(r"-step(\d{8})-state$", name)
    if match:
        return "step", int(match.group(1))
    match = re.search(r"-(\d{6})-state$", name)
    if match:
        return "epoch", int(match.group(1))
    return None
