"""Validation loss: --validation_split / validation_seed hold images out (the same ones every run), they are
never trained on, the loss on them uses fixed timesteps and noise, is logged under upstream's names, never
changes training (bit-identical weights), and is averaged over processes."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from library.data.pipeline import prepare_datasets
from library.training.validation import validation_option_problems, validation_timesteps
from tests.recipe_infos import parser_for, support
from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script, write_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("validation_data"), count=9)


def group_for(*argv: str, script: str = "train_network"):
    return prepare_datasets(parser_for(script).parse_args(list(argv)), support(script))


def trained_paths(group) -> set[str]:
    return {path for epoch in range(3) for plan in group.batches_for_epoch(epoch)
            for path in group.load_batch(plan, epoch)["image_paths"]}


def held_out_paths(group) -> set[str]:
    return {p for d in group.validation.datasets for p in d.paths}


def test_split_is_fixed_by_its_seed_and_never_trained_on(data, tmp_path):
    common = ["--train_data_dir", str(data), "--resolution", "64", "--validation_split", "0.25"]
    group = group_for(*common, "--validation_seed", "3", "--seed", "1")
    held = held_out_paths(group)
    assert len(held) == 2 and group.num_batches_per_epoch == 7  # ceil(9 x 0.75) train, excluded from the count
    assert not held & trained_paths(group)
    assert "2 image(s) held out" in group.summary()
    # the same validation seed holds out the same images whatever --seed is; another seed others
    assert held_out_paths(group_for(*common, "--validation_seed", "3", "--seed", "99")) == held
    assert held_out_paths(group_for(*common, "--validation_seed", "4", "--seed", "1")) != held
    # without --validation_seed the training seed picks them (as upstream)
    assert held_out_paths(group_for(*common, "--seed", "3")) == held
    # no split: no validation group, every image trains
    plain = group_for("--train_data_dir", str(data), "--resolution", "64")
    assert plain.validation is None and plain.num_batches_per_epoch == 9


def test_dataset_config_keys_split_each_dataset_and_never_reg_images(data, tmp_path):
    reg = write_image_folder(tmp_path / "reg", count=4)
    config = tmp_path / "d.toml"
    config.write_text(f"""
[general]
resolution = 64
[[datasets]]
validation_split = 0.5
validation_seed = 1
  [[datasets.subsets]]
  image_dir = '{data / "1_sks square"}'
  class_tokens = 'sks square'
  [[datasets.subsets]]
  image_dir = '{reg}'
  is_reg = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{data / "1_sks square"}'
  class_tokens = 'sks square'
""", encoding="utf-8")
    group = group_for("--dataset_config", str(config))
    first, second = group.datasets
    assert first.num_train_images == 5 and first.num_reg_images == 4 and second.num_train_images == 9
    (held,) = group.validation.datasets
    assert len(held.paths) == 4 and all("reg" not in p for p in held.paths)
    assert not set(held.paths) & set(first.paths)


def test_fixed_timesteps_and_option_checks():
    assert validation_timesteps(1000, None, None) == [200, 400, 600, 800]  # upstream's set
    assert validation_timesteps(1000, 100, 600) == [200, 300, 400, 500]
    args = parser_for("train_network").parse_args(["--validate_every_n_steps", "0", "--validation_split", "1.5"])
    problems = validation_option_problems(args)
    assert any("--validate_every_n_steps" in p for p in problems) and any("--validation_split" in p for p in problems)
    for script in ("train_network", "train_db", "fine_tune", "train_textual_inversion"):
        parsed = parser_for(script).parse_args(["--validation_split", "0.1", "--validate_every_n_epochs", "2",
                                                "--max_validation_steps", "3", "--validation_seed", "5"])
        assert parsed.validation_split == 0.1 and parsed.validate_every_n_epochs == 2


def validation_losses(stdout: str) -> dict[str, float]:
    return {when: float(value) for when, value in re.findall(r"validation loss after (\w+ \d+): ([0-9.]+)", stdout)}


def test_validation_never_changes_training_and_is_averaged_over_processes(tiny_models, data, tmp_path):
    """With validation after every step and epoch == the same split without validation, bit for bit; the
    2-process average (3 held-out batches: 2 on one process, 1 on the other) == the 1-process value."""
    split = ["--validation_split", "0.34", "--validation_seed", "2", "--max_train_epochs", "2",
             "--optimizer_type", "SGD", "--learning_rate", "0.05", "--flip_aug", "--shuffle_caption"]
    validated = tmp_path / "validated"
    result = run_script("train_network.py", *lora_args(
        tiny_models["sd1"], data, validated, *split, "--gradient_accumulation_steps", "2", "--validate_every_n_steps",
        "1", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"),
    ))
    assert_ok(result)
    losses = validation_losses(result.stdout)
    assert set(losses) == {"step 1", "step 2", "step 3", "step 4", "step 5", "step 6", "epoch 1", "epoch 2"}
    assert losses["epoch 1"] == losses["step 3"] and len(set(losses.values())) > 1
    events = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"loss/validation/step_average" in events and b"loss/validation/epoch_average" in events

    silent = tmp_path / "silent"  # the same split, validation never due
    quiet = run_script("train_network.py", *lora_args(
        tiny_models["sd1"], data, silent, *split, "--gradient_accumulation_steps", "2",
        "--validate_every_n_epochs", "1000",
    ))
    assert_ok(quiet)
    assert "validation loss" not in quiet.stdout
    a, b = load_file(validated / "tiny.safetensors"), load_file(silent / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from tests.test_train_network import two_process_launcher

    two = tmp_path / "two"
    result = run_script("train_network.py", *lora_args(
        tiny_models["sd1"], data, two, *split, "--validate_every_n_steps", "3",
    ), launcher=two_process_launcher(), env={"ACCELERATE_USE_CPU": "1"})
    assert_ok(result)
    assert "2 process(es)" in result.stdout
    two_losses = validation_losses(result.stdout)
    assert set(two_losses) == {"step 3", "step 6", "epoch 1", "epoch 2"}
    for when, value in two_losses.items():  # same global batches per step as 1 process x 2 accumulated
        assert value == pytest.approx(losses[when], rel=1e-4), when
