"""Latent cache: sd-scripts file naming and keys, validity checks, batched encoding and reuse."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.latent_cache import (
    LATENT_CACHE_FORBIDS,
    LATENT_CACHE_FORBIDS_REASON,
    CacheRequirement,
    LatentCacheError,
    LatentCacheItem,
    cache_file_path,
    cache_latents,
    cache_status,
    crop_ltrb_record,
    encode_latents,
    find_cache_file,
    legacy_cache_file_path,
    original_size_from_cache_name,
    read_alpha_mask,
    read_cache,
    write_cache,
)

SD_KEYS_WITH_FLIP = {"latents", "original_size", "crop_ltrb", "latents_flipped"}
STAMPS = {"image_mtime_ns", "image_file_size"}


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ).eval()


class CountingVAE:
    """Wraps the VAE to record the batch shapes it encodes."""

    def __init__(self, vae):
        self.vae, self.batches = vae, []

    device = property(lambda self: self.vae.device)
    dtype = property(lambda self: self.vae.dtype)

    def encode(self, pixels):
        self.batches.append(tuple(pixels.shape))
        return self.vae.encode(pixels)


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _valid_file(tmp_path: Path, flip: bool = False) -> tuple[Path, Path]:
    image = _image(tmp_path / "img.png", (64, 96))
    npz = cache_file_path(image, (64, 96))
    latents = np.zeros((4, 12, 8), np.float32)
    write_cache(npz, latents, (64, 96), (0, 0, 64, 96), latents if flip else None, image_path=image)
    return image, npz


def test_cache_file_names_follow_sd_scripts(tmp_path):
    image = tmp_path / "img.png"
    assert cache_file_path(image, (1024, 768)) == tmp_path / "img_1024x0768_sd.npz"
    assert cache_file_path("a/b.c.jpg", (64, 7)) == Path("a/b.c_0064x0007_sd.npz")
    assert original_size_from_cache_name(tmp_path / "my_img_1024x0768_sd.npz") == (1024, 768)
    assert legacy_cache_file_path(image) == tmp_path / "img.npz"
    assert find_cache_file(image, (1024, 768)) == tmp_path / "img_1024x0768_sd.npz"
    (tmp_path / "img.npz").write_bytes(b"")
    assert find_cache_file(image, (1024, 768)) == tmp_path / "img.npz"  # legacy preferred, as upstream


def test_requirement_and_crop_record():
    req = CacheRequirement.for_bucket((512, 768), flip_aug=True)
    assert req.latent_shape == (4, 96, 64) and req.mask_shape == (768, 512)
    assert crop_ltrb_record((512, 512), (1024, 768)) == (0, 64, 512, 448)
    assert crop_ltrb_record((512, 512), (512, 512)) == (0, 0, 512, 512)
    assert set(LATENT_CACHE_FORBIDS) == {"color_aug", "random_crop", "face_crop_aug_range"}
    assert "\n" not in LATENT_CACHE_FORBIDS_REASON


def test_cache_status_reasons(tmp_path):
    image, npz = _valid_file(tmp_path, flip=False)
    req = CacheRequirement.for_bucket((64, 96))
    assert cache_status(npz, image, req) == "valid"
    assert cache_status(tmp_path / "other_0064x0096_sd.npz", image, req) == "missing"
    assert cache_status(npz, image, CacheRequirement.for_bucket((64, 96), flip_aug=True)) == "no flipped latents"
    assert cache_status(npz, image, CacheRequirement.for_bucket((64, 64))) == (
        "latent shape (4,12,8) != expected (4,8,8): resolution or bucket changed"
    )
    assert cache_status(npz, image, CacheRequirement.for_bucket((64, 96), alpha_mask=True)) == "no alpha mask"

    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    assert cache_status(npz, image, req) == "corrupt or truncated"
    npz.write_bytes(b"")
    assert cache_status(npz, image, req) == "corrupt or truncated"


def test_cache_status_detects_changed_image(tmp_path):
    image, npz = _valid_file(tmp_path)
    req = CacheRequirement.for_bucket((64, 96))
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched
    assert cache_status(npz, image, req) == "image changed since caching"

    Image.new("RGB", (64, 96), "white").save(image)  # replaced by another picture of the same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...even one carrying the old mtime
    assert os.path.getsize(image) != stat.st_size
    assert cache_status(npz, image, req) == "image changed since caching"
    assert cache_status(npz, None, req) == "valid"  # no image given: content checks only


def test_sd_scripts_file_without_stamps(tmp_path):
    image = _image(tmp_path / "img.png", (64, 64))
    npz = cache_file_path(image, (64, 64))
    # exactly what sd-scripts writes: plain np.savez with its keys
    np.savez(npz, latents=np.zeros((4, 8, 8), np.float32), original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    req = CacheRequirement.for_bucket((64, 64))
    image_mtime = os.stat(image).st_mtime_ns
    os.utime(npz, ns=(image_mtime, image_mtime + 10**9))
    assert cache_status(npz, image, req) == "valid"
    os.utime(npz, ns=(image_mtime, image_mtime - 10**9))  # image newer than the cache
    assert cache_status(npz, image, req) == "image changed since caching"


def test_write_is_atomic_and_keeps_foreign_keys(tmp_path):
    image, npz = _valid_file(tmp_path, flip=True)
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(npz, other_arch_32x64=np.ones(3, np.float32), **arrays)
    write_cache(npz, torch.ones(4, 12, 8), (64, 96), (0.0, 0.0, 64.0, 96.0), image_path=image)
    with np.load(npz) as f:
        assert set(f.files) == {"latents", "original_size", "crop_ltrb", "other_arch_32x64"} | STAMPS
        assert f["latents"].dtype == np.float32 and f["latents"].max() == 1
        assert f["crop_ltrb"].tolist() == [0, 0, 64, 96]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", npz.name]  # no temp files left
    assert read_cache(npz).shape == (4, 12, 8)
    with pytest.raises(LatentCacheError, match="latents_flipped"):
        read_cache(npz, flipped=True)


def test_encode_latents_is_unscaled_float32_on_cpu(vae):
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = encode_latents(vae, images, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 12) and latents.dtype == torch.float32 and latents.device.type == "cpu"
    again = encode_latents(vae, images, torch.Generator().manual_seed(0))
    assert torch.equal(latents, again)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    assert (latents - mean).abs().mean() < (latents - mean * vae.config.scaling_factor).abs().mean()


def _items(tmp_path: Path) -> list[LatentCacheItem]:
    items = []
    for i in range(3):  # square bucket
        path = _image(tmp_path / f"sq{i}.png", (80, 80), seed=i)
        items.append(LatentCacheItem(path, bucket=(64, 64), resized_size=(64, 64), original_size=(80, 80)))
    for i in range(2):  # tall bucket, from a larger image with a crop
        path = _image(tmp_path / f"tall{i}.jpg", (70, 130), seed=10 + i)
        items.append(LatentCacheItem(path, bucket=(64, 128), resized_size=(69, 128), original_size=(70, 130)))
    return items


def test_cache_to_disk_groups_by_bucket_and_skips_valid(tmp_path, vae, caplog):
    items = _items(tmp_path)
    counting = CountingVAE(vae)
    with caplog.at_level("INFO", logger="library.data.latent_cache"):
        result = cache_latents(items, counting, batch_size=2, to_disk=True, flip_aug=True, show_progress=False)
    assert [r.getMessage() for r in caplog.records] == ["latent cache: 5 file(s) to (re-)encode: missing"]

    assert result.encoded == 5 and result.reused == 0 and result.invalid_reasons == {"missing": 5}
    # 3 square -> batches of 2 + 1, 2 tall -> 1 batch; each twice (plain + flipped); never mixed
    assert sorted(counting.batches) == sorted([(2, 3, 64, 64), (1, 3, 64, 64), (2, 3, 128, 64)] * 2)
    for item in items:
        npz = cache_file_path(item.image_path, item.original_size)
        assert result.npz_paths[item.image_path] == npz
        with np.load(npz) as f:
            assert set(f.files) == SD_KEYS_WITH_FLIP | STAMPS
            shape = (4, item.bucket[1] // 8, item.bucket[0] // 8)
            assert f["latents"].shape == shape and f["latents_flipped"].shape == shape
            assert f["latents"].dtype == np.float32
            assert f["original_size"].tolist() == list(item.original_size)
            assert f["crop_ltrb"].tolist() == list(crop_ltrb_record(item.bucket, item.original_size))
    assert not result.latents  # disk mode keeps nothing in memory

    counting.batches.clear()
    again = cache_latents(items, counting, batch_size=2, to_disk=True, flip_aug=True, show_progress=False)
    assert again.encoded == 0 and again.reused == 5 and counting.batches == []

    stat = os.stat(items[0].image_path)
    os.utime(items[0].image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = cache_latents(items, counting, batch_size=2, to_disk=True, flip_aug=True, show_progress=False)
    assert changed.encoded == 1 and changed.invalid_reasons == {"image changed since caching": 1}

    bigger = [LatentCacheItem(i.image_path, (64, 64), (64, 64), i.original_size) for i in items[:3]]
    rebucketed = cache_latents(bigger, counting, batch_size=4, to_disk=True, flip_aug=False, show_progress=False)
    assert rebucketed.encoded == 0  # same bucket, flip no longer required: still valid


def test_cache_in_memory_with_alpha_mask(tmp_path, vae):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    items = [
        LatentCacheItem(tmp_path / "cut.png", (64, 64), (64, 64), (64, 64)),
        LatentCacheItem(_image(tmp_path / "plain.png", (64, 64)), (64, 64), (64, 64), (64, 64)),
    ]
    result = cache_latents(items + items[:1], vae, batch_size=8, to_disk=False, alpha_mask=True, show_progress=False)
    assert result.encoded == 2 and set(result.latents) == {i.image_path for i in items}
    assert result.latents[items[0].image_path].shape == (4, 8, 8) and not result.latents_flipped
    mask = result.alpha_masks[items[0].image_path]
    assert mask.shape == (64, 64) and mask[:, :32].min() == 1 and mask[:, 32:].max() == 0
    assert result.alpha_masks[items[1].image_path].min() == 1
    assert list(tmp_path.glob("*.npz")) == []  # memory mode never touches the disk

    disk = cache_latents(items, vae, batch_size=8, to_disk=True, alpha_mask=True, show_progress=False)
    npz = disk.npz_paths[items[0].image_path]
    assert read_alpha_mask(npz).shape == (64, 64)
    assert cache_status(npz, items[0].image_path, CacheRequirement.for_bucket((64, 64), alpha_mask=True)) == "valid"


def test_one_image_in_two_buckets_is_refused(tmp_path, vae):
    path = _image(tmp_path / "a.png", (64, 64))
    items = [LatentCacheItem(path, (64, 64), (64, 64), (64, 64)), LatentCacheItem(path, (64, 128), (128, 128), (64, 64))]
    with pytest.raises(LatentCacheError, match="two bucket sizes"):
        cache_latents(items, vae, batch_size=1, to_disk=True, show_progress=False)


def test_two_images_sharing_one_cache_file_are_refused(tmp_path, vae):
    items = [
        LatentCacheItem(str(_image(tmp_path / "a.png", (64, 64))), [64, 64], [64, 64], [64, 64]),
        LatentCacheItem(str(_image(tmp_path / "a.jpg", (64, 64))), [64, 64], [64, 64], [64, 64]),
    ]
    assert items[0].image_path == tmp_path / "a.png" and items[0].bucket == (64, 64)
    with pytest.raises(LatentCacheError, match="rename one"):
        cache_latents(items, vae, batch_size=1, to_disk=True, show_progress=False)
    assert cache_latents(items, vae, batch_size=2, to_disk=False, show_progress=False).encoded == 2
