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

from tools.shape_data import BASE_SHAPES, write_image_folder  # noqa: E402

IDENTIFIER = "sks"
CONCEPT_SHAPE = "heart"
INSTANCE_COUNT = 16
REG_COUNT = 32
INSTANCE_SEED, REG_SEED = 101, 202
# Mostly white backgrounds, as in the prompts of the example; a few others so the identifier
# does not become tied to one background.
BACKGROUNDS = {"white": 0.7, "black": 0.15, "gray": 0.15}


def instance_caption(spec) -> str:
    article = "an" if spec.color[0] in "aeiou" else "a"
    return f"{article} {spec.color} {IDENTIFIER} on a {spec.background} background"


def write_quickstart_data(out: Path) -> dict[str, Path]:
    """Write `out/sks/` (instance images) and `out/reg/` (regularization images), replacing both."""
    folders = {"instance": out / IDENTIFIER, "reg": out / "reg"}
    for folder in folders.values():
        if folder.exists():
            shutil.rmtree(folder)
    write_image_folder(
        folders["instance"], INSTANCE_COUNT, seed=INSTANCE_SEED, shapes=(CONCEPT_SHAPE,),
        caption=instance_caption, backgrounds=BACKGROUNDS,
    )
    write_image_folder(folders["reg"], REG_COUNT, seed=REG_SEED, shapes=BASE_SHAPES, backgrounds=BACKGROUNDS)
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
