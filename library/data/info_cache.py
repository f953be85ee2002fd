"""``cache_info`` (``--cache_info``, or the dataset-config key): remember what scanning an image folder read.

The file is sd-scripts' ``<image_dir>/metadata_cache.json``, one entry per image, keyed by the image's path:
``{"<image path>": {"caption": "...", "resolution": [width, height]}, ...}``. sd-scripts reads only those
two keys and trusts them blindly; the entries written here add keys of their own (sd-scripts ignores them)
so that nothing stale is ever used:

- ``image_stat``: ``[size, mtime_ns]`` of the image when its size was read;
- ``caption_file``: the caption file's name (``null``: none; ``caption`` is then the subset's class_tokens,
  as sd-scripts writes it, and is not reused: it comes from the current class_tokens);
- ``caption_stat``: ``[size, mtime_ns]`` of that caption file, and ``wildcard``: whether it was read with
  enable_wildcard;
- ``checked``: ``true`` once the image decoded completely (the check ``check_images_readable`` makes).

The folder is still listed on every run (new and removed images are seen). An entry's caption is reused only
when the caption file has the same name, stat and wildcard setting; its size and ``checked`` only when the
image's stat is unchanged; everything else is read again. A stat taken less than ``RACY_NS`` before the scan
is not written (the file could still change within the same timestamp tick), so that file is read again next
time. Entries without stat keys (a file written by sd-scripts) are therefore never trusted: they are re-read
and rewritten with the keys. The file is rewritten (atomically) only when an entry changed, and only where the
folder can be written; otherwise the run goes on and one warning says so.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterable, Sequence

from library.fileio import atomic_path

__all__ = ["CACHE_FILE_NAME", "NEED", "RACY_NS", "FolderInfoCache", "checked_images", "save_info_caches"]

CACHE_FILE_NAME = "metadata_cache.json"  # sd-scripts' IMAGE_INFO_CACHE_FILE
# A file modified this close to the scan might change again within its mtime's granularity (2 s on FAT).
RACY_NS = 2_000_000_000


class _Need:
    """Marks a value the cache cannot give: the caller reads it from the file."""

    def __repr__(self) -> str:
        return "NEED"


NEED = _Need()


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _name_of(key: str, prefix: str) -> str:
    """The file name an entry key names: the key less this folder, else its last path part (any separator)."""
    if key.startswith(prefix):
        return key[len(prefix) :]
    return key.replace("\\", "/").rsplit("/", 1)[-1]


def _is_size(value) -> bool:
    """[width, height], two positive integers (true/false are not sizes)."""
    return (
        type(value) is list
        and len(value) == 2
        and type(value[0]) is int
        and type(value[1]) is int
        and value[0] >= 1
        and value[1] >= 1
    )


class FolderInfoCache:
    """The ``metadata_cache.json`` of one image folder during one run (shared by the subsets of that folder).

    Per subset: ``lookup`` says what the entries can give, the caller reads the rest, ``record`` makes the
    entries from the result; after the decode check ``mark_checked``, then ``save``.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, CACHE_FILE_NAME)
        self.problem: str | None = None  # why an existing file was ignored
        self.loaded: dict = {}
        if os.path.isfile(self.path):
            self.loaded, self.problem = _read_file(self.path)
        self._prefix = folder if folder.endswith(os.sep) else folder + os.sep
        self._old = {
            _name_of(key, self._prefix): entry for key, entry in self.loaded.items() if isinstance(entry, dict)
        }
        self.entries: dict[str, dict] = {}  # image path -> the entry to write
        self.checked: set[str] = set()  # image paths whose entry says they decoded, their stat unchanged
        # per image of the last lookup: (image stat, caption stat), and the old entry when it holds exactly that
        self._stats: list[tuple[list[int] | None, list[int] | None]] = []
        self._reusable: list[dict | None] = []
        self._racy_after = time.time_ns() - RACY_NS

    def lookup(
        self, names: Sequence[str], paths: Sequence[str], caption_paths: Sequence[str | None], wildcard: bool
    ) -> list[list]:
        """Per image ``[caption text or None (no caption file) or NEED, (width, height) or NEED]``.

        ``caption_paths``: this folder's path plus the caption file's name (None: no caption file). Costs one
        ``stat`` per image and per caption file; NEED where the entry is missing or stale.
        """
        known, stats, reusable = [], [], []
        self._stats, self._reusable = stats, reusable
        old_entries, checked, cut, wildcard = self._old, self.checked, len(self._prefix), bool(wildcard)
        for name, path, caption_path in zip(names, paths, caption_paths):
            image_stat = _stat(path)
            caption_stat = None if caption_path is None else _stat(caption_path)
            stats.append((image_stat, caption_stat))
            old = old_entries.get(name)
            if old is None:
                known.append([None if caption_path is None else NEED, NEED])
                reusable.append(None)
                continue
            size = text = NEED
            if image_stat is not None and old.get("image_stat") == image_stat:
                resolution = old.get("resolution")
                if _is_size(resolution):
                    size = (resolution[0], resolution[1])
                    if old.get("checked") is True:
                        checked.add(path)
            if caption_path is None:
                text = None
                same_caption = "caption_file" in old and old["caption_file"] is None
            elif (
                caption_stat is not None
                and old.get("caption_stat") == caption_stat
                and old.get("caption_file") == caption_path[cut:]
                and old.get("wildcard") is wildcard
                and type(old.get("caption")) is str
            ):
                text = old["caption"]
                same_caption = True
            else:
                same_caption = False
            known.append([text, size])
            reusable.append(old if same_caption and size is not NEED else None)
        return known

    def record(
        self, paths: Sequence[str], caption_paths: Sequence[str | None], loaded: Sequence, wildcard: bool, fallback: str
    ) -> None:
        """Make the entries of the images the last ``lookup`` saw, from what was finally known of them (``loaded``:
        ``(text or None or an error, size or the reason it cannot be read)``); failed images get none."""
        racy_after, entries, cut = self._racy_after, self.entries, len(self._prefix)
        for path, caption_path, (text, size), (image_stat, caption_stat), old in zip(
            paths, caption_paths, loaded, self._stats, self._reusable
        ):
            if isinstance(size, str) or not (text is None or isinstance(text, str)):
                entries.pop(path, None)
                self.checked.discard(path)
                continue
            if old is not None and (text is not None or old.get("caption") == fallback):
                entries[path] = old  # unchanged: the very same entry (also makes the "changed?" test cheap)
                continue
            entry = {"caption": fallback if text is None else text, "resolution": [size[0], size[1]]}
            if image_stat is not None and image_stat[1] < racy_after:
                entry["image_stat"] = image_stat
            entry["caption_file"] = None if caption_path is None else caption_path[cut:]
            if caption_path is not None:
                if caption_stat is not None and caption_stat[1] < racy_after:
                    entry["caption_stat"] = caption_stat
                entry["wildcard"] = bool(wildcard)
            entry["checked"] = path in self.checked
            entries[path] = entry

    def mark_checked(self, unreadable: set[str]) -> None:
        """Every image of the entries decoded completely but those in ``unreadable`` (dropped: never cached).
        Entries are replaced, never changed in place: some are the very objects read from the file."""
        entries = self.entries
        for path, entry in list(entries.items()):
            if path in unreadable:
                del entries[path]
                self.checked.discard(path)
            elif entry.get("checked") is not True:
                entries[path] = {**entry, "checked": True}

    def save(self) -> str | None:
        """Write the file if an entry changed; a warning when it cannot be written, else None."""
        if self.entries == self.loaded:
            return None
        if not os.access(self.folder, os.W_OK):
            return f"{self.folder} (read-only)"
        encode = json.JSONEncoder(ensure_ascii=False).encode
        lines = ",\n".join(f"{encode(path)}: {encode(entry)}" for path, entry in self.entries.items())
        try:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8", newline="\n") as file:
                    file.write("{\n" + lines + "\n}\n" if lines else "{}\n")
        except OSError as error:
            return f"{self.folder} ({error.strerror or error})"
        self.loaded = self.entries
        return None


def _read_file(path: str) -> tuple[dict, str | None]:
    """The entries of a cache file, or ({}, why it cannot be used)."""
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read().decode("utf-8-sig"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"{path}: not a readable cache file ({error}); it is made again"
    if not isinstance(data, dict):
        return {}, f"{path}: holds no JSON object; it is made again"
    return data, None


def checked_images(caches: Iterable[FolderInfoCache]) -> set[str]:
    """Images whose entry says they decoded, their file unchanged since: the full decode check can skip them."""
    return set().union(*(cache.checked for cache in caches))


def save_info_caches(caches: Iterable[FolderInfoCache], unreadable: Iterable[tuple[str, str]] | None) -> list[str]:
    """After the full decode check (``unreadable``: every (path, reason) the scan and the check found; None: no
    check ran) mark every other image checked and drop the unreadable ones, write each file whose entries
    changed, and return the warnings (at most one for all the folders that cannot be written)."""
    caches = list(caches)
    if unreadable is not None:
        bad = {str(path) for path, _ in unreadable}
        for cache in caches:
            cache.mark_checked(bad)
    warnings = [cache.problem for cache in caches if cache.problem]
    unwritten = [problem for problem in (cache.save() for cache in caches) if problem]
    if unwritten:
        warnings.append(
            f"cache_info: cannot write {CACHE_FILE_NAME} in {len(unwritten)} folder(s): "
            + "; ".join(unwritten[:5])
            + ("; ..." if len(unwritten) > 5 else "")
            + ". Training goes on, but those folders are read in full on every run; make them writable, "
            "or leave cache_info off for them"
        )
    return warnings
