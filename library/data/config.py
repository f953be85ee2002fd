"""Dataset blueprints: every dataset and subset with all of its settings resolved, built from a
`--dataset_config` file or from the legacy command-line folders (reference/dataset-config.md §4-§5).

Nothing here opens an image or loads a model: the blueprints are checked (keys, types, resolutions,
bucket settings, paths) so that a mistake stops the run before any model loads. Blueprints are frozen;
the datasets are built from them later.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from library.data.config_schema import (
    DatasetConfigError,
    DatasetSupport,
    dataset_config_problems,
    dataset_kind,
    value_problems,
)

__all__ = [
    "DatasetBlueprint",
    "DatasetConfigError",
    "SubsetBlueprint",
    "blueprints_from_args",
    "blueprints_from_config",
    "check_dataset_paths",
    "cli_fallbacks",
    "legacy_dataset",
    "load_dataset_config_file",
    "parse_repeat_folder_name",
    "parse_size_option",
]

logger = logging.getLogger(__name__)

SD_SIDE_MULTIPLE = 64  # latents are 1/8 of the image and the SD U-Net halves them 3 more times
LATENT_FACTOR = 8


@dataclass(frozen=True)
class SubsetBlueprint:
    """One folder (or metadata file) of a dataset with every setting resolved (§2.1-§2.4)."""

    image_dir: str | None = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    metadata_file: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    alpha_mask: bool = False
    cache_info: bool = False
    resize_interpolation: str | None = None
    custom_attributes: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    conditioning_data_dir: str | None = None
    origin: str = field(default="", compare=False)  # where it was written, for messages

    def __post_init__(self) -> None:
        # A private read-only copy, so neither the raw config nor a consumer can change it afterwards.
        attributes = copy.deepcopy(dict(self.custom_attributes or {}))
        object.__setattr__(self, "custom_attributes", MappingProxyType(attributes))
        if self.face_crop_aug_range is not None:
            object.__setattr__(self, "face_crop_aug_range", tuple(float(v) for v in self.face_crop_aug_range))


@dataclass(frozen=True)
class DatasetBlueprint:
    """One `[[datasets]]` with its dataset-level settings resolved (§2.5) and its subsets."""

    kind: str  # "dreambooth" | "fine_tuning" | "mask"
    resolution: tuple[int, int]  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    subsets: tuple[SubsetBlueprint, ...] = ()
    origin: str = field(default="", compare=False)


SUBSET_ONLY_FIELDS = frozenset({"image_dir", "is_reg", "metadata_file", "conditioning_data_dir"})
# Fields that mean nothing outside some kinds keep their default there (so a CLI value cannot leak in).
FIELD_KINDS = MappingProxyType(
    {
        "is_reg": ("dreambooth", "mask"),
        "class_tokens": ("dreambooth", "mask"),
        "cache_info": ("dreambooth", "mask"),
        "metadata_file": ("fine_tuning",),
        "alpha_mask": ("dreambooth", "fine_tuning"),
        "conditioning_data_dir": ("mask",),
    }
)
# Option names that differ from the config key (§4).
CLI_OPTION_NAMES = MappingProxyType({"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"})
NOT_RESOLVED = frozenset({"kind", "subsets", "origin"})
# Image files recognised when scanning legacy folders (avif/jxl count: the folder clearly holds images).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl"})
LEGACY_DATASET = "the command-line dataset"


# ---------------------------------------------------------------- loading the file


def load_dataset_config_file(path: str | Path) -> dict:
    """Read a `--dataset_config` file: TOML or JSON by extension (case-insensitive)."""
    path = Path(path)
    source = f"--dataset_config '{path}'"
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetConfigError([f"unsupported file type '{path.suffix}'; use a .toml or .json file"], source)
    if not path.exists():
        raise DatasetConfigError([f"file not found (looked for {path.absolute()})"], source)
    if not path.is_file():
        raise DatasetConfigError(["this is a folder; give the path of the .toml or .json file"], source)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as err:
        raise DatasetConfigError([f"not UTF-8 text ({err}); save it as UTF-8"], source) from None
    return _parse_config_text(text, suffix, source)


def _parse_config_text(text: str, suffix: str, source: str) -> dict:
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetConfigError([f"not valid JSON: {err}"], source) from None
    import toml

    try:
        return toml.loads(text)
    except toml.TomlDecodeError as err:
        hint = ""
        if "escape" in str(err).lower():
            hint = "; write Windows paths in single quotes, e.g. image_dir = 'C:\\train\\10_sls frog'"
        raise DatasetConfigError([f"not valid TOML: {err}{hint}"], source) from None


# ---------------------------------------------------------------- command-line fallbacks


def parse_size_option(value: Any, option: str, cast: Callable[[str], Any] = int) -> tuple | None:
    """`"512"` -> (512, 512), `"512,768"` -> (512, 768); lists and numbers (from --config_file) too."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(",")
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        numbers = tuple(cast(str(p).strip()) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) not in (1, 2) or any(n <= 0 for n in numbers):
        example = "512 or 512,768 (width,height)" if cast is int else "2.0,4.0"
        raise ValueError(f"{option}: expected {example}, got {value!r}")
    return numbers * 2 if len(numbers) == 1 else numbers


def cli_fallbacks(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The command-line values under config key names (§4), and the problems found in them."""
    names = [f.name for cls in (DatasetBlueprint, SubsetBlueprint) for f in fields(cls)]
    skipped = SUBSET_ONLY_FIELDS | NOT_RESOLVED
    values = {name: getattr(args, CLI_OPTION_NAMES.get(name, name), None) for name in names if name not in skipped}
    if getattr(args, "caption_extention", None) is not None:  # the misspelled legacy alias wins, as upstream
        values["caption_extension"] = args.caption_extention
    problems = []
    for name, cast in (("resolution", int), ("face_crop_aug_range", float)):
        try:
            values[name] = parse_size_option(values[name], f"--{name}", cast)
        except ValueError as err:
            problems.append(str(err))
            values[name] = None
    labels = {name: f"--{CLI_OPTION_NAMES.get(name, name)}" for name in values}
    return values, problems + value_problems(values, labels)


# ---------------------------------------------------------------- building blueprints


def blueprints_from_args(
    args: argparse.Namespace, support: DatasetSupport, *, check_paths: bool = True
) -> tuple[DatasetBlueprint, ...]:
    """The datasets of a run: from `--dataset_config`, or else from --train_data_dir / --reg_data_dir / --in_json."""
    if getattr(args, "dataset_config", None):
        folders = ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
        ignored = [f"--{name}" for name in folders if getattr(args, name, None)]
        if ignored:
            logger.warning(
                "%s ignored because --dataset_config is given; set image_dir / metadata_file / conditioning_data_dir "
                "in the config instead",
                ", ".join(ignored),
            )
        raw = load_dataset_config_file(args.dataset_config)
        source = f"--dataset_config '{args.dataset_config}'"
        return blueprints_from_config(raw, args, support, source=source, check_paths=check_paths)
    support = _support(args, support)
    cli, problems = cli_fallbacks(args)
    raw, labels, folder_problems = legacy_dataset(args, support)
    source = "the dataset options (--train_data_dir / --reg_data_dir / --in_json)"
    if problems or folder_problems:
        raise DatasetConfigError(folder_problems + problems, source)
    return _build(raw, cli, support, source, check_paths, labels)


def blueprints_from_config(
    raw: Any, args: argparse.Namespace, support: DatasetSupport, *, source: str | None = None, check_paths: bool = True
) -> tuple[DatasetBlueprint, ...]:
    """Validate a loaded config and resolve every value: subset -> dataset -> general -> command line -> default."""
    support = _support(args, support)
    cli, problems = cli_fallbacks(args)
    problems = dataset_config_problems(raw, support) + problems
    if problems:
        raise DatasetConfigError(problems, source)
    return _build(raw, cli, support, source, check_paths, labels=None)


def _support(args: argparse.Namespace, support: DatasetSupport) -> DatasetSupport:
    return support.for_run(bool(getattr(args, "masked_loss", False)))


def _build(
    raw: dict, cli: dict, support: DatasetSupport, source: str | None, check_paths: bool, labels: list | None
) -> tuple[DatasetBlueprint, ...]:
    """Resolve every dataset of a validated config; `labels`: [(dataset label, [subset labels])] or None (file)."""
    general = raw.get("general", {})
    blueprints, problems = [], []
    for i, dataset in enumerate(raw["datasets"]):
        where, subset_labels = labels[i] if labels else _file_labels(i, len(dataset["subsets"]))
        kind = dataset_kind(dataset["subsets"], support)
        subsets = [
            _resolve_subset(subset, (subset, dataset, general, cli), kind, label)
            for subset, label in zip(dataset["subsets"], subset_labels)
        ]
        values, dataset_problems = _resolve_dataset((dataset, general, cli), where, from_file=labels is None)
        problems += dataset_problems
        kept = _drop_unused_subsets(subsets)
        if not kept:
            logger.warning("%s: no subset with num_repeats >= 1; the dataset is ignored", where)
        elif not dataset_problems:
            blueprints.append(DatasetBlueprint(kind=kind, subsets=tuple(kept), origin=where, **values))
    if not blueprints and not problems:
        problems.append(
            "nothing to train on: every subset has num_repeats < 1, so each is ignored; "
            "set num_repeats to 1 or more (--dataset_repeats on the command line)"
        )
    if check_paths:
        problems += check_dataset_paths(blueprints)
    if problems:
        raise DatasetConfigError(problems, source)
    return tuple(blueprints)


def _file_labels(index: int, subset_count: int) -> tuple[str, list[str]]:
    return f"datasets[{index}]", [f"datasets[{index}].subsets[{j}]" for j in range(subset_count)]


def _first_set(name: str, tables: Sequence[Mapping[str, Any]], default: Any) -> Any:
    """§4: the first value that is not null; false and 0 count as set."""
    for table in tables:
        value = table.get(name)
        if value is not None:
            return value
    return default


def _resolve_subset(subset: dict, tables: Sequence[Mapping], kind: str, origin: str) -> SubsetBlueprint:
    values = {}
    for f in fields(SubsetBlueprint):
        if f.name == "origin" or kind not in FIELD_KINDS.get(f.name, (kind,)):
            continue
        search = (subset,) if f.name in SUBSET_ONLY_FIELDS else tables
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        values[f.name] = _first_set(f.name, search, default)
    return SubsetBlueprint(origin=origin, **values)


def _resolve_dataset(tables: Sequence[Mapping], where: str, from_file: bool) -> tuple[dict, list[str]]:
    values = {
        f.name: _first_set(f.name, tables, None if f.name == "resolution" else f.default)
        for f in fields(DatasetBlueprint)
        if f.name not in NOT_RESOLVED
    }
    if values["resolution"] is None:
        fix = "set resolution = 512 (or [width, height]) in [general] or [[datasets]], or pass" if from_file else "pass"
        return values, [f"{where}: no resolution given; {fix} --resolution 512 (or 512,768 for width,height)"]
    values["resolution"] = parse_size_option(values["resolution"], "resolution")
    steps = values["bucket_reso_steps"]
    if steps % SD_SIDE_MULTIPLE:
        return values, [
            f"{where}: bucket_reso_steps {steps} is not a multiple of 64; Stable Diffusion 1.x/2.x needs bucket sides "
            "divisible by 64 (latents are 1/8 of the image and the U-Net halves them 3 more times); use 64"
        ]
    if not values["enable_bucket"]:
        return values, _fixed_size_problems(*values["resolution"], where)
    values["min_bucket_reso"], values["max_bucket_reso"] = _round_bucket_limits(values, where)
    return values, _bucket_limit_problems(values, where)


def _round_bucket_limits(values: Mapping[str, Any], where: str) -> tuple[int, int]:
    """§4: min_bucket_reso rounded down, max_bucket_reso up, to multiples of bucket_reso_steps."""
    low, high, steps = values["min_bucket_reso"], values["max_bucket_reso"], values["bucket_reso_steps"]
    rounded = (low - low % steps, high + (-high) % steps)
    for name, old, new in zip(("min_bucket_reso", "max_bucket_reso"), (low, high), rounded):
        if new != old:
            logger.warning("%s: %s %d rounded to %d (a multiple of bucket_reso_steps %d)", where, name, old, new, steps)
    return rounded


def _bucket_limit_problems(values: Mapping[str, Any], where: str) -> list[str]:
    (width, height), steps = values["resolution"], values["bucket_reso_steps"]
    low, high = values["min_bucket_reso"], values["max_bucket_reso"]
    size = f"resolution {width}x{height}"
    problems = []
    if low < steps:
        problems.append(f"{where}: min_bucket_reso must be at least bucket_reso_steps ({steps})")
    elif low > min(width, height):
        problems.append(
            f"{where}: min_bucket_reso {low} is larger than the shorter side of {size}; "
            f"lower min_bucket_reso to {min(width, height)} or less"
        )
    if high < max(width, height):
        problems.append(
            f"{where}: max_bucket_reso {high} is smaller than the longer side of {size}; "
            f"raise max_bucket_reso to {max(width, height)} or more"
        )
    return problems


def _fixed_size_problems(width: int, height: int, where: str) -> list[str]:
    """Without buckets every image becomes exactly width x height, so the size itself must suit the model."""
    if width % LATENT_FACTOR or height % LATENT_FACTOR:
        return [
            f"{where}: resolution {width}x{height} is not divisible by 8 (the VAE makes latents 1/8 of the image); "
            "use multiples of 64 such as 512 or [512, 768], or set enable_bucket = true"
        ]
    if width % SD_SIDE_MULTIPLE or height % SD_SIDE_MULTIPLE:
        logger.warning(
            "%s: resolution %dx%d is not a multiple of 64; the SD U-Net has to pad such latents (multiples of 64 are "
            "better, or enable_bucket = true)", where, width, height,
        )
    return []


def _drop_unused_subsets(subsets: list[SubsetBlueprint]) -> list[SubsetBlueprint]:
    """Subsets with num_repeats < 1 and exact duplicates are ignored, with a warning (§2.1, §3)."""
    kept: list[SubsetBlueprint] = []
    for subset in subsets:
        if subset.num_repeats < 1:
            logger.warning("%s: num_repeats is %d (< 1), so this subset is ignored", subset.origin, subset.num_repeats)
        elif subset in kept:
            twin = kept[kept.index(subset)]
            logger.warning("%s: same settings as %s; the duplicate is ignored", subset.origin, twin.origin)
        else:
            kept.append(subset)
    return kept


# ---------------------------------------------------------------- paths


def check_dataset_paths(blueprints: Sequence[DatasetBlueprint]) -> list[str]:
    """Problems with the folders and files the subsets name (missing, or a file where a folder is expected)."""
    problems = []
    for i, dataset in enumerate(blueprints):
        for j, subset in enumerate(dataset.subsets):
            where = subset.origin or f"datasets[{i}].subsets[{j}]"
            for key, want_dir in (("image_dir", True), ("conditioning_data_dir", True), ("metadata_file", False)):
                value = getattr(subset, key)
                if value is not None:
                    problems += _path_problems(Path(value), want_dir, f"{where}.{key}")
    return problems


def _path_problems(path: Path, want_dir: bool, where: str) -> list[str]:
    if not path.exists():
        return [f"{where}: '{path}' not found (relative paths start at {Path.cwd()})"]
    if want_dir and not path.is_dir():
        return [f"{where}: '{path}' is a file; give the folder that holds the images"]
    if not want_dir and path.is_dir():
        return [f"{where}: '{path}' is a folder; give the metadata .json file"]
    return []


# ---------------------------------------------------------------- legacy folders (§5)


def legacy_dataset(args: argparse.Namespace, support: DatasetSupport) -> tuple[dict, list, list[str]]:
    """The raw config that --train_data_dir / --reg_data_dir / --in_json describe, labels for messages, problems."""
    in_json, train_dir, reg_dir = (getattr(args, n, None) for n in ("in_json", "train_data_dir", "reg_data_dir"))
    if in_json and support.fine_tuning:
        subset = {"metadata_file": str(in_json)} | ({"image_dir": str(train_dir)} if train_dir else {})
        if reg_dir:
            logger.warning("--reg_data_dir ignored with --in_json: fine-tuning datasets have no regularization images")
        return {"datasets": [{"subsets": [subset]}]}, [(LEGACY_DATASET, ["--in_json subset"])], []
    if not train_dir:
        metadata = " (plus --in_json FILE for a metadata file)" if support.fine_tuning else ""
        return {}, [], [f"no training data given: pass --dataset_config FILE, or --train_data_dir DIR{metadata}"]
    if not support.dreambooth:
        return {}, [], [
            f"{support.script}.py trains from a metadata file: pass --in_json FILE (made by the finetune/ scripts) "
            "with --train_data_dir, or --dataset_config FILE"
        ]
    subsets, labels, problems = repeat_folder_subsets(train_dir, False, "--train_data_dir")
    masks = getattr(args, "conditioning_data_dir", None)
    if masks and support.masks:
        for subset in subsets:
            subset["conditioning_data_dir"] = mask_folder_for(masks, subset["image_dir"])
    if reg_dir:
        reg_subsets, reg_labels, reg_problems = repeat_folder_subsets(reg_dir, True, "--reg_data_dir")
        subsets, labels, problems = subsets + reg_subsets, labels + reg_labels, problems + reg_problems
    return {"datasets": [{"subsets": subsets}]}, [(LEGACY_DATASET, labels)], problems


def mask_folder_for(conditioning_data_dir: str | Path, image_dir: str | Path) -> str:
    """--conditioning_data_dir of the folder form: its sub-folder named like the image folder when there is
    one ('<masks>/10_sks dog' for '<train>/10_sks dog'), else the folder itself."""
    own = Path(conditioning_data_dir) / Path(image_dir).name
    return str(own if own.is_dir() else Path(conditioning_data_dir))


def folder_pattern(is_reg: bool) -> tuple[str, str]:
    """The expected sub-folder name and an example."""
    return ("<repeats>_<class>", "1_frog") if is_reg else ("<repeats>_<identifier> <class>", "10_sls frog")


def parse_repeat_folder_name(name: str) -> tuple[int, str | None] | None:
    """`"10_sls frog"` -> (10, "sls frog"): the integer before the first `_` and the rest; None without an integer."""
    prefix, _, tokens = name.partition("_")
    try:
        repeats = int(prefix)
    except ValueError:
        return None
    return repeats, tokens or None


def repeat_folder_subsets(parent: str | Path, is_reg: bool, option: str) -> tuple[list[dict], list[str], list[str]]:
    """One subset per `<repeats>_<tokens>` sub-folder of `parent`; misnamed folders that hold images are reported."""
    parent = Path(parent)
    pattern, example = folder_pattern(is_reg)
    if not parent.is_dir():
        return [], [], [f"{option} '{parent}': {'is a file, not a folder' if parent.exists() else 'folder not found'}"]
    entries = sorted(parent.iterdir(), key=lambda p: p.name)
    subsets, labels, problems = [], [], []
    for folder in (p for p in entries if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_repeat_folder_name(folder.name)
        if parsed is None or parsed[0] < 1:
            if _has_images(folder):  # folders without images (e.g. a stray output folder) are left alone
                problems.append(_misnamed_folder_message(option, folder.name, parsed, pattern, example))
            continue
        subset = {"image_dir": str(folder), "num_repeats": parsed[0], "is_reg": is_reg}
        subsets.append(subset | ({"class_tokens": parsed[1]} if parsed[1] else {}))
        labels.append(f"{option} sub-folder '{folder.name}'")
    problems += _loose_image_problems(parent, entries, bool(subsets or problems), option, pattern, example)
    return subsets, labels, problems


def _misnamed_folder_message(option: str, name: str, parsed, pattern: str, example: str) -> str:
    if parsed is None:
        return f"{option}: sub-folder '{name}' does not start with a repeat count; name it '{pattern}' ('{example}')"
    return f"{option}: sub-folder '{name}' has {parsed[0]} repeats; the number before '_' must be 1 or more"


def _loose_image_problems(
    parent: Path, entries: list[Path], has_folders: bool, option: str, pattern: str, example: str
) -> list[str]:
    """Images directly inside the parent: the usual mistake of giving the image folder itself."""
    loose = [p.name for p in entries if _is_image(p)]
    if loose and not has_folders:
        return [
            f"{option} '{parent}' holds {len(loose)} image(s) itself (e.g. '{loose[0]}'); it must be the parent of "
            f"image folders named '{pattern}': move the images into a sub-folder such as '{parent / example}'"
        ]
    if loose:
        return [
            f"{option} '{parent}': {len(loose)} image(s) lie directly in it (e.g. '{loose[0]}') and would not be "
            f"used, since only its '{pattern}' sub-folders are read; move them into such a sub-folder "
            f"(e.g. '{parent / example}'), or remove them"
        ]
    if not has_folders:
        return [f"{option} '{parent}': no sub-folders named '{pattern}' (e.g. '{example}') with images in it"]
    return []


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _has_images(folder: Path) -> bool:
    try:
        return any(_is_image(p) for p in folder.iterdir())
    except OSError:
        return False
