"""face_crop_aug_range: face box from the file name, sd-scripts' crop_target scale/offset rule, wiring."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.datasets import build_dataset_group
from library.data.images import face_crop_window, face_from_name
from library.data.latent_cache import LatentCacheResult
from library.data.pipeline import latent_caching_problems


def upstream_crop_target(image_size, target, face, scale_range, random_crop, rnd: random.Random):
    """sd-scripts' BaseDataset.crop_target reduced to (resized size, crop left-top), with its own
    Python random generator standing in for the global one (for images at least as large as target)."""
    width, height = image_size
    target_w, target_h = target
    if (height, width) == (target_h, target_w):
        return (width, height), (0, 0)
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    size = min(target_h, target_w)
    min_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * scale_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * scale_range[0])))
    scale = min_scale if min_scale >= max_scale else rnd.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
    offsets = []
    for target_size, length, face_p in zip((target_h, target_w), (nh, nw), (face_cy, face_cx)):
        p1 = face_p - target_size // 2
        if random_crop:
            span = max(length - face_p, face_p)
            p1 = p1 + (rnd.randint(0, span) + rnd.randint(0, span)) - span
        elif scale_range[0] != scale_range[1] and face_size > size // 10 and face_size >= 40:
            p1 = p1 + rnd.randint(-face_size // 20, +face_size // 20)
        offsets.append(max(0, min(p1, length - target_size)))
    return (nw, nh), (offsets[1], offsets[0])


class PythonRandomAsGenerator:
    """The two numpy Generator methods face_crop_window uses, answered by a Python random.Random
    (integers' high is exclusive, randint's inclusive), so both rules see the same random numbers."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def uniform(self, low: float, high: float) -> float:
        return self.rnd.uniform(low, high)

    def integers(self, low: int, high: int) -> int:
        return self.rnd.randint(low, high - 1)


# ---------------------------------------------------------------- the file name


@pytest.mark.parametrize(
    ("name", "face"),
    [
        ("girl_a_120_80_64_48.png", (120, 80, 64, 48)),
        ("/data/x/img_1_2_3_4.jpg", (1, 2, 3, 4)),
        ("_5_6_7_8.png", (5, 6, 7, 8)),  # sd-scripts needs 5 fields; the first may be empty
        ("a_1_2_3.png", None),  # four fields: no face box
        ("my_cat_on_the_sofa.png", None),  # words, not numbers (sd-scripts would stop with an error)
        ("img_0_10_20_20.png", None),  # centre x 0: sd-scripts' "no face info"
        ("img_10_10_0_0.png", None),  # no size: would divide by zero
        ("plain.png", None),
    ],
)
def test_face_from_name(name, face):
    assert face_from_name(name) == face


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("random_crop", [False, True])
@pytest.mark.parametrize(
    ("image_size", "target", "face", "scale_range"),
    [
        ((1000, 800), (256, 256), (500, 400, 200, 200), (2.0, 4.0)),
        ((1000, 800), (256, 256), (500, 400, 200, 200), (3.0, 3.0)),
        ((640, 960), (320, 448), (100, 900, 60, 80), (1.5, 2.5)),  # face near a corner: crop kept inside
        ((512, 512), (512, 512), (256, 256, 100, 100), (2.0, 4.0)),  # already the target size
        ((3000, 2000), (512, 768), (1500, 600, 30, 30), (2.0, 4.0)),  # tiny face: scale capped at 1
    ],
)
def test_matches_sd_scripts_crop_target(image_size, target, face, scale_range, random_crop):
    for seed in range(20):
        expected = upstream_crop_target(image_size, target, face, scale_range, random_crop, random.Random(seed))
        got = face_crop_window(image_size, target, face, scale_range, random_crop, PythonRandomAsGenerator(seed))
        assert got == expected, seed
        (resized_w, resized_h), (left, top) = got
        assert 0 <= left <= resized_w - target[0] and 0 <= top <= resized_h - target[1]


def test_scale_range_bounds_the_face_size_and_centres_it():
    target, face = (256, 256), (500, 400, 200, 200)
    scales = set()
    for seed in range(50):
        (resized_w, _), (left, top) = face_crop_window(
            (1000, 800), target, face, (2.0, 4.0), False, np.random.default_rng(seed)
        )
        scale = resized_w / 1000
        scales.add(round(scale, 3))
        # face longer side between 1/4 and 1/2 of the target's shorter side (rounding aside)
        assert 256 / 4 - 1 <= 200 * scale <= 256 / 2 + 1
        # the face centre is within the +-face/20 jitter of the crop centre
        face_x, face_y = 500 * scale, 400 * scale
        jitter = 200 // 20 + 1
        assert abs(face_x - (left + 128)) <= jitter and abs(face_y - (top + 128)) <= jitter
    assert len(scales) > 10  # a random scale per sample


def test_small_image_is_enlarged_to_cover_instead_of_failing():
    (resized_w, resized_h), (left, top) = face_crop_window(
        (100, 80), (256, 256), (50, 40, 20, 20), (2.0, 4.0), False, np.random.default_rng(0)
    )
    assert resized_w >= 256 and resized_h >= 256
    assert 0 <= left <= resized_w - 256 and 0 <= top <= resized_h - 256


def test_same_generator_state_same_window():
    args = ((1000, 800), (256, 256), (500, 400, 200, 200), (2.0, 4.0), True)
    first = face_crop_window(*args, np.random.default_rng([1, 2, 3]))
    assert face_crop_window(*args, np.random.default_rng([1, 2, 3])) == first
    assert any(face_crop_window(*args, np.random.default_rng([1, 2, s])) != first for s in range(4, 10))


# ---------------------------------------------------------------- wiring


def _face_folder(tmp_path):
    """A white 400x300 image with a red 40x40 square centred at (300, 100), named with that face box,
    and a plain image without a face box."""
    folder = tmp_path / "faces"
    folder.mkdir()
    pixels = np.full((300, 400, 3), 255, dtype=np.uint8)
    pixels[80:120, 280:320] = (255, 0, 0)
    Image.fromarray(pixels).save(folder / "pic_300_100_40_40.png")
    Image.new("RGB", (400, 300), (255, 255, 255)).save(folder / "plain.png")
    return folder


def _dataset(folder, **subset_options):
    subset = SubsetBlueprint(image_dir=str(folder), class_tokens="face", **subset_options)
    return DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1, enable_bucket=False,
                            subsets=(subset,))


def _image_of(group, name, epoch=1):
    for plan in group.batches_for_epoch(epoch):
        batch = group.load_batch(plan, epoch)
        if batch["image_paths"][0].endswith(name):
            return batch["images"][0]
    raise AssertionError(name)


def _is_red(pixel) -> bool:  # [-1, 1] RGB
    return pixel[0] > 0.9 and pixel[1] < -0.9 and pixel[2] < -0.9


def test_load_batch_crops_around_the_named_face(tmp_path):
    folder = _face_folder(tmp_path)
    with_face = build_dataset_group([_dataset(folder, face_crop_aug_range=(2.0, 2.0))], check_readable=False)
    image = _image_of(with_face, "pic_300_100_40_40.png")
    assert image.shape == (3, 64, 64)
    # range (2, 2): the face is scaled to 64/2 = 32 px and centred
    assert _is_red(image[:, 32, 32]) and _is_red(image[:, 20, 20]) and _is_red(image[:, 44, 44])
    assert not _is_red(image[:, 10, 10]) and not _is_red(image[:, 54, 54])
    # without the option: the usual centre crop, where the face (top right) is not
    plain = build_dataset_group([_dataset(folder)], check_readable=False)
    assert not _is_red(_image_of(plain, "pic_300_100_40_40.png")[:, 32, 32])
    # images without a face box are centre-cropped as usual, and loading is deterministic
    assert torch.equal(_image_of(with_face, "plain.png"), _image_of(plain, "plain.png"))
    assert torch.equal(_image_of(with_face, "pic_300_100_40_40.png"), image)


def test_random_scale_changes_per_epoch_and_repeats_per_seed(tmp_path):
    folder = _face_folder(tmp_path)
    group = build_dataset_group([_dataset(folder, face_crop_aug_range=(1.0, 4.0))], seed=5, check_readable=False)
    images = [_image_of(group, "pic_300_100_40_40.png", epoch) for epoch in range(1, 5)]
    assert any(not torch.equal(images[0], other) for other in images[1:])
    again = build_dataset_group([_dataset(folder, face_crop_aug_range=(1.0, 4.0))], seed=5, check_readable=False)
    assert torch.equal(_image_of(again, "pic_300_100_40_40.png", 3), images[2])


def test_warnings_when_it_can_do_nothing(tmp_path):
    folder = _face_folder(tmp_path)
    bucketed = DatasetBlueprint(
        kind="dreambooth", resolution=(64, 64), batch_size=1, enable_bucket=True, min_bucket_reso=64,
        max_bucket_reso=128,
        subsets=(SubsetBlueprint(image_dir=str(folder), class_tokens="x", face_crop_aug_range=(2.0, 4.0)),),
    )
    group = build_dataset_group([bucketed], check_readable=False)
    assert any("face_crop_aug_range has no effect with enable_bucket" in w for w in group.warnings)
    (folder / "pic_300_100_40_40.png").rename(folder / "pic.png")
    group = build_dataset_group([_dataset(folder, face_crop_aug_range=(2.0, 4.0))], check_readable=False)
    assert any("no image name carries a face box" in w for w in group.warnings)


def test_refused_with_latent_caching(tmp_path):
    folder = _face_folder(tmp_path)
    blueprint = _dataset(folder, face_crop_aug_range=(2.0, 4.0))
    problems = latent_caching_problems([blueprint], argparse.Namespace(cache_latents=True))
    assert len(problems) == 1 and "face_crop_aug_range" in problems[0] and "--cache_latents" in problems[0]
    assert latent_caching_problems([blueprint], argparse.Namespace(cache_latents=False)) == []
    group = build_dataset_group([blueprint], check_readable=False)
    with pytest.raises(ValueError, match="face_crop_aug_range"):
        group.set_latents(LatentCacheResult(latents={}, latents_flipped={}))
