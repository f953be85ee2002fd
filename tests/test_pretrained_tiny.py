"""The shipped tiny base model (models/tiny-sd-shapes, built by tools/build_pretrained_tiny.py) still
loads in both layouts and draws the colours it was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "models" / "tiny-sd-shapes"
SINGLE_FILE = ROOT / "models" / "tiny-sd-shapes.safetensors"

pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(),
    reason="models/tiny-sd-shapes is missing; build it with `python tools/build_pretrained_tiny.py --out models`",
)

# (colour, shape) pairs the model card measures as reliable (colour and shape right in all its seeds)
CASES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]


@pytest.fixture(scope="module")
def parts():
    from library.models.loading import load_base_model

    return load_base_model(str(FOLDER))


def test_generates_the_captioned_colour_and_shape_on_the_captioned_background(parts):
    from tools.shape_data import caption_for
    from tools.shape_metrics import generate_images, score_image

    prompts = [caption_for(color, shape) for color, shape in CASES]
    images = generate_images(parts, prompts, [1000] * len(prompts), steps=25, guidance=5.0)
    assert images.shape == (len(CASES), 64, 64, 3)
    for (color, shape), image in zip(CASES, images):
        score = score_image(image)
        assert score.background == "white", f"{color} {shape}: background {score.background}"
        assert score.color == color, f"{color} {shape}: drew {score.color} ({score.shape})"
        assert score.shape == shape, f"{color} {shape}: drew a {score.shape} (IoU {score.iou(shape):.2f})"


@pytest.mark.skipif(not SINGLE_FILE.is_file(), reason="models/tiny-sd-shapes.safetensors is missing")
def test_single_file_holds_the_same_weights(parts):
    from library.models.loading import load_base_model

    single = load_base_model(str(SINGLE_FILE))
    for name in ("unet", "vae", "text_encoder"):
        folder_sd, file_sd = getattr(parts, name).state_dict(), getattr(single, name).state_dict()
        assert folder_sd.keys() == file_sd.keys(), name
        assert all(torch.equal(folder_sd[k], file_sd[k]) for k in folder_sd), name
