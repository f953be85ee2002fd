"""Image files in, training pixels out: listing, decoding, resize/crop and per-step augmentation.

Decoding rules (the same everywhere in the suite, so a cache written by one tool matches another):
- EXIF orientation is applied: a photo taken on its side trains upright and reports its displayed size.
- Transparency is flattened onto a WHITE background (RGBA, LA, PA, and P/L/RGB with a tRNS colour).
  White rather than black because line art and cut-out subjects are usually drawn on white; the raw
  RGB under transparent pixels is often garbage. `load_image_with_alpha` also returns the alpha
  channel for `alpha_mask` training.
- Grayscale, CMYK, YCbCr and 16-bit images are converted to 8-bit RGB.
- Very large images are shrunk while decoding (JPEG DCT scaling via `draft`, then Pillow's reducing
  resize with LANCZOS), so a 4000x3000 photo costs the memory of the size it trains at.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from library.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Images with a side at least this long are always shrunk on load...
LARGE_IMAGE_SIDE = 3000
# ...to this longer side when the caller did not say how large it needs them (pass max_side).
LARGE_IMAGE_DEFAULT_SIDE = 2048
WHITE = 255

# Interpolation names accepted by `resize_and_crop` (and upstream's --resize_interpolation).
INTERPOLATIONS = types.MappingProxyType({
    "lanczos": cv2.INTER_LANCZOS4,
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "box": cv2.INTER_AREA,
})

Size = tuple[int, int]  # (width, height)


class ImageReadError(UserError, RuntimeError):
    """An image file that cannot be decoded; the message names the file and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. "
            "Re-save or replace the file, or move it out of the dataset folder."
        )

    def __reduce__(self):  # keep it picklable (dataloader workers) despite the two-argument __init__
        return (type(self), (str(self.path), self.reason))


# ---------------------------------------------------------------- listing


def image_extensions() -> tuple[str, ...]:
    """The always-supported extensions plus those of optional decoders installed here."""
    extra = (".avif",) if features.check("avif") else ()
    return IMAGE_EXTENSIONS + extra


def is_image_file(name: str, extensions: Sequence[str] | None = None) -> bool:
    return os.path.splitext(name)[1].lower() in (extensions or image_extensions())


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name.

    Hidden files (".name") are skipped like upstream's glob does; this also drops macOS "._x.png"
    resource-fork files that look like images but are not.
    """
    extensions = image_extensions()
    with os.scandir(folder) as entries:
        names = [
            entry.name
            for entry in entries
            if not entry.name.startswith(".") and is_image_file(entry.name, extensions) and entry.is_file()
        ]
    return [Path(folder) / name for name in sorted(names)]


# ---------------------------------------------------------------- decoding

_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make a decodable image unreadable
        return 1


def _describe(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image (unknown format or corrupt header)"
    message = str(error) or type(error).__name__
    if "truncated" in message:
        return f"truncated or corrupt image data ({message})"
    return f"{type(error).__name__}: {message}"


def _open(path: Path) -> Image.Image:
    """Open lazily (header only); empty and missing files get a plain reason."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        return Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(path, _describe(error)) from error


def read_image_size(path: str | os.PathLike) -> Size:
    """(width, height) as displayed, read from the header only (EXIF rotation swaps the sides)."""
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return width, height


def _shrink_target(size: Size, max_side: int | None) -> Size | None:
    """The size to shrink to, or None when the image may be loaded as it is."""
    limit = max_side
    if limit is None and max(size) >= LARGE_IMAGE_SIDE:
        limit = LARGE_IMAGE_DEFAULT_SIDE
    if limit is None or max(size) <= limit:
        return None
    scale = limit / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> 8-bit "L" (Pillow would clip instead of scale)."""
    values = np.asarray(img).astype(np.float32)
    if img.mode == "F":
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:
        peak = 65535.0 if values.size and values.max() > 255 else 255.0
    return Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB", or "RGBA" when the image carries transparency."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _to_8bit_gray(img)
    if img.has_transparency_data:
        return img if img.mode == "RGBA" else img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(path: Path, max_side: int | None) -> Image.Image:
    """Decode to an upright RGB/RGBA Pillow image, shrunk while decoding when it is large."""
    with _open(path) as img:
        try:
            target = _shrink_target(img.size, max_side)  # max side is the same before/after rotation
            if target is not None:
                img.draft(None, target)  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never below target
            img.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES stays False)
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # unreadable EXIF: keep the stored orientation
                upright = img
            upright = _normalise_mode(upright)
            if target is not None:
                if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
                    target = (target[1], target[0])
                if upright.size != target:
                    # reducing_gap: integer box reduction first, then LANCZOS for the remainder
                    upright = upright.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return upright
        except ImageReadError:
            raise
        except Exception as error:
            raise ImageReadError(path, _describe(error)) from error


def flatten_alpha(rgb: np.ndarray, alpha: np.ndarray, background: int = WHITE) -> np.ndarray:
    """Composite RGB over a flat background using an 8-bit alpha channel (rounded, uint8 in/out)."""
    a = alpha.astype(np.uint32)[..., None]
    mixed = rgb.astype(np.uint32) * a + background * (255 - a)
    return ((mixed + 127) // 255).astype(np.uint8)


def load_image_with_alpha(path: str | os.PathLike, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB HxWx3 uint8 flattened onto white, alpha HxW uint8 or None when the image has none)."""
    pixels = np.array(_decode(Path(path), max_side))  # a writable copy (asarray would be read-only)
    if pixels.shape[2] == 3:
        return pixels, None
    alpha = np.ascontiguousarray(pixels[..., 3])
    return flatten_alpha(pixels[..., :3], alpha), alpha


def load_mask_channel(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """HxW uint8: the first channel of an image used as a loss mask (grey for a grey image; transparency
    is not composited, so an RGBA mask gives its raw red channel, as upstream reads mask images)."""
    pixels = np.asarray(_decode(Path(path), max_side))
    return np.ascontiguousarray(pixels[..., 0])


def load_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, upright, transparency flattened onto white.

    `max_side` bounds the longer side (images are only ever shrunk here). Pass the longer side of
    the size the image will be resized to; without it, images with a side >= LARGE_IMAGE_SIDE are
    shrunk to LARGE_IMAGE_DEFAULT_SIDE. Raises ImageReadError naming the file.
    """
    return load_image_with_alpha(path, max_side)[0]


# ---------------------------------------------------------------- readability check


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why the file cannot be decoded, or None when it decodes completely.

    Decodes all image data (Image.verify() misses truncated JPEGs); JPEGs are decoded at 1/8
    scale, which still reads every byte of the entropy-coded data.
    """
    path = Path(path)
    try:
        with _open(path) as img:
            img.draft(None, (1, 1))
            img.load()
            if img.width < 1 or img.height < 1:
                return "image has no pixels"
    except ImageReadError as error:
        return error.reason
    except Exception as error:
        return _describe(error)
    return None


def check_images_readable(
    paths: Iterable[str | os.PathLike], workers: int | None = None, remember: bool = True
) -> list[tuple[Path, str]]:
    """Every unreadable/empty/truncated file with its reason, in input order (empty list: all good).

    Decoded in parallel; images that decoded in an earlier check and are unchanged since are skipped
    (``remember``). The check lives in image_check.py (remembered, parallel, in the background if asked).
    """
    from library.data.image_check import check_images_readable as check  # image_check builds on this module

    return check(paths, workers, remember)


# ---------------------------------------------------------------- resize, crop, augment


def interpolation_flag(name: str, source: Size, target: Size) -> int:
    """cv2 flag for an interpolation name; "auto" = INTER_AREA to shrink, LANCZOS4 to enlarge."""
    if name == "auto":
        shrinking = target[0] <= source[0] and target[1] <= source[1]
        return cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        choices = ", ".join(["auto", *INTERPOLATIONS])
        raise ValueError(f"unknown interpolation {name!r}; use one of: {choices}") from None


def center_crop_left_top(resized_size: Size, bucket: Size) -> Size:
    return (resized_size[0] - bucket[0]) // 2, (resized_size[1] - bucket[1]) // 2


def random_crop_left_top(resized_size: Size, bucket: Size, rng: np.random.Generator) -> Size:
    return (
        int(rng.integers(0, resized_size[0] - bucket[0] + 1)),
        int(rng.integers(0, resized_size[1] - bucket[1] + 1)),
    )


def face_from_name(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """Face box written into a file name by face-crop tools: ``<name>_<cx>_<cy>_<w>_<h>.<ext>``.

    (centre x, centre y, width, height) in pixels of the image, or None when the name does
    not end in four integer fields or the box is unusable (centre x or size not positive). sd-scripts
    reads the same fields but stops with an error on non-numbers ("my_cat_on_the_sofa.png").
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    fields = stem.split("_")
    if len(fields) < 5:
        return None
    try:
        cx, cy, w, h = (int(field) for field in fields[-4:])
    except ValueError:
        return None
    if cx <= 0 or max(w, h) <= 0:  # sd-scripts: face_cx > 0 means "has face info"; a 0-sized face divides by 0
        return None
    return cx, cy, w, h


def face_crop_window(
    image_size: Size,
    target: Size,
    face: tuple[int, int, int, int],
    scale_range: tuple[float, float],
    random_crop: bool,
    rng: np.random.Generator,
) -> tuple[Size, Size]:
    """(resized size, crop left-top) that puts the face near the centre of a ``target`` (w, h) crop.

    sd-scripts' ``crop_target`` with ``face_crop_aug_range = (a, b)``: the image is scaled so that the
    face's longer side is between 1/b and 1/a of the target's shorter side (never enlarged, never
    below the size that covers the target), by a random factor in that range; the crop is centred on
    the face, shifted a little at random when a != b and the face is large (or freely with
    random_crop), and kept inside the image. Randomness comes from ``rng`` (uniform scale, then the
    vertical and the horizontal shift). Unlike sd-scripts, an image smaller than the target is
    enlarged to cover it instead of stopping with an internal error.
    """
    width, height = image_size
    target_w, target_h = target
    if (width, height) == (target_w, target_h):
        return (width, height), (0, 0)
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)
    low = min(1.0, max(cover, short_side / (face_size * scale_range[1])))
    high = min(1.0, max(low, short_side / (face_size * scale_range[0])))
    low, high = max(low, cover), max(high, cover)
    scale = low if low >= high else float(rng.uniform(low, high))
    resized_w = max(target_w, int(width * scale + 0.5))
    resized_h = max(target_h, int(height * scale + 0.5))
    face_x, face_y = int(cx * scale + 0.5), int(cy * scale + 0.5)
    offsets = []
    for target_side, length, face_p in ((target_h, resized_h, face_y), (target_w, resized_w, face_x)):
        start = face_p - target_side // 2
        if random_crop:
            # more often near the face, but sometimes far off it, to include background
            span = max(length - face_p, face_p)
            start += int(rng.integers(0, span + 1)) + int(rng.integers(0, span + 1)) - span
        elif scale_range[0] != scale_range[1] and face_size > short_side // 10 and face_size >= 40:
            start += int(rng.integers(-face_size // 20, face_size // 20 + 1))
        offsets.append(max(0, min(start, length - target_side)))
    top, left = offsets
    return (resized_w, resized_h), (left, top)


def resize_and_crop(
    image: np.ndarray,
    resized_size: Size,
    bucket: Size,
    crop_left_top: Size,
    interpolation: str = "auto",
) -> np.ndarray:
    """Resize to `resized_size` (w, h), then cut the `bucket` (w, h) window at `crop_left_top`.

    Works for HxWxC images and HxW masks. The result is bucket[1] x bucket[0].
    """
    (rw, rh), (bw, bh), (left, top) = resized_size, bucket, crop_left_top
    if not (0 <= left and left + bw <= rw and 0 <= top and top + bh <= rh):
        raise ValueError(
            f"crop {bw}x{bh} at ({left},{top}) does not fit inside the resized image {rw}x{rh}"
        )
    source = (image.shape[1], image.shape[0])
    if source != (rw, rh):
        image = cv2.resize(image, (rw, rh), interpolation=interpolation_flag(interpolation, source, (rw, rh)))
    return np.ascontiguousarray(image[top : top + bh, left : left + bw])


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def color_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weak colour jitter like upstream's color_aug: one time in three, either a hue shift of up
    to +-8 (OpenCV hue units, 0..180) or a gamma in [0.95, 1.05]; otherwise unchanged."""
    if rng.random() >= 1 / 3:
        return image
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-8.0, 8.0)
        hsv[..., 0] = np.round(hsv[..., 0].astype(np.float32) + shift).astype(np.int32) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return lut[image]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [3, H, W] in [-1, 1] (what the VAE expects)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0
