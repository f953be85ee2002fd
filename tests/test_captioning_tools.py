"""finetune/make_captions.py (BLIP) and make_captions_by_git.py (GIT) on tiny local models, as a user runs them."""

from __future__ import annotations

import logging

import pytest

from finetune import make_captions, make_captions_by_git
from library.data.captioning import remove_read_text
from tests.tiny_captioners import build_tiny_blip, build_tiny_git
from tests.training_helpers import run_script, write_image_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": build_tiny_blip(root / "blip"), "git": build_tiny_git(root / "git")}


@pytest.fixture
def images(tmp_path):
    folder = write_image_folder(tmp_path / "images", count=3)
    write_image_folder(folder / "sub", count=1)
    return folder


def captions(folder, extension=".caption", pattern="*"):
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob(f"{pattern}{extension}"))}


def test_blip_writes_one_line_per_image_reproducibly_and_keeps_existing_files(models, images, caplog):
    (images / "broken.png").write_bytes(b"not a png")
    (images / "img002.caption").write_text("written by hand\n", encoding="utf-8")
    argv = [str(images), "--caption_weights", str(models["blip"]), "--max_length", "12", "--batch_size", "2"]
    with caplog.at_level(logging.WARNING):
        assert make_captions.main(argv) == 0
    assert "broken.png" in caplog.text  # named and skipped; the others are captioned
    first = captions(images)
    assert set(first) == {"img000.caption", "img001.caption", "img002.caption"}
    assert first["img002.caption"] == "written by hand\n"  # kept without --overwrite
    assert all(text.endswith("\n") and text.count("\n") == 1 and text.strip() for text in first.values())
    assert "[DEC]" not in "".join(first.values())
    assert make_captions.main([*argv, "--overwrite"]) == 0
    again = captions(images)
    assert again["img002.caption"] != "written by hand\n"
    assert make_captions.main([*argv, "--overwrite"]) == 0
    assert captions(images) == again  # --seed 42 by default: the same captions every run


def test_blip_beam_search_does_not_depend_on_the_batch_size(models, images):
    base = [str(images), "--caption_weights", str(models["blip"]), "--max_length", "12", "--beam_search",
            "--num_beams", "3", "--overwrite", "--caption_extention", ".txt"]  # upstream's misspelt alias works
    assert make_captions.main([*base, "--batch_size", "1"]) == 0
    one = captions(images, ".txt")
    assert make_captions.main([*base, "--batch_size", "3", "--recursive"]) == 0
    assert captions(images, ".txt") == one and (images / "sub" / "img000.txt").is_file()


def test_git_captions_and_remove_words(models, images):
    assert make_captions_by_git.main([str(images), "--model_id", str(models["git"]), "--max_length", "12",
                                      "--batch_size", "2", "--remove_words"]) == 0
    assert len(captions(images)) == 3
    assert remove_read_text('a red sign with the words "open late" on the door') == "a red sign"
    assert remove_read_text("a poster that says hello on it") == "a poster"
    assert remove_read_text("a blue square") == "a blue square"


def test_missing_models_are_one_clear_line(images, tmp_path, capsys):
    assert make_captions.main([str(images), "--caption_weights", "nobody/no-such-blip"]) == 1
    err = capsys.readouterr().err
    assert "cannot load the captioning model nobody/no-such-blip" in err and "Traceback" not in err
    assert make_captions.main([str(images), "--caption_weights", str(tmp_path / "model_large_caption_v2.pth")]) == 1
    assert "original BLIP code are not supported" in capsys.readouterr().err


def test_the_script_runs_from_the_command_line(models, images):
    result = run_script("finetune/make_captions_by_git.py", str(images), "--model_id", str(models["git"]),
                        "--max_length", "8", "--caption_extension", "gcap")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 3 caption file(s)" in result.stdout and len(captions(images, ".gcap")) == 3
