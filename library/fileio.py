"""Atomic file and folder writes: a failed or interrupted save never destroys the previous good copy."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    Works for files and folders. The temporary name lives in the same folder so the
    final rename stays on one filesystem (and is atomic for files).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _replace(tmp, target)
    finally:
        _remove(tmp)


def _replace(src: Path, dst: Path) -> None:
    if src.is_dir():
        # Folders cannot be swapped atomically; move the old one aside first so the
        # window without a complete copy is a single rename.
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
        os.replace(src, dst)
        if old is not None:
            _remove(old)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
