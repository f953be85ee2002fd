"""Shrink the images of a folder to one or more maximum areas, keeping their shape.

    python tools/resize_images_to_resolution.py src dst --max_resolution 512x512,384x384 --divisible_by 8

For each image and each `WxH` of --max_resolution: an image larger than W·H pixels is scaled down
to that area with its aspect ratio kept (never enlarged), then centre-cropped so both sides are
multiples of --divisible_by, and saved as `<stem>+<WxH>.jpg` (quality 100) or `.png`. Other files
(captions, ...) are copied as they are; --copy_associated_files also copies an image's caption files
once per resolution, named like its images. Unreadable images are named and skipped.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
from PIL import Image

from library.args import ArgumentParser
from library.data.images import ImageReadError, image_extensions, interpolation_flag, load_image
from library.errors import UserError
from library.fileio import atomic_path
from library.tool_entry import run_tool

# upstream's names -> cv2 flags (None: area to shrink, as for training images)
INTERPOLATION = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4,
                 "nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "box": cv2.INTER_AREA}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="resize_images_to_resolution.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_img_folder", help="folder of the images")
    parser.add_argument("dst_img_folder", help="folder to write to (created when missing)")
    parser.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                        help="one or more maximum sizes 'WxH' (their area counts), comma-separated")
    parser.add_argument("--divisible_by", type=int, default=1, help="crop both sides to a multiple of this")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATION), default=None,
                        help="resampling (default: area, the sharpest for shrinking)")
    parser.add_argument("--save_as_png", action="store_true", help="write .png instead of .jpg")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="copy each image's other files (captions, ...) once per resolution, named like the images")
    return parser


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """[('512x512', 262144), ...] from '512x512,384x384'."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            width, height = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--max_resolution {text}: {part!r} is not WxH (e.g. 512x512)") from None
        out.append((part, width * height))
    if not out:
        raise UserError("--max_resolution: give at least one size, e.g. 512x512")
    return out


def fitted_size(width: int, height: int, max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized w, h), (cropped w, h)): the area limit with the shape kept, then sides floored to a multiple."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    crop = (max(divisible_by, width - width % divisible_by), max(divisible_by, height - height % divisible_by))
    return (width, height), (min(crop[0], width), min(crop[1], height))


def resize_folder(args) -> int:
    src, dst = Path(args.src_img_folder), Path(args.dst_img_folder)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder")
    if args.divisible_by < 1:
        raise UserError(f"--divisible_by {args.divisible_by}: must be at least 1")
    resolutions = parse_resolutions(args.max_resolution)
    dst.mkdir(parents=True, exist_ok=True)
    extensions = image_extensions()
    suffix = ".png" if args.save_as_png else ".jpg"
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in extensions]
    for other in (p for p in files if p.suffix.lower() not in extensions):
        shutil.copy2(other, dst / other.name)
    written = 0
    for path in images:
        try:
            pixels = load_image(path)
        except ImageReadError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        height, width = pixels.shape[:2]
        for name, max_pixels in resolutions:
            (w, h), (cw, ch) = fitted_size(width, height, max_pixels, args.divisible_by)
            flag = INTERPOLATION[args.interpolation] if args.interpolation else interpolation_flag("auto", (width, height), (w, h))
            resized = cv2.resize(pixels, (w, h), interpolation=flag) if (w, h) != (width, height) else pixels
            left, top = (w - cw) // 2, (h - ch) // 2
            image = Image.fromarray(resized[top : top + ch, left : left + cw])
            target = dst / f"{path.stem}+{name}{suffix}"
            with atomic_path(target) as tmp:
                image.save(tmp, format="PNG" if args.save_as_png else "JPEG", quality=100)
            written += 1
            if args.copy_associated_files:
                for companion in (p for p in files if p.stem == path.stem and p.suffix.lower() not in extensions):
                    shutil.copy2(companion, dst / f"{path.stem}+{name}{companion.suffix}")
    print(f"wrote {written} image(s) for {len(images)} source image(s) into {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), resize_folder, argv)


if __name__ == "__main__":
    sys.exit(main())
