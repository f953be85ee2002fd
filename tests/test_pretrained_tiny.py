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

# one caption per shape; the model card measures every (colour, shape) pair right in all its seeds
CASES = [("red", "circle"), ("blue", "square"), ("orange", "triangle"), ("purple", "star"), ("green", "cross"), ("cyan", "ring")]


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


def test_shipped_files_fit_25_mb_with_the_real_clip_tokenizer(parts, tmp_path):
    from library.models.tokenizer import build_clip_tokenizer

    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    total += SINGLE_FILE.stat().st_size if SINGLE_FILE.is_file() else 0
    assert total <= 25_000_000, f"models/tiny-sd-shapes* take {total / 1e6:.1f} MB"
    # the folder ships vocab.json + merges.txt only; they must give CLIP's own token ids
    reference = build_clip_tokenizer(tmp_path)
    prompts = ["a red circle on a white background", "sks, (masterpiece:1.2), photo of a dog <|endoftext|>"]
    assert parts.tokenizer(prompts).input_ids == reference(prompts).input_ids
    assert parts.tokenizer.model_max_length == 77
