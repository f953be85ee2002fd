"""The dataset config schema: which key is valid at which level for which script, the value types, and
`validate_dataset_config`, which reports every problem at once (see reference/dataset-config.md §2-§3).

The tables are built with voluptuous, one table at a time, so that a mistake in one subset does not hide
the mistakes in the others; voluptuous' errors are then rewritten into messages that name the table
path, the key and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import voluptuous as vol

from library.errors import UserError

KINDS = ("dreambooth", "fine_tuning", "mask")
KIND_NAMES = MappingProxyType({"dreambooth": "DreamBooth", "fine_tuning": "fine-tuning", "mask": "mask"})
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
GENERAL, DATASET, SUBSET = "general", "dataset", "subset"


class DatasetConfigError(UserError, ValueError):
    """Everything wrong with the dataset settings, one problem per line."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.problems)

    def __str__(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        source = self.source or "the dataset settings"
        return "\n".join([f"{count} {noun} in {source}:", *(f"  - {p}" for p in self.problems)])


@dataclass(frozen=True)
class DatasetSupport:
    """What one training script accepts (dataset-config.md §2.7); each recipe's RecipeInfo holds one."""

    script: str  # names the script in messages ("<script>.py")
    dreambooth: bool  # folders of images with caption files / class tokens, regularization images
    fine_tuning: bool  # metadata files (--in_json / metadata_file)
    masked_loss: bool  # the script offers --masked_loss (mask datasets)
    dropout: bool  # caption dropout options
    masks: bool = False  # --masked_loss was given in this run: mask datasets are accepted

    def for_run(self, masked_loss: bool) -> "DatasetSupport":
        """The support of one run: mask datasets only when --masked_loss is given."""
        return replace(self, masks=bool(masked_loss) and self.masked_loss)


# ---------------------------------------------------------------- value validators


def describe(value: Any) -> str:
    """A value as the user wrote it (TOML spelling for booleans and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value: Any) -> int:
    if not _is_int(value):
        raise vol.Invalid(f"expected an integer, got {describe(value)}")
    return value


def number(value: Any) -> float:
    # Upstream rejects an int where it wants a float (e.g. network_multiplier = 1); we accept both.
    if not _is_number(value):
        raise vol.Invalid(f"expected a number, got {describe(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid(f"expected true or false, got {describe(value)}")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a string in quotes, got {describe(value)}")
    return value


def non_empty_string(value: Any) -> str:
    if string(value) == "":
        raise vol.Invalid("must not be empty (captions are split on it)")
    return value


def at_least(check: Callable[[Any], Any], minimum: float) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if check(value) < minimum:
            raise vol.Invalid(f"must be {minimum} or more, got {describe(value)}")
        return value

    return validate


def fraction(upper_inclusive: bool = True) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        inside = 0 <= number(value) <= 1 if upper_inclusive else 0 <= number(value) < 1
        if not inside:
            bounds = "from 0 to 1" if upper_inclusive else "from 0 up to (not including) 1"
            raise vol.Invalid(f"expected a number {bounds}, got {describe(value)}")
        return value

    return validate


def resolution(value: Any) -> Any:
    if _is_int(value):
        sides = [value]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        sides = list(value)
    else:
        sides = []
    if not sides or not all(_is_int(side) and side > 0 for side in sides):
        raise vol.Invalid(f"expected a size like 512 or [width, height] like [512, 768], got {describe(value)}")
    return value


def number_pair(value: Any) -> Any:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value)):
        raise vol.Invalid(f"expected two positive numbers like [2.0, 4.0], got {describe(value)}")
    return value


def table(value: Any) -> Any:
    if not isinstance(value, dict):
        raise vol.Invalid(f"expected a table of name = value pairs, got {describe(value)}")
    return value


def interpolation(value: Any) -> Any:
    if string(value) not in RESIZE_INTERPOLATIONS:
        raise vol.Invalid(f"expected one of {', '.join(RESIZE_INTERPOLATIONS)}, got {describe(value)}")
    return value


def array_of_tables(header: str) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            if isinstance(value, dict):
                raise vol.Invalid(f"written as a single table; use double brackets: {header}")
            raise vol.Invalid(f"expected one or more {header} tables, got {describe(value)}")
        return value

    return validate


# ---------------------------------------------------------------- which key lives where (§2)

# §2.1: subset options that may also be written in [[datasets]] or [general].
ASCENDABLE_KEYS = MappingProxyType(
    {
        "num_repeats": integer,  # < 1 drops the subset (with a warning), so no range here
        "shuffle_caption": boolean,
        "caption_separator": non_empty_string,
        "keep_tokens": at_least(integer, 0),
        "keep_tokens_separator": string,
        "secondary_separator": string,
        "enable_wildcard": boolean,
        "caption_prefix": string,
        "caption_suffix": string,
        "token_warmup_min": at_least(integer, 0),
        "token_warmup_step": at_least(number, 0),
        "color_aug": boolean,
        "flip_aug": boolean,
        "random_crop": boolean,
        "face_crop_aug_range": number_pair,
        "custom_attributes": table,
        "resize_interpolation": interpolation,
    }
)
# §2.2: not in train_textual_inversion.py.
DROPOUT_KEYS = MappingProxyType(
    {
        "caption_dropout_rate": fraction(),
        "caption_dropout_every_n_epochs": at_least(integer, 0),
        "caption_tag_dropout_rate": fraction(),
    }
)
# §2.3: ascendable, but only for DreamBooth (and, for two of them, mask) datasets.
KIND_ASCENDABLE_KEYS = MappingProxyType(
    {
        "dreambooth": MappingProxyType({"caption_extension": string, "class_tokens": string, "cache_info": boolean}),
        "fine_tuning": MappingProxyType({}),
        # upstream's ControlNet-style mask datasets take these two; class_tokens is ours (folder-form captions)
        "mask": MappingProxyType({"caption_extension": string, "class_tokens": string, "cache_info": boolean}),
    }
)
# §2.4: subset-only keys per kind, and which of them are required.
SUBSET_ONLY_KEYS = MappingProxyType(
    {
        "dreambooth": MappingProxyType({"image_dir": string, "is_reg": boolean, "alpha_mask": boolean}),
        "fine_tuning": MappingProxyType({"metadata_file": string, "image_dir": string, "alpha_mask": boolean}),
        # is_reg is ours: regularization subsets of a mask dataset may go without masks (full weight)
        "mask": MappingProxyType({"image_dir": string, "conditioning_data_dir": string, "is_reg": boolean}),
    }
)
REQUIRED_SUBSET_KEYS = MappingProxyType(
    {"dreambooth": ("image_dir",), "fine_tuning": ("metadata_file",), "mask": ("image_dir", "conditioning_data_dir")}
)
# §2.5: dataset-level keys ([general] or [[datasets]], never a subset).
DATASET_KEYS = MappingProxyType(
    {
        "resolution": resolution,
        "batch_size": at_least(integer, 1),
        "enable_bucket": boolean,
        "min_bucket_reso": at_least(integer, 1),
        "max_bucket_reso": at_least(integer, 1),
        "bucket_reso_steps": at_least(integer, 1),
        "bucket_no_upscale": boolean,
        "network_multiplier": number,
        "validation_split": fraction(upper_inclusive=False),
        "validation_seed": integer,
        "resize_interpolation": interpolation,
    }
)
# §2.6: command-line only.
CLI_ONLY_KEYS = frozenset({"prior_loss_weight", "debug_dataset", "max_token_length"})
TOP_LEVEL_KEYS = ("general", "datasets")
SUBSET_ONLY_NAMES = frozenset(k for keys in SUBSET_ONLY_KEYS.values() for k in keys)
KIND_ASCENDABLE_NAMES = frozenset(k for keys in KIND_ASCENDABLE_KEYS.values() for k in keys)
MISSING_KEY_HINTS = MappingProxyType(
    {
        "image_dir": "missing image_dir (the folder that holds this subset's images)",
        "metadata_file": "missing metadata_file (the JSON made by the finetune/ scripts that holds the captions)",
        "conditioning_data_dir": "missing conditioning_data_dir (the folder of mask images)",
    }
)


def allowed_keys(level: str, kind: str | None, support: DatasetSupport) -> dict[str, Callable[[Any], Any]]:
    """Validators of every key allowed in one table. `kind=None`: a dataset whose kind is undecided (mixed)."""
    keys: dict[str, Callable[[Any], Any]] = {}
    if level in (GENERAL, DATASET):
        keys.update(DATASET_KEYS)
    keys.update(ASCENDABLE_KEYS)
    if support.dropout:
        keys.update(DROPOUT_KEYS)
    for candidate in _kinds_in_scope(level, kind, support):
        keys.update(KIND_ASCENDABLE_KEYS[candidate])
        if level == SUBSET:
            keys.update(SUBSET_ONLY_KEYS[candidate])
    if level == DATASET:
        keys["subsets"] = array_of_tables("[[datasets.subsets]]")
    return keys


def _kinds_in_scope(level: str, kind: str | None, support: DatasetSupport) -> tuple[str, ...]:
    if level == GENERAL or kind is None:
        return supported_kinds(support)
    return (kind,)


def supported_kinds(support: DatasetSupport) -> tuple[str, ...]:
    flags = (support.dreambooth, support.fine_tuning, support.masks)
    return tuple(kind for kind, ok in zip(KINDS, flags) if ok)


def dataset_kind(subsets: list, support: DatasetSupport) -> str | None:
    """§3: mask if every subset has conditioning_data_dir (masks on; regularization subsets may go without),
    else fine-tuning / DreamBooth; None = mixed."""
    tables = [s if isinstance(s, dict) else {} for s in subsets]
    if support.masks and is_mask_dataset(tables):
        return "mask"
    if not support.dreambooth:
        return "fine_tuning"
    if not support.fine_tuning:
        return "dreambooth"
    with_metadata = [("metadata_file" in s) for s in tables]
    if all(with_metadata) and tables:
        return "fine_tuning"
    if not any(with_metadata):
        return "dreambooth"
    return None


def is_mask_dataset(tables: list[dict]) -> bool:
    """Every subset has conditioning_data_dir, except regularization subsets, which may go without."""
    if not any("conditioning_data_dir" in s for s in tables) or any("metadata_file" in s for s in tables):
        return False
    return all("conditioning_data_dir" in s or s.get("is_reg") is True for s in tables)


# ---------------------------------------------------------------- validation


def validate_dataset_config(raw: Any, support: DatasetSupport, *, masked_loss: bool = False) -> None:
    """Check a loaded config against §2-§3 for a script; raise DatasetConfigError listing every problem."""
    problems = dataset_config_problems(raw, support.for_run(masked_loss))
    if problems:
        raise DatasetConfigError(problems)


def dataset_config_problems(raw: Any, support: DatasetSupport) -> list[str]:
    if not isinstance(raw, dict):
        return [f"the file must hold tables ([general], [[datasets]]), got {describe(raw)}"]
    problems = _top_level_problems(raw)
    if isinstance(raw.get("general"), dict):
        problems += table_problems(raw["general"], GENERAL, None, support, "general")
    datasets = raw.get("datasets")
    if isinstance(datasets, list):
        for index, dataset in enumerate(datasets):
            problems += _dataset_problems(dataset, support, f"datasets[{index}]")
    return problems


def _top_level_problems(raw: dict) -> list[str]:
    problems = []
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"top level: {_explain_top_level_key(key)}")
    if "general" in raw and not isinstance(raw["general"], dict):
        problems.append(f"general: expected a table [general], got {describe(raw['general'])}")
    if "datasets" not in raw:
        problems.append("top level: no [[datasets]]; add at least one [[datasets]] with a [[datasets.subsets]]")
    else:
        try:
            array_of_tables("[[datasets]]")(raw["datasets"])
        except vol.Invalid as err:
            problems.append(f"datasets: {err.error_message}")
    return problems


def _explain_top_level_key(key: str) -> str:
    if key in DATASET_KEYS or key in ASCENDABLE_KEYS or key in DROPOUT_KEYS or key in KIND_ASCENDABLE_NAMES:
        return f"'{key}' must be inside a table; write it under [general] (all datasets) or a [[datasets]]"
    if key in SUBSET_ONLY_NAMES:
        return f"'{key}' must be inside a [[datasets.subsets]] table"
    return _unknown_key_message(key, TOP_LEVEL_KEYS)


def _dataset_problems(dataset: Any, support: DatasetSupport, where: str) -> list[str]:
    if not isinstance(dataset, dict):
        return []  # already reported by array_of_tables
    subsets = dataset.get("subsets")
    subset_list = subsets if isinstance(subsets, list) else []
    kind = dataset_kind(subset_list, support)
    problems = table_problems(dataset, DATASET, kind, support, where)
    if "subsets" not in dataset:
        problems.append(f"{where}: no [[datasets.subsets]]; add at least one subset with image_dir")
    if kind is None:
        problems.append(_mixed_kinds_message(subset_list, where))
    for index, subset in enumerate(subset_list):
        if isinstance(subset, dict):
            subset_kind = kind or ("fine_tuning" if "metadata_file" in subset else "dreambooth")
            problems += table_problems(subset, SUBSET, subset_kind, support, f"{where}.subsets[{index}]")
    return problems


def _mixed_kinds_message(subsets: list, where: str) -> str:
    with_metadata = [i for i, s in enumerate(subsets) if isinstance(s, dict) and "metadata_file" in s]
    without = [i for i in range(len(subsets)) if i not in with_metadata]
    return (
        f"{where}: DreamBooth subsets (no metadata_file: subsets {without}) and fine-tuning subsets "
        f"(metadata_file: subsets {with_metadata}) cannot be mixed in one dataset; split them into two [[datasets]]"
    )


def table_problems(values: dict, level: str, kind: str | None, support: DatasetSupport, where: str) -> list[str]:
    """Run the voluptuous schema of one table and rewrite each error as `where.key: message`."""
    validators = allowed_keys(level, kind, support)
    required = REQUIRED_SUBSET_KEYS[kind] if level == SUBSET and kind else ()
    if kind == "mask" and values.get("is_reg") is True:  # regularization images may have no masks
        required = tuple(k for k in required if k != "conditioning_data_dir")
    # Markers compare equal to their key name, so each key gets exactly one: Required or Optional.
    markers = {k: (vol.Required(k) if k in required else vol.Optional(k)) for k in validators}
    schema = vol.Schema({markers[k]: v for k, v in validators.items()}, extra=vol.PREVENT_EXTRA)
    try:
        schema(values)
    except vol.MultipleInvalid as err:
        return [_rewrite_error(e, level, kind, support, where, validators) for e in err.errors]
    return []


def _rewrite_error(
    error: vol.Invalid, level: str, kind: str | None, support: DatasetSupport, where: str, validators: Mapping
) -> str:
    key = error.path[0] if error.path else None
    if isinstance(error, vol.RequiredFieldInvalid):
        alternative = ""
        if kind == "dreambooth" and support.fine_tuning:
            alternative = " - or metadata_file for a fine-tuning subset"
        return f"{where}: {MISSING_KEY_HINTS.get(key, f'missing {key}')}{alternative}"
    if key not in validators:
        return f"{where}: {explain_unknown_key(str(key), level, kind, support, validators)}"
    return f"{where}.{key}: {error.error_message}"


def explain_unknown_key(key: str, level: str, kind: str | None, support: DatasetSupport, allowed: Iterable[str]) -> str:
    """Why `key` is not accepted here: a known key in the wrong place, not for this script or kind, or a typo."""
    script = f"{support.script}.py"
    if key in CLI_ONLY_KEYS:
        return f"'{key}' is a command-line option (--{key}), not a dataset config key; remove it here"
    if key in DROPOUT_KEYS and not support.dropout:
        return f"'{key}': caption dropout is not available in {script}; remove it"
    if key == "subsets" and level == GENERAL:
        return "'subsets' belongs to a [[datasets]]; write [[datasets]] then [[datasets.subsets]]"
    if level == SUBSET and key in DATASET_KEYS:
        return f"'{key}' is a dataset setting; move it to its [[datasets]] (or [general])"
    if level != SUBSET and key in SUBSET_ONLY_NAMES and _valid_in_scope(key, level, kind, support):
        table_name = "[general]" if level == GENERAL else "[[datasets]]"
        return f"'{key}' belongs in each [[datasets.subsets]], not in {table_name}"
    if key in SUBSET_ONLY_NAMES or key in KIND_ASCENDABLE_NAMES:
        return _explain_kind_key(key, level, kind, support)
    return _unknown_key_message(key, allowed)


def _valid_in_scope(key: str, level: str, kind: str | None, support: DatasetSupport) -> bool:
    scope = _kinds_in_scope(level, kind, support)
    return any(k in scope for k in _key_kinds(key, support))


def _key_kinds(key: str, support: DatasetSupport) -> tuple[str, ...]:
    """The supported kinds in which `key` is valid."""
    return tuple(
        kind
        for kind in supported_kinds(support)
        if key in SUBSET_ONLY_KEYS[kind] or key in KIND_ASCENDABLE_KEYS[kind]
    )


def _explain_kind_key(key: str, level: str, kind: str | None, support: DatasetSupport) -> str:
    script = f"{support.script}.py"
    if key == "conditioning_data_dir":
        if not support.masked_loss:
            return f"'{key}': {script} has no masked loss; remove it"
        if not support.masks:
            return f"'{key}' is used only with --masked_loss; add --masked_loss or remove it"
        return (
            f"'{key}': a dataset is a mask dataset only when every one of its subsets has conditioning_data_dir "
            "(regularization subsets may go without); add conditioning_data_dir to the other subsets of this "
            "[[datasets]] too, or move this subset into a [[datasets]] of its own"
        )
    if key == "metadata_file" and not support.fine_tuning:
        return (
            f"'{key}': {script} does not train on fine-tuning (metadata) datasets; use image_dir with caption "
            "files, or train with train_network.py / fine_tune.py"
        )
    valid_in = _key_kinds(key, support)
    if not valid_in:
        return f"'{key}' applies only to DreamBooth datasets, which {script} does not use; remove it"
    names = " or ".join(KIND_NAMES[k] for k in valid_in)
    if level == GENERAL:
        return f"'{key}' applies only to {names} datasets; remove it"
    return f"'{key}' applies only to {names} datasets, and this one is {_kind_reason(kind)}"


def _kind_reason(kind: str | None) -> str:
    return {
        "fine_tuning": "fine-tuning (its subsets have metadata_file)",
        "dreambooth": "DreamBooth (its subsets have no metadata_file)",
        "mask": "a mask dataset (its subsets have conditioning_data_dir)",
    }.get(kind, "mixed")


def _unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    names = sorted(allowed)
    lowered = {name.lower(): name for name in names}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.7)
    if close:
        return f"unknown key '{key}'; did you mean '{lowered[close[0]]}'?"
    return f"unknown key '{key}'; allowed here: {', '.join(names)}"


def value_problems(values: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """Check already-typed values (e.g. from the command line) with the same validators as the file."""
    validators = {**DATASET_KEYS, **ASCENDABLE_KEYS, **DROPOUT_KEYS, **KIND_ASCENDABLE_KEYS["dreambooth"]}
    problems = []
    for key, value in values.items():
        if value is None or key not in validators:
            continue
        try:
            validators[key](value)
        except vol.Invalid as err:
            problems.append(f"{labels.get(key, key)}: {err.error_message}")
    return problems
