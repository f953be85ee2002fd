"""Hugging Face Hub options (reference/cli.md §9): checks, uploads, resume download.

These are unit tests of our wiring against an in-memory fake `HfApi` / fake `snapshot_download`
(they record the calls; nothing reaches the Hub). They show which Hub calls we make with which
arguments, not that the Hub accepts them. The last tests run the real script offline
(HF_HUB_OFFLINE=1), where every Hub call fails: training must finish and keep its files anyway.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import pytest

from library.recipe import Attached
from library.training.checkpoints import ResumeError
from library.training.hub import STAGING_DIR, HubUploader, download_state, hub_option_problems, parse_resume_spec
from library.training.training_args import training_option_problems
from tests.recipe_infos import SCRIPTS, parser_for


class FakeApi:
    """Records create_repo / upload_file / upload_folder calls; `fail` names methods that raise."""

    def __init__(self, fail: tuple[str, ...] = (), gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail
        self.gate = gate  # uploads wait for it (to observe async behaviour)
        self.contents: dict[str, bytes | dict] = {}  # what each upload read, by path_in_repo
        self.threads: set[str] = set()

    def _call(self, name: str, kwargs: dict) -> None:
        self.calls.append((name, kwargs))
        self.threads.add(threading.current_thread().name)
        if name in self.fail:
            raise OSError(f"{name} refused (fake)")

    def create_repo(self, **kwargs):
        self._call("create_repo", kwargs)

    def upload_file(self, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(10)
        self._call("upload_file", kwargs)
        self.contents[kwargs["path_in_repo"]] = Path(kwargs["path_or_fileobj"]).read_bytes()

    def upload_folder(self, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(10)
        self._call("upload_folder", kwargs)
        folder = Path(kwargs["folder_path"])
        self.contents[kwargs["path_in_repo"]] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def parse(*argv: str, script: str = "train_network") -> argparse.Namespace:
    return parser_for(script).parse_args(list(argv))


def hub_args(*argv: str) -> argparse.Namespace:
    return parse("--huggingface_repo_id", "you/model", *argv)


@pytest.fixture
def saved(tmp_path):
    model = tmp_path / "out" / "tiny-000001.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"model-1")
    state = tmp_path / "out" / "tiny-000001-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_step": 1}')
    (state / "trained.safetensors").write_bytes(b"weights")
    return model, state


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_the_hub_options_with_upstream_defaults(script):
    args = parse(script=script)
    assert args.huggingface_repo_id is None and args.huggingface_repo_type is None
    assert args.huggingface_path_in_repo is None and args.huggingface_token is None
    assert args.huggingface_repo_visibility is None  # = private
    assert not (args.save_state_to_huggingface or args.resume_from_huggingface or args.async_upload)
    assert hub_option_problems(args, argv=[]) == []


def test_upload_options_need_a_repo_id():
    problems = hub_option_problems(
        parse("--huggingface_path_in_repo", "loras", "--save_state_to_huggingface", "--async_upload"), argv=[]
    )
    assert len(problems) == 1
    for name in ("--huggingface_path_in_repo", "--save_state_to_huggingface", "--async_upload", "--huggingface_repo_id"):
        assert name in problems[0]
    assert hub_option_problems(hub_args("--huggingface_path_in_repo", "loras", "--async_upload"), argv=[]) == []
    assert hub_option_problems(parse("--huggingface_repo_id", ""), argv=[]) == []  # "" = not given (GUI configs)


def test_bad_repo_id_and_repo_type_are_reported():
    assert "owner/name" in hub_option_problems(parse("--huggingface_repo_id", "a/b/c"), argv=[])[0]
    problems = hub_option_problems(hub_args("--huggingface_repo_type", "models"), argv=[])
    assert problems and "model, dataset, space" in problems[0]
    assert hub_option_problems(hub_args("--huggingface_repo_type", "dataset"), argv=[]) == []


def test_resume_from_huggingface_needs_a_hub_spec_in_resume():
    assert "needs --resume" in hub_option_problems(parse("--resume_from_huggingface"), argv=[])[0]
    for bad in ("justaname", "a/b/p:main:model:x", "a/b/p:main:weird", "/b/p:main:model"):
        problems = hub_option_problems(parse("--resume_from_huggingface", "--resume", bad), argv=[])
        assert len(problems) == 1 and bad in problems[0], bad
    good = parse("--resume_from_huggingface", "--resume", "you/model/tiny-000002-state:main:model", "--output_dir", "o")
    assert hub_option_problems(good, argv=[]) == []
    # The local-folder check of --resume does not apply to a Hub spec (it is downloaded later).
    assert not [p for p in training_option_problems(good) if "--resume" in p]
    assert [p for p in training_option_problems(parse("--resume", "no/such/folder", "--output_dir", "o")) if "--resume" in p]


def test_parse_resume_spec_follows_upstream_form():
    spec = parse_resume_spec("you/model/sub/tiny-000002-state:main:dataset")
    assert (spec.repo_id, spec.path_in_repo, spec.revision, spec.repo_type) == ("you/model", "sub/tiny-000002-state", "main", "dataset")
    spec = parse_resume_spec("you/model/tiny-state:v1")  # upstream: two parts -> model repo
    assert (spec.path_in_repo, spec.revision, spec.repo_type) == ("tiny-state", "v1", "model")
    spec = parse_resume_spec("you/model")  # a state at the repo root, default branch
    assert (spec.repo_id, spec.path_in_repo, spec.revision, spec.repo_type) == ("you/model", "", None, "model")


def test_token_on_the_command_line_with_wandb_warns(caplog):
    argv = ["--huggingface_token", "hf_x", "--log_with", "wandb"]
    with caplog.at_level(logging.WARNING, logger="library.training.hub"):
        assert hub_option_problems(hub_args(*argv), argv=argv) == []
    assert "huggingface_token" in caplog.text and ".toml" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.training.hub"):
        # From a config file (not in argv), or without W&B: no warning.
        hub_option_problems(hub_args(*argv), argv=["--log_with", "wandb"])
        hub_option_problems(hub_args("--huggingface_token=hf_x"), argv=["--huggingface_token=hf_x"])
    assert "huggingface_token" not in caplog.text


# ---------------------------------------------------------------- uploads


def test_no_uploader_without_repo_id():
    assert HubUploader.from_args(parse(), api=FakeApi()) is None
    assert HubUploader.from_args(parse("--huggingface_repo_id", ""), api=FakeApi()) is None


def test_uploads_a_model_file_and_a_state_folder(saved):
    model, state = saved
    api = FakeApi()
    uploader = HubUploader.from_args(hub_args("--huggingface_path_in_repo", "/loras/"), api=api)
    uploader.upload(model, "model")
    uploader.upload(state, "state")
    assert uploader.close() == []
    assert api.names() == ["create_repo", "upload_file", "upload_folder"]  # the repo is created once
    assert api.calls[0][1] == {"repo_id": "you/model", "repo_type": "model", "private": True, "exist_ok": True}
    file_call, folder_call = api.calls[1][1], api.calls[2][1]
    assert file_call["path_in_repo"] == "loras/tiny-000001.safetensors"
    assert file_call["path_or_fileobj"] == str(model) and file_call["repo_id"] == "you/model"
    assert folder_call["path_in_repo"] == "loras/tiny-000001-state" and folder_call["folder_path"] == str(state)
    assert uploader.uploaded == ["loras/tiny-000001.safetensors", "loras/tiny-000001-state"]
    assert api.threads == {threading.current_thread().name}  # without --async_upload: in line


def test_visibility_repo_type_and_root_path(saved):
    model, _ = saved
    api = FakeApi()
    args = hub_args("--huggingface_repo_visibility", "public", "--huggingface_repo_type", "dataset")
    uploader = HubUploader.from_args(args, api=api)
    uploader.upload(model, "model")
    assert api.calls[0][1]["private"] is False and api.calls[0][1]["repo_type"] == "dataset"
    assert api.calls[1][1]["path_in_repo"] == "tiny-000001.safetensors" and api.calls[1][1]["repo_type"] == "dataset"
    for value in ("private", "Public", "whatever"):  # upstream: anything but "public" is private
        assert HubUploader.from_args(hub_args("--huggingface_repo_visibility", value), api=api).private is True
    with pytest.raises(ValueError):
        uploader.upload(model, "sample")


def test_async_uploads_run_in_background_in_order_and_close_waits(saved):
    model, state = saved
    gate = threading.Event()
    api = FakeApi(gate=gate)
    uploader = HubUploader.from_args(hub_args("--async_upload"), api=api)
    uploader.upload(model, "model")
    uploader.upload(state, "state")
    assert "upload_file" not in api.names()  # returned at once, the uploads wait for the gate
    # Keep-last-N pruning / a later save under the same name while queued: the queued content is kept.
    model.unlink()
    (state / "trained.safetensors").write_bytes(b"changed")  # (an atomic save replaces the file)
    gate.set()
    assert uploader.close() == []
    assert api.names() == ["create_repo", "upload_file", "upload_folder"]
    assert api.threads == {"hub-upload"}
    assert api.contents["tiny-000001.safetensors"] == b"model-1"
    assert uploader.uploaded == ["tiny-000001.safetensors", "tiny-000001-state"]
    assert not (model.parent / STAGING_DIR).exists()  # the pinned copies are cleaned up
    assert uploader.close() == []  # a second close is harmless
    with pytest.raises(RuntimeError):
        uploader.upload(state, "state")


def test_async_failures_are_reported_at_close(saved, caplog):
    model, _ = saved
    api = FakeApi(fail=("upload_file",))
    uploader = HubUploader.from_args(hub_args("--async_upload"), api=api)
    with caplog.at_level(logging.WARNING, logger="library.training.hub"):
        uploader.upload(model, "model")
        failures = uploader.close()
    assert [path for path, _ in failures] == [str(model)] and "refused" in failures[0][1]
    assert "not uploaded" in caplog.text
    assert model.read_bytes() == b"model-1"


def test_a_failing_api_only_warns(saved, caplog):
    model, state = saved
    api = FakeApi(fail=("create_repo", "upload_folder"))
    uploader = HubUploader.from_args(hub_args(), api=api)
    with caplog.at_level(logging.WARNING, logger="library.training.hub"):
        uploader.upload(model, "model")  # create fails -> warned, the upload is still tried (and works)
        uploader.upload(state, "state")  # the folder upload fails -> warned
    assert api.names() == ["create_repo", "upload_file", "create_repo", "upload_folder"]
    assert uploader.uploaded == ["tiny-000001.safetensors"]
    assert [path for path, _ in uploader.failed] == [str(state)]
    assert "could not create repo" in caplog.text and "failed" in caplog.text
    assert state.is_dir() and model.is_file()


def test_the_real_hfapi_accepts_our_arguments_offline(saved, monkeypatch, tmp_path):
    """With the real HfApi under HF_HUB_OFFLINE=1 each call fails on the network, not on its arguments."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    model, state = saved
    uploader = HubUploader.from_args(hub_args("--huggingface_token", "hf_fake"))
    uploader.upload(model, "model")
    uploader.upload(state, "state")
    assert len(uploader.failed) == 2
    assert all("Offline" in error and "TypeError" not in error for _, error in uploader.failed)
    with pytest.raises(ResumeError, match="LocalEntryNotFound|Offline"):
        download_state("you/model/tiny-state:main:model", tmp_path / "local")


# ---------------------------------------------------------------- resume download


def fake_snapshot(tmp_path, files: dict[str, str], fail: Exception | None = None):
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        if fail is not None:
            raise fail
        root = tmp_path / "snapshot"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return str(root)

    return snapshot_download, calls


def test_download_state_fetches_the_folder_and_returns_it(tmp_path):
    download, calls = fake_snapshot(tmp_path, {"sub/tiny-state/train_state.json": "{}", "sub/tiny-state/optimizer.pt": ""})
    folder = download_state("you/model/sub/tiny-state:v2:dataset", token="hf_x", snapshot_download=download)
    assert folder == tmp_path / "snapshot" / "sub" / "tiny-state"
    assert calls == [{
        "repo_id": "you/model", "repo_type": "dataset", "revision": "v2",
        "allow_patterns": ["sub/tiny-state/*"], "local_dir": None, "token": "hf_x",
    }]
    download_state("you/model/sub/tiny-state", tmp_path / "local", snapshot_download=download)
    assert calls[-1]["local_dir"] == str(tmp_path / "local") and calls[-1]["revision"] is None
    assert calls[-1]["repo_type"] == "model"


def test_download_state_errors_are_resume_errors(tmp_path):
    download, _ = fake_snapshot(tmp_path, {"tiny-state/other.txt": ""})
    with pytest.raises(ResumeError, match="holds no train_state.json"):
        download_state("you/model/tiny-state:main:model", snapshot_download=download)
    download, _ = fake_snapshot(tmp_path, {}, fail=OSError("404"))
    with pytest.raises(ResumeError, match="cannot download you/model/tiny-state.*404"):
        download_state("you/model/tiny-state:main:model", snapshot_download=download)
    with pytest.raises(ResumeError, match="owner/name"):
        download_state("nothing", snapshot_download=download)


# ---------------------------------------------------------------- trainer wiring


class _Accelerator:
    is_main_process = True
    num_processes = 1
    distributed_type = "NO"

    def wait_for_everyone(self):
        pass


class _Recipe:
    def hooks(self, args):
        return []

    def save(self, folder, name, ctx, progress):
        path = Path(folder) / f"{name}.safetensors"
        path.write_bytes(b"m")
        return path


@pytest.mark.parametrize("state_to_hub", [False, True])
def test_trainer_save_uploads_the_model_and_optionally_the_state(tmp_path, state_to_hub):
    from library.training.checkpoints import Progress
    from library.training.trainer import Trainer

    extra = ["--save_state_to_huggingface"] if state_to_hub else []
    args = hub_args("--output_dir", str(tmp_path), "--save_state", *extra)
    trainer = Trainer(_Recipe(), args, group=None, seed=0)
    trainer.accelerator, trainer.trainable, trainer.ctx, trainer.model = _Accelerator(), [], None, None
    trainer.attached = Attached(param_groups=[])
    trainer._save_state = lambda folder, progress: folder.mkdir()
    api = FakeApi()
    trainer.hub = HubUploader.from_args(args, api=api)
    trainer._save("tiny-000001", Progress(1, 1, 0), state=True)
    uploaded = [kwargs["path_in_repo"] for name, kwargs in api.calls if name.startswith("upload")]
    assert uploaded == ["tiny-000001.safetensors", *(["tiny-000001-state"] if state_to_hub else [])]


# ---------------------------------------------------------------- the real script, offline


def test_offline_uploads_fail_with_a_warning_and_training_completes(tiny_models, tmp_path):
    from tests.training_helpers import assert_ok, lora_args, run_script, write_image_folder

    data = write_image_folder(tmp_path / "data" / "1_sq", count=2, caption="a square")
    out = tmp_path / "out"
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data.parent, out, "--max_train_steps", "1", "--save_state",
                   "--huggingface_repo_id", "you/tiny", "--save_state_to_huggingface", "--async_upload"),
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""},
    )
    assert_ok(result)
    assert "not uploaded" in result.stderr and "offline" in result.stderr.lower()
    assert (out / "tiny.safetensors").is_file() and (out / "tiny-state" / "train_state.json").is_file()
    assert not (out / STAGING_DIR).exists()


def test_offline_resume_from_huggingface_is_a_one_line_error(tmp_path):
    from tests.training_helpers import run_script, write_image_folder

    data = write_image_folder(tmp_path / "data" / "1_sq", count=1, caption="a square")
    (tmp_path / "no_model_needed_yet").mkdir()  # a folder is taken as a diffusers model: loaded only later
    result = run_script(
        "train_network.py",
        "--pretrained_model_name_or_path", str(tmp_path / "no_model_needed_yet"), "--train_data_dir", str(data.parent),
        "--output_dir", str(tmp_path / "out"),
        "--resume_from_huggingface", "--resume", "you/tiny/tiny-state:main:model",
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""},
    )
    assert result.returncode == 1, result.stderr
    assert "error: --resume_from_huggingface: cannot download you/tiny/tiny-state" in result.stderr
    assert "Traceback" not in result.stderr
