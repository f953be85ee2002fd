"""Prompt files for sample images: .txt lines, .toml and .json forms, problems with their locations."""

from __future__ import annotations

import json

import pytest

from library.training.sample_prompts import (
    SamplePrompt,
    SamplePromptError,
    image_size,
    load_sample_prompts,
    parse_prompt_line,
    read_sample_prompts,
)
from library.training.sampling import SAMPLERS


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_line_with_every_option():
    values, problems, warnings = parse_prompt_line(
        "1girl, (white shirt:1.2) --n low quality, worst quality --w 768 --h 640 --d 42 --l 5.5 --s 28 --ss K_Euler_A",
        known_samplers=SAMPLERS,
    )
    assert problems == [] and warnings == []
    assert values == {
        "prompt": "1girl, (white shirt:1.2)",
        "negative_prompt": "low quality, worst quality",
        "width": 768,
        "height": 640,
        "seed": 42,
        "scale": 5.5,
        "sample_steps": 28,
        "sample_sampler": "k_euler_a",
    }


def test_txt_option_names_are_case_insensitive_and_other_architectures_are_ignored():
    values, problems, warnings = parse_prompt_line("cat --W 256 --N dog --g 3.5 --cn ctrl.png --fs 3 --ctr 0.2 --rcfg 1")
    assert problems == [] and warnings == []
    assert values["width"] == 256 and values["negative_prompt"] == "dog"
    prompt = load_prompt_from_values(values)
    assert prompt.ignored == {"guidance_scale": "3.5", "controlnet_image": "ctrl.png", "flow_shift": "3", "cfg_trunc_ratio": "0.2", "renorm_cfg": "1"}


def load_prompt_from_values(values):
    from library.training.sample_prompts import _prompt_from_values

    return _prompt_from_values(0, values, "here")


def test_txt_steps_are_clamped_and_defaults_apply():
    values, problems, _ = parse_prompt_line("a --s 5000")
    assert problems == [] and values["sample_steps"] == 1000
    values, problems, _ = parse_prompt_line("a --s 0")
    assert problems == [] and values["sample_steps"] == 1
    prompt = load_prompt_from_values(parse_prompt_line("just a prompt")[0])
    assert (prompt.width, prompt.height, prompt.scale, prompt.sample_steps, prompt.seed, prompt.negative_prompt, prompt.sample_sampler) == (
        512, 512, 7.5, 30, None, None, None
    )


def test_txt_quirks_follow_upstream():
    # a literal " --" in the text starts an option; a line of options only has an empty prompt
    values, _, warnings = parse_prompt_line("a cat --- dog")
    assert values["prompt"] == "a cat" and len(warnings) == 1 and "unknown option" in warnings[0]
    values, problems, _ = parse_prompt_line("--n ugly --d 3")
    assert problems == [] and values == {"prompt": "", "negative_prompt": "ugly", "seed": 3}
    values, problems, _ = parse_prompt_line("a--w 100")  # no space before --: part of the prompt
    assert values == {"prompt": "a--w 100"}


@pytest.mark.parametrize(
    "line, expected",
    [
        ("a --w abc", "--w abc: "),
        ("a --h 12.5", "--h 12.5: "),
        ("a --d -1", "--d -1: must be a non-negative integer"),
        ("a --l much", "--l much: "),
        ("a --l nan", "--l nan: not a finite number"),
        ("a --s x", "--s x: "),
        ("a --ss nosuch", "--ss nosuch: unknown sampler 'nosuch'"),
        ("a --w", "--w needs a value"),
        ("a --w 0", "--w 0: must be a positive integer"),
    ],
)
def test_txt_bad_values_are_problems(line, expected):
    _, problems, _ = parse_prompt_line(line, known_samplers=SAMPLERS)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_txt_file_comments_blank_lines_and_line_numbers(tmp_path):
    path = write(
        tmp_path, "p.txt",
        "\ufeff# prompt 1\n"
        "masterpiece, 1girl --n lowres --w 768 --h 768 --d 1 --l 7.5 --s 28\n"
        "\n"
        "   # indented: a prompt, as upstream\n"
        "1boy --w 576 --h 832 --d 2 --l 5.5 --s 40 --ss euler_a\n",
    )
    prompts = load_sample_prompts(path, known_samplers=SAMPLERS)
    assert [p.prompt for p in prompts] == ["masterpiece, 1girl", "# indented: a prompt, as upstream", "1boy"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert [p.location for p in prompts] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert prompts[0] == SamplePrompt(0, "masterpiece, 1girl", "lowres", 768, 768, 1, 7.5, 28, None, f"{path}:2")
    assert (prompts[2].width, prompts[2].height, prompts[2].sample_sampler) == (576, 832, "euler_a")


def test_txt_file_problems_name_file_and_line(tmp_path):
    path = write(tmp_path, "p.txt", "# c\nfine --w 64\nbad --w wide\n\nworse --ss nope --d x\n")
    with pytest.raises(SamplePromptError) as info:
        read_sample_prompts(path, known_samplers=SAMPLERS)
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:3: --w wide")
    assert problems[1].startswith(f"{path}:5: --ss nope: unknown sampler")
    assert problems[2].startswith(f"{path}:5: --d x")


def test_unknown_txt_option_is_a_warning_with_its_line(tmp_path):
    path = write(tmp_path, "p.txt", "a cat --wdith 512\n")
    prompts, warnings = read_sample_prompts(path)
    assert prompts[0].width == 512 and len(warnings) == 1 and warnings[0].startswith(f"{path}:1: unknown option '--wdith 512'")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(SamplePromptError, match="file not found"):
        read_sample_prompts(tmp_path / "nope.txt")
    other = write(tmp_path, "p.yaml", "a: b")
    with pytest.raises(SamplePromptError, match=r"must end in \.txt, \.toml or \.json"):
        read_sample_prompts(other)


def test_toml_subsets_take_defaults_and_override_them(tmp_path):
    path = write(
        tmp_path, "p.toml",
        """
[prompt]
negative_prompt = "lowres, bad hands"
width = 512
height = 768
sample_steps = 28
scale = 7.0
sample_sampler = "euler_a"

  [[prompt.subset]]
  prompt = "masterpiece, 1girl, white shirt"
  seed = 1

  [[prompt.subset]]
  prompt = "1boy, business suit"
  seed = 2
  width = 640
  sample_sampler = "dpmsolver++"
  negative_prompt = "blurry"
""",
    )
    first, second = load_sample_prompts(path, known_samplers=SAMPLERS)
    assert first == SamplePrompt(0, "masterpiece, 1girl, white shirt", "lowres, bad hands", 512, 768, 1, 7.0, 28, "euler_a", f"{path}: [[prompt.subset]] #1")
    assert (second.index, second.width, second.height, second.seed, second.sample_sampler, second.negative_prompt) == (
        1, 640, 768, 2, "dpmsolver++", "blurry"
    )


def test_toml_problems(tmp_path):
    bad = write(tmp_path, "bad.toml", "[prompt]\nwidth = 'wide'\n[[prompt.subset]]\nprompt = 'a'\nseed = -4\nscale = 'x'\n")
    with pytest.raises(SamplePromptError) as info:
        read_sample_prompts(bad)
    problems = info.value.problems
    assert problems[0].startswith(f"{bad}: [prompt]: width = 'wide'")
    assert any(p.startswith(f"{bad}: [[prompt.subset]] #1: seed = -4") for p in problems)
    assert any(p.startswith(f"{bad}: [[prompt.subset]] #1: scale = 'x'") for p in problems)
    broken = write(tmp_path, "broken.toml", "[prompt]\nwidth = \n")
    with pytest.raises(SamplePromptError, match=rf"{broken}:\d+: not valid TOML"):
        read_sample_prompts(broken)
    no_table = write(tmp_path, "empty.toml", "width = 3\n")
    with pytest.raises(SamplePromptError, match=r"needs a \[prompt\] table"):
        read_sample_prompts(no_table)


def test_toml_single_prompt_table_and_unknown_keys(tmp_path):
    path = write(tmp_path, "one.toml", "[prompt]\nprompt = 'a cat'\nseed = 9\nwidht = 3\n")
    prompts, warnings = read_sample_prompts(path)
    assert [(p.prompt, p.seed) for p in prompts] == [("a cat", 9)]
    assert len(warnings) == 1 and "unknown key 'widht'" in warnings[0]


def test_json_mixes_dicts_and_txt_lines(tmp_path):
    path = write(
        tmp_path, "p.json",
        json.dumps([
            {"prompt": "masterpiece, 1girl", "negative_prompt": "lowres", "width": 512, "height": 512, "seed": 42,
             "sample_steps": 30, "scale": 7.5},
            "1boy, business suit --n lowres --d 7 --ss k_euler",
        ]),
    )
    first, second = load_sample_prompts(path, known_samplers=SAMPLERS)
    assert first == SamplePrompt(0, "masterpiece, 1girl", "lowres", 512, 512, 42, 7.5, 30, None, f"{path}: entry 1")
    assert (second.index, second.prompt, second.negative_prompt, second.seed, second.sample_sampler) == (
        1, "1boy, business suit", "lowres", 7, "k_euler"
    )


def test_json_problems_name_the_entry(tmp_path):
    path = write(tmp_path, "p.json", json.dumps(["ok", 5, {"prompt": "x", "width": "big"}, "y --s many"]))
    with pytest.raises(SamplePromptError) as info:
        read_sample_prompts(path)
    problems = info.value.problems
    assert problems[0] == f"{path}: entry 2: must be a string or an object, not int"
    assert problems[1].startswith(f"{path}: entry 3: width = 'big'")
    assert problems[2].startswith(f"{path}: entry 4: --s many")
    not_list = write(tmp_path, "d.json", '{"prompt": "a"}')
    with pytest.raises(SamplePromptError, match="must hold a JSON list"):
        read_sample_prompts(not_list)
    broken = write(tmp_path, "b.json", '[\n"a",\n')
    with pytest.raises(SamplePromptError, match=rf"{broken}:\d+: not valid JSON"):
        read_sample_prompts(broken)


@pytest.mark.parametrize("value, expected", [(512, 512), (575, 568), (64, 64), (70, 64), (10, 64), (1, 64), (768, 768)])
def test_image_size_floors_to_multiples_of_8_with_a_minimum_of_64(value, expected):
    assert image_size(value) == expected


def test_the_shipped_example_parses_cleanly():
    from tests.training_helpers import ROOT

    prompts, warnings = read_sample_prompts(ROOT / "examples" / "sample_prompts.txt", known_samplers=SAMPLERS)
    assert warnings == [] and len(prompts) == 3
    assert prompts[0].seed == 1 and prompts[1].sample_sampler == "euler_a" and prompts[2].seed is None
