"""Image listing, decoding (EXIF, alpha, huge, broken files) and resize/crop/augment helpers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.images import (
    ImageReadError,
    check_images_readable,
    color_augment,
    flip_horizontal,
    interpolation_flag,
    list_images,
    load_image,
    load_image_with_alpha,
    read_image_size,
    resize_and_crop,
    to_tensor,
)


def _two_tone(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: shows which way an image was rotated."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_list_images_matches_every_extension_in_any_case(tmp_path):
    names = ["a.PNG", "b.jpg", "c.JPEG", "d.WebP", "e.bmp", "f.Jpg"]
    for name in names + ["notes.txt", "caption.caption", ".hidden.png", "noext"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory named like an image is not an image
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(b"x")  # not recursive

    assert [p.name for p in list_images(tmp_path)] == sorted(names)
    assert all(p.parent == tmp_path for p in list_images(tmp_path))


def test_exif_rotated_jpeg_loads_upright_with_swapped_size(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    _two_tone(80, 40).save(path, quality=95, exif=exif)

    assert read_image_size(path) == (40, 80)
    image = load_image(path)
    assert image.shape == (80, 40, 3) and image.dtype == np.uint8
    # clockwise rotation moves the stored left (red) half to the top
    assert image[10, 20, 0] > 200 and image[10, 20, 2] < 60
    assert image[70, 20, 2] > 200 and image[70, 20, 0] < 60
    assert load_image(path, max_side=40).shape == (40, 20, 3)  # shrinking keeps the displayed orientation


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 128)  # half-transparent red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")

    image = load_image(tmp_path / "rgba.png")
    assert image.shape == (4, 4, 3)
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[0, 1].tolist() == [255, 127, 127]
    assert image[3, 3].tolist() == [255, 255, 255]

    _, alpha = load_image_with_alpha(tmp_path / "rgba.png")
    assert alpha is not None and alpha[0, 1] == 128 and alpha[3, 3] == 0

    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[0, 0].tolist() == [255, 255, 255]
    assert load_image(tmp_path / "la.png")[0, 1].tolist() == [0, 0, 0]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").tolist() == [[[255, 255, 255], [0, 255, 0]]]
    assert load_image_with_alpha(tmp_path / "p.png")[1] is not None


def test_grayscale_cmyk_and_16bit_become_rgb(tmp_path):
    Image.new("L", (3, 2), 100).save(tmp_path / "gray.png")
    Image.new("CMYK", (3, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "gray.png").tolist()[0][0] == [100, 100, 100]
    assert load_image(tmp_path / "cmyk.jpg").shape == (2, 3, 3)
    assert load_image(tmp_path / "cmyk.jpg").min() > 240  # no ink = white
    assert load_image(tmp_path / "deep.png").tolist()[0][0] == [255, 255, 255]
    assert load_image_with_alpha(tmp_path / "gray.png")[1] is None


def test_huge_image_is_downscaled_on_load(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(path, quality=80)

    assert read_image_size(path) == (4000, 3000)
    image = load_image(path)
    assert image.shape == (1536, 2048, 3)
    assert abs(int(image[700, 1000, 1]) - 200) < 6
    assert load_image(path, max_side=512).shape == (384, 512, 3)


def test_max_side_shrinks_non_jpeg_and_never_enlarges(tmp_path):
    path = tmp_path / "wide.png"
    _two_tone(1200, 600).save(path)
    assert load_image(path, max_side=300).shape == (150, 300, 3)
    assert load_image(path, max_side=5000).shape == (600, 1200, 3)


def test_broken_files_are_reported_with_reasons(tmp_path):
    good = tmp_path / "good.jpg"
    # noise makes the entropy-coded data long enough to cut in the middle
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")

    report = dict(check_images_readable([good, truncated, empty, garbage], workers=2))
    assert set(report) == {truncated, empty, garbage}
    assert "truncated" in report[truncated]
    assert "empty" in report[empty]
    assert "not a recognised image" in report[garbage]

    with pytest.raises(ImageReadError, match="truncated.jpg") as caught:
        load_image(truncated)
    assert caught.value.path == truncated
    assert pickle.loads(pickle.dumps(caught.value)).reason == caught.value.reason
    with pytest.raises(ImageReadError, match="empty file"):
        load_image(empty)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image_size(tmp_path / "nope.png")


def test_resize_and_crop_gives_the_bucket():
    image = np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8)
    out = resize_and_crop(image, (48, 80), (48, 64), (0, 8))
    assert out.shape == (64, 48, 3)
    up = resize_and_crop(image, (120, 200), (64, 192), (28, 4), interpolation="bicubic")
    assert up.shape == (192, 64, 3)
    mask = resize_and_crop(np.full((100, 60), 255, np.uint8), (48, 80), (48, 64), (0, 8))
    assert mask.shape == (64, 48) and mask.min() == 255
    same = resize_and_crop(image, (60, 100), (60, 100), (0, 0))
    assert np.array_equal(same, image)
    with pytest.raises(ValueError, match="does not fit"):
        resize_and_crop(image, (48, 80), (48, 64), (1, 8))
    with pytest.raises(ValueError, match="lanczos"):
        resize_and_crop(image, (48, 80), (48, 64), (0, 8), interpolation="magic")


def test_auto_interpolation_areas_down_lanczos_up():
    import cv2

    assert interpolation_flag("auto", (100, 100), (50, 50)) == cv2.INTER_AREA
    assert interpolation_flag("auto", (100, 100), (150, 100)) == cv2.INTER_LANCZOS4
    assert interpolation_flag("linear", (1, 1), (2, 2)) == cv2.INTER_LINEAR


def test_flip_color_augment_and_tensor():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    assert np.array_equal(flip_horizontal(image)[:, 0], image[:, -1])

    outputs = [color_augment(image, np.random.default_rng(seed)) for seed in range(30)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    changed = [o for o in outputs if not np.array_equal(o, image)]
    assert 0 < len(changed) < len(outputs)  # applied about one time in three
    assert all(np.abs(o.astype(int) - image).mean() < 40 for o in changed)  # weak
    again = color_augment(image, np.random.default_rng(3))
    assert np.array_equal(again, outputs[3])  # reproducible from the generator

    tensor = to_tensor(np.array([[[0, 255, 128]]], np.uint8))
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
