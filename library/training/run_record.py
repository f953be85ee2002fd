"""What a training state records about its run, and how a --resume is compared with it before loading.

A state written with one network shape or optimizer cannot be loaded into another, and a dataset that
gained or lost images cannot repeat the interrupted run's batches. The state's train_state.json keeps
the options, the optimizer class and a dataset fingerprint; a resume compares them (and the saved
tensors' shapes, read from the file header) with this run first and says which option differs.
"""

from __future__ import annotations

import argparse
import hashlib

# Options that may change between a run and its resume without touching what the state holds.
FREE_TO_CHANGE = {
    "resume", "resume_from_huggingface", "output_dir", "output_name", "logging_dir", "log_prefix", "log_with",
    "log_tracker_name", "log_tracker_config", "wandb_api_key", "wandb_run_name", "config_file", "output_config",
    "max_train_steps", "max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio",
    "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state", "save_state",
    "save_state_on_train_end", "save_model_as", "save_precision", "sample_prompts", "sample_every_n_steps",
    "sample_every_n_epochs", "sample_at_first", "sample_sampler", "huggingface_repo_id", "huggingface_token",
    "huggingface_path_in_repo", "huggingface_repo_type", "huggingface_repo_visibility", "save_state_to_huggingface",
    "async_upload", "max_data_loader_n_workers", "persistent_data_loader_workers", "console_log_level",
    "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "seed", "xformers", "sdpa", "mem_eff_attn",
    "network_weights", "training_comment", "no_metadata",
}  # fmt: skip


def jsonable_options(args: argparse.Namespace) -> dict:
    """The run's options as JSON values (anything else as its text)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


def option_differences(recorded: dict, args: argparse.Namespace, limit: int = 8) -> list[str]:
    """`--name old (now new)` for the options that shape the state and changed since it was written."""
    current = jsonable_options(args)
    changed = []
    for key in sorted(set(recorded) | set(current)):
        if key in FREE_TO_CHANGE or key not in recorded or key not in current:
            continue
        if recorded[key] != current[key]:
            changed.append(f"--{key} {_show(recorded[key])} (now {_show(current[key])})")
    if len(changed) > limit:
        changed = changed[:limit] + [f"and {len(changed) - limit} more"]
    return changed


def _show(value) -> str:
    if value is None or value == "":
        return "(not given)"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "[]"
    return str(value)


def class_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def shape_problem(saved: dict[str, tuple], current: dict[str, tuple]) -> str | None:
    """How the state's trained tensors differ from what this run trains (None when they match)."""
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    resized = sorted(k for k in set(saved) & set(current) if tuple(saved[k]) != tuple(current[k]))
    if not (missing or extra or resized):
        return None
    parts = []
    if resized:
        key = resized[0]
        parts.append(f"{len(resized)} tensor(s) have another shape (e.g. {key}: {list(saved[key])} in the state, "
                     f"{list(current[key])} now)")
    if missing:
        parts.append(f"{len(missing)} tensor(s) this run trains are not in the state (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) in the state are not trained now (e.g. {extra[0]})")
    return "; ".join(parts)


def dataset_fingerprint(group) -> dict:
    """Counts and a hash of the image list: enough to tell that the dataset changed since a state was saved."""
    digest = hashlib.sha256()
    for path in sorted(str(item.image_path) for item in group.cache_items()):
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return {
        "train_images": group.num_train_images,
        "reg_images": group.num_reg_images,
        "batches_per_epoch": group.num_batches_per_epoch,
        "files_sha256": digest.hexdigest()[:16],
    }


def dataset_change(recorded: dict | None, current: dict) -> str | None:
    """A sentence saying how the dataset changed, or None if it did not (or the state predates fingerprints)."""
    if not recorded:
        return None
    if recorded == current:
        return None
    differences = [
        f"{name.replace('_', ' ')} {recorded.get(name)} -> {current.get(name)}"
        for name in ("train_images", "reg_images", "batches_per_epoch")
        if recorded.get(name) != current.get(name)
    ]
    if not differences:
        differences = ["the same counts, but other image files"]
    return ", ".join(differences)
