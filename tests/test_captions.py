"""Caption pipeline (dataset-config.md §6, §8): each option alone, their order, reproducibility, caption files."""

from __future__ import annotations

import random

import pytest

from library.data.captions import (
    CaptionFileError,
    CaptionSettings,
    caption_file_candidates,
    count_tags,
    process_caption,
    read_caption_file,
    resolve_token_warmup_step,
)

TAGS = "t0, t1, t2, t3, t4, t5"


def run(caption: str, seed: int = 0, **options) -> str:
    epoch = options.pop("epoch", 1)
    step = options.pop("step", 0)
    return process_caption(caption, CaptionSettings(**options), random.Random(seed), epoch=epoch, step=step)


def tags_of(caption: str) -> list[str]:
    return caption.split(", ")


# --- defaults, prefix / suffix -------------------------------------------------------------------


def test_defaults_leave_a_single_line_caption_untouched():
    assert run("a photo of sks dog,  on grass ") == "a photo of sks dog,  on grass "


def test_without_wildcard_only_the_first_line_is_used():
    assert run("first line\nsecond line") == "first line"


def test_prefix_and_suffix_are_joined_with_a_space():
    assert run("dog", caption_prefix="sks", caption_suffix="best quality") == "sks dog best quality"
    assert run("dog", caption_prefix="sks") == "sks dog"
    assert run("dog", caption_suffix="tail") == "dog tail"
    assert run("dog", caption_prefix="", caption_suffix=None) == "dog"


def test_prefix_and_suffix_apply_to_every_line_of_a_multi_line_caption():
    seen = {run("a\nb", seed, enable_wildcard=True, caption_prefix="P", caption_suffix="S") for seed in range(40)}
    assert seen == {"P a S", "P b S"}
    assert run("a\nb", caption_suffix="S") == "a S"  # the suffix is not lost with the other lines


# --- caption dropout -----------------------------------------------------------------------------


def test_dropout_comes_after_prefix_so_the_whole_caption_is_dropped():
    assert run("dog", caption_prefix="sks", caption_dropout_rate=1.0) == ""


def test_dropout_rate_drops_about_that_fraction_reproducibly():
    settings = CaptionSettings(caption_dropout_rate=0.3)
    rng = random.Random(123)
    outputs = [process_caption("dog", settings, rng) for _ in range(2000)]
    assert 0.25 < outputs.count("") / len(outputs) < 0.35
    rng = random.Random(123)
    assert [process_caption("dog", settings, rng) for _ in range(2000)] == outputs


def test_dropout_every_n_epochs_uses_one_based_epochs():
    dropped = [epoch for epoch in range(1, 10) if run("dog", caption_dropout_every_n_epochs=3, epoch=epoch) == ""]
    assert dropped == [3, 6, 9]
    assert run("dog", caption_dropout_every_n_epochs=2, epoch=1) == "dog"
    assert run("dog", caption_dropout_every_n_epochs=1, epoch=1) == ""


def test_dropped_caption_skips_the_remaining_steps():
    assert run("a, b ||| c", caption_dropout_every_n_epochs=1, keep_tokens_separator="|||", shuffle_caption=True) == ""


def test_unused_options_draw_nothing_from_the_rng():
    rng = random.Random(5)
    state = rng.getstate()
    process_caption(TAGS, CaptionSettings(keep_tokens=2, caption_dropout_every_n_epochs=4), rng, epoch=2)
    assert rng.getstate() == state


# --- wildcards -----------------------------------------------------------------------------------


def test_wildcard_picks_each_option():
    seen = {run("{simple|white} background", seed, enable_wildcard=True) for seed in range(40)}
    assert seen == {"simple background", "white background"}


def test_double_braces_are_literal_braces():
    assert run("1girl, {{retro style}}", enable_wildcard=True) == "1girl, {retro style}"
    assert run("{{a|b}}", enable_wildcard=True) == "{a|b}"
    assert run("{}", enable_wildcard=True) == "{}"


def test_wildcard_off_leaves_braces_alone():
    assert run("{a|b}") == "{a|b}"


def test_multi_line_caption_chooses_a_random_line_then_expands_it():
    seen = {run("x {1|2}\ny", seed, enable_wildcard=True) for seed in range(60)}
    assert seen == {"x 1", "x 2", "y"}


def test_wildcards_expand_before_shuffle_so_chosen_text_becomes_tags():
    for seed in range(30):
        out = run("{red, blue|green}, tag", seed, enable_wildcard=True, shuffle_caption=True)
        assert sorted(tags_of(out)) in (["blue", "red", "tag"], ["green", "tag"])


# --- keep tokens, shuffle, warm-up, tag dropout ---------------------------------------------------


def test_shuffle_permutes_tags_and_joins_with_comma_space():
    outputs = {run("a,b ,c, d", seed, shuffle_caption=True) for seed in range(30)}
    assert all(sorted(tags_of(o)) == ["a", "b", "c", "d"] for o in outputs)
    assert len(outputs) > 5


def test_shuffle_is_reproducible_for_a_seed():
    settings = CaptionSettings(shuffle_caption=True, caption_tag_dropout_rate=0.2, enable_wildcard=True)
    sequence = [process_caption("{p|q}, " + TAGS, settings, random.Random(9)) for _ in range(3)]
    assert len(set(sequence)) == 1
    assert {process_caption(TAGS, settings, random.Random(s)) for s in range(10)} != {sequence[0]}


def test_keep_tokens_with_shuffle_keeps_the_first_n_tags_in_place():
    for seed in range(30):
        out = tags_of(run(TAGS, seed, shuffle_caption=True, keep_tokens=2))
        assert out[:2] == ["t0", "t1"]
        assert sorted(out[2:]) == ["t2", "t3", "t4", "t5"]


def test_keep_tokens_alone_changes_nothing():
    assert run(TAGS, keep_tokens=2) == TAGS


def test_custom_separator_splits_but_output_joins_with_comma_space():
    out = run("a;b;c", shuffle_caption=True, caption_separator=";")
    assert sorted(tags_of(out)) == ["a", "b", "c"]


def test_empty_tags_are_removed_when_tags_are_rewritten():
    assert sorted(tags_of(run("a,, b,", shuffle_caption=True))) == ["a", "b"]


def test_keep_tokens_separator_fixes_prefix_and_suffix_parts():
    caption = "1girl, miku ||| stage, mic, smile ||| best quality, rating: general"
    for seed in range(30):
        out = tags_of(run(caption, seed, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5))
        assert out[:2] == ["1girl", "miku"]
        assert out[-2:] == ["best quality", "rating: general"]
        assert sorted(out[2:-2]) == ["mic", "smile", "stage"]


def test_keep_tokens_separator_marker_is_removed_even_without_shuffle():
    out = run("a, b ||| c, d ||| e", keep_tokens_separator="|||")
    assert out == "a, b, c, d, e"


def test_keep_tokens_separator_absent_from_caption_falls_back_to_keep_tokens():
    for seed in range(10):
        out = tags_of(run(TAGS, seed, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1))
        assert out[0] == "t0"


def test_prefix_and_suffix_can_carry_the_keep_separator():
    for seed in range(20):
        out = run(
            "x, y, z",
            seed,
            caption_prefix="1girl, miku |||",
            caption_suffix=", anime ||| masterpiece",
            keep_tokens_separator="|||",
            shuffle_caption=True,
        )
        tags = tags_of(out)
        assert tags[:2] == ["1girl", "miku"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["anime", "x", "y", "z"]


@pytest.mark.parametrize(("step", "expected"), [(0, 1), (1, 1), (2, 2), (5, 3), (9, 5), (10, 6), (50, 6)])
def test_token_warmup_counts(step, expected):
    # 6 flexible tags, min 1, 10 warm-up steps: floor(step * 5 / 10) + 1 tags until step 10.
    out = run(TAGS, token_warmup_min=1, token_warmup_step=10, step=step)
    assert tags_of(out) == [f"t{i}" for i in range(expected)]


def test_token_warmup_counts_only_flexible_tags():
    out = run(TAGS, keep_tokens=2, token_warmup_min=1, token_warmup_step=8, step=4)
    assert tags_of(out) == ["t0", "t1", "t2", "t3"]  # 2 fixed + floor(4 * 3 / 8) + 1 = 2 flexible


def test_token_warmup_takes_the_first_tags_before_shuffling():
    for seed in range(20):
        out = run(TAGS, seed, shuffle_caption=True, token_warmup_min=3, token_warmup_step=100, step=0)
        assert sorted(tags_of(out)) == ["t0", "t1", "t2"]


def test_resolve_token_warmup_step():
    assert resolve_token_warmup_step(0.5, 1000) == 500
    assert resolve_token_warmup_step(0.333, 10) == 3
    assert resolve_token_warmup_step(0, 1000) == 0
    assert resolve_token_warmup_step(200, 1000) == 200
    assert resolve_token_warmup_step(1, 1000) == 1
    with pytest.raises(ValueError):
        resolve_token_warmup_step(-1, 10)


def test_tag_dropout():
    assert run(TAGS, caption_tag_dropout_rate=1.0, keep_tokens=2) == "t0, t1"
    outputs = [tags_of(run(TAGS, seed, caption_tag_dropout_rate=0.5)) for seed in range(200)]
    lengths = [len([t for t in o if t]) for o in outputs]
    assert 2.5 < sum(lengths) / len(lengths) < 3.5
    assert all(o == sorted(o) for o in outputs if o != [""])  # dropout alone keeps order


def test_secondary_separator_groups_tags_and_is_replaced_after_the_join():
    for seed in range(20):
        out = run("a, b;;;c, d", seed, shuffle_caption=True, secondary_separator=";;;")
        assert sorted(tags_of(out)) == ["a", "b,c", "d"]
    assert run("sky;;;cloud, day", secondary_separator=";;;") == "sky,cloud, day"


def test_secondary_separator_group_drops_as_one_tag():
    outputs = {run("b;;;c, d", seed, caption_tag_dropout_rate=0.5, secondary_separator=";;;") for seed in range(40)}
    assert outputs <= {"b,c, d", "b,c", "d", ""}
    assert "b" not in outputs and "c, d" not in outputs


def test_settings_are_validated():
    with pytest.raises(ValueError, match="resolve_token_warmup_step"):
        CaptionSettings(token_warmup_step=0.5)
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        CaptionSettings(caption_dropout_rate=1.5)
    with pytest.raises(ValueError, match="keep_tokens"):
        CaptionSettings(keep_tokens=-1)
    with pytest.raises(ValueError, match="caption_separator"):
        CaptionSettings(caption_separator="")


# --- caption files -------------------------------------------------------------------------------


def test_read_caption_file_first_line_or_all_lines(tmp_path):
    path = tmp_path / "img.txt"
    path.write_bytes(b"  tag a, tag b  \r\n\r\n second line \n")
    assert read_caption_file(path, enable_wildcard=False) == "tag a, tag b"
    assert read_caption_file(path, enable_wildcard=True) == "tag a, tag b\nsecond line"


def test_read_caption_file_ignores_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "img.txt"
    path.write_bytes("\ufeffキャプション".encode("utf-8"))
    assert read_caption_file(path, enable_wildcard=False) == "キャプション"


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n \n"])
def test_empty_caption_file_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.caption"
    path.write_bytes(content)
    with pytest.raises(CaptionFileError, match="empty") as err:
        read_caption_file(path, enable_wildcard=False)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)


def test_non_utf8_caption_file_is_an_error_with_the_fix(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8") as err:
        read_caption_file(path, enable_wildcard=True)
    assert str(path) in str(err.value) and "Re-save" in str(err.value)


def test_caption_file_candidates(tmp_path):
    image = tmp_path / "photo.png"
    assert caption_file_candidates(image, ".txt") == [tmp_path / "photo.txt"]
    assert caption_file_candidates(image, "caption") == [tmp_path / "photo.caption"]
    assert caption_file_candidates(tmp_path / "my.photo.jpg", ".txt") == [tmp_path / "my.photo.txt"]


def test_face_crop_names_also_try_the_base_name(tmp_path):
    image = tmp_path / "girl_a_120_80_64_64.png"
    assert caption_file_candidates(image, ".txt") == [tmp_path / "girl_a_120_80_64_64.txt", tmp_path / "girl_a.txt"]
    # four fields are not a face-crop name; a name with nothing before the numbers has no base name
    assert caption_file_candidates(tmp_path / "a_1_2_3.png", ".txt") == [tmp_path / "a_1_2_3.txt"]
    assert caption_file_candidates(tmp_path / "_1_2_3_4.png", ".txt") == [tmp_path / "_1_2_3_4.txt"]


def test_count_tags():
    counts = count_tags(["Dog, grass , ,sky", "dog,SKY", ""])
    assert counts == {"dog": 2, "grass": 1, "sky": 2}
