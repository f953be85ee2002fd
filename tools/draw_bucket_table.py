"""Draw the aspect-ratio bucket table as rectangles to scale (docs/images/buckets.png).

The buckets come from the trainer's own code (library.data.buckets.make_bucket_resolutions), so
the picture shows exactly what `--enable_bucket --resolution 512` uses. Portrait buckets and the
square are on the top row; the landscape ones below, each under its transpose. The dashed square
in every cell is the --resolution square (512x512), the largest area a bucket may have.

    .venv/bin/python tools/draw_bucket_table.py                      # docs/images/buckets.png
    .venv/bin/python tools/draw_bucket_table.py --resolution 768 --max_bucket_reso 1280 --out b768.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFont

from library.data.buckets import make_bucket_resolutions

SCALE = 0.125  # pixels in the picture per training pixel
PAD, LABEL_H, TITLE_H = 14, 24, 56


def dashed_square(draw: ImageDraw.ImageDraw, left: int, bottom: int, side: int, dash: int = 4) -> None:
    top, right = bottom - side, left + side
    for start in range(0, side, 2 * dash):
        end = min(start + dash, side)
        draw.line([(left + start, top), (left + end, top)], fill="#999999")
        draw.line([(left + start, bottom), (left + end, bottom)], fill="#999999")
        draw.line([(left, top + start), (left, top + end)], fill="#999999")
        draw.line([(right, top + start), (right, top + end)], fill="#999999")


def draw(resolution: int, min_reso: int, max_reso: int, step: int, out: Path) -> Path:
    buckets = make_bucket_resolutions((resolution, resolution), min_reso, max_reso, step)
    by_ratio = sorted(buckets, key=lambda b: b[0] / b[1])
    rows = [[b for b in by_ratio if b[0] <= b[1]], [b for b in reversed(by_ratio) if b[0] > b[1]]]

    cell = round(max_reso * SCALE)  # column width: the widest bucket side
    heights = [round(max(resolution, *(h for _, h in row)) * SCALE) for row in rows]
    size = (PAD + max(len(row) for row in rows) * (cell + PAD), TITLE_H + sum(h + LABEL_H + PAD for h in heights))
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    title_font, label_font = ImageFont.load_default(size=18), ImageFont.load_default(size=13)
    pen.text((PAD, 10), f"{len(buckets)} aspect-ratio buckets for --resolution {resolution} "
             f"(min {min_reso}, max {max_reso}, step {step})", fill="black", font=title_font)
    pen.text((PAD, 34), f"drawn to scale; dashed: {resolution}x{resolution}, the largest area a bucket may have",
             fill="#555555", font=label_font)

    bottom = TITLE_H
    for row, height_px in zip(rows, heights):
        bottom += height_px
        for c, (width, height) in enumerate(row):
            left = PAD + c * (cell + PAD)
            dashed_square(pen, left, bottom, round(resolution * SCALE))
            pen.rectangle([left, bottom - round(height * SCALE), left + round(width * SCALE), bottom],
                          fill="#cfe2f3", outline="#1f4e79", width=2)
            pen.text((left, bottom + 4), f"{width}x{height}", fill="black", font=label_font)
        bottom += LABEL_H + PAD

    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--min_bucket_reso", type=int, default=256)
    parser.add_argument("--max_bucket_reso", type=int, default=1024)
    parser.add_argument("--bucket_reso_steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs/images/buckets.png")
    args = parser.parse_args()
    print(draw(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps, args.out))


if __name__ == "__main__":
    main()
