"""The decode check of every image (library/data/image_check.py): remembered in the user's cache so a second start
decodes only new or changed images, run by worker processes, and left running while the trainer loads the model."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import library.data.image_check as image_check
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.datasets import UnreadableImagesError, build_dataset_group
from library.data.image_check import ImageCheck, record_file
from library.data.info_cache import CACHE_FILE_NAME
from library.fileio import user_cache_dir
from tests.training_helpers import lora_args, run_script

HOUR_NS = 3600 * 10**9


def age(folder: Path, hours: float = 1.0) -> None:
    """Every file an mtime in the past (files changed just before a check are not recorded: racy)."""
    base = time.time_ns() - int(hours * HOUR_NS)
    for i, path in enumerate(sorted(folder.iterdir())):
        os.utime(path, ns=(base + i * 1000, base + i * 1000))


def truncated_png(size: int = 48) -> bytes:
    """A PNG whose header (and so its size) reads fine but whose pixel data stops halfway."""
    noise = np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) * 3 // 5]


def make_folder(folder: Path, count: int = 6, size: int = 8) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (size + i % 3 * 8, size), (i * 40 % 256, 90, 200)).save(folder / f"img{i:03d}.png")
    age(folder)
    return folder


def blueprint(folder: Path, **subset) -> DatasetBlueprint:
    return DatasetBlueprint(
        kind="dreambooth", resolution=(64, 64), batch_size=1, enable_bucket=True, min_bucket_reso=16,
        max_bucket_reso=128, bucket_reso_steps=64,
        subsets=(SubsetBlueprint(image_dir=str(folder), class_tokens="sks dog", **subset),),
    )


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Names of the images decoded in this process (checks of fewer than PARALLEL_FROM_IMAGES run here)."""
    names = []
    decode = image_check.unreadable_reason
    monkeypatch.setattr(image_check, "unreadable_reason", lambda path: names.append(Path(path).name) or decode(path))
    return names


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user_cache"
    monkeypatch.setenv("SD_TRAINER_CACHE_DIR", str(folder))
    return folder


def paths_of(group) -> list[str]:
    return [Path(p).name for d in group.datasets for p in d.paths]


# ---------------------------------------------------------------- remembered


def test_second_build_decodes_nothing_and_the_record_is_in_the_user_cache(tmp_path, own_cache, decoded):
    folder = make_folder(tmp_path / "imgs")
    before = sorted(os.listdir(folder))
    first = build_dataset_group([blueprint(folder)])
    assert sorted(decoded) == before
    decoded.clear()
    second = build_dataset_group([blueprint(folder)])
    assert decoded == []
    assert paths_of(first) == paths_of(second)
    assert sorted(os.listdir(folder)) == before  # nothing written into the dataset folder
    record = record_file(str(folder))
    assert record.parent == own_cache / "image-checks" and user_cache_dir() == own_cache
    data = json.loads(record.read_text(encoding="ascii"))
    assert data["folder"] == str(folder) and sorted(data["names"]) == before
    assert data["sizes"] == [os.stat(folder / name).st_size for name in data["names"]]
    assert data["mtimes_ns"] == [os.stat(folder / name).st_mtime_ns for name in data["names"]]


def test_changed_images_are_decoded_again_and_a_new_corruption_is_found(tmp_path, decoded):
    folder = make_folder(tmp_path / "imgs")
    build_dataset_group([blueprint(folder)])
    decoded.clear()
    (folder / "img001.png").write_bytes(truncated_png())  # header fine (the scan passes), pixels cut off
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "img004.png")  # rewritten, still good
    os.utime(folder / "img004.png", ns=(time.time_ns() - HOUR_NS // 2,) * 2)
    with pytest.raises(UnreadableImagesError) as info:
        build_dataset_group([blueprint(folder)])
    assert sorted(decoded) == ["img001.png", "img004.png"]
    assert [Path(p).name for p, _ in info.value.unreadable] == ["img001.png"]
    assert "truncated" in str(info.value) and "--skip_unreadable_images" in str(info.value)
    decoded.clear()
    with pytest.raises(UnreadableImagesError):  # the bad image stays unrecorded: found again
        build_dataset_group([blueprint(folder)])
    assert decoded == ["img001.png"]


def test_same_size_rewrite_is_seen_by_its_mtime(tmp_path, decoded):
    folder = make_folder(tmp_path / "imgs")
    build_dataset_group([blueprint(folder)])
    decoded.clear()
    path = folder / "img002.png"
    data = bytearray(path.read_bytes())
    data[-20:] = b"\x00" * 20  # same size, broken IDAT/IEND
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns() - HOUR_NS // 2,) * 2)
    with pytest.raises(UnreadableImagesError, match="img002.png"):
        build_dataset_group([blueprint(folder)])
    assert decoded == ["img002.png"]


def test_unreadable_image_is_never_recorded(tmp_path, decoded):
    folder = make_folder(tmp_path / "imgs")
    (folder / "bad.png").write_bytes(truncated_png())
    age(folder)
    group = build_dataset_group([blueprint(folder)], skip_unreadable=True)
    assert "bad.png" not in paths_of(group) and any("bad.png" in w for w in group.warnings)
    assert "bad.png" not in json.loads(record_file(str(folder)).read_text(encoding="ascii"))["names"]
    decoded.clear()
    group = build_dataset_group([blueprint(folder)], skip_unreadable=True)
    assert decoded == ["bad.png"] and "bad.png" not in paths_of(group)


def test_images_changed_just_before_the_check_are_not_recorded(tmp_path, decoded):
    folder = make_folder(tmp_path / "imgs", count=3)
    os.utime(folder / "img001.png", ns=(time.time_ns(),) * 2)  # within RACY_NS of the check
    build_dataset_group([blueprint(folder)])
    decoded.clear()
    build_dataset_group([blueprint(folder)])
    assert decoded == ["img001.png"]


@pytest.mark.parametrize("content", [
    b"\x00\xffgarbage",
    b'{"format": "sd-trainer image check 1"',
    b"[1, 2, 3]",
    b'{"format": "sd-trainer image check 1", "decoder": "x", "folder": "y", "names": 5, "sizes": [], "mtimes_ns": []}',
    "names",  # the right header, but the arrays do not match
    "other pillow",
])
def test_a_damaged_or_foreign_record_is_ignored(tmp_path, decoded, content):
    folder = make_folder(tmp_path / "imgs")
    build_dataset_group([blueprint(folder)])
    record = record_file(str(folder))
    if content == "names":
        data = json.loads(record.read_text(encoding="ascii"))
        data["sizes"] = data["sizes"][:-1]
        content = json.dumps(data).encode()
    elif content == "other pillow":
        data = json.loads(record.read_text(encoding="ascii"))
        data["decoder"] = "Pillow 1.0"
        content = json.dumps(data).encode()
    record.write_bytes(content)
    decoded.clear()
    group = build_dataset_group([blueprint(folder)])  # no error: everything is decoded again
    assert len(decoded) == 6 and len(paths_of(group)) == 6
    decoded.clear()
    build_dataset_group([blueprint(folder)])  # and the record was written anew
    assert decoded == []


def test_unwritable_cache_only_costs_a_recheck(tmp_path, monkeypatch, decoded):
    folder = make_folder(tmp_path / "imgs", count=2)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("SD_TRAINER_CACHE_DIR", str(blocker / "cache"))
    build_dataset_group([blueprint(folder)])
    build_dataset_group([blueprint(folder)])
    assert len(decoded) == 4


def test_cache_info_keeps_working_beside_the_record(tmp_path, decoded):
    folder = make_folder(tmp_path / "imgs")
    build_dataset_group([blueprint(folder, cache_info=True)])
    entries = json.loads((folder / CACHE_FILE_NAME).read_text(encoding="utf-8"))
    assert all(entry["checked"] is True for entry in entries.values())
    decoded.clear()
    record_file(str(folder)).unlink()  # cache_info alone knows the images decoded
    build_dataset_group([blueprint(folder, cache_info=True)])
    assert decoded == []


# ---------------------------------------------------------------- parallel and deferred


def big_folder(tmp_path: Path, bad: str | None = "img050.png") -> Path:
    """More images than PARALLEL_FROM_IMAGES: checked by worker processes, and deferred when asked."""
    folder = make_folder(tmp_path / "train" / "1_sks dog", count=image_check.PARALLEL_FROM_IMAGES + 12)
    if bad:
        (folder / bad).write_bytes(truncated_png())
        age(folder)
    return folder


def test_workers_give_the_same_answer_and_remember(tmp_path):
    folder = big_folder(tmp_path)
    paths = sorted(folder.iterdir())
    serial = [(path, image_check.unreadable_reason(path)) for path in paths]
    expected = [(path, reason) for path, reason in serial if reason is not None]
    check = ImageCheck(paths, workers=3)
    assert check.decoded == len(paths) and check.result() == expected == [(folder / "img050.png", expected[0][1])]
    again = ImageCheck(paths, workers=3)
    assert (again.decoded, again.remembered) == (1, len(paths) - 1)  # only the bad one
    assert again.result() == expected
    assert ImageCheck(paths, remember=False).decoded == len(paths)


def test_deferred_build_raises_the_same_error_when_finished(tmp_path):
    folder = big_folder(tmp_path)
    with pytest.raises(UnreadableImagesError) as sync:
        build_dataset_group([blueprint(folder)])
    for finish in ("explicitly", "by planning batches"):
        group = build_dataset_group([blueprint(folder)], defer_readability_check=True)
        assert group.readability_check_pending
        with pytest.raises(UnreadableImagesError) as deferred:
            if finish == "explicitly":
                group.finish_readability_check()
            else:
                group.batches_for_epoch(0)
        assert str(deferred.value) == str(sync.value)
        assert not group.readability_check_pending


def test_a_failure_while_checking_still_reports_the_bad_image_first(tmp_path):
    folder = big_folder(tmp_path)
    group = build_dataset_group([blueprint(folder)], defer_readability_check=True)
    with pytest.raises(UnreadableImagesError, match="img050.png"):
        with group.while_checking_images():
            raise OSError("the model file is broken")


def test_deferred_build_of_good_images_and_skip_unreadable(tmp_path, decoded):
    folder = big_folder(tmp_path, bad=None)
    group = build_dataset_group([blueprint(folder, cache_info=True)], defer_readability_check=True)
    assert group.readability_check_pending and not (folder / CACHE_FILE_NAME).exists()
    with group.while_checking_images():
        pass
    assert not group.readability_check_pending and len(group.batches_for_epoch(0)) == 140
    entries = json.loads((folder / CACHE_FILE_NAME).read_text(encoding="utf-8"))  # written once the check ended
    assert len(entries) == 140 and all(entry["checked"] is True for entry in entries.values())
    # --skip_unreadable_images is never deferred: the images left out shape the buckets and epochs
    (folder / "img007.png").write_bytes(truncated_png())
    group = build_dataset_group([blueprint(folder)], defer_readability_check=True, skip_unreadable=True)
    assert not group.readability_check_pending
    assert len(paths_of(group)) == 139 and "img007.png" not in paths_of(group)
    assert decoded == ["img007.png"]  # the others were recorded by the deferred check


def test_nothing_is_deferred_when_the_scan_already_found_a_problem(tmp_path):
    folder = big_folder(tmp_path, bad="img010.png")
    (folder / "empty.png").write_bytes(b"")  # the scan cannot read its size
    with pytest.raises(UnreadableImagesError) as info:  # raised by the build itself, listing both
        build_dataset_group([blueprint(folder)], defer_readability_check=True)
    assert {Path(p).name for p, _ in info.value.unreadable} == {"img010.png", "empty.png"}


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt_dataset")
    big_folder(root, bad="img050.png")
    return root / "train"


def test_train_network_fails_before_step_1_naming_the_file(tiny_models, corrupt_dataset, tmp_path):
    result = run_script(
        "train_network.py", *lora_args(tiny_models["sd1"], corrupt_dataset, tmp_path / "out", "--max_train_steps", "2")
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 image file(s) cannot be read" in result.stderr and "img050.png" in result.stderr
    assert "--skip_unreadable_images" in result.stderr and "Traceback" not in result.stderr
    assert "training samples/epoch" in result.stdout  # the dataset was ready first: the check ran behind it
    assert "training: " not in result.stdout and not (tmp_path / "out" / "tiny.safetensors").exists()


def test_the_bad_image_is_reported_rather_than_a_broken_model(corrupt_dataset, tmp_path):
    import torch
    from safetensors.torch import save_file

    broken = tmp_path / "not_an_sd_model.safetensors"
    save_file({"x": torch.zeros(1)}, str(broken))
    result = run_script("train_network.py", *lora_args(broken, corrupt_dataset, tmp_path / "out"))
    assert result.returncode == 1
    assert "img050.png" in result.stderr and "cannot be read" in result.stderr and "Traceback" not in result.stderr
