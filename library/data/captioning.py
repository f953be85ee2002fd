"""Image captioning for finetune/make_captions.py (BLIP) and make_captions_by_git.py (GIT), via transformers.

What both scripts share: the images of a folder, read once each (unreadable ones named and skipped),
batches, existing caption files kept unless `--overwrite`, atomic writes, a progress bar, the GPU when
there is one. Models load from a hub id or a local folder; offline without the files is one clear error.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from library.data.images import ImageReadError, load_image
from library.data.metadata_tools import find_images
from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

# The checkpoint sd-scripts downloads for BLIP (its own BLIP code); the same model on the hub, for transformers.
UPSTREAM_BLIP_URL_END = "model_large_caption.pth"
BLIP_HUB_ID = "Salesforce/blip-image-captioning-large"


class CaptionModelError(UserError, RuntimeError):
    """A captioning model that cannot be loaded; the message says what to pass or download."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_captioner(kind: str, name_or_path: str):
    """(processor, model) of BLIP (`kind="blip"`) or GIT (`"git"`) from a hub id or a local folder."""
    from transformers import AutoProcessor

    if kind == "blip":
        from transformers import BlipForConditionalGeneration as model_class
    else:
        from transformers import AutoModelForCausalLM as model_class
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = model_class.from_pretrained(name_or_path)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        where = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else str(err).splitlines()[0]
        raise CaptionModelError(
            f"cannot load the captioning model {name_or_path} ({where}); download it once with network "
            "(huggingface-cli download <id>), or give a local folder saved with save_pretrained"
        ) from None
    return processor, model.to(device()).eval()


def blip_weights(value: str | None) -> str:
    """--caption_weights: a hub id or folder; sd-scripts' default URL means the same model on the hub."""
    if not value or value.endswith(UPSTREAM_BLIP_URL_END):
        return BLIP_HUB_ID
    if value.endswith((".pth", ".pt")):
        raise CaptionModelError(
            f"--caption_weights {value}: checkpoints of the original BLIP code are not supported; give a transformers "
            f"BLIP model (a hub id such as {BLIP_HUB_ID}, or a folder saved with save_pretrained)"
        )
    return value


def add_captioning_arguments(parser, max_length: int) -> None:
    """The options both captioning scripts have (sd-scripts' names and defaults)."""
    parser.add_argument("train_data_dir", help="folder of the images")
    parser.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".caption",
                        help="extension of the caption files (default .caption)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per batch (larger is faster with memory to spare)")
    parser.add_argument("--max_length", type=int, default=max_length, help="longest caption, in tokens")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None, help="accepted for compatibility")
    parser.add_argument("--recursive", action="store_true", help="also the images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="caption images that already have a caption file too")
    parser.add_argument("--debug", action="store_true", help="print each caption")


def images_to_caption(args) -> tuple[list[Path], str]:
    """(images that need a caption file, the caption extension), from the scripts' shared options; says
    how many images already have a caption file and are kept."""
    extension = args.caption_extension if args.caption_extension.startswith(".") else f".{args.caption_extension}"
    images = find_images(args.train_data_dir, args.recursive)
    todo = [p for p in images if args.overwrite or not p.with_suffix(extension).exists()]
    if len(images) > len(todo):
        print(f"{len(images) - len(todo)} image(s) already have a {extension} file and are kept "
              "(--overwrite to caption them again)")
    if not todo:
        print("nothing to caption")
    return todo, extension


def batches_of_images(paths: list[Path], batch_size: int) -> Iterator[list[tuple[Path, object]]]:
    """Batches of (path, RGB PIL image); an unreadable image is named in a warning and left out."""
    from PIL import Image

    batch = []
    for path in paths:
        try:
            batch.append((path, Image.fromarray(load_image(path))))
        except ImageReadError as err:
            logger.warning("skipped: %s", err)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_caption(image: Path, extension: str, caption: str) -> None:
    with atomic_path(image.with_suffix(extension)) as tmp:
        tmp.write_text(caption + "\n", encoding="utf-8")


def caption_folder(
    paths: list[Path], batch_size: int, extension: str, caption_batch: Callable[[list], list[str]], debug: bool
) -> int:
    """Caption `paths` batch by batch with `caption_batch(images) -> captions`; returns files written."""
    from tqdm import tqdm

    written = 0
    with tqdm(total=len(paths), desc="captions", smoothing=0) as bar:
        for batch in batches_of_images(paths, batch_size):
            captions = caption_batch([image for _, image in batch])
            for (path, _), caption in zip(batch, captions):
                write_caption(path, extension, caption)
                written += 1
                if debug:
                    print(f"{path}: {caption}")
            bar.update(len(batch))
    return written


# Phrases GIT (trained on TextCaps) adds about text it believes it sees: "with the words ...", "that says ...".
_READ_TEXT_PHRASES = (
    re.compile(r"\s*(has|with|and) the (words?|letters?|name|number) (\"[^\"]*\"|'[^']*'|\S+)( (is |are )?(on|in) (the |a |her |his |their )?\w+)?"),
    re.compile(r"\s*(with a sign )?that (says|reads) (\"[^\"]*\"|'[^']*'|\S+)( on it)?"),
    re.compile(r"\s*with the number \d+ on \w+( \w+)?"),
)


def remove_read_text(caption: str) -> str:
    """--remove_words: drop GIT's often wrong "with the words xxx" / "that says xxx" phrases."""
    for pattern in _READ_TEXT_PHRASES:
        caption = pattern.sub("", caption)
    return re.sub(r"\s+", " ", caption).strip()
