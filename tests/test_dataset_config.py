"""Dataset options, the --dataset_config schema, value resolution and the legacy folder form (dataset-config.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from library.data.config import (
    DatasetBlueprint,
    DatasetConfigError,
    SubsetBlueprint,
    blueprints_from_args,
    blueprints_from_config,
    check_dataset_paths,
    load_dataset_config_file,
    parse_repeat_folder_name,
    parse_size_option,
)
from library.data.config_schema import validate_dataset_config
from library.data.dataset_args import add_dataset_arguments
from tests.recipe_infos import SCRIPTS, support

METADATA = {"metadata_file": "meta.json"}


def parse(script: str = "train_network", *argv: str, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support(script))
    args = parser.parse_args(list(argv))
    for key, value in extra.items():  # options owned by other groups (e.g. --masked_loss)
        setattr(args, key, value)
    return args


def make_images(folder: Path, count: int = 2, suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"img{i}{suffix}")
    return folder


def problems_of(raw: dict, script: str = "train_network", **kwargs) -> list[str]:
    with pytest.raises(DatasetConfigError) as info:
        validate_dataset_config(raw, support(script), **kwargs)
    return info.value.problems


def db_config(**subset) -> dict:
    return {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "img", **subset}]}]}


# ---------------------------------------------------------------- command-line options


def option_names(script: str) -> set[str]:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support(script))
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("script", SCRIPTS)
def test_options_per_script(script):
    names = option_names(script)
    always = {"--dataset_config", "--train_data_dir", "--resolution", "--caption_extention", "--skip_unreadable_images"}
    assert always <= names
    assert ("--reg_data_dir" in names) == ("--prior_loss_weight" in names) == (script != "fine_tune")
    assert ("--in_json" in names) == ("--dataset_repeats" in names) == (script != "train_db")
    assert ("--caption_dropout_rate" in names) == (not script.startswith("train_textual_inversion"))


def test_option_defaults_and_hidden_alias():
    args = parse("train_network")
    assert (args.caption_extension, args.caption_separator, args.keep_tokens_separator) == (".caption", ",", "")
    assert (args.train_batch_size, args.dataset_repeats, args.vae_batch_size) == (1, 1, 1)
    assert args.max_data_loader_n_workers == 8
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (256, 1024, 64)
    assert (args.token_warmup_min, args.token_warmup_step, args.prior_loss_weight) == (1, 0, 1.0)
    assert args.resolution is None and args.shuffle_caption is False and args.skip_unreadable_images is False
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support("train_db"))
    assert "--caption_extention" not in parser.format_help()


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"general": {"num_repeat": 2}, "datasets": db_config()["datasets"]}, "general"),
        ({"datasets": [{"num_repeat": 2, **db_config()["datasets"][0]}]}, "datasets[0]"),
        (db_config(num_repeat=2), "datasets[0].subsets[0]"),
    ],
)
def test_unknown_key_did_you_mean_at_each_level(raw, where):
    assert problems_of(raw) == [f"{where}: unknown key 'num_repeat'; did you mean 'num_repeats'?"]


def test_unknown_key_without_close_match_lists_allowed_keys():
    (problem,) = problems_of(db_config(zzz=1))
    assert problem.startswith("datasets[0].subsets[0]: unknown key 'zzz'; allowed here: ")
    assert "image_dir" in problem and "num_repeats" in problem and "resolution" not in problem


def test_top_level_typos():
    assert problems_of({"dataset": [], "datasets": db_config()["datasets"]}) == [
        "top level: unknown key 'dataset'; did you mean 'datasets'?"
    ]
    (problem,) = problems_of({"datasets": {"subsets": []}})
    assert "double brackets: [[datasets]]" in problem
    (problem,) = problems_of({"resolution": 512, **db_config()})
    assert "'resolution' must be inside a table" in problem


def test_wrong_types_are_named():
    raw = db_config(shuffle_caption="yes", keep_tokens=-1, face_crop_aug_range=[2.0])
    raw["datasets"][0]["batch_size"] = "four"
    raw["datasets"][0]["resolution"] = [512, "x"]
    assert problems_of(raw) == [
        "datasets[0].resolution: expected a size like 512 or [width, height] like [512, 768], got [512, 'x']",
        "datasets[0].batch_size: expected an integer, got 'four'",
        "datasets[0].subsets[0].shuffle_caption: expected true or false, got 'yes'",
        "datasets[0].subsets[0].keep_tokens: must be 0 or more, got -1",
        "datasets[0].subsets[0].face_crop_aug_range: expected two positive numbers like [2.0, 4.0], got [2.0]",
    ]


def test_missing_image_dir_and_missing_metadata_file():
    raw = {"datasets": [{"subsets": [{"num_repeats": 2}]}]}
    (problem,) = problems_of(raw, "train_db")
    assert problem.startswith("datasets[0].subsets[0]: missing image_dir")
    (problem,) = problems_of(raw, "fine_tune")
    assert problem.startswith("datasets[0].subsets[0]: missing metadata_file")
    assert "or metadata_file" in problems_of(raw, "train_network")[0]


def test_mixed_dreambooth_and_fine_tuning_subsets():
    raw = {"datasets": [{"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]}
    (problem,) = problems_of(raw)
    assert problem.startswith("datasets[0]: DreamBooth subsets") and "cannot be mixed" in problem
    assert "split them into two [[datasets]]" in problem


@pytest.mark.parametrize(
    "script, raw, expected",
    [
        ("train_db", {"datasets": [{"subsets": [METADATA]}]}, "train_db.py does not train on fine-tuning"),
        ("train_textual_inversion", db_config(caption_dropout_rate=0.1), "caption dropout is not available"),
        ("fine_tune", {"general": {"class_tokens": "x"}, "datasets": []}, "which fine_tune.py does not use"),
        ("train_network", db_config(conditioning_data_dir="m"), "used only with --masked_loss"),
        ("fine_tune", {"datasets": [{"subsets": [{**METADATA, "is_reg": True}]}]}, "fine_tune.py does not use"),
        ("train_network", {"datasets": [{"subsets": [{**METADATA, "is_reg": True}]}]}, "this one is fine-tuning"),
        ("train_network", db_config(resolution=512), "'resolution' is a dataset setting"),
        ("train_network", {"general": {"prior_loss_weight": 1.0}, **db_config()}, "is a command-line option"),
    ],
)
def test_keys_not_allowed_here_say_why(script, raw, expected):
    problems = problems_of(raw, script)
    assert any(expected in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    raw = {
        "general": {"enable_bukcet": True},
        "datasets": [
            {"batch_size": 0, "subsets": [{"image_dir": 5}, {"num_repeat": 1}]},
            {"subsets": [{"image_dir": "b", "caption_dropout_rate": 1.5}]},
        ],
    }
    with pytest.raises(DatasetConfigError) as info:
        validate_dataset_config(raw, support("train_network"))
    text = str(info.value)
    assert text.splitlines()[0] == "6 problems in the dataset settings:"
    assert len(info.value.problems) == 6 and len(text.splitlines()) == 7
    for fragment in ("did you mean 'enable_bucket'", "batch_size: must be 1 or more", "image_dir: expected a string",
                     "subsets[1]: missing image_dir", "datasets[1].subsets[0].caption_dropout_rate"):
        assert fragment in text


def test_mask_kind_needs_masked_loss_and_every_subset():
    raw = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "conditioning_data_dir": "m"}]}]}
    validate_dataset_config(raw, support("train_network"), masked_loss=True)
    validate_dataset_config(raw, support("train_db"), masked_loss=True)
    raw["datasets"][0]["subsets"].append({"image_dir": "b"})
    (problem,) = problems_of(raw, masked_loss=True)
    assert "every one of its subsets has conditioning_data_dir" in problem


# ---------------------------------------------------------------- value resolution


def test_fallback_order_subset_dataset_general_cli_default():
    raw = {
        "general": {"keep_tokens": 3, "caption_prefix": "g", "caption_suffix": "g", "flip_aug": True},
        "datasets": [
            {
                "resolution": 512,
                "keep_tokens": 2,
                "caption_prefix": "d",
                "subsets": [{"image_dir": "a", "keep_tokens": 1}, {"image_dir": "b", "flip_aug": False}],
            }
        ],
    }
    args = parse("train_network", "--caption_separator", ";", "--shuffle_caption", "--train_batch_size", "3")
    first, second = blueprints_from_config(raw, args, support("train_network"), check_paths=False)[0].subsets
    assert (first.keep_tokens, second.keep_tokens) == (1, 2)  # subset > dataset
    assert first.caption_prefix == "d" and first.caption_suffix == "g"  # dataset > general
    assert first.caption_separator == ";" and first.shuffle_caption is True  # command line
    assert first.token_warmup_min == 1 and first.secondary_separator is None  # built-in defaults
    assert first.flip_aug is True and second.flip_aug is False  # false stops the search


def test_zero_and_false_stop_the_search_before_the_command_line():
    raw = {"general": {"shuffle_caption": False, "keep_tokens": 0, "batch_size": 2}, **db_config()}
    args = parse("train_network", "--shuffle_caption", "--keep_tokens", "4", "--train_batch_size", "8")
    (dataset,) = blueprints_from_config(raw, args, support("train_network"), check_paths=False)
    assert dataset.batch_size == 2
    assert dataset.subsets[0].shuffle_caption is False and dataset.subsets[0].keep_tokens == 0


def test_defaults_when_the_script_lacks_the_option():
    args = argparse.Namespace(resolution="512")  # nothing else on the command line
    (dataset,) = blueprints_from_config(db_config(), args, support("train_textual_inversion"), check_paths=False)
    subset = dataset.subsets[0]
    assert (subset.caption_separator, subset.keep_tokens_separator, subset.caption_extension) == (",", "", ".caption")
    assert (subset.caption_dropout_rate, subset.num_repeats, dataset.batch_size) == (0.0, 1, 1)


def test_cli_name_mapping_resolution_and_alias():
    raw = {"datasets": [{"subsets": [{"image_dir": "a"}]}]}
    args = parse("train_network", "--resolution", "512,768", "--train_batch_size", "4", "--dataset_repeats", "3",
                 "--caption_extention", ".txt", "--face_crop_aug_range", "2.0,4.0")
    (dataset,) = blueprints_from_config(raw, args, support("train_network"), check_paths=False)
    assert dataset.resolution == (512, 768) and dataset.batch_size == 4
    assert dataset.subsets[0].num_repeats == 3 and dataset.subsets[0].caption_extension == ".txt"
    assert dataset.subsets[0].face_crop_aug_range == (2.0, 4.0)


def test_size_option_parsing():
    assert parse_size_option("512", "--resolution") == (512, 512)
    assert parse_size_option(" 512 , 768 ", "--resolution") == (512, 768)
    assert parse_size_option([640, 512], "--resolution") == (640, 512)
    with pytest.raises(ValueError, match="expected 512 or 512,768"):
        parse_size_option("512x768", "--resolution")
    with pytest.raises(DatasetConfigError, match="--resolution: expected"):
        blueprints_from_config(db_config(), parse("train_network", "--resolution", "abc"), support("train_network"))


def test_missing_resolution_names_both_places():
    raw = {"datasets": [{"subsets": [{"image_dir": "a"}]}]}
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)
    (problem,) = info.value.problems
    assert problem.startswith("datasets[0]: no resolution") and "--resolution 512" in problem and "[general]" in problem


def test_bucket_reso_rounding_and_checks(caplog):
    raw = {"general": {"enable_bucket": True, "min_bucket_reso": 300, "max_bucket_reso": 1000}, **db_config()}
    with caplog.at_level(logging.WARNING):
        (dataset,) = blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (256, 1024)
    assert "min_bucket_reso 300 rounded to 256" in caplog.text
    raw = {"general": {"enable_bucket": True, "min_bucket_reso": 640, "max_bucket_reso": 700}, **db_config()}
    raw["datasets"][0]["resolution"] = [512, 1024]
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)
    first, second = info.value.problems
    assert "min_bucket_reso 640 is larger than the shorter side of resolution 512x1024" in first
    assert "max_bucket_reso 704 is smaller than the longer side" in second


def test_bucket_reso_steps_must_be_a_multiple_of_64():
    with pytest.raises(DatasetConfigError, match="not a multiple of 64.*latents are 1/8"):
        args = parse("train_db", "--bucket_reso_steps", "32")
        blueprints_from_config(db_config(), args, support("train_db"), check_paths=False)


def test_fixed_size_must_divide_by_8():
    raw = db_config()
    raw["datasets"][0]["resolution"] = 500
    with pytest.raises(DatasetConfigError, match="500x500 is not divisible by 8"):
        blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)


def test_zero_repeats_and_duplicates_are_dropped_with_warnings(caplog):
    a, b = {"image_dir": "a"}, {"image_dir": "b", "num_repeats": 0}
    subsets = [a, b, dict(a), {**a, "is_reg": True}]
    raw = {"datasets": [{"resolution": 512, "subsets": subsets}]}
    with caplog.at_level(logging.WARNING):
        (dataset,) = blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)
    assert [(s.image_dir, s.is_reg) for s in dataset.subsets] == [("a", False), ("a", True)]
    assert "datasets[0].subsets[1]: num_repeats is 0" in caplog.text
    assert "datasets[0].subsets[2]: same settings as datasets[0].subsets[0]" in caplog.text


def test_blueprints_are_immutable_with_real_string_separators():
    raw = db_config(custom_attributes={"style": {"a": 1}})
    (dataset,) = blueprints_from_config(raw, parse(), support("train_network"), check_paths=False)
    subset = dataset.subsets[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        subset.num_repeats = 5
    with pytest.raises(TypeError):
        subset.custom_attributes["x"] = 1
    raw["datasets"][0]["subsets"][0]["custom_attributes"]["style"]["a"] = 2
    assert subset.custom_attributes["style"] == {"a": 1}  # a private copy
    assert type(subset.caption_separator) is str and type(subset.keep_tokens_separator) is str
    assert isinstance(hash(dataset), int) and isinstance(dataset, DatasetBlueprint)


# ---------------------------------------------------------------- files: the §10 examples, JSON, load errors


EXAMPLE_DREAMBOOTH = """
[general]
enable_bucket = true
shuffle_caption = false

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{root}/train/sls_frog'
  class_tokens = 'sls frog'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg/frog'
  class_tokens = 'frog'
  num_repeats = 1
"""

EXAMPLE_CAPTIONS = """
[general]
enable_bucket = true
caption_extension = '.txt'
shuffle_caption = true
keep_tokens = 1
caption_tag_dropout_rate = 0.05

[[datasets]]
resolution = [512, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root}/chara_a'
  num_repeats = 8

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg_girl'
  class_tokens = 'girl'
  num_repeats = 1
"""

EXAMPLE_FINE_TUNING = """
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 960

  [[datasets.subsets]]
  image_dir = '{root}/piyo'
  metadata_file = '{root}/piyo/meta_lat.json'
  num_repeats = 1
"""


def write_config(tmp_path: Path, text: str, folders: tuple[str, ...]) -> Path:
    for folder in folders:
        make_images(tmp_path / folder)
    path = tmp_path / "dataset.toml"
    path.write_text(text.format(root=tmp_path.as_posix()), encoding="utf-8")
    return path


def test_example_dreambooth_with_regularization(tmp_path):
    path = write_config(tmp_path, EXAMPLE_DREAMBOOTH, ("train/sls_frog", "reg/frog"))
    (dataset,) = blueprints_from_args(parse("train_db", "--dataset_config", str(path)), support("train_db"))
    assert (dataset.kind, dataset.resolution, dataset.batch_size) == ("dreambooth", (512, 512), 4)
    assert dataset.enable_bucket is True
    train, reg = dataset.subsets
    assert (train.class_tokens, train.num_repeats, train.is_reg) == ("sls frog", 10, False)
    assert (reg.class_tokens, reg.num_repeats, reg.is_reg) == ("frog", 1, True)
    assert train.image_dir.endswith("train/sls_frog") and train.shuffle_caption is False


def test_example_dreambooth_caption_files(tmp_path):
    path = write_config(tmp_path, EXAMPLE_CAPTIONS, ("chara_a", "reg_girl"))
    (dataset,) = blueprints_from_args(parse("train_network", "--dataset_config", str(path)), support("train_network"))
    assert (dataset.kind, dataset.resolution, dataset.batch_size) == ("dreambooth", (512, 768), 2)
    chara, reg = dataset.subsets
    assert (chara.num_repeats, chara.caption_extension, chara.class_tokens, chara.is_reg) == (8, ".txt", None, False)
    assert chara.shuffle_caption and chara.keep_tokens == 1 and chara.caption_tag_dropout_rate == 0.05
    assert (reg.is_reg, reg.class_tokens, reg.caption_extension) == (True, "girl", ".txt")


def test_example_fine_tuning(tmp_path):
    path = write_config(tmp_path, EXAMPLE_FINE_TUNING, ("piyo",))
    (tmp_path / "piyo" / "meta_lat.json").write_text(json.dumps({"img0": {"caption": "a"}}), encoding="utf-8")
    (dataset,) = blueprints_from_args(parse("fine_tune", "--dataset_config", str(path)), support("fine_tune"))
    assert (dataset.kind, dataset.resolution, dataset.batch_size) == ("fine_tuning", (512, 512), 4)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.enable_bucket) == (320, 960, True)
    (subset,) = dataset.subsets
    assert subset.metadata_file.endswith("piyo/meta_lat.json") and subset.num_repeats == 1
    assert subset.shuffle_caption and subset.keep_tokens == 1 and subset.is_reg is False


def test_example_fine_tuning_is_refused_by_train_db(tmp_path):
    path = write_config(tmp_path, EXAMPLE_FINE_TUNING, ("piyo",))
    with pytest.raises(DatasetConfigError, match="train_db.py does not train on fine-tuning"):
        blueprints_from_args(parse("train_db", "--dataset_config", str(path)), support("train_db"))


def test_json_config_and_missing_paths(tmp_path):
    make_images(tmp_path / "a")
    config = {"general": {"resolution": 512}, "datasets": [{"subsets": [
        {"image_dir": str(tmp_path / "a"), "num_repeats": 2}, {"image_dir": str(tmp_path / "missing")},
    ]}]}
    path = tmp_path / "dataset.JSON"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert load_dataset_config_file(path) == config
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_args(parse("train_network", "--dataset_config", str(path)), support("train_network"))
    (problem,) = info.value.problems
    assert problem.startswith("datasets[0].subsets[1].image_dir: '") and "not found" in problem
    assert "dataset.JSON" in str(info.value).splitlines()[0]


def test_check_dataset_paths(tmp_path):
    image_dir = make_images(tmp_path / "imgs")
    ok = SubsetBlueprint(image_dir=str(image_dir))
    bad = SubsetBlueprint(image_dir=str(image_dir / "img0.png"), metadata_file=str(tmp_path / "nope.json"))
    dataset = DatasetBlueprint(kind="fine_tuning", resolution=(512, 512), subsets=(ok, bad))
    problems = check_dataset_paths([dataset])
    assert problems[0].startswith("datasets[0].subsets[1].image_dir:") and "is a file" in problems[0]
    assert problems[1].startswith("datasets[0].subsets[1].metadata_file:") and "not found" in problems[1]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.toml", None, "file not found"),
        ("bad.toml", "[general\nx = 1", "not valid TOML"),
        ("win.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\hoge"\n', "single quotes"),
        ("bad.json", "{", "not valid JSON"),
        ("config.yaml", "a: 1", "use a .toml or .json file"),
    ],
)
def test_load_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetConfigError, match=expected) as info:
        load_dataset_config_file(path)
    assert name in str(info.value).splitlines()[0]


def test_config_file_warns_that_folder_options_are_ignored(tmp_path, caplog):
    path = write_config(tmp_path, EXAMPLE_DREAMBOOTH, ("train/sls_frog", "reg/frog"))
    args = parse("train_network", "--dataset_config", str(path), "--train_data_dir", "x", "--in_json", "m.json")
    with caplog.at_level(logging.WARNING):
        blueprints_from_args(args, support("train_network"))
    assert "--train_data_dir, --in_json ignored because --dataset_config is given" in caplog.text


# ---------------------------------------------------------------- legacy folders (§5)


def test_folder_name_parsing():
    assert parse_repeat_folder_name("10_sls frog") == (10, "sls frog")
    assert parse_repeat_folder_name("3_a_b") == (3, "a_b")  # later underscores are kept
    assert parse_repeat_folder_name("5") == (5, None)
    assert parse_repeat_folder_name("notanumber_x") is None


def test_legacy_dreambooth_folders(tmp_path):
    make_images(tmp_path / "train" / "10_sls frog")
    make_images(tmp_path / "train" / "5_cpc 1girl", suffix=".JPG")
    (tmp_path / "train" / "notes").mkdir()  # no images: ignored
    make_images(tmp_path / "reg" / "1_frog")
    args = parse("train_db", "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                 "--resolution", "512", "--shuffle_caption")
    (dataset,) = blueprints_from_args(args, support("train_db"))
    assert dataset.kind == "dreambooth" and dataset.resolution == (512, 512)
    found = [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert found == [
        ("10_sls frog", 10, "sls frog", False),
        ("5_cpc 1girl", 5, "cpc 1girl", False),
        ("1_frog", 1, "frog", True),
    ]
    assert all(s.shuffle_caption for s in dataset.subsets)
    assert dataset.subsets[0].origin == "--train_data_dir sub-folder '10_sls frog'"


def test_legacy_misnamed_folders_are_reported_together(tmp_path):
    make_images(tmp_path / "train" / "10_ok")
    make_images(tmp_path / "train" / "notanumber_x")
    make_images(tmp_path / "train" / "0_zero")
    args = parse("train_network", "--train_data_dir", str(tmp_path / "train"), "--resolution", "512")
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_args(args, support("train_network"))
    zero, bad = info.value.problems
    assert "'0_zero' has 0 repeats" in zero
    assert "'notanumber_x' does not start with a repeat count" in bad and "'<repeats>_<identifier> <class>'" in bad
    assert "'10_sls frog'" in bad


def test_legacy_images_directly_in_the_parent(tmp_path):
    make_images(tmp_path / "train")
    args = parse("train_network", "--train_data_dir", str(tmp_path / "train"), "--resolution", "512")
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_args(args, support("train_network"))
    (problem,) = info.value.problems
    assert "holds 2 image(s) itself" in problem and "must be the parent of image folders" in problem


def test_legacy_missing_folders_and_resolution(tmp_path):
    args = parse("train_network", "--train_data_dir", str(tmp_path / "nope"), "--reg_data_dir", str(tmp_path / "nope2"))
    with pytest.raises(DatasetConfigError) as info:
        blueprints_from_args(args, support("train_network"))
    assert [p.split(": ")[-1] for p in info.value.problems] == ["folder not found", "folder not found"]
    make_images(tmp_path / "train" / "2_x")
    with pytest.raises(DatasetConfigError, match="no resolution given; pass --resolution 512"):
        blueprints_from_args(parse("train_network", "--train_data_dir", str(tmp_path / "train")), support("train_network"))
    with pytest.raises(DatasetConfigError, match="no training data given"):
        blueprints_from_args(parse("train_network"), support("train_network"))


def test_legacy_in_json(tmp_path):
    make_images(tmp_path / "imgs")
    meta = tmp_path / "meta.json"
    meta.write_text("{}", encoding="utf-8")
    args = parse("fine_tune", "--train_data_dir", str(tmp_path / "imgs"), "--in_json", str(meta),
                 "--dataset_repeats", "4", "--resolution", "512,640")
    (dataset,) = blueprints_from_args(args, support("fine_tune"))
    (subset,) = dataset.subsets
    assert dataset.kind == "fine_tuning" and dataset.resolution == (512, 640)
    assert (subset.metadata_file, subset.image_dir, subset.num_repeats) == (str(meta), str(tmp_path / "imgs"), 4)
    with pytest.raises(DatasetConfigError, match="fine_tune.py trains from a metadata file"):
        blueprints_from_args(parse("fine_tune", "--train_data_dir", str(tmp_path / "imgs")), support("fine_tune"))
