"""Schedule arithmetic, batch sharding, per-batch seeds, checkpoint names and keep-last pruning."""

from __future__ import annotations

import pytest

from library.training.checkpoints import (
    Progress,
    epoch_name,
    epoch_to_prune,
    final_name,
    load_training_state,
    parse_state_name,
    save_training_state,
    should_save_at_epoch,
    should_save_at_step,
    state_folder_name,
    step_name,
    step_to_prune,
)
from library.training.schedule import batch_seed, micro_batch_group, plan_schedule, shard_batches


def test_steps_from_max_train_steps():
    schedule = plan_schedule(10, 1, 1, max_train_steps=25, max_train_epochs=None)
    assert (schedule.steps_per_epoch, schedule.max_train_steps, schedule.num_epochs) == (10, 25, 3)


def test_max_train_epochs_wins_over_steps():
    schedule = plan_schedule(10, 1, 1, max_train_steps=5, max_train_epochs=2)
    assert (schedule.max_train_steps, schedule.num_epochs) == (20, 2)


def test_accumulation_and_processes_divide_the_epoch():
    # 10 batches, 2 processes -> 5 each; accumulation 2 -> 3 steps (the last one has 1 batch).
    schedule = plan_schedule(10, 2, 2, max_train_steps=None, max_train_epochs=1)
    assert (schedule.batches_per_epoch, schedule.steps_per_epoch, schedule.max_train_steps) == (5, 3, 3)


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        plan_schedule(0, 1, 1, 10, None)


def test_shards_cover_the_epoch_and_pad_by_wrapping():
    batches = list("abcde")
    rank0, rank1 = shard_batches(batches, 0, 2), shard_batches(batches, 1, 2)
    assert rank0 == [(0, "a"), (2, "c"), (4, "e")]
    assert rank1 == [(1, "b"), (3, "d"), (5, "a")]
    assert shard_batches(batches, 0, 1) == list(enumerate(batches))


def test_batch_seeds_are_stable_and_distinct():
    assert batch_seed(1, 0, 0) == batch_seed(1, 0, 0)
    seeds = {batch_seed(s, e, b) for s in (1, 2) for e in range(3) for b in range(50)}
    assert len(seeds) == 300
    assert 0 <= batch_seed(2**40, 3, 7) < 2**63


def test_micro_batch_groups_handle_a_short_last_group():
    assert [micro_batch_group(i, 5, 2) for i in range(5)] == [(2, False), (2, True), (2, False), (2, True), (1, True)]
    assert all(micro_batch_group(i, 3, 1) == (1, True) for i in range(3))


def test_names_follow_sd_scripts():
    assert epoch_name("mylora", 2) == "mylora-000002"
    assert step_name("mylora", 500) == "mylora-step00000500"
    assert final_name("mylora") == "mylora"
    assert (epoch_name(None, 1), step_name(None, 3), final_name(None)) == ("epoch-000001", "at-step00000003", "last")
    assert state_folder_name("mylora-000002") == "mylora-000002-state"
    assert parse_state_name("x-step00000500-state") == ("step", 500)
    assert parse_state_name("x-000002-state") == ("epoch", 2)


def test_save_cadence_skips_the_end():
    assert [s for s in range(1, 11) if should_save_at_step(s, 3, 10)] == [3, 6, 9]
    assert [s for s in range(1, 10) if should_save_at_step(s, 3, 9)] == [3, 6]  # 9 is the final save
    assert [e for e in range(1, 5) if should_save_at_epoch(e, 1, 4)] == [1, 2, 3]
    assert not should_save_at_step(5, None, 10)


def test_keep_last_pruning():
    # every 2 epochs, keep 2: saving epoch 6 drops epoch 2
    assert epoch_to_prune(6, 2, 2) == 2
    assert epoch_to_prune(4, 2, 2) is None
    assert epoch_to_prune(6, 2, None) is None
    # every 10 steps, keep the last 20 steps: saving 40 drops 10 (upstream's rule)
    assert step_to_prune(40, 10, 20) == 10
    assert step_to_prune(20, 10, 20) is None


def test_state_round_trip(tmp_path):
    import torch

    folder = tmp_path / "run-step00000004-state"
    trained = {"w": torch.arange(6.0).reshape(2, 3)}
    save_training_state(folder, Progress(4, 1, 2), trained, {"state": {}, "param_groups": []}, {"last_epoch": 4}, extra={"seed": 9})
    loaded = load_training_state(folder)
    assert loaded.progress == Progress(4, 1, 2)
    assert torch.equal(loaded.trained["w"], trained["w"])
    assert loaded.scheduler_state == {"last_epoch": 4}
    assert loaded.info["seed"] == 9
    assert not list(tmp_path.glob(".*tmp*"))  # nothing temporary left behind


def test_incomplete_state_is_named(tmp_path):
    from library.training.checkpoints import ResumeError

    (tmp_path / "train_state.json").write_text("{}")
    with pytest.raises(ResumeError, match="missing trained.safetensors, optimizer.pt, scheduler.pt"):
        load_training_state(tmp_path)
