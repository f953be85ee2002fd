"""`make quickstart`: train a LoRA for a new concept on the shipped tiny base model, in about 2 minutes on a CPU.

It runs `train_network.py --config_file examples/quickstart/train.toml` exactly as a user would
type it. The base model (models/tiny-sd-shapes) draws coloured shapes; the example dataset teaches
it "sks", a heart it never saw (examples/quickstart/). Samples are written before training and after
the last epoch; this script puts them side by side, measures how many of the "sks" samples are
hearts before and after, and prints where everything is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_quickstart_data import CONCEPT_SHAPE as CONCEPT  # noqa: E402
from tools.make_quickstart_data import IDENTIFIER  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = Path("models/tiny-sd-shapes")
CONFIG = Path("examples/quickstart/train.toml")
OUTPUT = Path("quickstart_output")
# sd-scripts' sample names: <output_name>_e<epoch:06d>_<prompt index:02d>_<timestamp>_<seed>.png
SAMPLE_NAME = re.compile(r"_e(\d{6})_(\d{2})_\d{14}_\d+\.png$")


def train_command() -> list[str]:
    return [sys.executable, "train_network.py", "--config_file", str(CONFIG)]


def samples_by_epoch(folder: Path) -> dict[int, dict[int, Path]]:
    """{epoch: {prompt index: file}} of the sample images in `folder`."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(folder.glob("*.png")):
        match = SAMPLE_NAME.search(path.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    return found


def side_by_side(before: list[Path], after: list[Path], labels: list[str], out: Path, scale: int = 3) -> Path:
    """One PNG: the samples before training on the top row, after training below, prompts under each column."""
    from PIL import Image, ImageDraw

    tiles = [[Image.open(p).convert("RGB") for p in row] for row in (before, after)]
    size = tiles[0][0].width * scale
    label_h, margin = 30, 80
    sheet = Image.new("RGB", (margin + size * len(before), 2 * size + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, images) in enumerate(zip(("before", "after"), tiles)):
        draw.text((6, row * size + size // 2 - 6), name, fill="black")
        for col, image in enumerate(images):
            sheet.paste(image.resize((size, size), Image.NEAREST), (margin + col * size, row * size))
    for col, label in enumerate(labels):
        words = label.replace(" on a ", "\non a ").replace(" background", "")
        draw.multiline_text((margin + col * size + 4, 2 * size + 2), words, fill="black", spacing=1)
    sheet.save(out)
    return out


def main() -> int:
    os.chdir(ROOT)
    if not (BASE_MODEL / "model_index.json").is_file():
        print(f"The shipped base model {BASE_MODEL}/ is missing. Rebuild it (about 45 minutes on 2 cores):")
        print("  .venv/bin/python tools/build_pretrained_tiny.py --out models")
        return 1
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)  # the quickstart's own folder: every run starts clean
    command = train_command()
    print("Quick start: a LoRA that teaches the shipped tiny base model a new concept, \"sks\" (a heart).")
    print(f"  base model:  {BASE_MODEL}/ (draws coloured shapes: circle, square, triangle, star, cross, ring)")
    print("  data:        examples/quickstart/images/sks/ (16 hearts) + reg/ (56 shapes it already knows)")
    print("  training:    LoRA + LoCon rank 8, 640 steps of batch 4 (20 epochs); samples before and after")
    print(f"  options:     {CONFIG} (dataset: examples/quickstart/dataset.toml, prompts: examples/quickstart/prompts.txt)\n")
    print("$ " + " ".join(["python", *command[1:]]) + "\n", flush=True)
    start = time.perf_counter()
    # One CPU thread unless told otherwise: this tiny model trains faster on one thread than on two
    # (measured on 2 cores: 6.7 against 6.0 steps/s), the threads mostly wait on each other.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(f"\ntrain_network.py failed (exit {result.returncode}); its message is above.")
        return result.returncode
    return report(seconds)


def report(seconds: float) -> int:
    import numpy as np
    from PIL import Image

    from library.training.sample_prompts import read_sample_prompts
    from tools.shape_metrics import concept_scores

    prompts, _ = read_sample_prompts("examples/quickstart/prompts.txt")
    samples = samples_by_epoch(OUTPUT / "sample")
    if len(samples) < 2:
        print(f"expected samples before and after training in {OUTPUT / 'sample'}, found epochs {sorted(samples)}")
        return 1
    first, last = min(samples), max(samples)
    indices = sorted(samples[first])
    before, after = [samples[first][i] for i in indices], [samples[last][i] for i in indices]
    labels = [prompts[i].prompt for i in indices]
    sheet = side_by_side(before, after, labels, OUTPUT / "before_after.png")

    with_identifier = [k for k, label in enumerate(labels) if IDENTIFIER in label.split()]
    load = lambda paths: [np.asarray(Image.open(paths[k]).convert("RGB")) for k in with_identifier]  # noqa: E731
    was, now = concept_scores(load(before), CONCEPT), concept_scores(load(after), CONCEPT)
    lora = sorted(OUTPUT.glob("sks_heart*.safetensors"))

    print(f"\nDone in {seconds:.0f} s.")
    print(f"  LoRA:            {OUTPUT / 'sks_heart.safetensors'}" + (f" (and {len(lora) - 1} epoch save(s) beside it)" if len(lora) > 1 else ""))
    print(f"  samples:         {OUTPUT / 'sample'}/ (epoch {first} = before training, epoch {last} = after)")
    print(f"  side by side:    {sheet}")
    print(f"  \"{IDENTIFIER}\" samples drawn as a heart: {round(was['share'] * len(with_identifier))} of {len(with_identifier)} before, "
          f"{round(now['share'] * len(with_identifier))} of {len(with_identifier)} after (heart-template IoU {was['mean_iou']:.2f} -> {now['mean_iou']:.2f})")
    print("\nThe same on your own images and Stable Diffusion 1.5 (see docs/guide.md):")
    print("  1. put the images in a folder, one caption .txt beside each (\"a photo of sks dog on the beach\"),")
    print("     and point image_dir in a copy of examples/quickstart/dataset.toml at it (resolution = 512);")
    print("  2. accelerate launch train_network.py --config_file examples/quickstart/train.toml \\")
    print("       --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors --dataset_config my_dataset.toml \\")
    print("       --sample_prompts my_prompts.txt --learning_rate 1e-4 --mixed_precision bf16 --output_name my_lora")
    return 0


if __name__ == "__main__":
    sys.exit(main())
