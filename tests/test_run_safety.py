"""Mistakes and faults found after the model loads: wrong --network_weights, a --resume that no longer fits,
a save that --output_dir refuses, a disk too small, two runs in one folder, leftovers of killed saves, file modes.

The runs are the real train_network.py entry point, in-process on the tiny SD1/SD2 models (1-2 steps each).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train_network
from library.training.entry import run_recipe
from tests.training_helpers import ROOT, dreambooth_folders, lora_args, write_image_folder


def train(model, data, out, *extra: str) -> int:
    return run_recipe(train_network.NetworkRecipe(), lora_args(model, data, out, *extra))


@pytest.fixture
def data(tmp_path):
    return dreambooth_folders(tmp_path / "data", count=2)


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return err[err.index("error:"):]


# ---------------------------------------------------------------- --network_weights


def test_network_weights_of_another_rank_says_so_and_dim_from_weights_then_works(tiny_models, data, tmp_path, capsys):
    assert train(tiny_models["sd1"], data, tmp_path / "a", "--max_train_steps", "1") == 0
    weights = tmp_path / "a" / "tiny.safetensors"
    capsys.readouterr()
    code = train(tiny_models["sd1"], data, tmp_path / "b", "--max_train_steps", "1", "--network_dim", "8",
                 "--network_weights", str(weights))
    assert code == 1
    message = error_of(capsys)
    assert "trained with rank 4" in message and "rank 8" in message
    assert "--network_dim" in message and "--dim_from_weights" in message
    assert not (tmp_path / "b" / "tiny.safetensors").exists()
    code = train(tiny_models["sd1"], data, tmp_path / "c", "--max_train_steps", "1", "--network_dim", "8",
                 "--network_weights", str(weights), "--dim_from_weights")
    assert code == 0
    assert load_file(str(tmp_path / "c" / "tiny.safetensors"))[
        next(k for k in load_file(str(weights)) if k.endswith("lora_down.weight"))
    ].shape[0] == 4


@pytest.mark.parametrize("dim_from_weights", [False, True])
def test_network_weights_of_another_base_model_say_so(tiny_models, data, tmp_path, capsys, dim_from_weights):
    assert train(tiny_models["sd2"], data, tmp_path / "sd2", "--max_train_steps", "1", "--v2") == 0
    capsys.readouterr()
    extra = ["--dim_from_weights"] if dim_from_weights else []
    code = train(tiny_models["sd1"], data, tmp_path / "b", "--max_train_steps", "1",
                 "--network_weights", str(tmp_path / "sd2" / "tiny.safetensors"), *extra)
    assert code == 1
    message = error_of(capsys)
    assert "another base model" in message and "in the file" in message and "different rank" not in message


# ---------------------------------------------------------------- --resume


@pytest.fixture
def saved_state(tiny_models, data, tmp_path):
    assert train(tiny_models["sd1"], data, tmp_path / "first", "--max_train_steps", "2", "--save_state") == 0
    return tmp_path / "first" / "tiny-state"


def test_resume_with_another_network_dim_names_the_option(tiny_models, data, saved_state, tmp_path, capsys):
    capsys.readouterr()
    code = train(tiny_models["sd1"], data, tmp_path / "again", "--max_train_steps", "4", "--network_dim", "8",
                 "--resume", str(saved_state))
    assert code == 1
    message = error_of(capsys)
    assert "--network_dim 4 (now 8)" in message and "another shape" in message
    assert len(message.splitlines()) <= 3


def test_resume_with_another_optimizer_names_it_before_loading(tiny_models, data, saved_state, tmp_path, capsys):
    capsys.readouterr()
    code = train(tiny_models["sd1"], data, tmp_path / "again", "--max_train_steps", "4",
                 "--optimizer_type", "SGDNesterov", "--resume", str(saved_state))
    assert code == 1
    message = error_of(capsys)
    assert "torch.optim.adamw.AdamW" in message and "torch.optim.sgd.SGD" in message
    assert "--optimizer_type (not given) (now SGDNesterov)" in message


def test_resume_after_the_dataset_changed_warns_and_restarts_the_epoch(tiny_models, data, saved_state, tmp_path, caplog):
    write_image_folder(tmp_path / "more", count=1)
    shutil.copy(tmp_path / "more" / "img000.png", data / "1_sks square" / "extra.png")
    with caplog.at_level(logging.WARNING):
        code = train(tiny_models["sd1"], data, tmp_path / "again", "--max_train_steps", "3", "--resume", str(saved_state))
    assert code == 0
    warning = next(r.getMessage() for r in caplog.records if "dataset changed" in r.getMessage())
    assert "train images 2 -> 3" in warning and "cannot repeat" in warning


# ---------------------------------------------------------------- saving


def refuse_writes(folder: Path) -> None:
    """Make `folder` refuse new files as it would on a full or read-only disk (root ignores chmod)."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def test_a_save_refused_by_output_dir_goes_to_a_rescue_folder_and_resumes(
    tiny_models, data, tmp_path, capsys, monkeypatch
):
    out, rescue = tmp_path / "out", tmp_path / "rescue"
    monkeypatch.setenv("SD_TRAINER_RESCUE_DIR", str(rescue))
    real_save = train_network.NetworkRecipe.save

    def save_into_a_folder_that_just_failed(self, folder, name, ctx, progress):
        if Path(folder) == out:
            refuse_writes(out)
        return real_save(self, folder, name, ctx, progress)

    monkeypatch.setattr(train_network.NetworkRecipe, "save", save_into_a_folder_that_just_failed)
    try:
        code = train(tiny_models["sd1"], data, out, "--max_train_steps", "2")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
    assert code == 1
    message = error_of(capsys)
    saved = next(rescue.rglob("tiny.safetensors"))
    state = next(rescue.rglob("tiny-state"))
    assert f"could not save step 2 to --output_dir {out}" in message
    assert str(saved) in message and f"--resume {state}" in message and "nothing is lost" in message
    assert load_file(str(saved))  # a complete LoRA file
    monkeypatch.setattr(train_network.NetworkRecipe, "save", real_save)
    assert train(tiny_models["sd1"], data, tmp_path / "fixed", "--max_train_steps", "3", "--resume", str(state)) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_full_disk_during_a_state_save_is_called_a_full_disk(tiny_models, data, tmp_path, capsys, monkeypatch):
    import library.training.checkpoints as checkpoints

    out = tmp_path / "out"
    monkeypatch.setenv("SD_TRAINER_RESCUE_DIR", str(tmp_path / "rescue"))
    real_torch_save = checkpoints.torch.save
    real_usage = shutil.disk_usage
    full = {"now": False}

    def torch_save(obj, path, *args, **kwargs):
        if str(path).startswith(str(out)):
            full["now"] = True
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 536640 vs 536528")
        return real_torch_save(obj, path, *args, **kwargs)

    def disk_usage(path):
        usage = real_usage(path)
        if full["now"] and str(path).startswith(str(out)):
            return usage._replace(free=4096)
        return usage

    monkeypatch.setattr(checkpoints.torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    assert train(tiny_models["sd1"], data, out, "--max_train_steps", "1", "--save_state") == 1
    message = error_of(capsys)
    assert "the disk is full" in message and "MiB free" in message
    assert (out / "tiny.safetensors").is_file()  # the model file made it before the disk filled
    assert not list(out.glob(".*tmp-*"))  # the half-written state was removed


def test_a_disk_too_small_for_one_save_stops_before_the_first_step(tiny_models, data, tmp_path, capsys, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    assert train(tiny_models["sd1"], data, tmp_path / "out", "--max_train_steps", "1") == 1
    message = error_of(capsys)
    assert "--output_dir" in message and "MiB free" in message and "one save of this run needs" in message
    assert "training:" not in capsys.readouterr().out


def test_saved_files_get_the_umask_mode_and_killed_saves_are_tidied(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tiny.safetensors.tmp-0123abcd").write_bytes(b"half a file")
    (out / ".tiny-step00000001-state.tmp-89abcdef").mkdir()
    (out / ".yesterday.safetensors.old-00ff00ff").write_bytes(b"the only complete copy")
    old_mask = os.umask(0o022)
    try:
        assert train(tiny_models["sd1"], data, out, "--max_train_steps", "2", "--save_every_n_steps", "1",
                     "--save_state") == 0
    finally:
        os.umask(old_mask)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny-state", "tiny-step00000001-state", "tiny-step00000001.safetensors", "tiny.safetensors",
                     "yesterday.safetensors"]
    assert (out / "yesterday.safetensors").read_bytes() == b"the only complete copy"
    for path in [out / "tiny.safetensors", *(out / "tiny-state").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (out / "tiny-state").stat().st_mode & 0o777 == 0o755


def test_a_second_run_in_the_same_output_dir_is_refused_with_the_first_runs_pid(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom library.training.output_folder import hold_output_folder\n"
         f"with hold_output_folder({str(out)!r}, 'train_db'):\n    print('held', flush=True)\n    time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run(
            [sys.executable, str(ROOT / "train_network.py"), *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "1")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"another run is writing there: train_db.py (pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr and not (out / "tiny.safetensors").exists()
    time.sleep(0.1)
    # The holder was killed without cleaning up: its lock is gone with it and the folder is usable again.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_network.py"), *lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- the same guarantees in the full-model recipes


def db_args(model, data, out, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--output_name", "db", "--learning_rate", "1e-5", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors", *extra]


def test_dreambooth_refuses_a_lora_state_and_rescues_a_refused_save(
    tiny_models, data, saved_state, tmp_path, capsys, monkeypatch
):
    import train_db

    capsys.readouterr()
    code = run_recipe(train_db.DreamBoothRecipe(), db_args(tiny_models["sd1"], data, tmp_path / "db",
                                                           "--max_train_steps", "3", "--resume", str(saved_state)))
    assert code == 1
    message = error_of(capsys)
    assert "its weights do not fit this run" in message and "not in the state" in message

    out, rescue = tmp_path / "db2", tmp_path / "rescue"
    monkeypatch.setenv("SD_TRAINER_RESCUE_DIR", str(rescue))
    real_save = train_db.DreamBoothRecipe.save

    def save(self, folder, name, ctx, progress):
        if Path(folder) == out:
            refuse_writes(out)
        return real_save(self, folder, name, ctx, progress)

    monkeypatch.setattr(train_db.DreamBoothRecipe, "save", save)
    try:
        code = run_recipe(train_db.DreamBoothRecipe(), db_args(tiny_models["sd1"], data, out, "--max_train_steps", "1"))
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
    assert code == 1
    message = error_of(capsys)
    saved = next(rescue.rglob("db.safetensors"))
    assert str(saved) in message and "nothing is lost" in message
    assert any(k.startswith("model.diffusion_model.") for k in load_file(str(saved)))
