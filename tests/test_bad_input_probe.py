"""A careless user's probe: a table of bad inputs run through every recipe script's real entry point.

Each case must end with a nonzero exit, one `error:` line (with its indented continuation) naming the
option or file to fix, no traceback, no training step started, and the output folder exactly as it was.
The cases stop before the model loads, so the whole table runs in-process in a few seconds.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import fine_tune
import train_db
import train_network
import train_textual_inversion
import train_textual_inversion_XTI
from library.training.entry import run_recipe
from library.training.output_folder import hold_output_folder
from tests.training_helpers import write_image_folder

RECIPES = {
    "train_network": train_network.NetworkRecipe,
    "train_db": train_db.DreamBoothRecipe,
    "fine_tune": fine_tune.FineTuneRecipe,
    "train_textual_inversion": train_textual_inversion.TextualInversionRecipe,
    "train_textual_inversion_XTI": train_textual_inversion_XTI.XTIRecipe,
}


@dataclass
class Setup:
    """One script's working inputs in a fresh folder; cases change one thing."""

    script: str
    root: Path
    model: Path
    out: Path
    data: Path
    meta: Path | None

    def argv(self, **changes: str | None) -> list[str]:
        options = {
            "pretrained_model_name_or_path": str(self.model),
            "train_data_dir": str(self.data),
            "resolution": "64",
            "output_dir": str(self.out),
            "output_name": "probe",
            "learning_rate": "1e-4",
            "max_train_steps": "1",
            "max_data_loader_n_workers": "0",
        }
        if self.meta is not None:
            options["in_json"] = str(self.meta)
        if self.script == "train_network":
            options["network_dim"] = "4"
        if self.script.startswith("train_textual_inversion"):
            options["token_string"] = "sks"  # the class part of the folder name "2_sks square" holds it
        options.update(changes)
        argv = []
        for key, value in options.items():
            if value is None:
                continue
            argv += [f"--{key}"] if value == "" else [f"--{key}", value]
        return argv


def make_setup(script: str, root: Path, model: Path) -> Setup:
    out = root / "out"
    out.mkdir(parents=True)
    (out / "earlier.safetensors").write_bytes(b"a model the user trained yesterday")
    if script == "fine_tune":
        data = write_image_folder(root / "images", count=2, caption=None)
        meta = root / "meta.json"
        meta.write_text(json.dumps({p.stem: {"caption": "a square"} for p in data.glob("*.png")}), encoding="utf-8")
        return Setup(script, root, model, out, data, meta)
    write_image_folder(root / "train" / "2_sks square", count=2)
    return Setup(script, root, model, out, root / "train", None)


def chattr_immutable(path: Path) -> bool:
    """Make `path` refuse writes even for root (EPERM); False where the filesystem or sandbox cannot."""
    try:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if done:
        try:
            (path / ".probe").write_bytes(b"")
        except OSError:
            return True
        (path / ".probe").unlink()
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    return False


# ---------------------------------------------------------------- the cases


def empty_dataset(s: Setup) -> tuple[list[str], list[str]]:
    if s.meta is not None:
        s.meta.write_text(json.dumps({"no_such_image": {"caption": "x"}}), encoding="utf-8")
        return s.argv(), ["nothing to train on", str(s.meta.name), "no_such_image"]
    empty = s.root / "empty"
    (empty / "5_thing").mkdir(parents=True)
    (empty / "5_thing" / "notes.txt").write_text("not an image", encoding="utf-8")
    return s.argv(train_data_dir=str(empty)), ["nothing to train on", "5_thing", "none an image"]


def loose_images(s: Setup) -> tuple[list[str], list[str]]:
    write_image_folder(s.data, count=1)  # beside the N_ folder
    return s.argv(), ["lie directly in it", "move them into"]


def output_dir_is_a_file(s: Setup) -> tuple[list[str], list[str]]:
    target = s.root / "a_file"
    target.write_text("x", encoding="utf-8")
    return s.argv(output_dir=str(target)), ["--output_dir", "is a file"]


def logging_dir_is_a_file(s: Setup) -> tuple[list[str], list[str]]:
    target = s.root / "logs"
    target.write_text("x", encoding="utf-8")
    return s.argv(logging_dir=str(target)), ["--logging_dir", "is a file"]


def negative_learning_rate(s: Setup) -> tuple[list[str], list[str]]:
    return s.argv(learning_rate="-1"), ["--learning_rate -1", ">= 0"]


def text_file_named_ckpt(s: Setup) -> tuple[list[str], list[str]]:
    fake = s.root / "model.ckpt"
    fake.write_text("this is not a model, it is a note\n", encoding="utf-8")
    return s.argv(pretrained_model_name_or_path=str(fake)), ["model.ckpt", "not a PyTorch checkpoint", "holds text"]


def missing_model(s: Setup) -> tuple[list[str], list[str]]:
    return s.argv(pretrained_model_name_or_path=str(s.root / "nope.safetensors")), ["nope.safetensors", "no such file"]


def unknown_option(s: Setup) -> tuple[list[str], list[str]]:
    return [*s.argv(), "--netwrk_dim", "4"], ["unrecognized arguments: --netwrk_dim", "--help"]


def bad_number(s: Setup) -> tuple[list[str], list[str]]:
    return s.argv(max_train_steps="ten"), ["--max_train_steps", "invalid int value: 'ten'"]


def unknown_config_key(s: Setup) -> tuple[list[str], list[str]]:
    config = s.root / "config.toml"
    config.write_text('learning_rat = 1e-4\n', encoding="utf-8")
    return s.argv(config_file=str(config)), [str(config), "unknown option(s) learning_rat"]


def resume_from_a_model_folder(s: Setup) -> tuple[list[str], list[str]]:
    return s.argv(resume=str(s.out)), ["--resume", "not a training state folder"]


def output_dir_in_use(s: Setup) -> tuple[list[str], list[str]]:
    return s.argv(), ["--output_dir", "another run is writing there", "pid"]


def output_dir_refuses_writes(s: Setup) -> tuple[list[str], list[str]]:
    locked = s.root / "locked_out"
    locked.mkdir()
    if not chattr_immutable(locked):
        pytest.skip("this filesystem cannot make a folder refuse root's writes (chattr +i)")
    return s.argv(output_dir=str(locked)), ["--output_dir", "cannot write files there", "Operation not permitted"]


def read_only_images_with_disk_cache(s: Setup) -> tuple[list[str], list[str]]:
    folder = s.data if s.meta is not None else s.data / "2_sks square"
    if not chattr_immutable(folder):
        pytest.skip("this filesystem cannot make a folder refuse root's writes (chattr +i)")
    return s.argv(cache_latents_to_disk=""), ["--cache_latents_to_disk", "cannot write files there", "--cache_latents"]


CASES: dict[str, Callable[[Setup], tuple[list[str], list[str]]]] = {
    f.__name__: f
    for f in (
        empty_dataset, loose_images, output_dir_is_a_file, logging_dir_is_a_file, negative_learning_rate,
        text_file_named_ckpt, missing_model, unknown_option, bad_number, unknown_config_key,
        resume_from_a_model_folder, output_dir_in_use, output_dir_refuses_writes, read_only_images_with_disk_cache,
    )
}  # fmt: skip
NOT_FOR = {("loose_images", "fine_tune")}  # fine-tuning reads one flat folder: loose images are its dataset


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("script", list(RECIPES))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(script, case, tiny_models, tmp_path, capsys):
    if (case, script) in NOT_FOR:
        pytest.skip("not a mistake for this script")
    setup = make_setup(script, tmp_path, tiny_models["sd1"])
    before = snapshot(setup.out)
    try:
        argv, expected = CASES[case](setup)
        if case == "output_dir_in_use":
            with hold_output_folder(setup.out, "train_network"):
                code = _run(script, argv)
            before = snapshot(setup.out)  # the other run's lock file came and went with it
        else:
            code = _run(script, argv)
    finally:
        for path in (tmp_path / "locked_out", setup.data, setup.data / "2_sks square"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    captured = capsys.readouterr()
    assert code == 1, f"{case}: exit {code}\n{captured.err[-2000:]}"
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, captured.err
    message = captured.err[captured.err.index("error:"):]
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"
    assert len(message.splitlines()) <= 6, message
    assert "Traceback" not in captured.err
    assert "training:" not in captured.out, "a training step must not start"
    assert snapshot(setup.out) == before


def _run(script: str, argv: list[str]) -> int:
    try:
        return run_recipe(RECIPES[script](), argv)
    except SystemExit as exit_:  # argparse's errors exit through the parser
        return int(exit_.code)


# ---------------------------------------------------------------- the data tools


def _tool_cases(tmp: Path) -> dict[str, tuple[Callable[[list[str]], int], list[str], list[str]]]:
    from finetune import (
        clean_captions_and_tags,
        make_captions,
        make_captions_by_git,
        merge_captions_to_metadata,
        merge_dd_tags_to_metadata,
        prepare_buckets_latents,
        tag_images_by_wd14_tagger,
    )
    from tools import cache_latents, resize_images_to_resolution, show_metadata

    images = write_image_folder(tmp / "images", count=1)
    not_json = tmp / "notes.json"
    not_json.write_text("these are notes, not JSON", encoding="utf-8")
    text_ckpt = tmp / "model.ckpt"
    text_ckpt.write_text("not a model", encoding="utf-8")
    missing = str(tmp / "missing")
    return {
        "captions: no such folder": (make_captions.main, [missing], ["missing: no such folder"]),
        "captions: model offline": (make_captions_by_git.main, [str(images), "--model_id", "nobody/none"],
                                    ["cannot load the captioning model nobody/none"]),
        "tagger: model not downloaded": (tag_images_by_wd14_tagger.main,
                                         [str(images), "--model_dir", str(tmp / "models"), "--repo_id", "nobody/none"],
                                         ["nobody_none"]),
        "merge: recursive without full_path": (merge_captions_to_metadata.main, [str(images), str(tmp / "m.json"),
                                               "--recursive"], ["--recursive needs --full_path"]),
        "merge: in_json not JSON": (merge_dd_tags_to_metadata.main, [str(images), str(tmp / "m.json"), "--in_json",
                                    str(not_json)], ["notes.json: not valid JSON"]),
        "clean: not JSON": (clean_captions_and_tags.main, [str(not_json), str(tmp / "o.json")], ["notes.json"]),
        "prepare: not a model": (prepare_buckets_latents.main, [str(images), str(not_json), str(tmp / "o.json"),
                                 str(text_ckpt)], ["notes.json"]),
        "cache_latents: no model": (cache_latents.main, ["--train_data_dir", str(images.parent)],
                                    ["--pretrained_model_name_or_path"]),
        "resize: bad size": (resize_images_to_resolution.main, [str(images), str(tmp / "dst"), "--max_resolution",
                             "big"], ["'big' is not WxH"]),
        "show_metadata: no file": (show_metadata.main, ["--model", missing], ["missing"]),
        "any tool: unknown option": (merge_captions_to_metadata.main, [str(images), "x.json", "--ful_path"],
                                     ["unrecognized arguments: --ful_path"]),
    }


TOOL_CASES = [
    "captions: no such folder", "captions: model offline", "tagger: model not downloaded",
    "merge: recursive without full_path", "merge: in_json not JSON", "clean: not JSON", "prepare: not a model",
    "cache_latents: no model", "resize: bad size", "show_metadata: no file", "any tool: unknown option",
]


@pytest.mark.parametrize("case", TOOL_CASES)
def test_data_tools_answer_bad_input_with_one_error_line(case, tmp_path, capsys):
    main, argv, expected = _tool_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code)
    captured = capsys.readouterr()
    assert code == 1, f"{case}: exit {code}\n{captured.err[-2000:]}"
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, captured.err
    message = captured.err[captured.err.index("error:"):]
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"
    assert "Traceback" not in captured.err
    assert snapshot(tmp_path) == before, "a failed tool must not change the files it was given"
