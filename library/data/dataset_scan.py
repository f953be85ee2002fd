"""Subsets -> image records: list the images, find their captions, read their sizes (dataset-config.md §6).

Built for large folders (100k images in ~1.5-2 s on 2 cores, bench/bench_dataset_startup.py): one
``os.scandir`` per folder; caption files looked up in the set of names that scan returned (no ``stat``
per image); each caption file and image head read with one ``os.open``/``os.read`` (no buffered file
object, no Path object per image); metadata keys matched against the listing; one small NamedTuple
per image. Reads run serially unless the caller asks for threads (see ``parallel_map``). Problems
are collected, never raised one at a time, so the user sees all of them in one message.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence, TypeVar

from library.data.captions import (
    CaptionFileError,
    caption_from_bytes,
    normalize_caption_extension,
    read_small_file,
)
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.image_headers import size_or_reason
from library.data.images import face_from_name, image_extensions
from library.errors import UserError

__all__ = [
    "ImageRecord",
    "face_crop_warnings",
    "ScanReport",
    "UnreadableImagesError",
    "metadata_caption",
    "parallel_map",
    "paused_garbage_collection",
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


class UnreadableImagesError(UserError, RuntimeError):
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

    Serial by default: for files in the page cache the work is system calls plus GIL-bound Python, and
    threads were no faster for 100k small files on 2 cores (and 2-4x slower before reads used
    ``os.read``); threads pay off on network or cold disks, so callers may ask.
    """
    if not workers or workers <= 1 or len(items) <= _CHUNK:
        return [function(item) for item in items]
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda chunk: [function(item) for item in chunk], chunks)
        return [result for chunk_result in results for result in chunk_result]


@contextlib.contextmanager
def paused_garbage_collection():
    """Turn Python's cyclic garbage collector off for the block (back on after, if it was on).

    For work that allocates many small objects without making reference cycles: the collector would
    otherwise run full passes over every live object again and again while nothing can be freed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_sizes(paths: Sequence[str], workers: int | None = None) -> list[tuple[int, int] | str]:
    """(width, height) from each header, or the reason it cannot be read."""
    return parallel_map(size_or_reason, paths, workers)


def _folder_names(folder: str) -> tuple[list[str], set[str]]:
    """(sorted image file names, every file name) of a folder, from one scandir."""
    extensions = tuple(image_extensions())  # lower case, each with one dot: endswith == splitext's answer
    images, names = [], set()
    add_name, add_image = names.add, images.append
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            add_name(name)
            # hidden files (and macOS "._x.png" forks) are skipped, as list_images does
            if name.lower().endswith(extensions) and name[0] != "." and entry.is_file():
                add_image(name)
    images.sort()
    return images, names


# ---------------------------------------------------------------- DreamBooth kind


def _caption_file_name(image_name: str, extension: str, names: set[str]) -> str | None:
    """Name of the image's caption file in ``names``: ``<stem><ext>``, else the face-crop base name
    (``captions.caption_file_candidates`` on plain strings, without Path objects)."""
    stem = image_name[: image_name.rfind(".")]
    name = stem + extension
    if name in names:
        return name
    if stem.count("_") >= 4:
        base = stem.rsplit("_", 4)[0]
        if base and base + extension in names:
            return base + extension
    return None


def _read_image(
    path: str, caption_path: str | None, enable_wildcard: bool
) -> tuple[str | CaptionFileError | None, tuple[int, int] | str]:
    """(caption text, error or None without a caption file; size or the reason it cannot be read)."""
    text = None
    if caption_path is not None:
        try:
            text = caption_from_bytes(read_small_file(caption_path), caption_path, enable_wildcard)
        except CaptionFileError as error:
            text = error
        except OSError as error:  # no permission, a folder named like a caption file, ...
            text = CaptionFileError(
                f"cannot read caption file {caption_path}: {error.strerror or error}. "
                "Fix its permissions, or rename/remove it."
            )
    return text, size_or_reason(path)


def _scan_dreambooth(
    subset: SubsetBlueprint, report: ScanReport, workers: int | None
) -> list[tuple[str, str, tuple[int, int] | str]]:
    folder = os.path.abspath(subset.image_dir)
    image_names, names = _folder_names(folder)
    prefix = folder if folder.endswith(os.sep) else folder + os.sep  # os.path.join, without its cost
    extension = normalize_caption_extension(subset.caption_extension or "")
    paths = [prefix + name for name in image_names]
    caption_paths: list[str | None] = [None] * len(paths)
    if extension:
        for i, name in enumerate(image_names):
            caption_name = _caption_file_name(name, extension, names)
            if caption_name is not None:
                caption_paths[i] = prefix + caption_name
    wildcard = subset.enable_wildcard
    loaded = parallel_map(lambda i: _read_image(paths[i], caption_paths[i], wildcard), range(len(paths)), workers)
    fallback = subset.class_tokens or ""
    entries, uncaptioned = [], []
    for path, (text, size) in zip(paths, loaded):
        if text is None:
            text = fallback
            if not fallback:
                uncaptioned.append(path)
        elif isinstance(text, CaptionFileError):
            report.caption_errors.append(str(text))
            continue
        entries.append((path, text, size))
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
    """Absolute image path of a metadata key: ``image_dir/key``, ``image_dir/<key><any image ext>``, or an
    absolute path (with or without its extension).

    Keys that name a file of ``image_dir`` are found in its listing without touching the disk (the usual
    case: 100k keys cost no ``stat``); only absolute keys and sub-paths are looked up on disk. A file
    name never contains a path separator, so listing hits and disk lookups cannot disagree.
    """
    if folder is not None:
        prefix = folder if folder.endswith(os.sep) else folder + os.sep
        if key in names:  # the key with its extension
            return prefix + key
        for ext in extensions:
            for candidate in (key + ext, key + ext.upper()):
                if candidate in names:
                    return prefix + candidate
    if os.path.isabs(key):
        if os.path.isfile(key):
            return os.path.abspath(key)
        return next((os.path.abspath(key + ext) for ext in extensions if os.path.isfile(key + ext)), None)
    if folder is not None and os.path.isfile(os.path.join(folder, key)):  # a sub-path, "./name", or a
        return os.path.abspath(os.path.join(folder, key))  # name that differs only in case on Windows/macOS
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
        entries.append((path, caption, (int(size[0]), int(size[1])) if size else None))
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
    unsized = [path for path, _, size in entries if size is None]  # fine-tuning entries without image_size
    sizes = dict(zip(unsized, read_sizes(unsized, workers))) if unsized else {}
    records = []
    for path, caption, size in entries:
        if size is None:
            size = sizes[path]
        if isinstance(size, str):
            report.unreadable.append((path, size))
        else:
            records.append(ImageRecord(path, caption, size[0], size[1]))
    if own_report and (report.unreadable or report.caption_errors):
        raise UnreadableImagesError(report.unreadable, report.caption_errors)
    return records


def face_crop_warnings(dataset: DatasetBlueprint, records_per_subset: Sequence[list[ImageRecord]]) -> list[str]:
    """face_crop_aug_range that can do nothing: with bucketing (sd-scripts ignores it then), or no face names."""
    warnings = []
    for subset, records in zip(dataset.subsets, records_per_subset):
        if subset.face_crop_aug_range is None:
            continue
        where = subset.origin or subset.image_dir
        if dataset.enable_bucket:
            warnings.append(
                f"{where}: face_crop_aug_range has no effect with enable_bucket (as in sd-scripts, face crops "
                "are made only at a fixed resolution); turn bucketing off to use it"
            )
        elif records and not any(face_from_name(record.path) for record in records):
            warnings.append(
                f"{where}: face_crop_aug_range is set, but no image name carries a face box "
                "('<name>_<cx>_<cy>_<w>_<h>.png'); these images are centre-cropped as usual"
            )
    return warnings
