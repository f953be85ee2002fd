"""Hashes of model files and of safetensors contents (reference/formats.md §2.5), below every wing.

Networks hash the files they write and the trainer hashes the base model for metadata; both
use these, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NOFILE, IS_A_DIRECTORY = "NOFILE", "IsADirectory"


def precalculate_safetensors_hashes(state_dict: dict[str, "torch.Tensor"], metadata: dict[str, str] | None):
    """(sshs_model_hash, sshs_legacy_hash) of the file these tensors + ss_* metadata make.

    Only ss_* keys take part so that editing user metadata (modelspec.*) later does not change
    the hash; the bytes come from safetensors' own serializer so the layout matches the file.
    """
    import safetensors.torch

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    buffer = safetensors.torch.save(state_dict, ss_only)
    header_len = int.from_bytes(buffer[:8], "little")
    model_hash = hashlib.sha256(buffer[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(buffer[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def model_file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(old A1111 8-hex hash: 64 KiB at 1 MiB, full-file SHA-256) of a base model / VAE file."""
    try:
        legacy, full = hashlib.sha256(), hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(0x100000)
            legacy.update(f.read(0x10000))
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                full.update(chunk)
        return legacy.hexdigest()[:8], full.hexdigest()
    except FileNotFoundError:
        return NOFILE, NOFILE
    except (IsADirectoryError, PermissionError):
        return IS_A_DIRECTORY, IS_A_DIRECTORY
