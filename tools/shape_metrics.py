"""Score generated shape images: background, foreground colour and shape against rendered references.

Used by tools/build_pretrained_tiny.py (the figures in the model card), tests/test_pretrained_tiny.py
and the learning tests. For one image:

* background: the median of the 2-pixel border, named by the nearest background colour;
* foreground: pixels far (RGB distance > FG_THRESHOLD) from that background; the largest
  connected blob is the object;
* colour: the median of the object's clearly-coloured pixels, named by the nearest colour among
  the shape colours *and* the background colours (so a grey smudge counts as wrong);
* shape: every shape kind is rendered (tools/shape_data.shape_mask) into the object's bounding
  box, nudged by half-pixel offsets and +-10 % sizes; the best intersection-over-union per kind
  gives a nearest-template classifier, and the IoU of the expected kind says how well it is drawn.

`generate_images` makes the images with a diffusers StableDiffusionPipeline (DDIM as in training samples, CFG).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tools.shape_data import BACKGROUNDS, BASE_SHAPES, COLORS, shape_mask

FG_THRESHOLD = 50.0  # RGB distance from the background; the closest pair (purple on gray) is ~100 apart
MIN_OBJECT_PIXELS = 12
OFFSETS = (-0.5, 0.0, 0.5)
SCALES = (0.9, 1.0, 1.1)


@dataclass
class ImageScore:
    background: str
    color: str | None  # None when no object was found
    shape: str | None
    ious: dict[str, float] = field(default_factory=dict)  # best IoU per shape kind
    object_pixels: int = 0

    def iou(self, kind: str) -> float:
        return self.ious.get(kind, 0.0)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    values = np.asarray([table[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((values - rgb) ** 2).sum(axis=1)))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _best_ious(obj: np.ndarray, shapes) -> dict[str, float]:
    ys, xs = np.nonzero(obj)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    half = max(x1 - x0 + 1, y1 - y0 + 1) / 2
    size = obj.shape[0]
    area = obj.sum()
    best = {}
    for kind in shapes:
        score = 0.0
        for scale in SCALES:
            for dx in OFFSETS:
                for dy in OFFSETS:
                    ref = shape_mask(kind, cx + dx, cy + dy, half * scale, size=size)
                    inter = np.logical_and(ref, obj).sum()
                    score = max(score, inter / (area + ref.sum() - inter))
        best[kind] = float(score)
    return best


def score_image(image, shapes=BASE_SHAPES) -> ImageScore:
    """Analyse one square RGB image (uint8 array H x W x 3 or PIL image)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=-1))
    obj = _largest_blob(distance > FG_THRESHOLD)
    count = int(obj.sum())
    if count < MIN_OBJECT_PIXELS:
        return ImageScore(background, None, None, {}, count)
    # colour from the clearly-coloured pixels, not the anti-aliased rim
    core = obj & (distance >= 0.7 * np.percentile(distance[obj], 90))
    color = _nearest(np.median(pixels[core], axis=0), {**COLORS, **BACKGROUNDS})
    ious = _best_ious(obj, shapes)
    return ImageScore(background, color, max(ious, key=ious.get), ious, count)


def summarize(scores: list[ImageScore], expected: list[tuple[str, str, str]]) -> dict:
    """Accuracies and mean IoU of `scores` against (colour, shape, background) triples."""
    if len(scores) != len(expected):
        raise ValueError("one expected (colour, shape, background) per score")
    n = max(1, len(scores))
    color = sum(s.color == c for s, (c, _, _) in zip(scores, expected)) / n
    shape = sum(s.shape == k for s, (_, k, _) in zip(scores, expected)) / n
    background = sum(s.background == b for s, (_, _, b) in zip(scores, expected)) / n
    both = sum(s.color == c and s.shape == k for s, (c, k, _) in zip(scores, expected)) / n
    iou = sum(s.iou(k) for s, (_, k, _) in zip(scores, expected)) / n
    return {
        "images": len(scores),
        "color_accuracy": color,
        "shape_accuracy": shape,
        "color_and_shape_accuracy": both,
        "background_accuracy": background,
        "mean_iou": iou,
    }


def generate_images(parts, prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 5.0,
                    size: int = 64, batch_size: int = 64, negative_prompt: str = "") -> np.ndarray:
    """uint8 images [len(prompts), size, size, 3]: DDIM with classifier-free guidance, one seed per prompt.

    The scheduler is the one sample images during training get (library/training/sampling.py)."""
    import torch

    from library.training.sampling import make_scheduler

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    scheduler = make_scheduler("ddim", parts.v_parameterization, parts.noise_scheduler.config)
    pipe = parts.to_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            result = pipe(
                prompt=chunk,
                negative_prompt=[negative_prompt] * len(chunk),
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
            ).images
            out.append((np.clip(result, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def concept_scores(images, concept: str, shapes=BASE_SHAPES) -> dict:
    """How much a set of images shows `concept` (a shape kind, e.g. the quickstart's "heart").

    share: fraction of images whose nearest template, among `shapes` plus `concept`, is the concept;
    mean_iou: mean IoU of the concept's template (0 for an image without an object).
    """
    kinds = tuple(shapes) + ((concept,) if concept not in shapes else ())
    scores = [score_image(image, kinds) for image in images]
    n = max(1, len(scores))
    return {
        "images": len(scores),
        "share": sum(s.shape == concept for s in scores) / n,
        "mean_iou": sum(s.iou(concept) for s in scores) / n,
        "shapes": [s.shape for s in scores],
    }
