"""The run's output folders, checked before any model loads, held by one run at a time, and a rescue for saves.

- `output_folder_problems`: --output_dir / --logging_dir must be folders this process can write to
  (probed by writing a file, which also catches read-only mounts and root-squashed shares).
- `latent_cache_folder_problems`: with --cache_latents_to_disk, the image folders that still need cache files.
- `hold_output_folder`: a lock file in --output_dir, so a second run with the same folder stops at once
  instead of overwriting the first run's files (released by the OS even when the process is killed).
- `clean_interrupted_saves`: leftovers of saves cut off by kill -9 or a power loss (only under the lock).
- `rescue_folders`: where a save goes when --output_dir stops accepting files mid-run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from library.errors import UserError, describe_os_error
from library.fileio import restore_interrupted_replacements

logger = logging.getLogger(__name__)

LOCK_FILE = ".sd-trainer.lock"
RESCUE_ENV = "SD_TRAINER_RESCUE_DIR"


class OutputFolderBusy(UserError, RuntimeError):
    """Another training run holds the lock on this --output_dir."""


def writable_folder_problem(option: str, folder: str | os.PathLike, create: bool = True) -> str | None:
    """Why `folder` cannot take files (None if it can). Creates it when missing and `create` is set."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{option} {path}: this is a file, not a folder; give a folder (it is created when missing)"
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        return f"{option} {path}: cannot write files there ({describe_os_error(err, with_path=False)})"
    return None


def output_folder_problems(args) -> list[str]:
    problems = []
    if args.output_dir:
        problem = writable_folder_problem("--output_dir", args.output_dir)
        if problem:
            problems.append(problem)
    if getattr(args, "logging_dir", None):
        problem = writable_folder_problem("--logging_dir", args.logging_dir)
        if problem:
            problems.append(problem)
    return problems


def latent_cache_folder_problems(group, to_disk: bool) -> list[str]:
    """Folders where --cache_latents_to_disk must write a cache file but cannot."""
    if not to_disk:
        return []
    from library.data.latent_cache import find_cache_file

    folders = sorted({
        item.image_path.parent
        for item in group.cache_items()
        if not find_cache_file(item.image_path, item.original_size).is_file()
    })  # fmt: skip
    problems = []
    for folder in folders:
        problem = writable_folder_problem("--cache_latents_to_disk", folder, create=False)
        if problem:
            problems.append(
                f"{problem}. The .npz latent files are written beside the images: make the folder writable, or "
                "use --cache_latents (in memory) instead"
            )
    return problems


# ---------------------------------------------------------------- one run per folder


def _lock_owner(path: Path) -> str:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
    return f"{owner.get('script', 'a training run')} (pid {owner.get('pid')} on {owner.get('host')}, started {started})"


@contextlib.contextmanager
def hold_output_folder(folder: str | os.PathLike, script: str, enabled: bool = True) -> Iterator[None]:
    """Hold `<folder>/.sd-trainer.lock` for the block; refuse at once if another run holds it.

    `enabled=False` (the non-main processes of a multi-process run) holds nothing.
    """
    if not enabled:
        yield
        return
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        locked = _try_lock(fd)
        if not locked:
            raise OutputFolderBusy(
                f"--output_dir {folder}: another run is writing there: {_lock_owner(path)}. Wait for it to finish, "
                "or give this run another --output_dir"
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "script": f"{script}.py", "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner).encode())
        yield
    finally:
        if locked:  # removed while still held; a killed run leaves it behind, unlocked, and the next run reuses it
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:  # e.g. ENOLCK on some network filesystems: run unguarded rather than not at all
        logger.warning("cannot lock the output folder (%s); make sure no other run writes there", err.strerror)
        return True


def clean_interrupted_saves(folder: str | os.PathLike) -> list[str]:
    """Finish or remove what interrupted saves left in `folder`; returns what was done (for the log).

    Call only while holding the folder's lock: a running save's temporary files look the same.
    """
    return restore_interrupted_replacements(folder)


# ---------------------------------------------------------------- rescue


def rescue_folders(output_dir: str | os.PathLike) -> Iterable[Path]:
    """Places to try, in order, when --output_dir refuses a save: $SD_TRAINER_RESCUE_DIR, the user's cache, temp."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(output_dir).name or 'output'}"
    roots = []
    if os.environ.get(RESCUE_ENV):
        roots.append(Path(os.environ[RESCUE_ENV]))
    roots.append(Path.home() / ".cache" / "sd-trainer" / "rescued")
    roots.append(Path(tempfile.gettempdir()) / "sd-trainer-rescued")
    for root in roots:
        yield root / stamp


def write_failure_reason(err: Exception, folder: Path, needed_bytes: int) -> str:
    """Why a save into `folder` failed, in words: the OS error, or a full disk behind a library's own message.

    torch's zip writer reports a full disk as "unexpected pos ..." and safetensors wraps OS errors in
    its own text; the free space (the failed file is already removed) and the embedded errno tell.
    """
    if isinstance(err, OSError):
        return describe_os_error(err)
    text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    code = re.search(r"Os \{ code: (\d+)", text)
    if code:
        number = int(code.group(1))
        return describe_os_error(OSError(number, os.strerror(number), str(folder)))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    if free < needed_bytes * 2:
        return f"the disk is full: {free / 2**20:.0f} MiB free, a save needs about {needed_bytes * 2 / 2**20:.0f} MiB; {text}"
    return f"{type(err).__name__}: {text}"
