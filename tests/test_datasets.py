"""Datasets: scanning, reg balancing, buckets, epoch plans, batch loading, resume (dataset-config.md §6-§10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.data.buckets import BucketAssignment, bucket_info
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.datasets import (
    DatasetGroup,
    EpochBatches,
    UnreadableImagesError,
    build_dataset_group,
    make_dataloader,
    scan_subset,
)
from library.data.latent_cache import LatentCacheResult
from library.data.sample_plan import balance_regularization, bucket_info_from_arrays


def make_images(folder: Path, count: int, size=(64, 64), ext=".png", prefix="img", caption_ext=None, caption=None):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = size if not callable(size) else size(i)
        path = folder / f"{prefix}{i:03d}{ext}"
        Image.new("RGB", (w, h), ((i * 37) % 256, 100, 200)).save(path)
        if caption_ext:
            (folder / f"{prefix}{i:03d}{caption_ext}").write_text(caption or f"tag{i}, red, blue", encoding="utf-8")
        paths.append(path)
    return paths


def dataset(subsets, **kwargs) -> DatasetBlueprint:
    values = dict(kind="dreambooth", resolution=(512, 512), batch_size=4, enable_bucket=True)
    values.update(kwargs)
    return DatasetBlueprint(subsets=tuple(subsets), **values)


def build(blueprints, **kwargs) -> DatasetGroup:
    kwargs.setdefault("check_readable", False)
    return build_dataset_group(blueprints, **kwargs)


# ---------------------------------------------------------------- §10 examples


def test_example_dreambooth_class_tokens_with_reg(tmp_path):
    make_images(tmp_path / "sls_frog", 20, size=lambda i: (512, 512) if i % 2 else (640, 384))
    make_images(tmp_path / "frog", 200, size=(48, 48))
    bp = dataset([
        SubsetBlueprint(image_dir=str(tmp_path / "sls_frog"), class_tokens="sls frog", num_repeats=10),
        SubsetBlueprint(image_dir=str(tmp_path / "frog"), class_tokens="frog", num_repeats=1, is_reg=True),
    ])
    group = build([bp], prior_loss_weight=0.5)
    assert group.num_train_images == 200
    assert group.num_reg_images == 200
    d = group.datasets[0]
    assert int(d.repeats.sum()) == 400
    buckets = d.bucket_info["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 400
    # 100 square train + 200 square reg samples in 512x512; 100 wide in a landscape bucket
    assert {tuple(b["resolution"]): b["count"] for b in buckets.values()}[(512, 512)] == 300
    expected = sum(math.ceil(b["count"] / 4) for b in buckets.values())
    assert group.num_batches_per_epoch == expected == len(group.batches_for_epoch(1))
    assert set(d.captions) == {"sls frog", "frog"}
    assert "512x512" in group.summary()


def test_example_caption_files(tmp_path):
    make_images(tmp_path / "chara_a", 6, size=(512, 768), caption_ext=".txt", caption="chara_a, 1girl, smile")
    make_images(tmp_path / "reg_girl", 10, size=(512, 768))
    bp = dataset(
        [
            SubsetBlueprint(image_dir=str(tmp_path / "chara_a"), num_repeats=8, caption_extension=".txt",
                            shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.05),
            SubsetBlueprint(image_dir=str(tmp_path / "reg_girl"), class_tokens="girl", is_reg=True,
                            caption_extension=".txt"),
        ],
        resolution=(512, 768), batch_size=2,
    )
    group = build([bp])
    assert group.num_train_images == 48 and group.num_reg_images == 10
    d = group.datasets[0]
    assert int(d.repeats[d.subset_ids == 1].sum()) == 48  # reg raised from 10 to 48
    assert group.num_batches_per_epoch == 48  # 96 samples, one bucket 512x768, batch 2
    assert d.bucket_list == [(512, 768)]
    batch = group.load_batch(group.batches_for_epoch(1)[0], epoch=1)
    for caption in batch["captions"]:
        assert caption == "girl" or caption.startswith("chara_a")


def test_example_fine_tuning_metadata_stem_keys(tmp_path):
    folder = tmp_path / "piyo"
    make_images(folder, 2, size=(64, 96), ext=".jpg", prefix="a")
    make_images(folder, 2, size=(96, 64), ext=".png", prefix="b")
    meta = {
        "a000": {"caption": "a bird", "tags": "bird, yellow"},
        "a001": {"caption": "another bird"},
        "b000": {"tags": "chick", "image_size": [960, 640]},
        "b001.png": {"caption": "with extension"},
        str(folder / "a000.jpg"): {"caption": "absolute"},
        "missing": {"caption": "no image"},
    }
    (folder / "meta_lat.json").write_text(json.dumps(meta), encoding="utf-8")
    bp = dataset(
        [SubsetBlueprint(image_dir=str(folder), metadata_file=str(folder / "meta_lat.json"), shuffle_caption=True,
                         keep_tokens=1)],
        kind="fine_tuning", min_bucket_reso=320, max_bucket_reso=960,
    )
    group = build([bp])
    d = group.datasets[0]
    assert [Path(p).name for p in d.paths] == ["a000.jpg", "a001.jpg", "b000.png", "b001.png", "a000.jpg"]
    assert d.captions[0] == "a bird,bird, yellow"
    assert d.captions[2] == "chick"
    assert d.sizes[2].tolist() == [960, 640]  # image_size used instead of the header
    assert group.num_train_images == 5 and group.num_batches_per_epoch >= 2
    assert any("missing" in w for w in group.warnings)
    meta_out = group.metadata()
    assert meta_out["ss_datasets"][0]["is_dreambooth"] is False
    assert meta_out["ss_tag_frequency"]["meta_lat.json"]["bird"] == 1
    # fine-tuning subsets are named by their metadata file in ss_dataset_dirs, as upstream
    assert meta_out["ss_dataset_dirs"] == {"meta_lat.json": {"n_repeats": 1, "img_count": 5}}


def test_dataset_dirs_named_by_metadata_file_and_deduplicated(tmp_path):
    datasets = []
    for name in ("one", "two"):
        folder = tmp_path / name
        make_images(folder, 2, prefix="p")
        (folder / "meta.json").write_text(json.dumps({"p000": {"caption": "x"}, "p001": {"caption": "y"}}))
        datasets.append(dataset([SubsetBlueprint(image_dir=str(folder), metadata_file=str(folder / "meta.json"),
                                                 num_repeats=3)], kind="fine_tuning"))
    make_images(tmp_path / "db", 1)
    datasets.append(dataset([
        SubsetBlueprint(image_dir=str(tmp_path / "db"), class_tokens="x"),
        SubsetBlueprint(image_dir=str(tmp_path / "one"), class_tokens="reg", is_reg=True),
    ]))
    dirs = build(datasets).metadata()["ss_dataset_dirs"]
    assert dirs == {
        "meta.json": {"n_repeats": 3, "img_count": 2},
        "meta.json (2)": {"n_repeats": 3, "img_count": 2},
        "db": {"n_repeats": 1, "img_count": 1},
    }


def test_metadata_jsonl(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    lines = [json.dumps({"image_path": str(p), "caption": f"c{i}"}) for i, p in enumerate(sorted(folder.iterdir()))]
    (tmp_path / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")
    sub = SubsetBlueprint(image_dir=str(folder), metadata_file=str(tmp_path / "m.jsonl"))
    records = scan_subset(sub, dataset([sub], kind="fine_tuning"))
    assert [r.caption for r in records] == ["c0", "c1"]


# ---------------------------------------------------------------- regularization


def test_balance_more_reg_than_train():
    repeats, report = balance_regularization([2, 2, 2, 2], 5)
    assert repeats.tolist() == [2, 2, 1, 0] and int(repeats.sum()) == 5
    assert "unused" in report


def test_balance_fewer_reg_than_train():
    repeats, report = balance_regularization([1, 1, 1], 8)
    assert repeats.tolist() == [3, 3, 2]
    assert "round-robin" in report


def test_reg_loss_weights_in_batches(tmp_path):
    make_images(tmp_path / "train", 3, caption_ext=".caption", caption="x")
    make_images(tmp_path / "reg", 10)
    bp = dataset([
        SubsetBlueprint(image_dir=str(tmp_path / "train"), num_repeats=2),
        SubsetBlueprint(image_dir=str(tmp_path / "reg"), class_tokens="cls", is_reg=True),
    ], resolution=(64, 64), min_bucket_reso=64, max_bucket_reso=128, batch_size=3)
    group = build([bp], prior_loss_weight=0.25)
    d = group.datasets[0]
    assert d.repeats.tolist() == [2, 2, 2] + [1] * 6 + [0] * 4
    assert "more reg samples (10) than training samples (6)" in d.reg_report
    for plan in group.batches_for_epoch(0):
        batch = group.load_batch(plan, 0)
        for caption, weight in zip(batch["captions"], batch["loss_weights"].tolist()):
            assert weight == (0.25 if caption == "cls" else 1.0)


# ---------------------------------------------------------------- plans


def _mixed_group(tmp_path, seed=0) -> DatasetGroup:
    sizes = [(64, 64), (96, 48), (48, 96), (80, 64)]
    make_images(tmp_path / "a", 24, size=lambda i: sizes[i % 4])
    make_images(tmp_path / "b", 5, size=(64, 64))
    first = dataset([SubsetBlueprint(image_dir=str(tmp_path / "a"), num_repeats=3, class_tokens="a")],
                    resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, batch_size=4)
    second = dataset([SubsetBlueprint(image_dir=str(tmp_path / "b"), class_tokens="b")],
                     resolution=(64, 64), enable_bucket=False, batch_size=2)
    return build([first, second], seed=seed)


def test_batches_never_mix_buckets_or_datasets(tmp_path):
    group = _mixed_group(tmp_path)
    plans = group.batches_for_epoch(1)
    seen = []
    for plan in plans:
        d = group.datasets[plan.dataset]
        assert {tuple(d.buckets[i]) for i in plan.images} == {plan.bucket}
        assert 1 <= len(plan.images) <= d.blueprint.batch_size
        seen += [(plan.dataset, int(i)) for i in plan.images]
    assert len(seen) == group.num_train_images == 72 + 5
    assert len(plans) == group.num_batches_per_epoch
    assert len({plan.dataset for plan in plans}) == 2


def test_order_deterministic_per_seed_and_epoch(tmp_path):
    group = _mixed_group(tmp_path)

    def key(plans):
        return [(p.dataset, p.bucket, tuple(p.images.tolist())) for p in plans]

    assert key(group.batches_for_epoch(1)) == key(group.batches_for_epoch(1))
    assert key(group.batches_for_epoch(1)) != key(group.batches_for_epoch(2))
    other = DatasetGroup(group.datasets, seed=1)
    assert key(other.batches_for_epoch(1)) != key(group.batches_for_epoch(1))


def test_bucket_info_matches_reference(tmp_path):
    group = _mixed_group(tmp_path)
    d = group.datasets[0]
    reference = bucket_info(
        [(BucketAssignment(tuple(b), tuple(r), e), n) for b, r, e, n in zip(d.buckets.tolist(), d.resized_sizes.tolist(), d.ar_errors, d.repeats)],
    )
    fast = bucket_info_from_arrays(d.buckets, d.repeats, d.ar_errors, None)
    assert fast == reference


# ---------------------------------------------------------------- unreadable images


def _bad_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(folder / "big.jpg", quality=70)
    good = folder / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    Image.new("RGB", (256, 256), (9, 9, 9)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_unreadable_listed_in_one_error(tmp_path):
    folder = _bad_folder(tmp_path)
    bp = dataset([SubsetBlueprint(image_dir=str(folder), class_tokens="x")], batch_size=2)
    with pytest.raises(UnreadableImagesError) as info:
        build_dataset_group([bp])
    message = str(info.value)
    assert "corrupt.jpg" in message and "empty.png" in message
    assert "--skip_unreadable_images" in message
    assert {Path(p).name for p, _ in info.value.unreadable} == {"corrupt.jpg", "empty.png"}


def test_skip_unreadable_proceeds_and_loads_large_image(tmp_path):
    folder = _bad_folder(tmp_path)
    bp = dataset([SubsetBlueprint(image_dir=str(folder), class_tokens="x")], batch_size=2)
    group = build_dataset_group([bp], skip_unreadable=True)
    assert sorted(Path(p).name for p in group.datasets[0].paths) == ["big.jpg", "good.png"]
    assert any("skip_unreadable" in w for w in group.warnings)
    for plan in group.batches_for_epoch(1):
        batch = group.load_batch(plan, 1)
        w, h = plan.bucket
        assert batch["images"].shape == (len(plan.images), 3, h, w)
        if any(Path(p).name == "big.jpg" for p in batch["image_paths"]):
            assert plan.bucket == (576, 448)  # 4:3 in the 512x512 set


# ---------------------------------------------------------------- captions and loading


def test_caption_files_override_class_tokens(tmp_path):
    folder = tmp_path / "c"
    make_images(folder, 3)
    (folder / "img000.caption").write_text("from file\nsecond line", encoding="utf-8")
    make_images(tmp_path / "face", 1, prefix="base_1_2_3_")  # face-crop name -> base.caption
    (tmp_path / "face" / "base.caption").write_text("face caption", encoding="utf-8")
    sub = SubsetBlueprint(image_dir=str(folder), class_tokens="sks dog")
    records = scan_subset(sub, dataset([sub]))
    assert [r.caption for r in records] == ["from file", "sks dog", "sks dog"]
    assert (records[0].width, records[0].height) == (64, 64)
    face = SubsetBlueprint(image_dir=str(tmp_path / "face"))
    assert scan_subset(face, dataset([face]))[0].caption == "face caption"
    bare = SubsetBlueprint(image_dir=str(folder))
    group = build([dataset([bare])])
    assert group.datasets[0].captions == ["from file", "", ""]
    assert any("EMPTY caption" in w for w in group.warnings)


def test_empty_caption_file_is_an_error(tmp_path):
    make_images(tmp_path / "e", 1)
    (tmp_path / "e" / "img000.caption").write_text("  ", encoding="utf-8")
    with pytest.raises(UnreadableImagesError, match="caption file is empty"):
        build([dataset([SubsetBlueprint(image_dir=str(tmp_path / "e"))])])


def test_load_batch_shapes_captions_and_flip(tmp_path):
    make_images(tmp_path / "f", 4, size=(100, 64), caption_ext=".txt", caption="a, b, c, d")
    sub = SubsetBlueprint(image_dir=str(tmp_path / "f"), caption_extension=".txt", flip_aug=True,
                          shuffle_caption=True, random_crop=True, color_aug=True)
    group = build([dataset([sub], resolution=(96, 64), min_bucket_reso=32, max_bucket_reso=128,
                           bucket_reso_steps=32, batch_size=4)], seed=7)
    plan = group.batches_for_epoch(3)[0]
    batch = group.load_batch(plan, epoch=3, step=5)
    assert batch["images"].shape == (4, 3, 64, 96)
    assert batch["images"].dtype == torch.float32
    assert -1.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert batch["loss_weights"].tolist() == [1.0] * 4
    assert batch["bucket"] == (96, 64) and batch["network_multiplier"] == 1.0
    assert all(sorted(c.split(", ")) == ["a", "b", "c", "d"] for c in batch["captions"])
    again = group.load_batch(plan, epoch=3, step=5)
    assert again["captions"] == batch["captions"] and torch.equal(again["images"], batch["images"])
    assert again["flipped"] == batch["flipped"]


def test_cached_latents_and_flip(tmp_path):
    make_images(tmp_path / "l", 3, size=(64, 64))
    sub = SubsetBlueprint(image_dir=str(tmp_path / "l"), class_tokens="x", flip_aug=True)
    group = build([dataset([sub], resolution=(64, 64), min_bucket_reso=64, max_bucket_reso=64, batch_size=3)])
    items = group.cache_items()
    assert [item.bucket for item in items] == [(64, 64)] * 3
    result = LatentCacheResult(
        latents={item.image_path: torch.full((4, 8, 8), float(i)) for i, item in enumerate(items)},
        latents_flipped={item.image_path: torch.full((4, 8, 8), -1.0 - i) for i, item in enumerate(items)},
    )
    group.set_latents(result)
    for seed_epoch in range(4):
        batch = group.load_batch(group.batches_for_epoch(seed_epoch)[0], seed_epoch)
        assert batch["latents"].shape == (3, 4, 8, 8) and "images" not in batch
        for value, flipped in zip(batch["latents"][:, 0, 0, 0].tolist(), batch["flipped"]):
            assert (value < 0) == flipped


def test_resume_with_start_batch(tmp_path):
    group = _mixed_group(tmp_path, seed=3)
    full = EpochBatches(group, epoch=2)
    resumed = EpochBatches(group, epoch=2, start_batch=5, first_step=5)
    assert len(resumed) == len(full) - 5
    for i in range(len(resumed)):
        a, b = full[i + 5], resumed[i]
        assert a["image_paths"] == b["image_paths"] and a["captions"] == b["captions"]
        assert torch.equal(a["images"], b["images"])
    loader = make_dataloader(group, epoch=2, workers=2, start_batch=5)
    paths = [batch["image_paths"] for batch in loader]
    assert paths == [resumed[i]["image_paths"] for i in range(len(resumed))]


# ---------------------------------------------------------------- header sizes


def test_fast_header_sizes_match_pillow(tmp_path):
    from library.data.image_headers import fast_image_size
    from library.data.images import read_image_size

    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rot.jpg", exif=exif)
    png_exif = Image.new("RGB", (30, 10))
    png_exif.save(tmp_path / "rot.png", exif=exif)
    Image.new("RGB", (33, 17)).save(tmp_path / "plain.png")
    Image.new("L", (21, 13)).save(tmp_path / "gray.jpg", progressive=True)
    Image.new("RGB", (12, 34)).save(tmp_path / "x.webp")
    for name in ("rot.jpg", "rot.png", "plain.png", "gray.jpg", "x.webp"):
        assert fast_image_size(str(tmp_path / name)) == read_image_size(tmp_path / name), name
    assert fast_image_size(str(tmp_path / "rot.jpg")) == (20, 40)
