"""Reading and writing single-file state dicts (.safetensors and .ckpt/.pt) safely.

`.ckpt` files are pickles; a pickle can run arbitrary code when loaded. We only ever
load them with `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers, and we never fall back to an unsafe load.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.fileio import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class UnsafeCheckpointError(UserError, RuntimeError):
    """A pickle checkpoint that asks to build objects other than tensors (it could execute code)."""


class NotACheckpointError(UserError, ValueError):
    """A file that is no weights file at all (text, an image, a truncated download), named in the message."""


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = 0x80


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a .safetensors/.ckpt/.pt weights file, from its first bytes (None if it can).

    Checked before anything is unpickled or memory-mapped, so a wrong file gets a message about what it
    is rather than a parser's complaint (or a warning about unsafe pickles).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        return f"{path}: not a weights file (expected .safetensors, .ckpt, .pt, .pth or .bin)"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return f"{path}: the file is empty (an interrupted download or copy?); get the file again"
    looks = _what_it_looks_like(head)
    if suffix in SAFETENSORS_SUFFIXES:
        header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if len(head) < 9 or header_len + 8 > size or head[8:9] != b"{":
            return (
                f"{path}: not a valid .safetensors file ({looks}; "
                f"{size} bytes); an interrupted download or a renamed file? Get the file again"
            )
        return None
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL_BYTE:
        return None
    return f"{path}: not a PyTorch checkpoint ({looks}); an interrupted download or a renamed file? Get the file again"


def check_weights_file(path: str | os.PathLike) -> Path:
    """`path` as a Path once it is known to exist and look like a weights file (else the error that says why)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    problem = checkpoint_file_problem(path)
    if problem:
        raise NotACheckpointError(problem)
    return path


def _what_it_looks_like(head: bytes) -> str:
    if head.startswith(ZIP_MAGIC):
        return "it is a zip archive"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF")):
        return "it is an image"
    if head.lstrip().startswith((b"<", b"{")):
        return "it holds HTML/JSON text, perhaps an error page saved instead of the file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "its first bytes are not a known weights format"
    return f"it holds text: {text.strip()[:40]!r}"


def _lightning_checkpoint_stub() -> type:
    # Old SD .ckpt files pickle a PyTorch Lightning callback object next to the weights.
    # It holds no code we need; allowing this inert stub under that name lets
    # weights_only loading read those files without importing Lightning.
    stub = type("ModelCheckpoint", (), {"__setstate__": lambda self, state: None})
    stub.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    return stub


def read_pickle_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True; a refused pickle raises UnsafeCheckpointError."""
    path = str(path)
    try:
        with torch.serialization.safe_globals([_lightning_checkpoint_stub()]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it is a pickle that asks to create objects other than tensors, "
            "which could run code on this machine, so it was not loaded (nothing in it was executed). "
            f"Loader said: {_refusal_reason(err)} "
            "If you trust the file, convert it to .safetensors with a tool you trust, or ask its author for a "
            ".safetensors version."
        ) from None


def _refusal_reason(err: Exception) -> str:
    """The line of torch's refusal that names the forbidden global (skipping its 'retry unsafely' advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or ["unsupported content"])[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int, int]:
    """(tensors, epoch, global_step) of a single-file checkpoint in one read.

    The LDM `state_dict` level of .ckpt files is unwrapped; safetensors files carry no counters (0, 0).
    """
    path = check_weights_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path)), 0, 0
    data = read_pickle_checkpoint(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not contain a state dict (found {type(data).__name__})")
    epoch, step = int(data.get("epoch", 0) or 0), int(data.get("global_step", 0) or 0)
    if isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, epoch, step


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint."""
    return read_checkpoint(path)[0]


def read_checkpoint_counters(path: str | os.PathLike) -> tuple[int, int]:
    """(epoch, global_step) stored in an LDM .ckpt, 0s for safetensors or when absent."""
    return read_checkpoint(path)[1:]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_state_dict(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    ckpt_extra: dict[str, Any] | None = None,
) -> None:
    """Atomically write tensors as .safetensors (with metadata) or as an LDM-style pickle.

    Pickle files are `{"state_dict": ..., **ckpt_extra}` (LDM layout) when `ckpt_extra`
    is given, else the plain dict of tensors.
    """
    path = Path(path)
    tensors = _unshared_cpu_tensors(state_dict)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            payload = tensors if ckpt_extra is None else {"state_dict": tensors, **ckpt_extra}
            torch.save(payload, str(tmp))


def _unshared_cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning any that share storage (safetensors refuses shared memory)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and (ident in seen or tensor.untyped_storage().nbytes() != tensor.nbytes):
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        out[key] = tensor
    return out
