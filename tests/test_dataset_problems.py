"""Bad datasets are refused, or clearly warned about, before any model loads (no model is loaded here).

Each test builds the dataset a user got wrong in tmp_path and calls ``prepare_datasets`` with the options
parsed by the script's real parser, then checks the text the user reads: it names the file or folder and
says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.data.config_schema import DatasetConfigError
from library.data.dataset_checks import NoTrainingDataError
from library.data.dataset_scan import MetadataFileError
from library.data.pipeline import prepare_datasets
from library.errors import UserError
from tests.recipe_infos import parser_for, support

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, size=(64, 64), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def images(folder: Path, count: int, size=(64, 64)) -> list[Path]:
    return [png(folder / f"img{i}.png", size, (i * 40 % 256, 60, 90)) for i in range(count)]


def prepare(*argv: str, script: str = "train_network"):
    args = parser_for(script).parse_args([*argv])
    return prepare_datasets(args, support(script))


def refused(*argv: str, script: str = "train_network", error=NoTrainingDataError) -> str:
    with pytest.raises(error) as info:
        prepare(*argv, script=script)
    assert isinstance(info.value, UserError)
    return str(info.value)


def warnings_of(caplog, *argv: str, script: str = "train_network") -> str:
    with caplog.at_level(logging.WARNING, logger="library.data"):
        prepare(*argv, script=script)
    return caplog.text


# ---------------------------------------------------------------- 1. nothing to train on


def test_empty_image_folder(tmp_path):
    (tmp_path / "parent" / "5_x").mkdir(parents=True)
    message = refused("--train_data_dir", str(tmp_path / "parent"), "--resolution", "64")
    assert message.startswith("nothing to train on")
    assert f"--train_data_dir sub-folder '5_x': folder {tmp_path / 'parent' / '5_x'} is empty" in message
    assert "put the training images (.png .jpg .jpeg .webp .bmp" in message


def test_folder_of_text_and_pdf_files(tmp_path):
    folder = tmp_path / "parent" / "5_x"
    folder.mkdir(parents=True)
    for name in ("a.txt", "b.txt", "notes.pdf"):
        (folder / name).write_text("x")
    message = refused("--train_data_dir", str(tmp_path / "parent"), "--resolution", "64")
    assert f"folder {folder} holds 3 file(s), none an image this trainer reads (.png .jpg .jpeg .webp .bmp" in message
    assert "put the training images in it" in message


def test_images_in_a_sub_folder_of_the_image_folder(tmp_path):
    folder = tmp_path / "parent" / "5_x"
    images(folder / "more", 2)
    message = refused("--train_data_dir", str(tmp_path / "parent"), "--resolution", "64")
    assert "1 sub-folder(s) (e.g. 'more')" in message and "move their images up into this folder" in message


def test_in_json_keys_match_no_image(tmp_path):
    images(tmp_path / "imgs", 2)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"photo_{i}": {"caption": "a cat"} for i in range(12)}), encoding="utf-8")
    message = refused("--in_json", str(meta), "--train_data_dir", str(tmp_path / "imgs"), "--resolution", "64")
    assert f"metadata {meta}: none of its 12 key(s) matches an image in {tmp_path / 'imgs'} (e.g. key 'photo_0')" in message
    assert "point image_dir (--train_data_dir) at the folder the metadata was made for" in message


def test_every_image_unreadable_and_skipped(tmp_path, caplog):
    folder = tmp_path / "parent" / "1_x"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not a png at all")
    (folder / "b.jpg").write_bytes(b"")
    (folder / "c.png").write_bytes(png(tmp_path / "whole.png").read_bytes()[:60])  # truncated
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with caplog.at_level(logging.WARNING, logger="library.data"):
        message = refused("--train_data_dir", str(tmp_path / "parent"), "--resolution", "64", "--skip_unreadable_images")
    assert f"all 4 image(s) of {folder} were unreadable and skipped" in message
    assert "re-save or replace them" in message
    assert "4 unreadable image(s) left out" in caplog.text  # the list is shown before the error


def test_every_subset_has_zero_repeats(tmp_path):
    images(tmp_path / "a", 1)
    images(tmp_path / "b", 1)
    config = tmp_path / "data.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'a'}'\n  num_repeats = 0\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'b'}'\n  num_repeats = 0\n",
        encoding="utf-8",
    )
    message = refused("--dataset_config", str(config), error=DatasetConfigError)
    assert "every subset has num_repeats < 1" in message and "set num_repeats to 1 or more" in message


def test_regularization_images_without_training_images(tmp_path):
    (tmp_path / "train" / "3_sks dog").mkdir(parents=True)
    images(tmp_path / "reg" / "1_dog", 3)
    message = refused("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                      "--resolution", "64", script="train_db")
    assert f"--train_data_dir sub-folder '3_sks dog': folder {tmp_path / 'train' / '3_sks dog'} is empty" in message
    assert "--reg_data_dir sub-folder '1_dog': its 3 regularization image(s) are not used" in message
    assert "add training images" in message


def test_one_empty_subset_beside_a_good_one_is_a_warning(tmp_path, caplog):
    images(tmp_path / "parent" / "2_good", 2)
    (tmp_path / "parent" / "3_empty").mkdir()
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "parent"), "--resolution", "64")
    assert f"--train_data_dir sub-folder '3_empty': folder {tmp_path / 'parent' / '3_empty'} is empty" in text


def test_a_user_sees_one_error_line_and_no_traceback(tmp_path):
    """The whole script: the dataset is refused before the model loads, as `error: ...`, exit status 1."""
    (tmp_path / "parent" / "5_x").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_network.py"), "--pretrained_model_name_or_path",
         str(ROOT / "models" / "tiny-sd-shapes"), "--train_data_dir", str(tmp_path / "parent"), "--resolution", "64",
         "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: nothing to train on" in result.stderr
    assert "is empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert "no batches to train on" not in result.stderr  # the trainer's internal guard is never reached


# ---------------------------------------------------------------- 2. metadata keys that match no image


def test_some_metadata_keys_match_no_image(tmp_path, caplog):
    images(tmp_path / "imgs", 2)
    meta = tmp_path / "meta.json"
    entries = {"img0": {"caption": "a"}, "img1.png": {"caption": "b"}}
    entries |= {f"gone_{i}": {"caption": "c"} for i in range(5)}
    meta.write_text(json.dumps(entries), encoding="utf-8")
    text = warnings_of(caplog, "--in_json", str(meta), "--train_data_dir", str(tmp_path / "imgs"), "--resolution", "64")
    assert f"{meta}: 5 key(s) of its 7 match no image in {tmp_path / 'imgs'} and are skipped" in text
    assert "'gone_0', 'gone_1', 'gone_2')" in text and "'gone_3'" not in text  # three examples
    assert "fix those keys, or add the missing images" in text


# ---------------------------------------------------------------- 3. loose images beside the sub-folders


def test_loose_images_beside_an_empty_repeat_folder(tmp_path):
    parent = tmp_path / "parent"
    (parent / "5_x").mkdir(parents=True)
    png(parent / "loose.png")
    message = refused("--train_data_dir", str(parent), "--resolution", "64", error=DatasetConfigError)
    assert f"--train_data_dir '{parent}': 1 image(s) lie directly in it (e.g. 'loose.png') and would not be used" in message
    assert "move them into such a sub-folder" in message and "or remove them" in message


def test_loose_images_beside_good_sub_folders_are_an_error_too(tmp_path):
    parent = tmp_path / "parent"
    images(parent / "5_x", 2)
    png(parent / "stray.jpg")
    png(parent / "stray2.png")
    message = refused("--train_data_dir", str(parent), "--resolution", "64", error=DatasetConfigError)
    assert "2 image(s) lie directly in it" in message and "'stray.jpg'" in message


# ---------------------------------------------------------------- 4. pictures in a format the trainer does not read


def test_gif_with_a_caption_is_named_in_a_warning(tmp_path, caplog):
    folder = tmp_path / "parent" / "1_cat"
    images(folder, 1)
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "cat.gif", save_all=True, append_images=frames[1:])  # animated
    (folder / "cat.txt").write_text("a cat", encoding="utf-8")
    (folder / "dog.tiff").write_bytes(b"II*\x00")  # a picture format, no caption
    (folder / "img0.txt").write_text("caption of a png", encoding="utf-8")
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "parent"), "--resolution", "64",
                       "--caption_extension", ".txt")
    assert f"{folder}: 2 file(s) look like training images but are not a format this trainer reads" in text
    assert "'cat.gif', 'dog.tiff'" in text and "convert them to PNG" in text
    assert "img0.txt" not in text


def test_a_folder_of_gifs_only_is_refused_naming_them(tmp_path):
    folder = tmp_path / "parent" / "1_cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "cat.gif")
    (folder / "cat.txt").write_text("a cat", encoding="utf-8")
    message = refused("--train_data_dir", str(tmp_path / "parent"), "--resolution", "64", "--caption_extension", ".txt")
    assert "holds 2 file(s), none an image this trainer reads" in message
    assert "(e.g. 'cat.gif')" in message and "convert those to PNG" in message


# ---------------------------------------------------------------- 5. extreme resizing


def test_tiny_image_and_panorama_are_warned_about(tmp_path, caplog):
    folder = tmp_path / "parent" / "1_x"
    png(folder / "dot.png", (1, 1))
    png(folder / "pano.png", (1200, 20))  # 60:1
    images(folder, 2, size=(512, 512))
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "parent"), "--resolution", "512", "--enable_bucket")
    upscale = next(line for line in text.splitlines() if "enlarged" in line)
    assert f"{folder}: 2 image(s) are enlarged more than 4x (per side) to fit their bucket" in upscale
    assert "'dot.png' (1x1 -> 512x512, 512x)" in upscale and "use larger images" in upscale
    crop = next(line for line in text.splitlines() if "of their area" in line)
    assert f"{folder}: 1 image(s) lose more than 25% of their area to the crop into their bucket" in crop
    assert "'pano.png' (1200x20 into 1024x256: 93% cut away)" in crop
    assert "min_bucket_reso / max_bucket_reso" in crop
    assert "img0.png" not in text


def test_wide_images_without_bucketing_suggest_it(tmp_path, caplog):
    folder = tmp_path / "parent" / "1_x"
    for i in range(5):
        png(folder / f"wide{i}.png", (256, 64))
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "parent"), "--resolution", "64")
    (crop,) = [line for line in text.splitlines() if "of their area" in line]
    assert "5 image(s) lose more than 25%" in crop and "75% cut away" in crop and "and 2 more" in crop
    assert "--enable_bucket" in crop


def test_ordinary_images_give_no_resize_warning(tmp_path, caplog):
    images(tmp_path / "parent" / "1_x", 3, size=(80, 64))
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "parent"), "--resolution", "64", "--enable_bucket",
                       "--min_bucket_reso", "64", "--max_bucket_reso", "128")
    assert "enlarged" not in text and "of their area" not in text


# ---------------------------------------------------------------- 6. metadata files that are not metadata


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("meta.jsonl", '{"image_path": "img0", "caption": "a"}\n{"image_path": "img1", caption: "b"}\n',
         "meta.jsonl line 2: not valid JSON"),
        ("meta.jsonl", '{"image_path": "img0"}\n\n["img1"]\n', "meta.jsonl line 3: a JSON list, expected one object"),
        ("meta.jsonl", '{"caption": "no path"}\n', "meta.jsonl line 1: no 'image_path'"),
        ("meta.json", '{"img0": {"caption": "a"},\n "img1": }', "meta.json: not valid JSON at line 2, column"),
        ("meta.json", '{"img0": {"caption": "a"}}\n{"img1": {"caption": "b"}}\n', "must be named .jsonl"),
        ("meta.json", '["img0", "img1"]', "meta.json: holds a JSON list, but a metadata file is one object"),
        ("meta.json", '{"img0": "a cat"}', "meta.json: the entry of key 'img0' is a string"),
        ("meta.json", '{"img0": {"tags": ["cat", "sofa"]}}', "has a list as its 'tags'; write it as one string"),
        ("meta.json", '{"img0": {"image_size": 512}}', "has image_size 512; write it as [width, height]"),
    ],
)
def test_malformed_metadata_file(tmp_path, name, content, expected):
    images(tmp_path / "imgs", 2)
    (tmp_path / name).write_text(content, encoding="utf-8")
    message = refused("--in_json", str(tmp_path / name), "--train_data_dir", str(tmp_path / "imgs"), "--resolution", "64",
                      error=MetadataFileError)
    assert str(tmp_path / name) in message and expected in message


def test_metadata_file_that_is_not_utf8(tmp_path):
    images(tmp_path / "imgs", 1)
    (tmp_path / "meta.json").write_bytes(b'{"img0": {"caption": "caf\xe9"}}')
    message = refused("--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "imgs"),
                      "--resolution", "64", error=MetadataFileError)
    assert "not UTF-8 text" in message and "save the metadata file as UTF-8" in message


# ---------------------------------------------------------------- 7. regularization images left unused


def test_more_reg_images_than_training_images(tmp_path, caplog):
    images(tmp_path / "train" / "1_sks dog", 2)
    images(tmp_path / "reg" / "1_dog", 5)
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                       "--resolution", "64", script="train_db")
    assert "--reg_data_dir sub-folder '1_dog': only 2 of the 5 regularization images are used" in text
    assert f"the other 3 (e.g. {tmp_path / 'reg' / '1_dog' / 'img2.png'}) are never trained on" in text
    assert "add training images or raise the training num_repeats" in text


def test_balanced_reg_images_give_no_warning(tmp_path, caplog):
    images(tmp_path / "train" / "2_sks dog", 2)
    images(tmp_path / "reg" / "1_dog", 4)
    text = warnings_of(caplog, "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                       "--resolution", "64", script="train_db")
    assert "regularization images are used" not in text
