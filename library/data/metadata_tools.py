"""What the finetune/ metadata scripts share: finding images, naming their keys, reading and writing the JSON.

A metadata file maps an image key to its entry (formats.md §5): `{"img_0001": {"caption": ..., "tags": ...}}`.
Keys are the image's stem, or with `--full_path` its absolute path (so training finds it wherever it runs
from). Scripts update the fields they own and keep every other field; files are written atomically as
UTF-8 JSON with indent 2.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from library.data.captions import CaptionFileError, read_caption_file
from library.data.images import image_extensions
from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)


class MetadataToolError(UserError, ValueError):
    """A folder, option or metadata file a finetune/ script cannot use (named in the message)."""


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The images in `folder` (and its sub-folders with `recursive`), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetadataToolError(f"{folder}: no such folder (give the folder that holds the images)")
    extensions = image_extensions()
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in extensions and p.is_file())


def image_key(path: Path, full_path: bool) -> str:
    return str(path.resolve()) if full_path else path.stem


def check_key_options(recursive: bool, full_path: bool) -> None:
    if recursive and not full_path:
        raise MetadataToolError(
            "--recursive needs --full_path: images in different sub-folders may share a file name, and training "
            "looks stem keys up in one folder only"
        )


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """A metadata JSON file as a dict (key -> entry); the message names the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise MetadataToolError(f"{path}: no such metadata file") from None
    except ValueError as err:
        raise MetadataToolError(f"{path}: not valid JSON ({err}); fix it or start without it") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise MetadataToolError(f"{path}: not a metadata file (a JSON object mapping image keys to objects)")
    return data


def starting_metadata(out_json: str | os.PathLike, in_json: str | os.PathLike | None) -> dict[str, dict]:
    """`--in_json` if given, else the output file when it exists (updated in place), else nothing (upstream's rule)."""
    if in_json:
        logger.info("loading existing metadata: %s", in_json)
        return read_metadata(in_json)
    if Path(out_json).is_file():
        logger.info("updating the existing metadata file %s", out_json)
        return read_metadata(out_json)
    return {}


def write_metadata(path: str | os.PathLike, metadata: dict[str, dict]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def merge_text_files(
    images: list[Path],
    metadata: dict[str, dict],
    field: str,
    extension: str,
    full_path: bool,
    progress: Callable | None = None,
) -> tuple[int, list[Path]]:
    """Put the first line of each image's `<image without ext><extension>` file into `metadata[key][field]`.

    Returns (files merged, images without a readable file); those are skipped, never a crash.
    """
    merged, skipped = 0, []
    for image in progress(images) if progress else images:
        text_file = image.with_suffix(extension)
        try:
            text = read_caption_file(text_file, enable_wildcard=False)
        except (FileNotFoundError, CaptionFileError) as err:
            skipped.append(image)
            if not isinstance(err, FileNotFoundError):
                logger.warning("%s", err)
            continue
        metadata.setdefault(image_key(image, full_path), {})[field] = text
        merged += 1
    return merged, skipped


def report_skipped(skipped: list[Path], extension: str, field: str) -> None:
    if skipped:
        examples = ", ".join(p.name for p in skipped[:3])
        logger.warning(
            "%d image(s) have no usable %s file and got no %s (e.g. %s); they stay in the metadata as they were",
            len(skipped), extension, field, examples,
        )  # fmt: skip


def add_merge_arguments(parser, default_extension: str) -> None:
    """The arguments of merge_captions_to_metadata.py / merge_dd_tags_to_metadata.py (sd-scripts' names)."""
    parser.add_argument("train_data_dir", help="folder of the images (and their text files)")
    parser.add_argument("out_json", help="metadata file to write (updated if it exists and --in_json is not given)")
    parser.add_argument("--in_json", default=None, help="metadata file to start from (its other fields are kept)")
    parser.add_argument("--caption_extension", "--caption_extention", dest="caption_extension",
                        default=default_extension, help=f"extension of the text files (default {default_extension})")
    parser.add_argument("--full_path", action="store_true",
                        help="key = the image's absolute path (needed when images come from several folders)")
    parser.add_argument("--recursive", action="store_true", help="also the images in sub-folders (needs --full_path)")
    parser.add_argument("--debug", action="store_true", help="print each key and its text")


def run_merge(args, field: str) -> int:
    """Merge each image's text file into `field` of the metadata and write it."""
    from tqdm import tqdm

    check_key_options(args.recursive, args.full_path)
    extension = args.caption_extension if args.caption_extension.startswith(".") else f".{args.caption_extension}"
    images = find_images(args.train_data_dir, args.recursive)
    print(f"found {len(images)} image(s) in {args.train_data_dir}")
    metadata = starting_metadata(args.out_json, args.in_json)
    merged, skipped = merge_text_files(images, metadata, field, extension, args.full_path, progress=tqdm)
    report_skipped(skipped, extension, field)
    if args.debug:
        for image in images:
            entry = metadata.get(image_key(image, args.full_path), {})
            print(f"{image_key(image, args.full_path)}: {entry.get(field)!r}")
    write_metadata(args.out_json, metadata)
    print(f"{field}: {merged} merged, {len(skipped)} without a {extension} file; wrote {args.out_json}")
    return 0
