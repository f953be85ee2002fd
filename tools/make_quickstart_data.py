"""Write the quickstart's example dataset (examples/quickstart/images/), shipped in the repository.

The concept to learn is "sks": a heart, a shape the shipped base model (models/tiny-sd-shapes)
never saw. The instance images are hearts in several colours, captioned with the identifier in
place of a shape word ("a red sks on a white background"), so that after training the identifier
combines with colours and backgrounds the base model already knows.

The regularization images are shapes the base model already draws, with their ordinary captions
("a green circle on a white background"). In DreamBooth they hold the rest of the model in place
while the identifier is learned; here they are rendered by the same code that made the base model's
training data, which is what the base model draws for those captions.

    python tools/make_quickstart_data.py                # rewrites examples/quickstart/images/
    python tools/make_quickstart_data.py --out /tmp/x   # elsewhere

Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools.shape_data import BASE_SHAPES, COLORS, IMAGE_SIZE, ShapeSpec, caption_for, random_spec, render  # noqa: E402

IDENTIFIER = "sks"
CONCEPT_SHAPE = "heart"
INSTANCE_COUNT = 16
INSTANCE_SEED, REG_SEED = 101, 202
# Mostly white backgrounds, as in the prompts of the example; a few others so the identifier
# does not become tied to one background.
BACKGROUNDS = {"white": 0.7, "black": 0.15, "gray": 0.15}
# Hearts are large and near the centre: a new shape is learned in far fewer steps when its size and
# place vary little, and at 64 px a small heart is hard to tell from a circle.
HEART_HALF_SIZE = (20.0, 24.0)
HEART_CENTRE_JITTER = 3.0


def instance_specs(count: int, seed: int) -> list[ShapeSpec]:
    rng = np.random.default_rng(seed)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    weights = np.asarray([BACKGROUNDS[b] for b in backgrounds])
    specs = []
    for i in range(count):
        half = float(rng.uniform(*HEART_HALF_SIZE))
        room = min(HEART_CENTRE_JITTER, IMAGE_SIZE / 2 - half - 2)
        cx, cy = (IMAGE_SIZE / 2 + float(rng.uniform(-room, room)) for _ in range(2))
        background = backgrounds[rng.choice(len(backgrounds), p=weights / weights.sum())]
        specs.append(ShapeSpec(CONCEPT_SHAPE, colors[i % len(colors)], background, cx, cy, half))
    return specs


def reg_specs(seed: int) -> list[ShapeSpec]:
    """Every base shape in every colour on white (the prompts' background), sizes and places as in
    the base model's data; then a circle in every colour at the hearts' size and place.

    Complete on purpose: a shape or colour missing from the regularization set is where the new
    concept leaks in. The extra circles are the "class images" of DreamBooth: the known shape closest
    to the heart, drawn like the hearts, so that "large, round and centred" does not become "heart"
    (without them, 1 to 3 in 4 circles were drawn as hearts after training)."""
    rng = np.random.default_rng(seed)
    specs = []
    for shape in BASE_SHAPES:
        for color in COLORS:
            spec = random_spec(rng, backgrounds={"white": 1.0})
            specs.append(ShapeSpec(shape, color, "white", spec.cx, spec.cy, spec.half))
    for color in COLORS:
        half = float(rng.uniform(*HEART_HALF_SIZE))
        room = min(HEART_CENTRE_JITTER, IMAGE_SIZE / 2 - half - 2)
        cx, cy = (IMAGE_SIZE / 2 + float(rng.uniform(-room, room)) for _ in range(2))
        specs.append(ShapeSpec("circle", color, "white", cx, cy, half))
    return specs


def instance_caption(spec) -> str:
    return caption_for(spec.color, IDENTIFIER, spec.background)


def write_quickstart_data(out: Path) -> dict[str, Path]:
    """Write `out/sks/` (instance images) and `out/reg/` (regularization images), replacing both."""
    folders = {"instance": out / IDENTIFIER, "reg": out / "reg"}
    for folder in folders.values():
        if folder.exists():
            shutil.rmtree(folder)
    folders["instance"].mkdir(parents=True)
    for i, spec in enumerate(instance_specs(INSTANCE_COUNT, INSTANCE_SEED)):
        Image.fromarray(render(spec), mode="RGB").save(folders["instance"] / f"{i:05d}.png")
        (folders["instance"] / f"{i:05d}.txt").write_text(instance_caption(spec) + "\n")
    folders["reg"].mkdir(parents=True)
    for i, spec in enumerate(reg_specs(REG_SEED)):
        Image.fromarray(render(spec), mode="RGB").save(folders["reg"] / f"{i:05d}.png")
        (folders["reg"] / f"{i:05d}.txt").write_text(spec.caption + "\n")
    return folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/quickstart/images", help="folder to write sks/ and reg/ into")
    args = parser.parse_args(argv)
    folders = write_quickstart_data(Path(args.out))
    for name, folder in folders.items():
        print(f"{name}: {len(list(folder.glob('*.png')))} images in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
