"""VAE latents cached in memory or in sd-scripts-compatible `.npz` files (formats.md §4).

File: `<image path without ext>_<W:04d>x<H:04d>_sd.npz` (W x H = original image size), or a legacy
`<stem>.npz` beside the image when one exists. Keys: `latents` float32 [4, H_b/8, W_b/8],
`original_size` int [W, H], `crop_ltrb` int [l, t, r, b], optional `latents_flipped`, `alpha_mask`.
We also write `image_mtime_ns` and `image_file_size` (int64 scalars) so a cache whose image was
edited or replaced is re-encoded; sd-scripts reads keys by name, so the extra ones are ignored there.

Validity goes beyond upstream: the latent shape must match the current bucket (upstream reuses
stale files after a resolution/bucket change, formats.md §10 item 7).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.data.images import Size, center_crop_left_top, load_image_with_alpha, resize_and_crop, to_tensor
from library.errors import UserError
from library.fileio import atomic_path

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

CACHE_SUFFIX = "_sd.npz"
LATENT_STRIDE = 8  # SD1/SD2 VAE downsamples by 8
LATENT_CHANNELS = 4
SD_KEYS = ("latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask")
STAMP_KEYS = ("image_mtime_ns", "image_file_size")
VALID = "valid"

LATENT_CACHE_FORBIDS = ("color_aug", "random_crop", "face_crop_aug_range")
LATENT_CACHE_FORBIDS_REASON = (
    "latents are encoded once before training, so per-step colour augmentation, random crops and "
    "random face-centred crops (face_crop_aug_range) cannot be applied to them: turn "
    "color_aug/random_crop/face_crop_aug_range off or do not cache latents"
)


class LatentCacheError(UserError, RuntimeError):
    """A cache file that cannot be used as asked; the message names the file and the fix."""


# ---------------------------------------------------------------- file names


def cache_file_path(image_path: str | os.PathLike, original_size: Size) -> Path:
    """`<image path without ext>_<W:04d>x<H:04d>_sd.npz` (upstream's SD naming)."""
    base, _ = os.path.splitext(os.fspath(image_path))
    return Path(f"{base}_{original_size[0]:04d}x{original_size[1]:04d}{CACHE_SUFFIX}")


def legacy_cache_file_path(image_path: str | os.PathLike) -> Path:
    """`<stem>.npz` beside the image (sd-scripts v0.8.7 / prepare_buckets_latents.py)."""
    return Path(image_path).with_suffix(".npz")


def find_cache_file(image_path: str | os.PathLike, original_size: Size) -> Path:
    """The file to read/write for an image: the legacy one when it exists (as upstream), else the new name."""
    legacy = legacy_cache_file_path(image_path)
    return legacy if legacy.is_file() else cache_file_path(image_path, original_size)


def original_size_from_cache_name(npz_path: str | os.PathLike) -> Size:
    """(W, H) parsed back from `…_<W>x<H>_sd.npz` (second-to-last `_` field), to skip image headers."""
    stem = os.path.basename(os.fspath(npz_path))[: -len(".npz")]
    width, height = stem.split("_")[-2].split("x")
    return int(width), int(height)


# ---------------------------------------------------------------- validity


@dataclass(frozen=True)
class CacheRequirement:
    """What a cache file must hold to be reused for one image in its current bucket."""

    latent_shape: tuple[int, int, int]  # (4, H_b/8, W_b/8)
    flip_aug: bool = False
    alpha_mask: bool = False

    @classmethod
    def for_bucket(cls, bucket: Size, flip_aug: bool = False, alpha_mask: bool = False) -> "CacheRequirement":
        shape = (LATENT_CHANNELS, bucket[1] // LATENT_STRIDE, bucket[0] // LATENT_STRIDE)
        return cls(shape, flip_aug, alpha_mask)

    @property
    def mask_shape(self) -> tuple[int, int]:
        return self.latent_shape[1] * LATENT_STRIDE, self.latent_shape[2] * LATENT_STRIDE


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(n)) for n in shape) + ")"


def image_stamp(image_path: str | os.PathLike) -> tuple[int, int]:
    """(mtime in ns, size in bytes) of the image: what our cache files record."""
    stat = os.stat(image_path)
    return stat.st_mtime_ns, stat.st_size


def _content_problem(npz, requirement: CacheRequirement) -> str | None:
    """Why the arrays in an opened npz do not fit the requirement (reads every array it checks)."""
    if "latents" not in npz.files:
        return "no latents in file"
    latents = npz["latents"]
    if tuple(latents.shape) != requirement.latent_shape:
        return (
            f"latent shape {_shape_text(latents.shape)} != expected {_shape_text(requirement.latent_shape)}: "
            "resolution or bucket changed"
        )
    if not np.isfinite(latents).all():
        return "latents contain NaN/inf (VAE overflow; use a float32 VAE, e.g. --no_half_vae)"
    if requirement.flip_aug:
        if "latents_flipped" not in npz.files:
            return "no flipped latents"
        if tuple(npz["latents_flipped"].shape) != requirement.latent_shape:
            return "flipped latent shape does not match the bucket"
    if requirement.alpha_mask:
        if "alpha_mask" not in npz.files:
            return "no alpha mask"
        if tuple(npz["alpha_mask"].shape) != requirement.mask_shape:
            return "alpha mask shape does not match the bucket"
    return None


def _image_change_problem(npz, npz_path: Path, image_path: Path) -> str | None:
    mtime_ns, size = image_stamp(image_path)
    if all(key in npz.files for key in STAMP_KEYS):
        if int(npz["image_mtime_ns"]) != mtime_ns or int(npz["image_file_size"]) != size:
            return "image changed since caching"
        return None
    # Written by sd-scripts (no stamp): trust it unless the image is newer than the cache.
    if os.stat(npz_path).st_mtime_ns < mtime_ns:
        return "image changed since caching"
    return None


def cache_status(
    npz_path: str | os.PathLike, image_path: str | os.PathLike | None, requirement: CacheRequirement
) -> str:
    """"valid", or a short reason the file cannot be reused (see module docstring)."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        return "missing"
    try:
        with np.load(npz_path) as npz:
            problem = _content_problem(npz, requirement)
            if problem is None and image_path is not None:
                problem = _image_change_problem(npz, npz_path, Path(image_path))
    except FileNotFoundError:
        return "image missing" if npz_path.is_file() else "missing"
    except Exception:  # BadZipFile, EOFError, ValueError, OSError: all mean "cannot be read back"
        return "corrupt or truncated"
    return problem or VALID


# ---------------------------------------------------------------- read / write


def _existing_foreign_keys(npz_path: Path) -> dict[str, np.ndarray]:
    """Keys of a readable existing file that are not ours to rewrite (e.g. other architectures')."""
    if not npz_path.is_file():
        return {}
    try:
        with np.load(npz_path) as npz:
            return {key: npz[key] for key in npz.files if key not in SD_KEYS + STAMP_KEYS}
    except Exception:
        return {}  # unreadable: nothing worth keeping


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def write_cache(
    npz_path: str | os.PathLike,
    latents: torch.Tensor | np.ndarray,
    original_size: Size,
    crop_ltrb: Sequence[int],
    latents_flipped: torch.Tensor | np.ndarray | None = None,
    alpha_mask: torch.Tensor | np.ndarray | None = None,
    image_path: str | os.PathLike | None = None,
    *,
    stamp: tuple[int, int] | None = None,
) -> None:
    """Write one cache file atomically (np.savez, uncompressed; temp file + os.replace).

    Like upstream, keys already in the file are kept — except the SD keys and our stamps, which are
    rewritten as one set so flipped latents or a mask of an older image version never survive.
    `stamp` is the image's (mtime_ns, size) taken before it was decoded; default: stat it now.
    """
    npz_path = Path(npz_path)
    arrays = _existing_foreign_keys(npz_path)
    arrays["latents"] = _as_numpy(latents)
    arrays["original_size"] = np.array([int(original_size[0]), int(original_size[1])], dtype=np.int64)
    arrays["crop_ltrb"] = np.array([int(round(v)) for v in crop_ltrb], dtype=np.int64)
    if latents_flipped is not None:
        arrays["latents_flipped"] = _as_numpy(latents_flipped)
    if alpha_mask is not None:
        arrays["alpha_mask"] = _as_numpy(alpha_mask)
    if stamp is None and image_path is not None:
        stamp = image_stamp(image_path)
    if stamp is not None:
        arrays["image_mtime_ns"] = np.array(stamp[0], dtype=np.int64)
        arrays["image_file_size"] = np.array(stamp[1], dtype=np.int64)
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(f, **arrays)


def read_cache(npz_path: str | os.PathLike, flipped: bool = False) -> torch.Tensor:
    """The cached latents (float32 [4, h, w], unscaled), or their flipped twin."""
    key = "latents_flipped" if flipped else "latents"
    with np.load(npz_path) as npz:
        if key not in npz.files:
            raise LatentCacheError(
                f"{npz_path} has no '{key}'; delete it (or run with the cache check on) so it is re-encoded"
            )
        return torch.from_numpy(npz[key].astype(np.float32, copy=False))


def read_alpha_mask(npz_path: str | os.PathLike) -> torch.Tensor | None:
    """The cached [H_b, W_b] alpha mask in 0..1, or None when the file has none."""
    with np.load(npz_path) as npz:
        return torch.from_numpy(npz["alpha_mask"].astype(np.float32)) if "alpha_mask" in npz.files else None


def crop_ltrb_record(bucket: Size, original_size: Size) -> tuple[int, int, int, int]:
    """SDXL-style crop record stored in `crop_ltrb`: the image fitted inside the bucket, centred
    (upstream's definition; SD1/2 training does not use it, it is kept for interchangeability)."""
    (bw, bh), (w, h) = bucket, original_size
    if bw / bh > w / h:  # bucket wider than the image: heights match
        fitted_w, fitted_h = bh * w / h, float(bh)
    else:
        fitted_w, fitted_h = float(bw), bw * h / w
    left, top = int((bw - fitted_w) // 2), int((bh - fitted_h) // 2)
    return left, top, left + round(fitted_w), top + round(fitted_h)


# ---------------------------------------------------------------- encoding


def encode_latents(vae: "AutoencoderKL", images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> float32 CPU [B,4,H/8,W/8] sampled from the VAE posterior.

    NOT multiplied by vae.config.scaling_factor: caches hold raw latents (as sd-scripts' do) and
    the trainer scales them, so a cache stays valid across SD1 and SD2 VAEs' factors.
    """
    with torch.no_grad():
        pixels = images.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return latents.float().cpu()


@dataclass(frozen=True)
class LatentCacheItem:
    """One image to encode, as the dataset resized and cropped it."""

    image_path: Path
    bucket: Size  # (w, h), multiples of 8
    resized_size: Size  # (w, h) after resize, before the crop
    original_size: Size  # (w, h) displayed size of the file
    crop_left_top: Size | None = None  # None = centred
    interpolation: str = "auto"

    def __post_init__(self) -> None:  # accept str paths and list sizes (TOML, JSON)
        object.__setattr__(self, "image_path", Path(self.image_path))
        for name in ("bucket", "resized_size", "original_size", "crop_left_top"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))

    @property
    def npz_path(self) -> Path:
        return find_cache_file(self.image_path, self.original_size)


@dataclass
class LatentCacheResult:
    """What `cache_latents` did. Memory mode fills the tensor dicts; disk mode fills `npz_paths`."""

    latents: dict[Path, torch.Tensor] = field(default_factory=dict)
    latents_flipped: dict[Path, torch.Tensor] = field(default_factory=dict)
    alpha_masks: dict[Path, torch.Tensor] = field(default_factory=dict)
    npz_paths: dict[Path, Path] = field(default_factory=dict)
    encoded: int = 0  # images run through the VAE
    reused: int = 0  # valid disk caches skipped
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # why caches were re-encoded


@dataclass(frozen=True)
class _Prepared:
    pixels: torch.Tensor  # [3, H_b, W_b] in [-1, 1]
    mask: torch.Tensor | None  # [H_b, W_b] in 0..1
    stamp: tuple[int, int]


def _prepare(item: LatentCacheItem, alpha_mask: bool) -> _Prepared:
    stamp = image_stamp(item.image_path)  # before decoding: a later edit must look like a change
    rgb, alpha = load_image_with_alpha(item.image_path, max_side=max(item.resized_size))
    crop = item.crop_left_top or center_crop_left_top(item.resized_size, item.bucket)
    rgb = resize_and_crop(rgb, item.resized_size, item.bucket, crop, item.interpolation)
    mask = None
    if alpha_mask:
        if alpha is None:
            mask = torch.ones(item.bucket[1], item.bucket[0])
        else:
            alpha = resize_and_crop(alpha, item.resized_size, item.bucket, crop, item.interpolation)
            mask = torch.from_numpy(alpha.astype(np.float32) / 255.0)
    return _Prepared(to_tensor(rgb), mask, stamp)


def _unique_items(items: Iterable[LatentCacheItem]) -> list[LatentCacheItem]:
    """Drop exact duplicates; refuse one image in two buckets (both would share one cache file)."""
    seen: dict[Path, LatentCacheItem] = {}
    for item in items:
        earlier = seen.setdefault(item.image_path, item)
        if (earlier.bucket, earlier.resized_size) != (item.bucket, item.resized_size):
            raise LatentCacheError(
                f"{item.image_path} is used at two bucket sizes ({earlier.bucket} and {item.bucket}); "
                "its latents can be cached for one only: give the datasets the same resolution or copy the image"
            )
    return list(seen.values())


def _refuse_shared_files(npz_paths: dict[Path, Path]) -> None:
    """Two images that map to one cache file (img.png + img.jpg of one size) would overwrite each other."""
    owners: dict[Path, Path] = {}
    for image, npz in npz_paths.items():
        other = owners.setdefault(npz, image)
        if other != image:
            raise LatentCacheError(
                f"{other} and {image} would share the latent cache file {npz}; rename one of the images"
            )


def _batches_by_bucket(items: Sequence[LatentCacheItem], batch_size: int) -> list[list[LatentCacheItem]]:
    """Batches of at most `batch_size`, never mixing bucket sizes (the VAE needs one shape per batch)."""
    groups: dict[Size, list[LatentCacheItem]] = defaultdict(list)
    for item in items:
        groups[tuple(item.bucket)].append(item)
    return [
        group[start : start + batch_size]
        for _, group in sorted(groups.items())
        for start in range(0, len(group), batch_size)
    ]


def _log_reasons(reasons: dict[str, int]) -> None:
    for reason, count in sorted(reasons.items()):
        log = logger.info if reason == "missing" else logger.warning
        log("latent cache: %d file(s) to (re-)encode: %s", count, reason)


def _check_finite(latents: torch.Tensor, batch: Sequence[LatentCacheItem]) -> None:
    for item, one in zip(batch, latents):
        if not torch.isfinite(one).all():
            raise LatentCacheError(
                f"VAE produced NaN/inf latents for {item.image_path}; use a float32 VAE (--no_half_vae)"
            )


def _disk_status(item: LatentCacheItem, flip_aug: bool, alpha_mask: bool, skip_cache_check: bool) -> str:
    npz_path = item.npz_path
    if skip_cache_check:  # --skip_cache_check: trust any existing file
        return VALID if npz_path.is_file() else "missing"
    return cache_status(npz_path, item.image_path, CacheRequirement.for_bucket(item.bucket, flip_aug, alpha_mask))


def _encode_batch(
    batch: Sequence[LatentCacheItem],
    prepared: Sequence[_Prepared],
    vae: "AutoencoderKL",
    flip_aug: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    pixels = torch.stack([p.pixels for p in prepared])
    latents = encode_latents(vae, pixels, generator)
    _check_finite(latents, batch)
    if not flip_aug:
        return latents, None
    flipped = encode_latents(vae, torch.flip(pixels, dims=[3]), generator)
    _check_finite(flipped, batch)
    return latents, flipped


def cache_latents(
    items: Iterable[LatentCacheItem],
    vae: "AutoencoderKL",
    batch_size: int,
    to_disk: bool,
    flip_aug: bool = False,
    alpha_mask: bool = False,
    generator: torch.Generator | None = None,
    *,
    skip_cache_check: bool = False,
    workers: int | None = None,
    show_progress: bool = True,
    reencode: bool = False,
) -> LatentCacheResult:
    """Encode items in batches of `batch_size` (--vae_batch_size), never mixing bucket sizes.

    to_disk: valid files are skipped (existence only with `skip_cache_check`), the others are
    encoded and written; `reencode` writes every file again. Memory mode (like upstream) always
    encodes and never touches the disk.
    """
    result = LatentCacheResult()
    items = _unique_items(items)
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        todo = items
        if to_disk:
            result.npz_paths = {item.image_path: item.npz_path for item in items}
            _refuse_shared_files(result.npz_paths)
            if not reencode:  # with reencode every file is written again: no need to read the old ones
                statuses = list(pool.map(lambda item: _disk_status(item, flip_aug, alpha_mask, skip_cache_check), items))
                todo = [item for item, status in zip(items, statuses) if status != VALID]
                result.reused = len(items) - len(todo)
                result.invalid_reasons = dict(Counter(status for status in statuses if status != VALID))
                _log_reasons(result.invalid_reasons)

        with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress) as progress:
            for batch in _batches_by_bucket(todo, max(1, int(batch_size))):
                prepared = list(pool.map(lambda item: _prepare(item, alpha_mask), batch))
                latents, flipped = _encode_batch(batch, prepared, vae, flip_aug, generator)
                for i, (item, prep) in enumerate(zip(batch, prepared)):
                    _store(result, item, prep, latents[i], None if flipped is None else flipped[i], to_disk)
                result.encoded += len(batch)
                progress.update(len(batch))
    return result


def _store(
    result: LatentCacheResult,
    item: LatentCacheItem,
    prep: _Prepared,
    latents: torch.Tensor,
    flipped: torch.Tensor | None,
    to_disk: bool,
) -> None:
    if to_disk:
        crop = crop_ltrb_record(item.bucket, item.original_size)
        write_cache(result.npz_paths[item.image_path], latents, item.original_size, crop, flipped, prep.mask, stamp=prep.stamp)
        return
    # clone: a row of the batch tensor would keep the whole batch alive
    result.latents[item.image_path] = latents.clone()
    if flipped is not None:
        result.latents_flipped[item.image_path] = flipped.clone()
    if prep.mask is not None:
        result.alpha_masks[item.image_path] = prep.mask
