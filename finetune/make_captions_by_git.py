"""Caption images with GIT: a one-line `<image>.caption` file beside each image.

    python finetune/make_captions_by_git.py --batch_size 8 --remove_words train_data

`--model_id` is a hub id or a local folder (default microsoft/git-large-textcaps). `--remove_words`
drops the "with the words ..." phrases GIT often invents. Images that already have a caption file are
kept unless `--overwrite`. See docs/guide.md §7.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from library.args import ArgumentParser
from library.data import captioning
from library.tool_entry import run_tool

GIT_HUB_ID = "microsoft/git-large-textcaps"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="make_captions_by_git.py", description=__doc__.split("\n\n")[0])
    captioning.add_captioning_arguments(parser, max_length=50)
    parser.add_argument("--model_id", default=GIT_HUB_ID, help=f"GIT model: a hub id or a local folder (default {GIT_HUB_ID})")
    parser.add_argument("--remove_words", action="store_true",
                        help="drop phrases such as 'with the words xxx' / 'that says xxx' (GIT invents them)")
    parser.add_argument("--pin_memory", action="store_true", help="accepted for compatibility")
    return parser


def make_captions(args) -> int:
    paths, extension = captioning.images_to_caption(args)
    if not paths:
        return 0
    processor, model = captioning.load_captioner("git", args.model_id)

    @torch.no_grad()
    def caption_batch(images):
        inputs = processor(images=images, return_tensors="pt").to(model.device)
        ids = model.generate(pixel_values=inputs.pixel_values, max_length=args.max_length)
        captions = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
        return [captioning.remove_read_text(c) for c in captions] if args.remove_words else captions

    written = captioning.caption_folder(paths, args.batch_size, extension, caption_batch, args.debug)
    print(f"wrote {written} caption file(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), make_captions, argv)


if __name__ == "__main__":
    sys.exit(main())
