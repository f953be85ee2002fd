"""The decode check of dataset images: remembered between runs, run in parallel, in the background when asked.

Before training every image is decoded once (``images.unreadable_reason``), so that a corrupt or truncated file
stops the run before it starts, never halfway through. Three things keep that cheap:

- **Remembered.** After a check, every image that decoded is recorded with the size and modification time
  (``st_size``, ``st_mtime_ns``) it had just before it was decoded, in one file per image folder in the per-user
  cache, ``fileio.user_cache_dir()/image-checks/<hash of the folder's absolute path>.json`` (nothing is written
  into dataset folders). The next check decodes only images that are new or whose size or mtime changed. As in
  info_cache.py, an image modified less than ``RACY_NS`` before the check started is not recorded (a change within
  the same timestamp tick could go unseen), an unreadable one never is, and a record made with another Pillow
  version is not used. A missing, unreadable or corrupt record file means "nothing checked yet"; one that cannot
  be written costs a re-check next time, nothing else.
- **Parallel.** The images left to decode are split across worker processes (forked, on Linux) or threads
  (elsewhere). For small images most of the time is Pillow's Python (opening, parsing chunks), which threads
  cannot run at once; processes also leave the caller's thread free to load a model meanwhile.
- **In the background.** ``ImageCheck(...)`` starts the work and returns; ``result()`` waits for the answer and
  writes the record. ``datasets.build_dataset_group(defer_readability_check=True)`` uses this so the trainer
  loads the model while the images are decoded.

The record file: ``{"format", "decoder" (Pillow version), "folder", "names": [...], "sizes": [...],
"mtimes_ns": [...]}`` (parallel arrays: 100,000 entries load in a few tens of milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

import PIL
from PIL import Image

from library.data.dataset_scan import UnreadableImagesError
from library.data.images import unreadable_reason
from library.data.info_cache import RACY_NS, save_info_caches
from library.fileio import atomic_path, user_cache_dir

__all__ = ["RECORD_FOLDER", "ImageCheck", "PendingCheck", "check_images_readable", "record_file"]

logger = logging.getLogger(__name__)

RECORD_FOLDER = "image-checks"  # inside user_cache_dir()
_FORMAT = "sd-trainer image check 1"
# Fewer images than this (and fewer bytes) are decoded at once in the calling thread: starting workers costs more.
PARALLEL_FROM_IMAGES = 128
PARALLEL_FROM_BYTES = 8 << 20
MAX_WORKERS = 8
BACKGROUND_NICENESS = 10  # worker processes of a background check run at this lower priority (Linux)

# One decoded image: (st_size, st_mtime_ns) taken before decoding (-1, -1 when it could not be taken), and
# why it cannot be decoded (None: it decodes completely).
Outcome = tuple  # (int, int, str | None)


def record_file(folder: str) -> Path:
    """Where the record of the images directly inside ``folder`` (an absolute path) is kept."""
    digest = hashlib.sha256(folder.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return user_cache_dir() / RECORD_FOLDER / f"{digest}.json"


def _decoder() -> str:
    return f"Pillow {PIL.__version__}"


class _Record:
    """One folder's record: image name -> (size, mtime_ns) of an image that decoded completely."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = record_file(folder)
        self.entries: dict[str, tuple] = self._read()
        self.changed = False

    def _read(self) -> dict[str, tuple]:
        try:
            with open(self.path, "rb") as file:
                data = json.loads(file.read())
            if (data["format"], data["decoder"], data["folder"]) != (_FORMAT, _decoder(), self.folder):
                return {}
            names, sizes, mtimes = data["names"], data["sizes"], data["mtimes_ns"]
            if not len(names) == len(sizes) == len(mtimes):
                return {}
            # values that are not integers can only fail to match a stat: such images are decoded again
            return dict(zip(names, zip(sizes, mtimes)))
        except FileNotFoundError:
            return {}
        except Exception as error:  # any damage (bad JSON, wrong types, no permission): check everything again
            logger.debug("image check record %s ignored: %s", self.path, error)
            return {}

    def save(self) -> None:
        if not self.changed:
            return
        values = list(self.entries.values())
        data = {
            "format": _FORMAT,
            "decoder": _decoder(),
            "folder": self.folder,
            "names": list(self.entries),
            "sizes": [value[0] for value in values],
            "mtimes_ns": [value[1] for value in values],
        }
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="ascii")  # ensure_ascii: any name
        except OSError as error:  # a read-only home, a full disk: the images are decoded again next time
            logger.debug("cannot write the image check record %s: %s", self.path, error)
            return
        self.changed = False


# ---------------------------------------------------------------- decoding in workers


def _outcome(path: str) -> Outcome:
    try:
        st = os.stat(path)  # before decoding: a change made while decoding then shows as a different stat
    except OSError:
        return -1, -1, unreadable_reason(path)
    return st.st_size, st.st_mtime_ns, unreadable_reason(path)


def _outcomes(paths: list[str]) -> list[Outcome]:
    return [_outcome(path) for path in paths]


def _child(connection, paths: list[str], niceness: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends its daemonic workers on exit
    if niceness:
        os.nice(niceness)
    connection.send(_outcomes(paths))
    connection.close()


def _can_fork() -> bool:
    # fork is cheap and needs no re-import; macOS has it but its system libraries are not fork-safe
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def default_workers(background: bool = False) -> int:
    """One worker per CPU this process may use (at most MAX_WORKERS); ``background``: one fewer, leaving the caller
    a CPU for what it does meanwhile (loading a model)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus - background))


class _Workers:
    """``_outcomes`` of ``paths`` split across ``count`` daemonic worker processes (fork) or daemon threads,
    started on construction; ``results()`` waits. A worker that dies has its share decoded again here."""

    def __init__(self, paths: list[str], count: int, niceness: int = 0) -> None:
        count = max(1, min(count, len(paths)))
        self._niceness = niceness
        self._total = len(paths)
        self._parts = [paths[i::count] for i in range(count)]  # interleaved: big and small files spread evenly
        self._answers: list[list[Outcome] | None] = [None] * count
        self._processes: list = []
        self._threads: list[threading.Thread] = []
        if _can_fork():
            try:
                self._start_processes()
                return
            except Exception as error:  # cannot fork (memory, limits, a daemonic caller): threads instead
                logger.debug("image check: no worker processes (%s); using threads", error)
                self.cancel()
        for i in range(count):
            thread = threading.Thread(target=self._run_part, args=(i,), name="image-check", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _start_processes(self) -> None:
        Image.init()  # every format plugin imported once here, never by a child (no import while forked)
        context = multiprocessing.get_context("fork")
        for part in self._parts:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_child, args=(sender, part, self._niceness), name="image-check", daemon=True
            )
            self._processes.append((process, receiver))
            process.start()
            sender.close()

    def _run_part(self, i: int) -> None:
        try:
            self._answers[i] = _outcomes(self._parts[i])
        except Exception:  # decoded again by results(), where the error surfaces
            self._answers[i] = None

    def results(self) -> list[Outcome]:
        for i, (process, receiver) in enumerate(self._processes):
            try:
                self._answers[i] = receiver.recv()
            except (EOFError, OSError):  # the worker died (killed, out of memory, a crash in a decoder)
                self._answers[i] = None
            receiver.close()
            process.join()
        for thread in self._threads:
            thread.join()
        merged: list = [None] * self._total
        count = len(self._parts)
        for i, answer in enumerate(self._answers):
            merged[i::count] = _outcomes(self._parts[i]) if answer is None else answer
        return merged

    def cancel(self) -> None:
        """Stop the worker processes (threads finish their share; they are daemons)."""
        for process, receiver in self._processes:
            if process.is_alive():
                process.terminate()
            receiver.close()
        for process, _ in self._processes:
            if process.pid is not None:
                process.join()
        self._processes = []


# ---------------------------------------------------------------- the check


class ImageCheck:
    """The decode check of ``paths``, started on construction; ``result()`` waits for it.

    Images the record says decoded before, unchanged since, are not decoded again (``remember=False``: every image
    is, and nothing is recorded). The rest are decoded in the calling thread when few, else by ``workers``
    processes or threads (default: one per CPU, at most ``MAX_WORKERS``; one fewer with ``background``, when the
    caller has work of its own meanwhile) while the caller goes on.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike],
        workers: int | None = None,
        remember: bool = True,
        background: bool = False,
    ) -> None:
        self._inputs = list(paths)
        self._racy_after = time.time_ns() - RACY_NS
        sep = os.sep
        absolute = [p if (p := os.fspath(x)).startswith(sep) else os.path.abspath(p) for x in self._inputs]
        self._absolute = absolute
        self._records: dict[str, _Record] | None = {} if remember else None
        todo, todo_bytes = self._not_remembered(absolute) if remember else (list(range(len(absolute))), 0)
        self._todo = todo
        self._result: list[tuple[Path, str]] | None = None
        self._cancelled = False
        self._outcomes: list[Outcome] | None = None
        self._workers: _Workers | None = None
        paths_to_decode = [absolute[i] for i in todo]
        if len(todo) < PARALLEL_FROM_IMAGES and todo_bytes < PARALLEL_FROM_BYTES:
            self._outcomes = _outcomes(paths_to_decode)
        else:
            # in the background the check yields the CPU to the caller's own work (the model loading it waits for)
            niceness = BACKGROUND_NICENESS if background else 0
            self._workers = _Workers(paths_to_decode, workers or default_workers(background), niceness)

    def _not_remembered(self, absolute: list[str]) -> tuple[list[int], int]:
        """(indices of the images to decode, their bytes): those the records do not hold with their current stat."""
        records, todo, todo_bytes, stat, sep = self._records, [], 0, os.stat, os.sep
        for index, path in enumerate(absolute):
            folder, _, name = path.rpartition(sep)
            record = records.get(folder)
            if record is None:
                record = records[folder] = _Record(folder)
            try:
                st = stat(path)
            except OSError:
                todo.append(index)
                continue
            if record.entries.get(name) != (st.st_size, st.st_mtime_ns):
                todo.append(index)
                todo_bytes += st.st_size
        return todo, todo_bytes

    @property
    def remembered(self) -> int:
        """Images not decoded: the record says they decoded before, unchanged since."""
        return len(self._absolute) - len(self._todo)

    @property
    def decoded(self) -> int:
        return len(self._todo)

    def result(self) -> list[tuple[Path, str]]:
        """Every image that cannot be decoded, with the reason, in input order (empty: all good). Waits for the
        workers, then records the images that decoded."""
        if self._result is None:
            if self._cancelled:
                raise RuntimeError("this image check was cancelled; it has no result")
            outcomes = self._outcomes if self._workers is None else self._workers.results()
            self._workers = None
            if self._records is not None:
                self._remember(outcomes)
            self._result = [
                (Path(self._inputs[index]), reason)
                for index, (_, _, reason) in zip(self._todo, outcomes)
                if reason is not None
            ]
        return self._result

    def cancel(self) -> None:
        """Give up (the caller failed for another reason): stop the workers, record nothing."""
        if self._workers is not None:
            self._workers.cancel()
            self._workers = None
        self._cancelled = True

    def _remember(self, outcomes: list[Outcome]) -> None:
        racy_after, records, sep = self._racy_after, self._records, os.sep
        for index, (size, mtime, reason) in zip(self._todo, outcomes):
            folder, _, name = self._absolute[index].rpartition(sep)
            record = records[folder]
            if reason is None and size >= 0 and mtime < racy_after:
                if record.entries.get(name) != (size, mtime):
                    record.entries[name] = (size, mtime)
                    record.changed = True
            elif record.entries.pop(name, None) is not None:
                record.changed = True
        for record in records.values():
            record.save()


def check_images_readable(
    paths: Iterable[str | os.PathLike], workers: int | None = None, remember: bool = True
) -> list[tuple[Path, str]]:
    """Every unreadable/empty/truncated file with its reason, in input order (empty list: all good); images that
    decoded in an earlier check and are unchanged since are not decoded again (``remember``)."""
    return ImageCheck(paths, workers, remember).result()


class PendingCheck:
    """The decode check a deferred build left running, and what its answer is waited for with."""

    def __init__(self, check: ImageCheck, info_caches: list) -> None:
        self.check = check
        self.info_caches = info_caches  # cache_info folders: written once the answer is known

    def finish(self) -> list[str]:
        """The warnings of writing the cache_info files; raises ``UnreadableImagesError`` as the build would have."""
        unreadable = [(str(path), reason) for path, reason in self.check.result()]
        warnings = save_info_caches(self.info_caches, unreadable)
        if unreadable:
            raise UnreadableImagesError(unreadable)
        return warnings

    def cancel(self) -> None:
        self.check.cancel()

    def __reduce__(self):
        raise TypeError("call finish_readability_check() before a DatasetGroup is copied to another process")
