"""Run the textual-inversion example and draw its before/after sheet (docs/images/textual_inversion_before_after.png).

    python tools/ti_example_sheet.py                      # train, then write the sheet to docs/images/
    python tools/ti_example_sheet.py --no_train           # only redraw it from textual_inversion_output/sample/
    python tools/ti_example_sheet.py --out /tmp/sheet.png

Training is `train_textual_inversion.py --config_file examples/textual_inversion/train.toml`, exactly as
the example's README has it (its output folder, textual_inversion_output/, is emptied first). The
example samples before training and after the last epoch; the sheet puts them side by side with the
quickstart's drawing code (tools/quickstart.py) and the "sks" samples are scored as the quickstart does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_quickstart_data import CONCEPT_SHAPE as CONCEPT  # noqa: E402
from tools.make_quickstart_data import IDENTIFIER  # noqa: E402
from tools.quickstart import samples_by_epoch, side_by_side  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path("examples/textual_inversion/train.toml")
SHEET = Path("docs/images/textual_inversion_before_after.png")


def example_options() -> dict:
    import toml

    options = {}
    for section in toml.load(CONFIG).values():
        options.update(section)
    return options


def train(output_dir: Path) -> int:
    if output_dir.exists():
        shutil.rmtree(output_dir)  # the example's own folder: every run starts clean
    command = [sys.executable, "train_textual_inversion.py", "--config_file", str(CONFIG)]
    print("$ " + " ".join(["python", *command[1:]]) + "\n", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    result = subprocess.run(command, env=env)
    print(f"\ntrain_textual_inversion.py: exit {result.returncode} after {time.perf_counter() - start:.0f} s")
    return result.returncode


def draw_sheet(output_dir: Path, out: Path) -> int:
    import numpy as np
    from PIL import Image

    from library.training.sample_prompts import read_sample_prompts
    from tools.shape_metrics import concept_scores

    options = example_options()
    prompts, _ = read_sample_prompts(options["sample_prompts"])
    samples = samples_by_epoch(output_dir / "sample")
    if len(samples) < 2:
        print(f"expected samples before and after training in {output_dir / 'sample'}, found epochs {sorted(samples)}")
        return 1
    first, last = min(samples), max(samples)
    indices = sorted(samples[first])
    before, after = [samples[first][i] for i in indices], [samples[last][i] for i in indices]
    labels = [prompts[i].prompt for i in indices]
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(before, after, labels, out)

    load = lambda paths, keep: [np.asarray(Image.open(paths[k]).convert("RGB")) for k in keep]  # noqa: E731
    token = [k for k, label in enumerate(labels) if IDENTIFIER in label.split()]
    other = [k for k in range(len(labels)) if k not in token]
    was, now = concept_scores(load(before, token), CONCEPT), concept_scores(load(after, token), CONCEPT)
    same = all(np.array_equal(a, b) for a, b in zip(load(before, other), load(after, other)))
    print(f"sheet: {out} (epoch {first} = before training, epoch {last} = after)")
    print(f'  "{IDENTIFIER}" samples: {was["shapes"]} before, {now["shapes"]} after; heart-template IoU '
          f"{was['mean_iou']:.2f} -> {now['mean_iou']:.2f}")
    print(f"  samples without \"{IDENTIFIER}\": {'identical' if same else 'DIFFERENT'} before and after")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no_train", action="store_true", help="draw the sheet from the samples already there")
    parser.add_argument("--out", type=Path, default=SHEET, help=f"the sheet to write (default {SHEET})")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    output_dir = Path(example_options()["output_dir"])
    if not args.no_train:
        code = train(output_dir)
        if code:
            return code
    return draw_sheet(output_dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
