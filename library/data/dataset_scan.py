"""Subsets -> image records: list the images, find their captions, read their sizes (dataset-config.md §6).

Built for large folders: one ``os.scandir`` per folder, caption files looked up in the set of names that
scan returned (no ``stat`` per image), caption files and image headers read in a thread pool in chunks
(one task per few hundred files, so the pool's own overhead stays small), and one small NamedTuple per
image. Problems are collected, never raised one at a time, so the user sees all of them in one message.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence, TypeVar

from library.data.captions import (
    CaptionFileError,
    caption_file_candidates,
    normalize_caption_extension,
    read_caption_file,
)
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.image_headers import size_or_reason
from library.data.images import image_extensions

__all__ = [
    "ImageRecord",
    "ScanReport",
    "UnreadableImagesError",
    "metadata_caption",
    "parallel_map",
    "read_metadata_file",
    "read_sizes",
    "scan_subset",
]

# Files per thread-pool task: large enough that futures cost little, small enough to balance threads.
_CHUNK = 256
_T = TypeVar("_T")
_R = TypeVar("_R")


class ImageRecord(NamedTuple):
    """One image of a subset: absolute path, raw caption (before §8 processing) and (width, height)."""

    path: str
    caption: str
    width: int
    height: int


@dataclass
class ScanReport:
    """What scanning found besides the records: warnings to show, and problems that stop the run."""

    warnings: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    caption_errors: list[str] = field(default_factory=list)


class UnreadableImagesError(RuntimeError):
    """Images that cannot be decoded (or caption files that cannot be read), all listed in one message."""

    def __init__(self, unreadable: Sequence[tuple[str, str]], caption_errors: Sequence[str] = ()) -> None:
        self.unreadable = list(unreadable)
        self.caption_errors = list(caption_errors)
        lines = []
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} image file(s) cannot be read:")
            lines += [f"  {path}: {reason}" for path, reason in self.unreadable]
            lines.append(
                "Fix: re-save or replace these files, or move them out of the dataset folder; "
                "or pass --skip_unreadable_images to train without them (a warning lists what was skipped)."
            )
        if self.caption_errors:
            lines.append(f"{len(self.caption_errors)} caption file(s) cannot be used:")
            lines += [f"  {message}" for message in self.caption_errors]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (type(self), (self.unreadable, self.caption_errors))


# ---------------------------------------------------------------- helpers


def parallel_map(function: Callable[[_T], _R], items: Sequence[_T], workers: int | None = None) -> list[_R]:
    """``[function(x) for x in items]``, on ``workers`` threads in chunks when ``workers`` > 1.

    Serial by default: for files in the page cache the work is GIL-bound Python and threads made it
    2-4x slower (measured on 2 cores); threads pay off on network or cold disks, so callers may ask.
    """
    if not workers or workers <= 1 or len(items) <= _CHUNK:
        return [function(item) for item in items]
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda chunk: [function(item) for item in chunk], chunks)
        return [result for chunk_result in results for result in chunk_result]


def read_sizes(paths: Sequence[str], workers: int | None = None) -> list[tuple[int, int] | str]:
    """(width, height) from each header, or the reason it cannot be read."""
    return parallel_map(size_or_reason, paths, workers)


def _folder_names(folder: str) -> tuple[list[str], set[str]]:
    """(sorted image file names, every file name) of a folder, from one scandir."""
    extensions = image_extensions()
    images, names = [], set()
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            names.add(name)
            # hidden files (and macOS "._x.png" forks) are skipped, as list_images does
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions and entry.is_file():
                images.append(name)
    images.sort()
    return images, names


def _caption_or_error(path: str, enable_wildcard: bool) -> str | CaptionFileError:
    try:
        return read_caption_file(path, enable_wildcard)
    except CaptionFileError as error:
        return error


# ---------------------------------------------------------------- DreamBooth kind


def _find_caption_file(folder: str, image_name: str, extension: str, names: set[str]) -> str | None:
    stem = os.path.splitext(image_name)[0]
    if stem + extension in names:  # the common case, without building Path objects
        return os.path.join(folder, stem + extension)
    for candidate in caption_file_candidates(os.path.join(folder, image_name), extension)[1:]:
        if candidate.name in names:
            return str(candidate)
    return None


def _scan_dreambooth(subset: SubsetBlueprint, report: ScanReport, workers: int | None) -> list[tuple[str, str, None]]:
    folder = os.path.abspath(subset.image_dir)
    image_names, names = _folder_names(folder)
    extension = normalize_caption_extension(subset.caption_extension or "")
    caption_files = [_find_caption_file(folder, name, extension, names) if extension else None for name in image_names]
    to_read = [path for path in caption_files if path is not None]
    texts = dict(zip(to_read, parallel_map(lambda p: _caption_or_error(p, subset.enable_wildcard), to_read, workers)))
    fallback = subset.class_tokens or ""
    entries, uncaptioned = [], []
    for name, caption_file in zip(image_names, caption_files):
        path = os.path.join(folder, name)
        text = texts.get(caption_file) if caption_file else None
        if isinstance(text, CaptionFileError):
            report.caption_errors.append(str(text))
            continue
        if text is None:
            text = fallback
            if not fallback:
                uncaptioned.append(path)
        entries.append((path, text, None))
    if uncaptioned:
        report.warnings.append(
            f"{len(uncaptioned)} image(s) in {folder} have no caption file ('<name>{extension}') and the subset "
            f"has no class_tokens: they train with an EMPTY caption (first: {uncaptioned[0]}). "
            "Add caption files or set class_tokens."
        )
    if not image_names:
        report.warnings.append(f"no images found in {folder}")
    return entries


# ---------------------------------------------------------------- fine-tuning kind


def read_metadata_file(path: str) -> list[tuple[str, dict]]:
    """(key, entry) pairs of a metadata ``.json`` (key -> entry) or ``.jsonl`` (one object with image_path per line)."""
    with open(path, encoding="utf-8-sig") as file:
        if path.lower().endswith(".jsonl"):
            pairs = []
            for number, line in enumerate(file, 1):
                if line.strip():
                    entry = json.loads(line)
                    if "image_path" not in entry:
                        raise ValueError(f"{path} line {number}: no 'image_path' in {line.strip()[:80]}")
                    pairs.append((entry["image_path"], entry))
            return pairs
        return list(json.load(file).items())


def _resolve_key(key: str, folder: str | None, names: set[str], extensions: Sequence[str]) -> str | None:
    """Image path of a metadata key: absolute path, ``image_dir/key``, or ``image_dir/<stem><any image ext>``."""
    if os.path.isabs(key):
        if os.path.isfile(key):
            return key
        return next((key + ext for ext in extensions if os.path.isfile(key + ext)), None)
    if folder is None:
        return None
    if key in names or os.path.isfile(os.path.join(folder, key)):  # key with its extension (or a sub-path)
        return os.path.join(folder, key)
    for ext in extensions:
        for candidate in (key + ext, key + ext.upper()):
            if candidate in names:
                return os.path.join(folder, candidate)
    return None


def metadata_caption(entry: dict, separator: str, enable_wildcard: bool) -> str:
    """``caption``, then ``separator`` + ``tags`` when tags are present (on every line with wildcards)."""
    caption = entry.get("caption") or ""
    tags = entry.get("tags") or ""
    if not tags:
        return caption
    if not caption:
        return tags
    if enable_wildcard:
        return "\n".join(line + separator + tags for line in caption.split("\n"))
    return caption + separator + tags


def _scan_fine_tuning(subset: SubsetBlueprint, report: ScanReport) -> list[tuple[str, str, tuple[int, int] | None]]:
    folder = os.path.abspath(subset.image_dir) if subset.image_dir else None
    names = _folder_names(folder)[1] if folder and os.path.isdir(folder) else set()
    extensions = image_extensions()
    entries, missing, empty = [], [], 0
    for key, entry in read_metadata_file(subset.metadata_file):
        path = _resolve_key(key, folder, names, extensions)
        if path is None:
            missing.append(key)
            continue
        caption = metadata_caption(entry, subset.caption_separator, subset.enable_wildcard)
        empty += not caption
        size = entry.get("image_size")
        entries.append((os.path.abspath(path), caption, (int(size[0]), int(size[1])) if size else None))
    if missing:
        report.warnings.append(
            f"{len(missing)} key(s) of {subset.metadata_file} match no image (e.g. {missing[0]!r}); skipped. "
            "Relative keys are looked up in image_dir as <key> or <key>.<image extension>."
        )
    if empty:
        report.warnings.append(f"{empty} image(s) in {subset.metadata_file} have neither caption nor tags")
    return entries


# ---------------------------------------------------------------- public entry


def scan_subset(
    subset: SubsetBlueprint,
    dataset: DatasetBlueprint,
    report: ScanReport | None = None,
    workers: int | None = None,
) -> list[ImageRecord]:
    """Every usable image of a subset with its raw caption and size.

    Problems go into ``report``; without one, unreadable images or caption files raise
    ``UnreadableImagesError`` and warnings are dropped.
    """
    own_report = report is None
    report = report or ScanReport()
    if dataset.kind == "fine_tuning" or subset.metadata_file:
        entries = _scan_fine_tuning(subset, report)
    else:  # DreamBooth and mask kinds list the image folder
        entries = _scan_dreambooth(subset, report, workers)
    unsized = [path for path, _, size in entries if size is None]
    sizes = dict(zip(unsized, read_sizes(unsized, workers)))
    records = []
    for path, caption, size in entries:
        size = size or sizes[path]
        if isinstance(size, str):
            report.unreadable.append((path, size))
        else:
            records.append(ImageRecord(path, caption, size[0], size[1]))
    if own_report and (report.unreadable or report.caption_errors):
        raise UnreadableImagesError(report.unreadable, report.caption_errors)
    return records
