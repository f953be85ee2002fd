"""Synthetic captioned shapes: the training data of the shipped tiny base model (tools/build_pretrained_tiny.py).

Flat, anti-aliased shapes in named colours on plain backgrounds, captioned
"a red circle on a white background" ("an orange star on a black background"). Everything is deterministic from a seed.

    BASE_SHAPES    what the base model was trained on
    HELD_OUT_SHAPES  drawn by the same renderer but never shown to the base model, so the
                   quickstart and the learning tests can teach one of them as a new concept

The scorer in tools/shape_metrics.py renders its references with `shape_mask`, so a
generated image and its reference follow the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Named colours (RGB). Chosen to stay far apart, so a nearest-colour test is meaningful.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# How often each background appears in the training set.
BACKGROUND_WEIGHTS = {"white": 0.6, "black": 0.2, "gray": 0.2}
BASE_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
HELD_OUT_SHAPES = ("heart", "checkerboard", "stripes")
ALL_SHAPES = BASE_SHAPES + HELD_OUT_SHAPES

IMAGE_SIZE = 64
MIN_HALF_SIZE, MAX_HALF_SIZE = 12, 24  # half the bounding box side, in pixels at 64 px
MARGIN = 2
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image: shape kind, colour and background names, centre and half-size in pixels."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    half: float
    size: int = IMAGE_SIZE

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.background)


def caption_for(color: str, shape: str, background: str = "white") -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def _polygon(kind: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    if kind == "triangle":
        return [(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "star":
        outer, inner = 1.05 * s, 0.45 * s
        cy = cy + 0.0955 * outer  # centre the bounding box vertically (the lower points reach only 0.81 r)
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else inner
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if kind == "cross":
        t = 0.32 * s
        return [
            (cx - t, cy - s), (cx + t, cy - s), (cx + t, cy - t), (cx + s, cy - t), (cx + s, cy + t), (cx + t, cy + t),
            (cx + t, cy + s), (cx - t, cy + s), (cx - t, cy + t), (cx - s, cy + t), (cx - s, cy - t), (cx - t, cy - t),
        ]
    if kind == "heart":
        points = []
        for i in range(64):
            a = 2 * math.pi * i / 64
            x = 16 * math.sin(a) ** 3
            y = -(13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a))
            # the curve spans x in [-16, 16], y in [-12, 17]: scale into the box, centred
            points.append((cx + x / 16 * s, cy + (y - 2.5) / 14.5 * s))
        return points
    return None


def _draw_coverage(kind: str, cx: float, cy: float, s: float, size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel the shape covers (float32, size x size), drawn at `supersample`x."""
    big = size * supersample
    k = supersample
    X, Y, S = cx * k, cy * k, s * k
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    box = [X - S, Y - S, X + S - 1, Y + S - 1]
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        r = 0.55 * S
        draw.ellipse([X - r, Y - r, X + r - 1, Y + r - 1], fill=0)
    elif kind in ("checkerboard", "stripes"):
        ys, xs = np.mgrid[0:big, 0:big].astype(np.float32)
        inside = (xs >= X - S) & (xs < X + S) & (ys >= Y - S) & (ys < Y + S)
        if kind == "checkerboard":
            cell = 2 * S / 4
            on = ((np.floor((xs - (X - S)) / cell) + np.floor((ys - (Y - S)) / cell)) % 2) == 0
        else:
            period = 2 * S / 4
            on = ((xs - (X - S)) + (ys - (Y - S))) % period < period / 2
        canvas = Image.fromarray((inside & on).astype(np.uint8) * 255, mode="L")
    else:
        polygon = _polygon(kind, X, Y, S)
        if polygon is None:
            raise ValueError(f"unknown shape {kind!r}; known: {', '.join(ALL_SHAPES)}")
        draw.polygon(polygon, fill=255)
    small = canvas.resize((size, size), Image.BOX) if supersample > 1 else canvas
    return np.asarray(small, dtype=np.float32) / 255.0


def shape_mask(kind: str, cx: float, cy: float, half: float, size: int = IMAGE_SIZE, supersample: int = 2) -> np.ndarray:
    """Boolean mask (size x size) of a shape: pixels at least half covered."""
    return _draw_coverage(kind, cx, cy, half, size, supersample) >= 0.5


def render(spec: ShapeSpec, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The RGB image (uint8, size x size x 3) of one ShapeSpec."""
    alpha = _draw_coverage(spec.shape, spec.cx, spec.cy, spec.half, spec.size, supersample)[..., None]
    fg = np.asarray(COLORS[spec.color], dtype=np.float32)
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    return (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8)


def random_spec(
    rng: np.random.Generator,
    shapes=BASE_SHAPES,
    colors=tuple(COLORS),
    backgrounds: dict[str, float] | None = None,
    size: int = IMAGE_SIZE,
) -> ShapeSpec:
    """A random shape kind, colour, background, size and position (kept inside the image)."""
    backgrounds = backgrounds or BACKGROUND_WEIGHTS
    names = list(backgrounds)
    weights = np.asarray([backgrounds[n] for n in names], dtype=np.float64)
    scale = size / IMAGE_SIZE
    half = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE) * scale
    low, high = half + MARGIN * scale, size - half - MARGIN * scale
    return ShapeSpec(
        shape=str(shapes[rng.integers(len(shapes))]),
        color=str(colors[rng.integers(len(colors))]),
        background=str(names[rng.choice(len(names), p=weights / weights.sum())]),
        cx=float(rng.uniform(low, high)),
        cy=float(rng.uniform(low, high)),
        half=float(half),
        size=size,
    )


def make_dataset(count: int, seed: int = 0, shapes=BASE_SHAPES, size: int = IMAGE_SIZE, **kwargs):
    """(images uint8 [count, size, size, 3], specs) — the same for the same arguments."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, shapes=shapes, size=size, **kwargs) for _ in range(count)]
    images = np.stack([render(spec) for spec in specs]) if specs else np.zeros((0, size, size, 3), np.uint8)
    return images, specs


def write_image_folder(folder, count: int, seed: int = 0, shapes=BASE_SHAPES, caption=None, **kwargs) -> list[ShapeSpec]:
    """Write `count` PNGs with .txt captions (sd-scripts folder layout); `caption(spec)` overrides the caption."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, specs = make_dataset(count, seed, shapes=shapes, **kwargs)
    for i, (image, spec) in enumerate(zip(images, specs)):
        Image.fromarray(image, mode="RGB").save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text((caption(spec) if caption else spec.caption) + "\n")
    return specs
