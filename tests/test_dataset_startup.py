"""The fast start-up path (one scandir, os.read of captions and image heads, no Path objects per image)
gives exactly what the plain way gives: same images, captions, sizes, warnings and errors."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from library.data.captions import CaptionFileError, caption_file_candidates, read_caption_file
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.dataset_scan import ScanReport, paused_garbage_collection, scan_subset
from library.data.datasets import build_dataset_group
from library.data.image_headers import fast_image_size
from library.data.images import ImageReadError, list_images, read_image_size


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def tricky_folder(folder: Path) -> Path:
    """Every naming and format case the scan handles specially."""
    folder.mkdir()

    def png(name, size, **options):
        Image.new("RGB", size, (10, 20, 30)).save(folder / name, **options)

    png("a.png", (10, 20))
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbfcap a\r\nline two")  # BOM, CRLF
    png("B.PNG", (30, 20))
    (folder / "B.txt").write_text("cap B")
    png("girl_x_1_2_3_4.png", (16, 16))
    (folder / "girl_x.txt").write_text("girl base")  # face-crop name -> base caption
    png("boy_1_2_3_4.png", (16, 8))
    (folder / "boy_1_2_3_4.txt").write_text("own caption wins")
    png("_1_2_3_4.png", (8, 8))  # no base name
    png("my.photo.png", (12, 12))
    (folder / "my.photo.txt").write_text("dotted stem")
    png(".hidden.png", (8, 8))
    png("no_caption.png", (9, 9))
    Image.new("RGB", (40, 20)).save(folder / "rotated.jpg", exif=_exif(6))
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 10000)  # a chunk before the pixels, past the first 4 KiB read
    png("bigtext.png", (33, 17), pnginfo=info)
    # an EXIF block larger than the first read, orientation 8 (sides swap)
    big_exif = _exif(8)
    big_exif[0x010E] = "d" * 20000  # ImageDescription
    Image.new("RGB", (50, 30)).save(folder / "bigexif.jpg", exif=big_exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    png("wild.png", (5, 7))
    (folder / "wild.txt").write_text("  \n first \r\r second  \n")  # empty first line
    Image.new("RGB", (11, 13)).save(folder / "w.webp")
    Image.new("RGB", (11, 14)).save(folder / "b.bmp")
    (folder / "dir.png").mkdir()  # a folder named like an image is not an image
    (folder / "notes.txt").write_text("not a caption of anything")
    return folder


def reference_scan(subset: SubsetBlueprint) -> tuple[list[tuple], list[tuple[str, str]], list[str]]:
    """The plain way: list_images, Path-based caption candidates, read_caption_file, Pillow sizes."""
    records, unreadable, caption_errors = [], [], []
    extension = subset.caption_extension
    for image in list_images(os.path.abspath(subset.image_dir)):
        caption = None
        for candidate in caption_file_candidates(image, extension) if extension else []:
            if candidate.exists():
                try:
                    caption = read_caption_file(candidate, subset.enable_wildcard)
                except CaptionFileError as error:
                    caption = error
                break
        if isinstance(caption, CaptionFileError):
            caption_errors.append(str(caption))
            continue
        try:
            width, height = read_image_size(image)
        except ImageReadError as error:
            unreadable.append((str(image), error.reason))
            continue
        records.append((str(image), subset.class_tokens or "" if caption is None else caption, width, height))
    return records, unreadable, caption_errors


@pytest.mark.parametrize("wildcard", [False, True])
@pytest.mark.parametrize(("extension", "class_tokens"), [(".txt", None), ("txt", "cls"), ("", "cls")])
def test_scan_matches_the_plain_way(tmp_path, wildcard, extension, class_tokens):
    folder = tricky_folder(tmp_path / "data")
    subset = SubsetBlueprint(image_dir=str(folder), caption_extension=extension, class_tokens=class_tokens,
                             enable_wildcard=wildcard)
    blueprint = DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1, subsets=(subset,))
    report = ScanReport()
    records = scan_subset(subset, blueprint, report)
    expected_records, expected_unreadable, expected_errors = reference_scan(subset)
    assert [tuple(r) for r in records] == expected_records
    assert report.unreadable == expected_unreadable
    assert report.caption_errors == expected_errors
    names = [Path(r.path).name for r in records]
    assert ".hidden.png" not in names and "dir.png" not in names and "B.PNG" in names
    assert {Path(p).name for p, _ in report.unreadable} == {"empty.png", "corrupt.jpg"}
    sizes = {Path(r.path).name: (r.width, r.height) for r in records}
    assert sizes["rotated.jpg"] == (20, 40) and sizes["bigexif.jpg"] == (30, 50) and sizes["bigtext.png"] == (33, 17)


def test_caption_errors_match_the_plain_way(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, content in (("latin", "café".encode("latin-1")), ("bom_latin", b"\xef\xbb\xbfab\xff"),
                          ("blank", b" \r\n\t\n"), ("good", b"fine")):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(content)
    subset = SubsetBlueprint(image_dir=str(folder), caption_extension=".txt")
    blueprint = DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1, subsets=(subset,))
    report = ScanReport()
    records = scan_subset(subset, blueprint, report)
    assert [Path(r.path).name for r in records] == ["good.png"]
    assert report.caption_errors == reference_scan(subset)[2]
    assert len(report.caption_errors) == 3
    # the offset counts from after a byte-order mark, as Python's utf-8-sig decoder reports it
    assert any("bom_latin.txt" in e and "offset 2" in e for e in report.caption_errors)


def test_long_caption_files_are_read_to_the_end(tmp_path):
    path = tmp_path / "long.txt"
    text = "tag, " * 40000  # 200 kB, more than one read
    path.write_text(text + "\nlast line", encoding="utf-8")
    assert read_caption_file(path, enable_wildcard=False) == text.strip()
    assert read_caption_file(str(path), enable_wildcard=True).endswith("\nlast line")


def test_lone_carriage_returns_end_lines(tmp_path):
    path = tmp_path / "cr.txt"
    path.write_bytes(b"first\rsecond\r\nthird")
    assert read_caption_file(path, enable_wildcard=False) == "first"
    assert read_caption_file(path, enable_wildcard=True) == "first\nsecond\nthird"


def test_fast_sizes_fall_back_for_everything_unusual(tmp_path):
    folder = tricky_folder(tmp_path / "data")
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() in (".png", ".jpg", ".webp", ".bmp") and path.stat().st_size:
            if path.name == "corrupt.jpg":
                with pytest.raises(ImageReadError):
                    fast_image_size(str(path))
            else:
                assert fast_image_size(str(path)) == read_image_size(path), path.name


def test_build_pauses_the_garbage_collector_and_restores_it(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    blueprint = DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1,
                                 subsets=(SubsetBlueprint(image_dir=str(folder), class_tokens="x"),))
    assert gc.isenabled()
    build_dataset_group([blueprint], check_readable=False)
    assert gc.isenabled()
    gc.disable()
    try:
        build_dataset_group([blueprint], check_readable=False)
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError):
        with paused_garbage_collection():
            assert not gc.isenabled()
            raise RuntimeError
    assert gc.isenabled()


def test_metadata_keys_resolve_from_the_listing_and_on_disk(tmp_path):
    import json

    folder = tmp_path / "ft"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "B.JPG", "sub/c.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    keys = {
        "a": "stem", "a.png": "name", "B": "upper-case extension", "sub/c.png": "sub-path", "./a.png": "dot",
        str(folder / "sub" / "c"): "absolute without extension", str(folder / "sub" / ".." / "a.png"): "absolute",
        "sub/c": "sub-path without extension: not looked up", "nothing": "missing",
    }
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({key: {"caption": caption} for key, caption in keys.items()}), encoding="utf-8")
    subset = SubsetBlueprint(image_dir=str(folder), metadata_file=str(meta))
    blueprint = DatasetBlueprint(kind="fine_tuning", resolution=(64, 64), batch_size=1, subsets=(subset,))
    report = ScanReport()
    found = {record.caption: record.path for record in scan_subset(subset, blueprint, report)}
    a, b, c = (str(folder / name) for name in ("a.png", "B.JPG", "sub/c.png"))
    assert found == {
        "stem": a, "name": a, "upper-case extension": b, "sub-path": c, "dot": a,
        "absolute without extension": c, "absolute": a,
    }
    assert any("2 key(s)" in warning for warning in report.warnings)


def test_a_caption_file_that_cannot_be_opened_is_listed_not_raised(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "img.png")
    (folder / "img.txt").mkdir()  # a folder where the caption file should be
    subset = SubsetBlueprint(image_dir=str(folder), caption_extension=".txt")
    blueprint = DatasetBlueprint(kind="dreambooth", resolution=(64, 64), batch_size=1, subsets=(subset,))
    report = ScanReport()
    assert scan_subset(subset, blueprint, report) == []
    assert len(report.caption_errors) == 1 and "cannot read caption file" in report.caption_errors[0]
    assert str(folder / "img.txt") in report.caption_errors[0]
