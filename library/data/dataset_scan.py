"""Subsets -> image records: list the images, find their captions, read their sizes (dataset-config.md §6).

Built for large folders (100k images in ~1.5-2 s on 2 cores, bench/bench_dataset_startup.py): one
``os.scandir`` per folder; caption files looked up in the set of names that scan returned (no ``stat``
per image); each caption file and image head read with one ``os.open``/``os.read`` (no buffered file
object, no Path object per image); metadata keys matched against the listing; one small NamedTuple
per image. With ``cache_info`` a folder's unchanged files are not read at all (info_cache.py).
Reads run serially unless the caller asks for threads (see ``parallel_map``). Problems
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
from library.data.info_cache import NEED, FolderInfoCache
from library.errors import UserError

__all__ = [
    "ImageRecord",
    "MetadataFileError",
    "resolve_metadata_keys",
    "SubsetFindings",
    "face_crop_warnings",
    "image_extensions_text",
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


# Picture and video formats this trainer does not read: such a file in an image folder was almost
# certainly meant to train, so it is named in a warning instead of being skipped without a word.
OTHER_PICTURE_SUFFIXES = frozenset({
    ".gif", ".apng", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".jp2", ".j2k", ".svg", ".psd",
    ".ico", ".tga", ".exr", ".hdr", ".dng", ".raw", ".cr2", ".nef", ".arw", ".ppm", ".pgm", ".pbm",
    ".mp4", ".webm", ".mov", ".mkv", ".avi",
})
# Files that live beside images without being pictures (captions, caches, notes): never "unread images".
COMPANION_SUFFIXES = frozenset({
    ".txt", ".caption", ".captions", ".tags", ".json", ".jsonl", ".npz", ".toml", ".yaml", ".yml", ".md", ".csv",
    ".log", ".ini", ".db",
})


@dataclass
class SubsetFindings:
    """What the scan of one subset saw, for messages about subsets that give nothing to train on."""

    subset: SubsetBlueprint
    folder: str | None  # absolute image_dir (None: a metadata subset without one)
    images: int = 0  # image files listed (DreamBooth) or metadata keys that name a file (fine-tuning)
    unreadable: list[str] = field(default_factory=list)  # image paths whose header cannot be read
    files: int = 0  # DreamBooth, only counted when the folder holds no image: non-hidden files in it
    sub_folders: list[str] = field(default_factory=list)  # ditto: its sub-folders (never scanned)
    not_read: list[str] = field(default_factory=list)  # files that look like pictures in a format not read
    keys: int = 0  # fine-tuning: entries in the metadata file
    unmatched: list[str] = field(default_factory=list)  # fine-tuning: keys that name no image


@dataclass
class ScanReport:
    """What scanning found besides the records: warnings to show, and problems that stop the run."""

    warnings: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    caption_errors: list[str] = field(default_factory=list)
    findings: list[SubsetFindings] = field(default_factory=list)  # one per scan_subset call, in call order
    info_caches: dict[str, FolderInfoCache] = field(default_factory=dict)  # cache_info folders -> their cache


class MetadataFileError(UserError, ValueError):
    """A metadata file (--in_json / metadata_file) that cannot be used; the message names the file (and line)."""


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


def _read_caption(caption_path: str | None, enable_wildcard: bool) -> str | CaptionFileError | None:
    """Caption text, the error, or None without a caption file."""
    if caption_path is None:
        return None
    try:
        return caption_from_bytes(read_small_file(caption_path), caption_path, enable_wildcard)
    except CaptionFileError as error:
        return error
    except OSError as error:  # no permission, a folder named like a caption file, ...
        return CaptionFileError(
            f"cannot read caption file {caption_path}: {error.strerror or error}. "
            "Fix its permissions, or rename/remove it."
        )


def _read_image(
    path: str, caption_path: str | None, enable_wildcard: bool
) -> tuple[str | CaptionFileError | None, tuple[int, int] | str]:
    """(caption text, error or None without a caption file; size or the reason it cannot be read)."""
    return _read_caption(caption_path, enable_wildcard), size_or_reason(path)


def _read_with_cache(
    cache: FolderInfoCache,
    names: list[str],
    paths: list[str],
    caption_paths: list[str | None],
    subset: SubsetBlueprint,
    workers: int | None,
) -> list[tuple[str | CaptionFileError | None, tuple[int, int] | str]]:
    """What ``_read_image`` gives for each image, read only where ``cache`` has no valid entry (info_cache.py)."""
    wildcard = subset.enable_wildcard
    known = cache.lookup(names, paths, caption_paths, wildcard)

    def finish(i: int) -> tuple:
        text, size = known[i]
        return (
            _read_caption(caption_paths[i], wildcard) if text is NEED else text,
            size_or_reason(paths[i]) if size is NEED else size,
        )

    stale = [i for i, (text, size) in enumerate(known) if text is NEED or size is NEED]
    for i, result in zip(stale, parallel_map(finish, stale, workers)):
        known[i] = result
    cache.record(paths, caption_paths, known, wildcard, subset.class_tokens or "")
    return known


def image_extensions_text() -> str:
    """The image extensions read here, for messages: ".png .jpg .jpeg .webp .bmp" (any letter case)."""
    return " ".join(image_extensions())


def _not_read_files(folder: str, names: set[str], known: Sequence[str], extension: str) -> list[str]:
    """Sorted names of files that look like training pictures this trainer does not read: a picture or video
    format it has no decoder for (``cat.gif``), or any other file with a caption file beside it.

    ``known``: names already accounted for (the images and their caption files), removed by one set
    difference so that only the few other names of a big folder are looked at in Python.
    """
    readable = tuple(image_extensions())
    skip = tuple(COMPANION_SUFFIXES | ({extension.lower()} if extension else set()))
    found = []
    for name in names.difference(known):
        lower = name.lower()
        if name[0] == "." or "." not in name[1:] or lower.endswith(readable) or lower.endswith(skip):
            continue
        if lower[lower.rfind(".") :] in OTHER_PICTURE_SUFFIXES or (
            extension and _caption_file_name(name, extension, names) is not None
        ):
            found.append(name)
    return sorted(name for name in found if os.path.isfile(os.path.join(folder, name)))


def _folder_contents(folder: str, names: set[str]) -> tuple[int, list[str]]:
    """(non-hidden files, sorted sub-folder names) of a folder; only called for folders without images."""
    files, folders = 0, []
    for name in names:
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            folders.append(name)
        elif os.path.isfile(path):
            files += 1
    return files, sorted(folders)


def _scan_dreambooth(
    subset: SubsetBlueprint, report: ScanReport, workers: int | None, findings: SubsetFindings
) -> list[tuple[str, str, tuple[int, int] | str]]:
    folder = os.path.abspath(subset.image_dir)
    image_names, names = _folder_names(folder)
    prefix = folder if folder.endswith(os.sep) else folder + os.sep  # os.path.join, without its cost
    extension = normalize_caption_extension(subset.caption_extension or "")
    paths = [prefix + name for name in image_names]
    caption_paths: list[str | None] = [None] * len(paths)
    caption_names = []
    if extension:
        for i, name in enumerate(image_names):
            caption_name = _caption_file_name(name, extension, names)
            if caption_name is not None:
                caption_paths[i] = prefix + caption_name
                caption_names.append(caption_name)
    wildcard = subset.enable_wildcard
    if subset.cache_info:
        cache = report.info_caches.get(folder) or report.info_caches.setdefault(folder, FolderInfoCache(folder))
        loaded = _read_with_cache(cache, image_names, paths, caption_paths, subset, workers)
    else:
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
    findings.images = len(image_names)
    findings.not_read = _not_read_files(folder, names, image_names + caption_names, extension)
    if not image_names:  # described by the caller (an error when no subset has anything to train on)
        findings.files, findings.sub_folders = _folder_contents(folder, names)
    elif findings.not_read:
        examples = ", ".join(repr(name) for name in findings.not_read[:3])
        report.warnings.append(
            f"{folder}: {len(findings.not_read)} file(s) look like training images but are not a format this "
            f"trainer reads, so they are skipped (e.g. {examples}); it reads {image_extensions_text()}: "
            "convert them to PNG (an animated GIF: one frame per PNG), or move them out of the folder"
        )
    return entries


# ---------------------------------------------------------------- fine-tuning kind


def read_metadata_file(path: str) -> list[tuple[str, dict]]:
    """(key, entry) pairs of a metadata ``.json`` (key -> entry) or ``.jsonl`` (one object with image_path per line).

    Raises ``MetadataFileError`` naming the file, and the line or key, for anything that is not such a file.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise MetadataFileError(
            f"{path}: cannot read the metadata file ({error.strerror or error}); check the path and its permissions"
        ) from None
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as error:
        raise MetadataFileError(
            f"{path}: not UTF-8 text (bad byte at offset {error.start}); save the metadata file as UTF-8"
        ) from None
    if path.lower().endswith(".jsonl"):
        return _jsonl_pairs(text, path)
    return _json_pairs(text, path)


_ENTRY_EXAMPLE = '{"caption": "a cat on a sofa", "tags": "cat, sofa"}'


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _json_pairs(text: str, path: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "fix the file, or make it again"
        if error.msg == "Extra data":
            hint = "a file with one JSON object per line must be named .jsonl"
        raise MetadataFileError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}); {hint}"
        ) from None
    if not isinstance(data, dict):
        raise MetadataFileError(
            f"{path}: holds a JSON {_json_type(data)}, but a metadata file is one object that maps each image "
            f'to its entry, e.g. {{"img_0001": {_ENTRY_EXAMPLE}}}; make it again in that form'
        )
    pairs = list(data.items())
    for key, entry in pairs:
        problem = _entry_problem(entry)
        if problem:
            raise MetadataFileError(f"{path}: the entry of key {key!r} {problem}")
    return pairs


def _jsonl_pairs(text: str, path: str) -> list[tuple[str, dict]]:
    pairs = []
    # split on newlines only: JSON strings may hold U+2028 and other characters str.splitlines() splits on
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetadataFileError(
                f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); each line must be "
                f'one complete JSON object such as {{"image_path": "img_0001.png", "caption": "a cat"}}'
            ) from None
        if not isinstance(entry, dict):
            raise MetadataFileError(
                f"{path} line {number}: a JSON {_json_type(entry)}, expected one object per line such as "
                f'{{"image_path": "img_0001.png", "caption": "a cat"}}; fix that line'
            )
        image_path = entry.get("image_path")
        if not isinstance(image_path, str) or not image_path:
            raise MetadataFileError(
                f"{path} line {number}: no 'image_path' (the image's file name or path) in {line.strip()[:80]}; "
                "add it to that line"
            )
        problem = _entry_problem(entry)
        if problem:
            raise MetadataFileError(f"{path} line {number}: the entry {problem}")
        pairs.append((image_path, entry))
    return pairs


def _entry_problem(entry) -> str | None:
    """Why a metadata entry cannot be used ("is a list, ..."), or None."""
    if not isinstance(entry, dict):
        return f"is a {_json_type(entry)}; each entry must be an object such as {_ENTRY_EXAMPLE}"
    for name in ("caption", "tags"):
        value = entry.get(name)
        if value is not None and not isinstance(value, str):
            return f"has a {_json_type(value)} as its {name!r}; write it as one string, e.g. \"cat, sofa\""
    size = entry.get("image_size")
    if size is not None and not (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        return f"has image_size {json.dumps(size)[:40]}; write it as [width, height] in pixels, or leave it out"
    return None


def resolve_metadata_keys(keys: Sequence[str], folder: str | None) -> dict[str, str]:
    """key -> absolute image path, for the keys of a metadata file that name an image (as training resolves them)."""
    folder = os.path.abspath(folder) if folder else None
    names = _folder_names(folder)[1] if folder and os.path.isdir(folder) else set()
    extensions = image_extensions()
    found = {key: _resolve_key(key, folder, names, extensions) for key in keys}
    return {key: path for key, path in found.items() if path is not None}


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


def _scan_fine_tuning(
    subset: SubsetBlueprint, report: ScanReport, findings: SubsetFindings
) -> list[tuple[str, str, tuple[int, int] | None]]:
    folder = os.path.abspath(subset.image_dir) if subset.image_dir else None
    names = _folder_names(folder)[1] if folder and os.path.isdir(folder) else set()
    extensions = image_extensions()
    entries, missing, empty = [], [], 0
    pairs = read_metadata_file(subset.metadata_file)
    for key, entry in pairs:
        path = _resolve_key(key, folder, names, extensions)
        if path is None:
            missing.append(key)
            continue
        caption = metadata_caption(entry, subset.caption_separator, subset.enable_wildcard)
        empty += not caption
        size = entry.get("image_size")
        entries.append((path, caption, (int(size[0]), int(size[1])) if size else None))
    findings.folder, findings.keys, findings.images, findings.unmatched = folder, len(pairs), len(entries), missing
    if missing and entries:  # none matching is described by the caller (an error if nothing else trains)
        examples = ", ".join(repr(key) for key in missing[:3])
        where = f"in {folder}" if folder else "(no image_dir given, so only absolute paths can match)"
        report.warnings.append(
            f"{subset.metadata_file}: {len(missing)} key(s) of its {len(pairs)} match no image {where} and are "
            f"skipped (e.g. {examples}); a key is looked up as <image_dir>/<key>, as <key> plus an image extension "
            f"({image_extensions_text()}), or as an absolute path: fix those keys, or add the missing images"
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
    ``UnreadableImagesError`` and warnings are dropped. A metadata file that cannot be parsed raises
    ``MetadataFileError`` at once (nothing of that subset can be scanned). What was seen is appended to
    ``report.findings`` (one ``SubsetFindings`` per call) for messages about subsets that give nothing.
    A DreamBooth/mask subset with ``cache_info`` reads through its folder's ``FolderInfoCache`` in
    ``report.info_caches``; the caller writes those files (``info_cache.save_info_caches``).
    """
    own_report = report is None
    report = report or ScanReport()
    findings = SubsetFindings(subset, os.path.abspath(subset.image_dir) if subset.image_dir else None)
    report.findings.append(findings)
    if dataset.kind == "fine_tuning" or subset.metadata_file:
        entries = _scan_fine_tuning(subset, report, findings)
    else:  # DreamBooth and mask kinds list the image folder
        entries = _scan_dreambooth(subset, report, workers, findings)
    unsized = [path for path, _, size in entries if size is None]  # fine-tuning entries without image_size
    sizes = dict(zip(unsized, read_sizes(unsized, workers))) if unsized else {}
    records = []
    for path, caption, size in entries:
        if size is None:
            size = sizes[path]
        if isinstance(size, str):
            report.unreadable.append((path, size))
            findings.unreadable.append(path)
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
