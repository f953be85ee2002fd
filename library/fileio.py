"""Atomic file and folder writes: a failed or interrupted save never destroys the previous good copy.

Files written here get the mode the user's umask gives new files (safetensors itself writes 0600,
which a UI running as another user could not read).
"""

from __future__ import annotations

import contextlib
import os
import re
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
        give_umask_mode(tmp)
        _replace(tmp, target)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file_named_as(target: str | os.PathLike) -> Iterator[Path]:
    """Like `atomic_path`, for writers that pick the format by the file name (a third-party network's
    `save_weights` writes safetensors only to a `.safetensors` name): the temporary path has `target`'s
    own name, inside a hidden staging folder beside it that `restore_interrupted_replacements` tidies."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        inner = staging / target.name
        yield inner
        give_umask_mode(inner)
        os.replace(inner, target)
    finally:
        _remove(staging)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (no window with umask 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: Path) -> None:
    """chmod `path` (and, for a folder, everything in it) to what a plain `open`/`mkdir` would have made."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not path.is_dir():
        if path.is_file():
            os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def restore_interrupted_replacements(folder: str | os.PathLike) -> list[str]:
    """Tidy what `atomic_path` saves cut off by a crash left in `folder`; returns a line per action.

    A `.<name>.old-*` copy whose `<name>` is missing is the last complete version (the crash fell between
    the two renames of a folder swap): it is put back. Other `.old-*` and every `.tmp-*` (never committed)
    are removed. Only safe while no save is running in `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    actions = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None:
            if entry.name.startswith(".write-test-"):
                _remove(entry)
            continue
        target = folder / match.group("name")
        if match.group("kind") == "old" and not target.exists():
            os.replace(entry, target)
            actions.append(f"restored {target} from an interrupted save")
        else:
            _remove(entry)
            actions.append(f"removed {entry.name} (left by an interrupted save)")
    return actions


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


def user_cache_dir() -> Path:
    """The per-user cache folder (never inside a dataset): ``$SD_TRAINER_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/sd-trainer`` (an absolute XDG_CACHE_HOME only, as the XDG spec says), else
    ``~/.cache/sd-trainer``. Not created here."""
    own = os.environ.get("SD_TRAINER_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "sd-trainer"
    return Path.home() / ".cache" / "sd-trainer"
