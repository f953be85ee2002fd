"""--debug_dataset: show what training would see (images, captions, bucket, repeats) without training.

With a display and an OpenCV build that has windows: one window per batch; S = next batch,
E = next epoch, Esc = quit. Headless (the usual case on Linux servers, and always with
opencv-python-headless): the batches are written as PNG files plus a captions listing into a
folder, whose name is printed, and the run ends normally.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAX_PREVIEW_BATCHES = 50  # images written headless; the captions listing covers the whole epoch
KEY_NEXT_STEP, KEY_NEXT_EPOCH, KEY_QUIT = ord("s"), ord("e"), 27


def to_uint8_images(images) -> list[np.ndarray]:
    """[-1,1] float tensors [B,3,H,W] -> RGB uint8 arrays HxWx3."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return list(array)


def load_preview_batch(group, plan, epoch: int, index: int) -> dict:
    """The batch as training loads it, plus each sample's repeats (after regularization balancing)."""
    batch = group.load_batch(plan, epoch, index)
    batch["num_repeats"] = [int(r) for r in group.datasets[plan.dataset].repeats[plan.images]]
    return batch


def describe_batch(epoch: int, index: int, batch: dict) -> list[str]:
    """One line per sample: where it came from, its bucket, repeats and the caption as processed."""
    bucket = batch.get("bucket")
    repeats = batch.get("num_repeats") or [None] * len(batch["captions"])
    lines = []
    for i, (path, caption) in enumerate(zip(batch["image_paths"], batch["captions"])):
        extra = f" repeats={repeats[i]}" if repeats[i] is not None else ""
        weight = batch.get("loss_weights")
        if weight is not None and float(weight[i]) != 1.0:
            extra += f" loss_weight={float(weight[i]):g}"
        lines.append(f"epoch {epoch} batch {index} [{i}] bucket={bucket}{extra} {path}\n    caption: {caption!r}")
    return lines


def display_available() -> bool:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import cv2

    try:  # opencv-python-headless has no window support at all
        cv2.namedWindow("debug_dataset")
        cv2.destroyWindow("debug_dataset")
        return True
    except cv2.error:
        return False


def preview_headless(group, out_dir: Path, epochs: int = 1, max_batches: int = MAX_PREVIEW_BATCHES) -> Path:
    """Write preview PNGs for the first `max_batches` batches and a captions listing for every batch."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    listing = []
    written = 0
    for epoch in range(1, epochs + 1):
        for index, plan in enumerate(group.batches_for_epoch(epoch)):
            batch = load_preview_batch(group, plan, epoch, index)
            listing.extend(describe_batch(epoch, index, batch))
            if written >= max_batches or "images" not in batch:
                continue
            for i, image in enumerate(to_uint8_images(batch["images"])):
                name = out_dir / f"epoch{epoch:03d}_batch{index:05d}_{i}.png"
                cv2.imwrite(str(name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            written += 1
    (out_dir / "captions.txt").write_text("\n".join(listing) + "\n", encoding="utf-8")
    return out_dir


def preview_window(group) -> None:
    """Interactive preview: S next batch, E next epoch, Esc quit."""
    import cv2

    epoch = 1
    while True:
        for index, plan in enumerate(group.batches_for_epoch(epoch)):
            batch = load_preview_batch(group, plan, epoch, index)
            print("\n".join(describe_batch(epoch, index, batch)))
            images = to_uint8_images(batch["images"]) if "images" in batch else []
            key = KEY_NEXT_STEP
            for i, image in enumerate(images):
                cv2.imshow(f"image {i}", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if images:
                key = cv2.waitKey() & 0xFF
            if key == KEY_QUIT:
                cv2.destroyAllWindows()
                return
            if key == KEY_NEXT_EPOCH:
                break
        epoch += 1


def run_debug_dataset(group, output_dir: str | os.PathLike | None) -> Path | None:
    """Preview in a window when possible, else write files; returns the folder written (headless)."""
    if display_available():
        preview_window(group)
        return None
    folder = Path(output_dir or ".") / "debug_dataset"
    preview_headless(group, folder)
    print(f"--debug_dataset: no display, wrote the batch previews and captions.txt to {folder.resolve()}")
    return folder
