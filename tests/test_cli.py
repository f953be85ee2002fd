"""The four recipe scripts as a user runs them: --help, --config_file, clear one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from library.args import parse_args, write_config_file
from tests.recipe_infos import SCRIPTS, parser_for

ROOT = Path(__file__).resolve().parent.parent
# Options of reference/cli.md these scripts own so far (the foundation groups).
OWNED = (
    "--pretrained_model_name_or_path",
    "--v2",
    "--v_parameterization",
    "--vae",
    "--clip_skip",
    "--max_token_length",
    "--xformers",
    "--mem_eff_attn",
    "--save_model_as",
    "--save_precision",
    "--config_file",
)


def run_script(script: str, *args: str, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_owned_options(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    for option in OWNED:
        assert option in result.stdout, option
    assert ("--weighted_captions" in result.stdout) == (not script.startswith("train_textual_inversion"))


def test_save_model_as_choices_and_defaults_follow_sd_scripts():
    assert parser_for("train_network").parse_args([]).save_model_as == "safetensors"
    assert parser_for("train_textual_inversion").parse_args([]).save_model_as == "pt"
    assert parser_for("train_db").parse_args([]).save_model_as is None  # source format
    with pytest.raises(SystemExit):
        parser_for("train_network").parse_args(["--save_model_as", "diffusers"])
    assert parser_for("fine_tune").parse_args(["--save_model_as", "diffusers_safetensors"]).save_model_as


def test_config_file_fills_options_and_command_line_wins(tmp_path):
    config = tmp_path / "args.toml"
    config.write_text('[model]\nv2 = true\nclip_skip = 2\n[saving]\nsave_precision = "fp16"\n')
    parser = parser_for("train_network")
    args = parse_args(parser, ["--config_file", str(config), "--clip_skip", "1"])
    assert args.v2 is True and args.save_precision == "fp16"
    assert args.clip_skip == 1


def test_config_file_unknown_key_is_named(tmp_path, capsys):
    config = tmp_path / "args.toml"
    config.write_text("clip_skipp = 2\n")
    with pytest.raises(SystemExit):
        parse_args(parser_for("train_network"), ["--config_file", str(config)])
    assert "clip_skipp" in capsys.readouterr().err


def test_output_config_writes_non_defaults_once(tmp_path):
    target = tmp_path / "saved.toml"
    parser = parser_for("train_db")
    args = parse_args(parser, ["--config_file", str(target), "--output_config", "--clip_skip", "2", "--v2"])
    write_config_file(parser, args)
    import toml

    assert toml.load(target) == {"clip_skip": 2, "v2": True}
    with pytest.raises(SystemExit):
        write_config_file(parser, args)


def test_xformers_without_cuda_is_one_clear_line():
    result = run_script("train_db", "--xformers")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--xformers cannot be used" in result.stderr
