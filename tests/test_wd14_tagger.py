"""finetune/tag_images_by_wd14_tagger.py against tiny WD14-shaped ONNX models whose scores we choose.

The models read the mean colour of their input: "red" scores the red channel, "green" the green one, and so
on, so each test image (a flat colour) gets known tags. A red image fed as RGB instead of BGR would come out
"blue", and black padding instead of white would lose the tags of a padded image.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import tag_images_by_wd14_tagger as script
from library.data import wd14_tagger
from library.data.config import DatasetBlueprint, SubsetBlueprint
from library.data.dataset_scan import read_metadata_file, scan_subset

ROOT = Path(__file__).resolve().parent.parent
from tests.tiny_taggers import FIXED_REPO, MAPPING_REPO, WD14_REPO, write_mapping_model, write_wd14_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14_tagger_model")
    write_wd14_model(root / "test_wd-tiny-tagger")
    write_wd14_model(root / "test_wd-fixed-batch", batch=2)
    write_mapping_model(root / "test_cl-tiny" / "v1")
    return root


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 20), rgb).save(folder / f"{name}.png")
    return folder


def tag(folder, model_dir, *args, repo=WD14_REPO) -> int:
    return script.main([str(folder), "--model_dir", str(model_dir), "--repo_id", repo, *args])


def tags_of(folder: Path, ext: str = ".txt") -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob(f"*{ext}"))}


# ---------------------------------------------------------------- WD14 format


def test_default_run_keeps_csv_order_and_writes_character_tags(images, model_dir):
    assert tag(images, model_dir) == 0
    assert tags_of(images) == {  # general tags in CSV order, then characters (upstream: UnboundLocalError)
        "blue": "blue, long_hair, ^_^\n",
        "green": "green, long_hair, hatsune_miku_(vocaloid)\n",
        "red": "red, long_hair, kaname_madoka\n",
    }
    assert not list(images.glob(".*tmp*"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("args, expected", [
    ([], "red, long_hair, kaname_madoka"),
    (["--general_threshold", "0.6"], "red, kaname_madoka"),  # characters keep --thresh
    (["--character_threshold", "0.5"], "red, long_hair"),
    (["--thresh", "0.45"], "red, long_hair"),  # the fallback of both
    (["--thresh", "0.45", "--character_threshold", "0.3"], "red, long_hair, kaname_madoka"),
    (["--character_threshold", "1.1", "--general_threshold", "1.1"], ""),
])
def test_thresholds_per_category(images, model_dir, args, expected):
    assert tag(images, model_dir, *args) == 0
    assert tags_of(images)["red"] == expected + "\n"


def test_rating_first_or_last_is_the_most_probable_rating(images, model_dir, capsys):
    assert tag(images, model_dir, "--use_rating_tags") == 0
    assert tags_of(images) == {"blue": "sensitive, blue, long_hair, ^_^\n",
                               "green": "general, green, long_hair, hatsune_miku_(vocaloid)\n",
                               "red": "questionable, red, long_hair, kaname_madoka\n"}
    assert tag(images, model_dir, "--use_rating_tags_as_last_tag") == 0
    assert tags_of(images)["red"] == "red, long_hair, kaname_madoka, questionable\n"
    capsys.readouterr()
    assert tag(images, model_dir, "--use_rating_tags", "--use_rating_tags_as_last_tag") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --use_rating_tags and --use_rating_tags_as_last_tag contradict")
    assert err.count("\n") == 1


def test_character_tags_first_and_always_first_tags(images, model_dir):
    assert tag(images, model_dir, "--character_tags_first", "--use_rating_tags") == 0
    assert tags_of(images)["red"] == "questionable, kaname_madoka, red, long_hair\n"
    # the listed tags an image has come first, in the listed order; absent ones are ignored
    assert tag(images, model_dir, "--always_first_tags", "long_hair, nope,red", "--use_rating_tags") == 0
    assert tags_of(images)["red"] == "long_hair, red, questionable, kaname_madoka\n"


def test_undesired_tags_match_the_written_or_the_model_spelling(images, model_dir):
    assert tag(images, model_dir, "--undesired_tags", "long_hair,kaname_madoka, questionable", "--use_rating_tags") == 0
    assert tags_of(images)["red"] == "red\n"  # an undesired rating is not written either
    assert tag(images, model_dir, "--remove_underscore", "--undesired_tags", "long hair,hatsune_miku_(vocaloid)") == 0
    assert tags_of(images) == {"blue": "blue, ^_^\n", "green": "green\n", "red": "red, kaname madoka\n"}


def test_remove_underscore_character_tag_expand_and_separator(images, model_dir):
    assert tag(images, model_dir, "--remove_underscore") == 0
    assert tags_of(images)["blue"] == "blue, long hair, ^_^\n"  # 3-character ^_^ kept
    assert tags_of(images)["green"] == "green, long hair, hatsune miku (vocaloid)\n"
    assert tag(images, model_dir, "--character_tag_expand", "--remove_underscore", "--caption_separator", " | ",
               "--undesired_tags", "blue|^_^") == 0
    assert tags_of(images) == {"blue": "long hair\n", "green": "green | long hair | hatsune miku | vocaloid\n",
                               "red": "red | long hair | kaname madoka\n"}


def test_tag_replacement_with_escapes(images, model_dir):
    replacement = r"red,crimson\, dark;^_^,smile\;happy;long hair,very long hair;hatsune miku,miku"
    assert tag(images, model_dir, "--tag_replacement", replacement, "--remove_underscore",
               "--character_tag_expand") == 0
    assert tags_of(images) == {  # applied after --remove_underscore and --character_tag_expand
        "blue": "blue, very long hair, smile;happy\n",
        "green": "green, very long hair, miku, vocaloid\n",
        "red": "crimson, dark, very long hair, kaname madoka\n",
    }


def test_tag_replacement_parsing():
    parse = wd14_tagger.parse_tag_replacement
    assert parse(r"a\,b,c;d,e\;f;") == {"a,b": "c", "d": "e;f"}
    assert parse(r"\m/,metal; x , y ") == {r"\m/": "metal", "x": "y"}
    for bad in ("a,b,c", "abc", ",x", "a,"):
        with pytest.raises(wd14_tagger.TaggerError, match="--tag_replacement"):
            parse(bad)


def test_bad_tag_replacement_is_one_error_line(images, model_dir, capsys):
    assert tag(images, model_dir, "--tag_replacement", "a,b,c") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tag_replacement: 'a,b,c' is not 'source,target'") and "Traceback" not in err
    assert not list(images.glob("*.txt"))


def test_existing_files_are_replaced_unless_append_tags(images, model_dir, capsys):
    (images / "red.txt").write_text("masterpiece, red\n", encoding="utf-8")
    (images / "green.txt").write_text("old", encoding="utf-8")
    assert tag(images, model_dir, "--append_tags") == 0
    assert tags_of(images) == {"blue": "blue, long_hair, ^_^\n",
                               "green": "old, green, long_hair, hatsune_miku_(vocaloid)\n",
                               "red": "masterpiece, red, long_hair, kaname_madoka\n"}
    assert tag(images, model_dir, "--append_tags") == 0  # a second run adds nothing
    assert tags_of(images)["red"] == "masterpiece, red, long_hair, kaname_madoka\n"
    capsys.readouterr()
    assert tag(images, model_dir) == 0  # sd-scripts' default: overwrite
    assert tags_of(images)["red"] == "red, long_hair, kaname_madoka\n"
    assert "3 existing one(s) replaced" in capsys.readouterr().out


def test_caption_extension_with_or_without_dot(images, model_dir):
    assert tag(images, model_dir, "--caption_extension", "tags") == 0
    assert tags_of(images, ".tags")["red"] == "red, long_hair, kaname_madoka\n"
    assert tag(images, model_dir, "--caption_extention", ".wd") == 0  # upstream's misspelt alias
    assert (images / "red.wd").is_file()


@pytest.mark.parametrize("name", ["meta.json", "meta.jsonl"])
def test_output_path_is_read_by_fine_tuning(images, model_dir, tmp_path, name):
    Image.new("RGB", (30, 20), (0, 0, 0)).save(images / "wide.png")
    out = tmp_path / "out" / name
    assert tag(images, model_dir, "--output_path", str(out)) == 0
    assert not list(images.glob("*.txt"))  # one file instead of per-image files
    pairs = dict(read_metadata_file(str(out)))
    red = str((images / "red.png").resolve())
    if name.endswith(".jsonl"):
        assert pairs[red] == {"image_path": red, "caption": "red, long_hair, kaname_madoka", "image_size": [20, 20]}
    else:
        assert pairs[red] == {"tags": "red, long_hair, kaname_madoka", "image_size": [20, 20]}
    # what fine_tune.py's dataset scan makes of it: every image found, tags as the caption, sizes kept
    subset = SubsetBlueprint(image_dir=str(images), metadata_file=str(out))
    records = scan_subset(subset, DatasetBlueprint(kind="fine_tuning", resolution=(64, 64), subsets=(subset,)))
    by_name = {Path(r.path).name: r for r in records}
    assert set(by_name) == {"red.png", "green.png", "blue.png", "wide.png"}
    assert by_name["red.png"].caption == "red, long_hair, kaname_madoka"
    assert (by_name["wide.png"].width, by_name["wide.png"].height) == (30, 20)


def test_recursive(images, model_dir):
    sub = images / "more"
    sub.mkdir()
    Image.new("RGB", (20, 20), COLOURS["green"]).save(sub / "leaf.png")
    assert tag(images, model_dir) == 0
    assert not (sub / "leaf.txt").exists()
    assert tag(images, model_dir, "--recursive") == 0
    assert (sub / "leaf.txt").read_text() == "green, long_hair, hatsune_miku_(vocaloid)\n"


def test_unreadable_image_is_named_and_skipped(images, model_dir, caplog, capsys):
    (images / "broken.png").write_bytes(b"not a png at all")
    (images / "cut.png").write_bytes((images / "red.png").read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        assert tag(images, model_dir, "--batch_size", "2") == 0
    assert set(tags_of(images)) == {"red", "green", "blue"}
    out = capsys.readouterr()
    assert "broken.png" in out.err and "cut.png" in out.err  # each named as it is met
    assert "2 unreadable image(s) skipped" in caplog.text and "broken.png" in caplog.text
    assert "tagged 3 image(s)" in out.out


def test_preprocessing_white_padding_transparency_and_bgr(tmp_path, model_dir):
    folder = tmp_path / "pre"
    folder.mkdir()
    Image.new("RGB", (40, 20), (0, 0, 0)).save(folder / "black_wide.png")  # half white once padded to a square
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(folder / "clear.png")  # fully transparent: white
    assert tag(folder, model_dir) == 0
    assert tags_of(folder) == {
        "black_wide": "red, green, blue, long_hair, ^_^, hatsune_miku_(vocaloid)\n",
        "clear": "red, green, blue, long_hair, ^_^, white_background, hatsune_miku_(vocaloid), kaname_madoka\n",
    }
    square = wd14_tagger.square_bgr(np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8))
    assert square.shape == (2, 2, 3) and square[0, 0].tolist() == [30, 20, 10] and square[1].tolist() == [[255] * 3] * 2
    prepared = wd14_tagger.prepare_image(np.zeros((10, 30, 3), np.uint8), (448, 448))
    assert prepared.shape == (448, 448, 3) and prepared.dtype == np.float32 and prepared.max() == 255


def test_fixed_batch_model_forces_the_batch_size(images, model_dir, caplog):
    with caplog.at_level(logging.WARNING):  # 3 images in batches of 2: the last one is padded
        assert tag(images, model_dir, "--batch_size", "5", repo=FIXED_REPO) == 0
    assert "--batch_size 5: the model only takes batches of 2" in caplog.text
    assert tags_of(images)["blue"] == "blue, long_hair, ^_^\n"


def test_reading_threads_give_the_same_tags(images, model_dir):
    for i in range(5):
        Image.new("RGB", (20, 20), list(COLOURS.values())[i % 3]).save(images / f"more{i}.png")
    assert tag(images, model_dir, "--batch_size", "2") == 0
    plain = tags_of(images)
    for p in images.glob("*.txt"):
        p.unlink()
    assert tag(images, model_dir, "--batch_size", "2", "--max_data_loader_n_workers", "2") == 0
    assert tags_of(images) == plain and len(plain) == 8


def test_frequency_tags_and_debug(images, model_dir, capsys):
    assert tag(images, model_dir, "--frequency_tags", "--debug") == 0
    out = capsys.readouterr().out
    counts = out.split("Tag frequencies:\n")[1].splitlines()
    assert counts[0] == "long_hair: 3" and "red: 1" in counts and "kaname_madoka: 1" in counts
    assert "character tags: kaname_madoka" in out and "general tags: red, long_hair" in out


# ---------------------------------------------------------------- the tag_mapping format


def test_mapping_format_sorts_by_confidence_with_its_categories(images, model_dir):
    assert tag(images, model_dir, repo=MAPPING_REPO) == 0
    assert tags_of(images) == {
        "blue": "blue, ^_^, absurdres, long_hair\n",
        "green": "green, hatsune_miku_(vocaloid), vocaloid, some_model, long_hair\n",
        "red": "red, some_artist, long_hair, kaname_madoka\n",
    }
    assert tag(images, model_dir, "--artist_threshold", "0.7", "--copyright_threshold", "0.8", "--meta_threshold",
               "0.7", "--model_threshold", "0.6", "--character_threshold", "0.85", repo=MAPPING_REPO) == 0
    assert tags_of(images) == {"blue": "blue, ^_^, long_hair\n", "green": "green, long_hair\n",
                               "red": "red, long_hair\n"}


def test_mapping_format_rating_quality_and_character_order(images, model_dir):
    assert tag(images, model_dir, "--use_rating_tags", "--use_quality_tags", "--character_tags_first",
               repo=MAPPING_REPO) == 0
    assert tags_of(images)["red"] == "questionable, normal_quality, kaname_madoka, red, some_artist, long_hair\n"
    assert tags_of(images)["blue"] == "sensitive, best_quality, blue, ^_^, absurdres, long_hair\n"
    assert tag(images, model_dir, "--use_rating_tags_as_last_tag", "--use_quality_tags_as_last_tag",
               repo=MAPPING_REPO) == 0
    assert tags_of(images)["red"] == "red, some_artist, long_hair, kaname_madoka, normal_quality, questionable\n"


def test_mapping_format_expand_underscore_and_replacement(images, model_dir):
    assert tag(images, model_dir, "--character_tag_expand", "--remove_underscore", "--tag_replacement",
               r"some artist,artist\, the;^_^,smile\;happy", repo=MAPPING_REPO) == 0
    assert tags_of(images) == {  # the expanded "vocaloid" is written once
        "blue": "blue, smile;happy, absurdres, long hair\n",
        "green": "green, hatsune miku, vocaloid, some model, long hair\n",
        "red": "red, artist, the, long hair, kaname madoka\n",
    }


# ---------------------------------------------------------------- model files


def test_model_folder_layout():
    wd = wd14_tagger.resolve_model_files("SmilingWolf/wd-vit-tagger-v3", "models")
    assert wd.folder == Path("models/SmilingWolf_wd-vit-tagger-v3") and wd.model_path.name == "model.onnx"
    assert wd.tags_file == "selected_tags.csv" and wd.default_format
    cl = wd14_tagger.resolve_model_files("cella110n/cl_tagger/cl_tagger_1_01", "models")
    assert (cl.repo_id, cl.subfolder) == ("cella110n/cl_tagger", "cl_tagger_1_01")
    assert cl.folder == Path("models/cella110n_cl_tagger/cl_tagger_1_01") and cl.tags_file == "tag_mapping.json"
    assert cl.model_candidates[0] == "model_optimized.onnx" and not cl.default_format
    with pytest.raises(wd14_tagger.TaggerError, match="--repo_id"):
        wd14_tagger.resolve_model_files("a/../b", "models")


def test_offline_without_the_model_is_one_clear_error(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main([str(images), "--model_dir", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    folder = tmp_path / "models" / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    assert err.startswith(f"error: {folder}: the tagger model is missing there (model.onnx, selected_tags.csv)")
    assert "https://huggingface.co/SmilingWolf/wd-v1-4-convnext-tagger-v2" in err and err.count("\n") == 1
    assert not list(images.glob("*.txt"))


def test_only_missing_files_are_downloaded(images, model_dir, tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, subfolder, local_dir, force):
        calls.append((repo_id, filename, subfolder, Path(local_dir), force))
        source = model_dir / repo_id.replace("/", "_") / (subfolder or "") / filename
        target = Path(local_dir) / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())

    monkeypatch.setattr(wd14_tagger, "download_file", fake_download)
    monkeypatch.setattr(wd14_tagger, "_hub_offline", lambda: False)
    models = tmp_path / "models"
    (models / "test_wd-tiny-tagger").mkdir(parents=True)  # a folder with one file: upstream never fills it
    (models / "test_wd-tiny-tagger" / "selected_tags.csv").write_bytes(
        (model_dir / "test_wd-tiny-tagger" / "selected_tags.csv").read_bytes())
    assert tag(images, models) == 0
    assert calls == [(WD14_REPO, "model.onnx", None, models / "test_wd-tiny-tagger", False)]
    assert tags_of(images)["red"] == "red, long_hair, kaname_madoka\n"
    calls.clear()
    assert tag(images, models) == 0 and calls == []  # all there: the hub is not asked
    assert tag(images, models, "--force_download") == 0
    assert [c[1] for c in calls] == ["model.onnx", "selected_tags.csv"] and all(c[4] for c in calls)
    calls.clear()
    assert tag(images, models, repo=MAPPING_REPO) == 0  # subfolder format: local_dir is the repo folder
    assert calls == [("test/cl-tiny", name, "v1", models / "test_cl-tiny", False)
                     for name in ("model_optimized.onnx", "tag_mapping.json")]
    assert tags_of(images)["red"] == "red, some_artist, long_hair, kaname_madoka\n"


def test_mapping_format_falls_back_to_model_onnx_and_download_errors_are_one_line(tmp_path, model_dir, monkeypatch):
    class RemoteEntryNotFoundError(Exception):  # what huggingface_hub raises for a file the repo lacks
        pass

    def fake_download(repo_id, filename, subfolder, local_dir, force):
        if filename == "model_optimized.onnx":
            raise RemoteEntryNotFoundError("404 Client Error: Entry Not Found")
        if filename == "tag_mapping.json":
            raise ConnectionError("Max retries exceeded\nwith url ...")
        target = Path(local_dir) / subfolder / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((model_dir / "test_cl-tiny" / "v1" / "model_optimized.onnx").read_bytes())

    monkeypatch.setattr(wd14_tagger, "download_file", fake_download)
    monkeypatch.setattr(wd14_tagger, "_hub_offline", lambda: False)
    files = wd14_tagger.resolve_model_files("test/cl-tiny/v1", tmp_path)
    with pytest.raises(wd14_tagger.TaggerError) as error:
        wd14_tagger.ensure_model_files(files)
    assert str(error.value).startswith("cannot download tag_mapping.json of test/cl-tiny (Max retries exceeded)")
    assert files.model_path.name == "model.onnx" and files.missing() == ["tag_mapping.json"]


def test_missing_or_empty_image_folder(tmp_path, model_dir, capsys):
    assert tag(tmp_path / "nope", model_dir) == 1
    assert "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert tag(tmp_path / "empty", model_dir) == 1
    assert "empty: no images found (add --recursive for sub-folders)" in capsys.readouterr().err


def test_mismatched_model_and_tag_list_is_a_clear_error(images, model_dir, tmp_path, capsys):
    folder = tmp_path / "models" / "test_wd-tiny-tagger"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((model_dir / "test_wd-tiny-tagger" / "model.onnx").read_bytes())
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,general,9,1\n", encoding="utf-8")
    assert tag(images, tmp_path / "models") == 1
    assert "gives 12 scores but selected_tags.csv lists 1 tags" in capsys.readouterr().err
    (folder / "model.onnx").write_bytes(b"garbage")
    assert tag(images, tmp_path / "models") == 1
    assert "onnxruntime cannot load it" in capsys.readouterr().err


def test_providers_prefer_the_gpu():
    assert wd14_tagger.onnx_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert wd14_tagger.onnx_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


# ---------------------------------------------------------------- the script as users run it


def test_script_runs_as_a_command(images, model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*args):
        command = [sys.executable, str(ROOT / "finetune" / "tag_images_by_wd14_tagger.py"), *args]
        return subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    help_text = run("--help")
    assert help_text.returncode == 0 and "TensorFlow" in help_text.stdout
    assert "--character_tag_expand" in help_text.stdout
    result = run(str(images), "--model_dir", str(model_dir), "--repo_id", WD14_REPO, "--onnx", "--use_rating_tags")
    assert result.returncode == 0, result.stderr
    assert tags_of(images)["green"] == "general, green, long_hair, hatsune_miku_(vocaloid)\n"
    assert "tagged 3 image(s)" in result.stdout and "image/s" in result.stderr  # the progress bar
    bad = run(str(images), "--batch_size", "x")
    assert bad.returncode == 1 and bad.stderr.startswith("error: argument --batch_size") and "usage" not in bad.stderr
