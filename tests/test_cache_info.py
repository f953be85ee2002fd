"""cache_info: <image_dir>/metadata_cache.json (sd-scripts' file, plus stat keys) makes a second start-up read
no unchanged caption file or image, and nothing stale is ever used (library/data/info_cache.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

import library.data.dataset_scan as dataset_scan
import library.data.datasets as datasets
import library.data.info_cache as info_cache
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.datasets import UnreadableImagesError, build_dataset_group
from library.data.info_cache import CACHE_FILE_NAME
from tests.test_dataset_startup import tricky_folder

HOUR_NS = 3600 * 10**9


def age(folder: Path, hours: float = 1.0) -> None:
    """Give every file an mtime in the past, each a different one (files just written are re-read: racy)."""
    base = time.time_ns() - int(hours * HOUR_NS)
    for i, path in enumerate(sorted(folder.iterdir())):
        if path.is_file() and path.name != CACHE_FILE_NAME:
            os.utime(path, ns=(base + i * 1000, base + i * 1000))


def touch_past(path: Path, minutes: int) -> None:
    stamp = time.time_ns() - minutes * 60 * 10**9
    os.utime(path, ns=(stamp, stamp))


def make_folder(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (16 + 8 * i, 16), (i * 40, 100, 200)).save(folder / f"img{i}.png")
        if i != 2:  # img2 has no caption file: class_tokens
            (folder / f"img{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    age(folder)
    return folder


def blueprint(*folders: Path, cache_info: bool = True, **subset) -> DatasetBlueprint:
    subsets = tuple(
        SubsetBlueprint(image_dir=str(f), caption_extension=".txt", class_tokens="sks dog", cache_info=cache_info,
                        **subset)
        for f in folders
    )
    return DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1, enable_bucket=True,
                            min_bucket_reso=16, max_bucket_reso=128, bucket_reso_steps=64, subsets=subsets)


class Reads:
    """Counts caption files and image heads read by the scan, and images decoded by the full check."""

    def __init__(self, monkeypatch):
        self.captions, self.heads, self.decoded = [], [], []
        read_small_file, size_or_reason = dataset_scan.read_small_file, dataset_scan.size_or_reason
        check = datasets.check_images_readable
        monkeypatch.setattr(dataset_scan, "read_small_file", lambda p: self.captions.append(p) or read_small_file(p))
        monkeypatch.setattr(dataset_scan, "size_or_reason", lambda p: self.heads.append(p) or size_or_reason(p))
        monkeypatch.setattr(datasets, "check_images_readable",
                            lambda paths, workers=None: self.decoded.extend(paths) or check(paths, workers))

    def names(self) -> tuple[list[str], list[str], list[str]]:
        return tuple(sorted(os.path.basename(str(p)) for p in found) for found in (self.captions, self.heads,
                                                                                   self.decoded))

    def clear(self) -> None:
        self.captions.clear(), self.heads.clear(), self.decoded.clear()


def records(group) -> list[tuple]:
    return [
        (path, caption, tuple(size))
        for d in group.datasets
        for path, caption, size in zip(d.paths, d.captions, d.sizes.tolist())
    ]


def build(*folders, cache_info=True, **kwargs):
    kwargs.setdefault("check_readable", True)
    return build_dataset_group([blueprint(*folders, cache_info=cache_info)], **kwargs)


def cache_of(folder: Path) -> dict:
    return json.loads((folder / CACHE_FILE_NAME).read_text(encoding="utf-8"))


def test_second_run_reads_no_unchanged_file(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    reads = Reads(monkeypatch)
    plain = records(build(folder, cache_info=False))
    assert not (folder / CACHE_FILE_NAME).exists()
    reads.clear()
    first = build(folder)
    assert len(reads.heads) == 6 and len(reads.captions) == 5 and len(reads.decoded) == 6
    entries = cache_of(folder)
    entry = entries[str(folder / "img0.png")]
    assert entry["caption"] == "caption 0" and entry["resolution"] == [16, 16] and entry["checked"] is True
    assert entry["caption_file"] == "img0.txt" and len(entry["image_stat"]) == 2 and len(entry["caption_stat"]) == 2
    no_caption = entries[str(folder / "img2.png")]
    assert no_caption["caption"] == "sks dog" and no_caption["caption_file"] is None  # as sd-scripts writes it
    written = (folder / CACHE_FILE_NAME).stat()

    reads.clear()
    second = build(folder)
    assert reads.names() == ([], [], [])  # no caption file, image head or full decode
    assert records(first) == records(second) == plain
    after = (folder / CACHE_FILE_NAME).stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # nothing changed: not rewritten


def test_changed_caption_new_and_removed_images_are_seen(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    build(folder)
    (folder / "img1.txt").write_text("a new caption", encoding="utf-8")
    touch_past(folder / "img1.txt", 10)
    Image.new("RGB", (40, 24)).save(folder / "new.png")
    touch_past(folder / "new.png", 10)
    (folder / "img4.png").unlink()
    (folder / "img2.txt").write_text("caption file added", encoding="utf-8")  # the class_tokens image gets one
    touch_past(folder / "img2.txt", 10)
    reads = Reads(monkeypatch)
    group = build(folder)
    assert reads.names() == (["img1.txt", "img2.txt"], ["new.png"], ["new.png"])
    got = {os.path.basename(path): (caption, size) for path, caption, size in records(group)}
    assert got["img1.png"][0] == "a new caption" and got["img2.png"][0] == "caption file added"
    assert got["new.png"] == ("sks dog", (40, 24)) and "img4.png" not in got
    assert records(group) == records(build(folder, cache_info=False))
    entries = cache_of(folder)
    assert str(folder / "img4.png") not in entries and entries[str(folder / "new.png")]["checked"] is True
    assert entries[str(folder / "img1.png")]["caption"] == "a new caption"

    # a caption file removed: back to class_tokens; another enable_wildcard: the caption is read again
    (folder / "img2.txt").unlink()
    reads.clear()
    group = build_dataset_group([blueprint(folder, enable_wildcard=True)])
    assert reads.names() == (["img0.txt", "img1.txt", "img3.txt", "img5.txt"], [], [])
    assert dict((os.path.basename(p), c) for p, c, _ in records(group))["img2.png"] == "sks dog"


def test_corrupt_image_replaced_after_a_checked_run_is_caught(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    build(folder)
    good = (folder / "img3.png").read_bytes()
    (folder / "img3.png").write_bytes(good[: len(good) // 2])  # the header still reads: only decoding fails
    touch_past(folder / "img3.png", 10)
    reads = Reads(monkeypatch)
    with pytest.raises(UnreadableImagesError) as error:
        build(folder)
    assert [os.path.basename(p) for p, _ in error.value.unreadable] == ["img3.png"]
    assert reads.names()[2] == ["img3.png"]  # only the changed image was decoded
    assert str(folder / "img3.png") not in cache_of(folder)  # never cached, so sd-scripts does not use it either
    group = build(folder, skip_unreadable=True)
    assert "img3.png" in " ".join(group.warnings)


def test_sd_scripts_file_is_not_trusted_and_rewritten(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    upstream = {  # sd-scripts keys its entries by the path it globbed (relative here), with two keys only
        os.path.join("imgs", f"img{i}.png"): {"caption": "stale caption", "resolution": [999, 999]} for i in range(6)
    }
    (folder / CACHE_FILE_NAME).write_text(json.dumps(upstream, indent=2), encoding="utf-8")
    reads = Reads(monkeypatch)
    group = build(folder)
    assert len(reads.captions) == 5 and len(reads.heads) == 6 and len(reads.decoded) == 6
    assert records(group) == records(build(folder, cache_info=False))
    entries = cache_of(folder)
    assert set(entries) == {str(folder / f"img{i}.png") for i in range(6)}
    for i, (path, entry) in enumerate(sorted(entries.items())):
        # what sd-scripts reads: the path opens, the caption and [width, height] are right
        assert Image.open(path).size == tuple(entry["resolution"]) == (16 + 8 * i, 16)
        assert entry["caption"] == ("sks dog" if i == 2 else f"caption {i}")
        assert entry["checked"] is True and "image_stat" in entry


def test_broken_cache_file_is_made_again(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    (folder / CACHE_FILE_NAME).write_text("{not json", encoding="utf-8")
    group = build(folder)
    assert any(CACHE_FILE_NAME in w and "made again" in w for w in group.warnings)
    assert len(cache_of(folder)) == 6


def test_files_written_just_now_are_read_again(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    (folder / "img0.txt").write_text("just written", encoding="utf-8")  # mtime: now
    build(folder)
    assert "caption_stat" not in cache_of(folder)[str(folder / "img0.png")]
    reads = Reads(monkeypatch)
    build(folder)
    assert reads.names() == (["img0.txt"], [], [])


def test_read_only_folder_only_warns_once(tmp_path, monkeypatch):
    folders = [make_folder(tmp_path / "a"), make_folder(tmp_path / "b")]
    access = os.access
    monkeypatch.setattr(info_cache.os, "access", lambda path, mode: False if mode == os.W_OK else access(path, mode))
    group = build(*folders)
    warnings = [w for w in group.warnings if CACHE_FILE_NAME in w]
    assert len(warnings) == 1 and "2 folder(s)" in warnings[0] and "read-only" in warnings[0]
    assert not any((f / CACHE_FILE_NAME).exists() for f in folders)
    assert records(group) == records(build(*folders, cache_info=False))


def test_failed_write_only_warns(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")

    def refuse(target):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(info_cache, "atomic_path", refuse)
    group = build(folder)
    assert any("Read-only file system" in w for w in group.warnings)
    assert not (folder / CACHE_FILE_NAME).exists()


def test_records_and_warnings_equal_a_run_without_cache_info(tmp_path, monkeypatch):
    folder = tricky_folder(tmp_path / "tricky")
    age(folder)

    def run(cache_info, wildcard):
        bp = blueprint(folder, cache_info=cache_info, enable_wildcard=wildcard)
        group = build_dataset_group([bp], skip_unreadable=True)
        return records(group), group.warnings

    for wildcard in (False, True):
        plain = run(False, wildcard)
        first = run(True, wildcard)
        reads = Reads(monkeypatch)
        second = run(True, wildcard)
        monkeypatch.undo()
        assert plain == first == second
        assert reads.names()[0] == [] and reads.names()[2] == []  # only the unreadable images' heads again
        assert set(reads.names()[1]) == {"empty.png", "corrupt.jpg"}


def test_option_and_config_key(tmp_path):
    from library.data.config import blueprints_from_args, blueprints_from_config
    from tests.recipe_infos import parser_for, support

    make_folder(tmp_path / "train" / "2_sks dog")
    args = parser_for("train_network").parse_args(
        ["--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--cache_info"]
    )
    (bp,) = blueprints_from_args(args, support("train_network"))
    assert bp.subsets[0].cache_info is True
    args = parser_for("fine_tune").parse_args(["--resolution", "64", "--cache_info"])
    metadata = tmp_path / "meta.json"
    metadata.write_text("{}", encoding="utf-8")
    raw = {"datasets": [{"subsets": [{"metadata_file": str(metadata)}]}]}
    (bp,) = blueprints_from_config(raw, args, support("fine_tune"))
    assert bp.subsets[0].cache_info is False  # means nothing for fine-tuning subsets
    args = parser_for("train_network").parse_args(["--resolution", "64"])
    raw = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "train" / "2_sks dog"), "cache_info": True}]}]}
    (bp,) = blueprints_from_config(raw, args, support("train_network"))
    assert bp.subsets[0].cache_info is True


def test_unchecked_entries_get_checked_by_a_later_run(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    build(folder, check_readable=False)
    assert not any(entry["checked"] for entry in cache_of(folder).values())
    reads = Reads(monkeypatch)
    build(folder)
    assert reads.names()[:2] == ([], []) and len(reads.decoded) == 6
    assert all(entry["checked"] for entry in cache_of(folder).values())
    reads.clear()
    build(folder)
    assert reads.names() == ([], [], [])


def test_two_subsets_of_one_folder_share_its_file(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    for i in range(3):
        (folder / f"img{i}.tags").write_text(f"tags {i}", encoding="utf-8")
    age(folder)

    def run(cache_info):
        subsets = (
            SubsetBlueprint(image_dir=str(folder), caption_extension=".txt", cache_info=cache_info),
            SubsetBlueprint(image_dir=str(folder), caption_extension=".tags", class_tokens="dog", cache_info=cache_info),
        )
        bp = DatasetBlueprint(kind="dreambooth", resolution=(64, 64), enable_bucket=True, min_bucket_reso=16,
                              max_bucket_reso=128, subsets=subsets)
        return records(build_dataset_group([bp]))

    plain = run(False)
    assert plain == run(True) == run(True)
    assert "tags 0" in {caption for _, caption, _ in plain} and "caption 0" in {caption for _, caption, _ in plain}
