"""finetune/ metadata scripts as the guide's chapter uses them: merge captions, merge tags, clean, then train.

Upstream's merge scripts crash on an image without a caption file; here it is named and skipped."""

from __future__ import annotations

import json
import logging

import pytest

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from library.data.caption_cleaning import clean_caption, clean_tags
from tests.training_helpers import assert_ok, run_script, write_image_folder


@pytest.fixture
def images(tmp_path):
    folder = write_image_folder(tmp_path / "images", count=3)
    (folder / "img000.caption").write_text("an anime woman holding a red square\n", encoding="utf-8")
    (folder / "img001.caption").write_text("a cartoon drawing of a blue square", encoding="utf-8")
    (folder / "img000.txt").write_text("1girl, long_hair, shirt, white_shirt, ^_^", encoding="utf-8")
    (folder / "img001.txt").write_text("2girls, blonde_hair, blue_eyes, smile, rating:safe", encoding="utf-8")
    (folder / "img002.txt").write_text("square", encoding="utf-8")
    return folder


def test_the_chapter_merge_merge_clean_then_fine_tune_trains(images, tmp_path, caplog, tiny_models):
    cap, dd, clean = tmp_path / "meta_cap.json", tmp_path / "meta_cap_dd.json", tmp_path / "meta_clean.json"
    with caplog.at_level(logging.WARNING):
        assert merge_captions_to_metadata.main([str(images), str(cap)]) == 0
    assert "1 image(s) have no usable .caption file" in caplog.text and "img002.png" in caplog.text
    assert json.loads(cap.read_text()) == {
        "img000": {"caption": "an anime woman holding a red square"},
        "img001": {"caption": "a cartoon drawing of a blue square"},
    }
    assert merge_dd_tags_to_metadata.main([str(images), str(dd), "--in_json", str(cap)]) == 0
    merged = json.loads(dd.read_text())
    assert merged["img000"] == {"caption": "an anime woman holding a red square",
                                "tags": "1girl, long_hair, shirt, white_shirt, ^_^"}
    assert merged["img002"] == {"tags": "square"}
    assert clean_captions_and_tags.main([str(dd), str(clean)]) == 0
    cleaned = json.loads(clean.read_text())
    assert cleaned["img000"] == {"caption": "a girl holding a red square", "tags": "1girl, long hair, white shirt, ^_^"}
    assert cleaned["img001"] == {"caption": "a drawing of a blue square", "tags": "2girls, smile"}

    result = run_script("fine_tune.py", "--pretrained_model_name_or_path", str(tiny_models["sd1"]),
                        "--train_data_dir", str(images), "--in_json", str(clean), "--resolution", "64",
                        "--output_dir", str(tmp_path / "out"), "--output_name", "ft", "--max_train_steps", "1",
                        "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors")
    assert_ok(result)
    assert "3 training samples/epoch" in result.stdout


def test_full_path_keys_recursive_folders_and_kept_fields(images, tmp_path):
    sub = write_image_folder(images / "more", count=1)
    (sub / "img000.caption").write_text("a third square", encoding="utf-8")
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({str((images / "img000.png").resolve()): {"caption": "old", "image_size": [64, 64]}}))
    assert merge_captions_to_metadata.main([str(images), str(out), "--full_path", "--recursive"]) == 0
    data = json.loads(out.read_text())  # the existing file was updated, its other fields kept
    assert data[str((images / "img000.png").resolve())] == {
        "caption": "an anime woman holding a red square", "image_size": [64, 64]}
    assert data[str((sub / "img000.png").resolve())] == {"caption": "a third square"}


def test_mistakes_are_one_line_errors(images, tmp_path, capsys):
    assert merge_captions_to_metadata.main([str(images), str(tmp_path / "m.json"), "--recursive"]) == 1
    assert "--recursive needs --full_path" in capsys.readouterr().err
    assert merge_dd_tags_to_metadata.main([str(tmp_path / "nope"), str(tmp_path / "m.json")]) == 1
    assert "nope: no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert clean_captions_and_tags.main([str(bad), str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err
    assert "bad.json: not a metadata file" in err and "Traceback" not in err


def test_cleaning_rules():
    assert clean_caption("an anime woman with an anime girl") == "a girl with a girl"
    assert clean_caption("womanhood and human") == "womanhood and human"  # whole words only
    assert clean_tags("solo, shirt, white_shirt, white shirt, >_<, rating:explicit") == "solo, white shirt, >_<"
    assert clean_tags("multiple_girls, red_hair, green_eyes, ponytail, outdoors") == "multiple girls, outdoors"
    assert clean_tags("1girl, red_hair, ponytail") == "1girl, red hair, ponytail"  # one person: kept
