"""Caption images with BLIP: a one-line `<image>.caption` file beside each image.

    python finetune/make_captions.py --batch_size 8 train_data

The model is transformers' BLIP (`--caption_weights`: a hub id or a local folder; default
Salesforce/blip-image-captioning-large, the model sd-scripts downloads as a .pth). Nucleus sampling by
default, `--beam_search` for beam search. Images that already have a caption file are kept unless
`--overwrite`. See docs/guide.md §7.1.
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="make_captions.py", description=__doc__.split("\n\n")[0])
    captioning.add_captioning_arguments(parser, max_length=75)
    parser.add_argument("--caption_weights", default=captioning.BLIP_HUB_ID,
                        help=f"BLIP model: a hub id or a local folder (default {captioning.BLIP_HUB_ID})")
    parser.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep the top tokens of this mass")
    parser.add_argument("--min_length", type=int, default=5, help="shortest caption, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling (the same seed gives the same captions)")
    return parser


def make_captions(args) -> int:
    paths, extension = captioning.images_to_caption(args)
    if not paths:
        return 0
    processor, model = captioning.load_captioner("blip", captioning.blip_weights(args.caption_weights))
    torch.manual_seed(args.seed)
    if args.beam_search:
        generation = {"num_beams": args.num_beams, "do_sample": False}
    else:
        generation = {"do_sample": True, "top_p": args.top_p, "repetition_penalty": 1.1}

    @torch.no_grad()
    def caption_batch(images):
        inputs = processor(images=images, return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_length=args.max_length, min_length=args.min_length, **generation)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]

    written = captioning.caption_folder(paths, args.batch_size, extension, caption_batch, args.debug)
    print(f"wrote {written} caption file(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), make_captions, argv)


if __name__ == "__main__":
    sys.exit(main())
