"""Caption weighting syntax, long-caption chunking, clip_skip and weighted encoding."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from library.models.prompt_weights import parse_prompt_weights, strip_prompt_weights
from library.models.text_encoding import (
    TextEncoding,
    apply_token_weights,
    encode,
    encode_prompts,
    encode_weighted,
    join_chunk_states,
    run_text_encoder,
    split_into_chunks,
    token_window,
    tokenize,
    tokenize_weighted,
)
from library.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer

BOS, EOS, SD2_PAD = 49406, 49407, 0
LONG_CAPTION = ", ".join(f"tag{i} {word}" for i, word in enumerate(["red", "blue", "green", "cat", "dog", "tree"] * 20))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd1_tokenizer(tmp_path_factory):
    return load_clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok_sd1")))


@pytest.fixture(scope="module")
def sd2_tokenizer(tmp_path_factory):
    return load_clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok_sd2"), v2=True))


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return CLIPTextModel(config).eval()


def content_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def flat_ids(tokenizer, caption: str, max_token_length: int | None) -> torch.Tensor:
    window = token_window(max_token_length)
    return tokenizer(caption, padding="max_length", truncation=True, max_length=window, return_tensors="pt").input_ids[0]


# --------------------------------------------------------------------------- prompt weight parsing


def assert_weights(result, expected):
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("", []),
        ("(red)", [("red", 1.1)]),
        ("[red]", [("red", 1 / 1.1)]),
        ("(red:1.23)", [("red", 1.23)]),
        ("(red: 1.5 )", [("red", 1.5)]),
        ("(red:.5)", [("red", 0.5)]),
        ("(red:-1)", [("red", -1.0)]),
        ("(red:2.)", [("red", 2.0)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ],
)
def test_parse_basic_syntax(text, expected):
    assert_weights(parse_prompt_weights(text), expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("((red))", [("red", 1.1 * 1.1)]),
        ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
        ("([red])", [("red", 1.0)]),
        ("((red:1.5))", [("red", 1.5 * 1.1)]),
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
        ("[a (b) c]", [("a ", 1 / 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
    ],
)
def test_parse_nesting_multiplies(text, expected):
    assert_weights(parse_prompt_weights(text), expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\(red\)", [("(red)", 1.0)]),
        (r"\[red\]", [("[red]", 1.0)]),
        (r"back\\slash", [("back\\slash", 1.0)]),
        (r"(a\)b)", [("a)b", 1.1)]),
        (r"(a\\)", [("a\\", 1.1)]),
        (r"lone\ backslash", [("lone\\ backslash", 1.0)]),
    ],
)
def test_parse_escapes(text, expected):
    assert_weights(parse_prompt_weights(text), expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a (red circle", [("a ", 1.0), ("red circle", 1.1)]),
        ("a [red circle", [("a ", 1.0), ("red circle", 1 / 1.1)]),
        ("((a", [("a", 1.21)]),
        ("(a (b:2)", [("a ", 1.1), ("b", 2.0 * 1.1)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("red:1.5) x", [("red:1.5) x", 1.0)]),
        ("[red:1.5)]", [("red:1.5)", 1 / 1.1)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
        ("time: 12:30", [("time: 12:30", 1.0)]),
        ("()[]", []),
    ],
)
def test_parse_malformed_input_degrades_gracefully(text, expected):
    assert_weights(parse_prompt_weights(text), expected)


def test_parse_merges_adjacent_equal_weights():
    assert_weights(parse_prompt_weights("(a)(b) c (d:1) e"), [("ab", 1.1), (" c d e", 1.0)])


def test_strip_prompt_weights():
    assert strip_prompt_weights(r"a ((red:1.3)) [big] \(x\) circle") == "a red big (x) circle"


# --------------------------------------------------------------------------- settings


def test_settings_validate_and_report_sizes():
    assert TextEncoding().num_positions == 77
    assert TextEncoding(max_token_length=75).num_chunks == 1
    assert TextEncoding(max_token_length=150).num_positions == 152
    assert TextEncoding(max_token_length=225).num_positions == 227
    with pytest.raises(ValueError):
        TextEncoding(max_token_length=100)
    with pytest.raises(ValueError):
        TextEncoding(clip_skip=0)


def test_settings_from_upstream_args():
    args = argparse.Namespace(max_token_length=225, clip_skip=2, v2=True, weighted_captions=True)
    assert TextEncoding.from_args(args) == TextEncoding(225, 2, True, True)
    assert TextEncoding.from_args(argparse.Namespace()) == TextEncoding()


# --------------------------------------------------------------------------- tokenizing / chunking


@pytest.mark.parametrize("max_token_length, chunks", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_tokenize_shapes(sd1_tokenizer, max_token_length, chunks):
    ids = tokenize(sd1_tokenizer, [LONG_CAPTION, "a cat"], max_token_length)
    assert ids.shape == (2, chunks, 77) and ids.dtype == torch.long


def test_sd1_long_caption_chunks_follow_sd_scripts_rule(sd1_tokenizer):
    flat = flat_ids(sd1_tokenizer, LONG_CAPTION, 225)
    assert len(content_ids(sd1_tokenizer, LONG_CAPTION)) > 225  # really truncated
    chunks = tokenize(sd1_tokenizer, [LONG_CAPTION], 225)[0]
    for k in range(3):
        expected = torch.cat([flat[:1], flat[1 + 75 * k : 76 + 75 * k], flat[-1:]])
        assert torch.equal(chunks[k], expected)
        assert chunks[k, 0] == BOS and chunks[k, -1] == EOS


def test_sd1_short_caption_second_chunk_is_bos_eos_padding(sd1_tokenizer):
    chunks = tokenize(sd1_tokenizer, ["a photo of a cat"], 150)[0]
    assert chunks[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert chunks[1].tolist() == [BOS] + [EOS] * 76


def test_sd2_short_caption_chunks(sd2_tokenizer):
    chunks = tokenize(sd2_tokenizer, ["a photo of a cat"], 150)[0]
    assert chunks[0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] + [SD2_PAD] * 70
    assert chunks[1].tolist() == [BOS, EOS] + [SD2_PAD] * 75


def test_sd2_chunks_end_in_eos_when_cut_mid_caption(sd2_tokenizer):
    words = " ".join(["cat"] * 100)  # 100 tokens: 75 in chunk 1, 25 in chunk 2
    chunks = tokenize(sd2_tokenizer, [words], 225)[0]
    cat = content_ids(sd2_tokenizer, "cat")[0]
    assert chunks[0].tolist() == [BOS] + [cat] * 75 + [EOS]
    assert chunks[1].tolist() == [BOS] + [cat] * 25 + [EOS] + [SD2_PAD] * 50
    assert chunks[2].tolist() == [BOS, EOS] + [SD2_PAD] * 75


def test_sd2_caption_filling_a_chunk_exactly(sd2_tokenizer):
    cat = content_ids(sd2_tokenizer, "cat")[0]
    chunks = tokenize(sd2_tokenizer, [" ".join(["cat"] * 75)], 150)[0]
    assert chunks[0].tolist() == [BOS] + [cat] * 75 + [EOS]
    assert chunks[1].tolist() == [BOS, EOS] + [SD2_PAD] * 75


def test_sd2_truncated_caption(sd2_tokenizer):
    chunks = tokenize(sd2_tokenizer, [LONG_CAPTION], 150)[0]
    assert (chunks[:, 0] == BOS).all() and (chunks[:, -1] == EOS).all()
    assert SD2_PAD not in chunks.tolist()


def test_split_into_chunks_rejects_bad_length():
    with pytest.raises(ValueError):
        split_into_chunks(torch.zeros(1, 100, dtype=torch.long), BOS, EOS, EOS)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("max_token_length, positions", [(None, 77), (75, 77), (150, 152), (225, 227)])
def test_encode_shapes(sd1_tokenizer, text_encoder, max_token_length, positions):
    settings = TextEncoding(max_token_length=max_token_length)
    with torch.no_grad():
        states = encode(text_encoder, tokenize(sd1_tokenizer, [LONG_CAPTION, "a cat"], max_token_length), settings)
    assert states.shape == (2, positions, 32)


def test_single_chunk_equals_plain_encoder_output(sd1_tokenizer, text_encoder):
    ids = tokenize(sd1_tokenizer, ["a photo of a cat"], None)
    with torch.no_grad():
        states = encode(text_encoder, ids, TextEncoding())
        plain = text_encoder(ids[:, 0]).last_hidden_state
    assert torch.equal(states, plain)


def test_long_caption_concatenation_matches_per_chunk_runs(sd1_tokenizer, text_encoder):
    ids = tokenize(sd1_tokenizer, [LONG_CAPTION], 150)
    with torch.no_grad():
        states = encode(text_encoder, ids, TextEncoding(max_token_length=150))[0]
        first = text_encoder(ids[:, 0]).last_hidden_state[0]
        second = text_encoder(ids[:, 1]).last_hidden_state[0]
    by_hand = torch.cat([first[:1], first[1:76], second[1:76], second[76:]])
    assert by_hand.shape == (152, 32)
    torch.testing.assert_close(states, by_hand, rtol=1e-5, atol=1e-6)


def test_join_chunk_states_layout():
    states = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(1, 2, 77, 3)[..., :1].expand(1, 2, 77, 4)
    joined = join_chunk_states(states)[0, :, 0]
    flat = states[0, :, :, 0]
    assert joined.tolist() == [flat[0, 0]] + flat[0, 1:76].tolist() + flat[1, 1:76].tolist() + [flat[1, 76]]


def test_batched_encode_matches_single_captions(sd1_tokenizer, text_encoder):
    settings = TextEncoding(max_token_length=150)
    captions = [LONG_CAPTION, "a cat"]
    with torch.no_grad():
        batched = encode(text_encoder, tokenize(sd1_tokenizer, captions, 150), settings)
        single = [encode(text_encoder, tokenize(sd1_tokenizer, [c], 150), settings)[0] for c in captions]
    torch.testing.assert_close(batched, torch.stack(single), rtol=1e-5, atol=1e-6)


def test_clip_skip_two_uses_penultimate_layer_with_final_norm(sd1_tokenizer, text_encoder):
    ids = tokenize(sd1_tokenizer, ["a photo of a cat"], None)
    with torch.no_grad():
        skipped = encode(text_encoder, ids, TextEncoding(clip_skip=2))
        default = encode(text_encoder, ids, TextEncoding())
        last_layer = encode(text_encoder, ids, TextEncoding(clip_skip=1))
        hidden = text_encoder(ids[:, 0], output_hidden_states=True).hidden_states
        expected = text_encoder.final_layer_norm(hidden[-2])
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(skipped, default)
    torch.testing.assert_close(last_layer, default)


def test_clip_skip_beyond_depth_raises(sd1_tokenizer, text_encoder):
    ids = tokenize(sd1_tokenizer, ["a cat"], None)
    with torch.no_grad(), pytest.raises(ValueError):
        encode(text_encoder, ids, TextEncoding(clip_skip=7))


def test_clip_skip_finds_layer_norm_under_text_model(sd1_tokenizer, text_encoder):
    """transformers 4.x keeps the layers under .text_model; the wrapper mimics that layout."""

    class Legacy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

        def forward(self, *args, **kwargs):
            return self.text_model(*args, **kwargs)

    ids = tokenize(sd1_tokenizer, ["a cat"], None)[:, 0]
    with torch.no_grad():
        legacy = run_text_encoder(Legacy(text_encoder), ids, clip_skip=2)
        modern = run_text_encoder(text_encoder, ids, clip_skip=2)
    assert torch.equal(legacy, modern)


def test_encode_rejects_wrong_chunk_count(sd1_tokenizer, text_encoder):
    ids = tokenize(sd1_tokenizer, ["a cat"], 150)
    with pytest.raises(ValueError):
        encode(text_encoder, ids, TextEncoding(max_token_length=225))


def test_encode_leaves_gradients_to_the_caller(sd1_tokenizer, text_encoder):
    states = encode(text_encoder, tokenize(sd1_tokenizer, ["a cat"], 150), TextEncoding(max_token_length=150))
    assert states.requires_grad


# --------------------------------------------------------------------------- weighted captions


def _position_of(tokenizer, caption_without_weights: str, word: str, max_token_length=None) -> int:
    flat = flat_ids(tokenizer, caption_without_weights, max_token_length).tolist()
    return flat.index(content_ids(tokenizer, word)[0])


def assert_only_position_scaled(weighted, plain, position, factor):
    others = torch.ones(weighted.shape[1], dtype=torch.bool)
    others[position] = False
    assert torch.equal(weighted[:, others], plain[:, others])
    torch.testing.assert_close(weighted[:, position], plain[:, position] * factor)
    assert not torch.allclose(weighted[:, position], plain[:, position])


@pytest.mark.parametrize(
    "weighted_caption, factor",
    [("a (red:1.5) circle", 1.5), ("a ((red)) circle", 1.21), ("a [red] circle", 1 / 1.1)],
)
@pytest.mark.parametrize("max_token_length", [None, 150])
def test_weight_changes_exactly_the_weighted_token(sd1_tokenizer, text_encoder, weighted_caption, factor, max_token_length):
    settings = TextEncoding(max_token_length=max_token_length, weighted=True)
    with torch.no_grad():
        weighted = encode_weighted(sd1_tokenizer, text_encoder, [weighted_caption], settings)
        plain = encode(text_encoder, tokenize(sd1_tokenizer, ["a red circle"], max_token_length), settings)
    position = _position_of(sd1_tokenizer, "a red circle", "red", max_token_length)
    assert position == 2
    assert_only_position_scaled(weighted, plain, position, factor)


def test_weight_in_second_chunk_lands_on_the_right_position(sd1_tokenizer, text_encoder):
    prefix = " ".join(["cat"] * 90)
    settings = TextEncoding(max_token_length=150, weighted=True)
    with torch.no_grad():
        weighted = encode_weighted(sd1_tokenizer, text_encoder, [prefix + " (red:2) dog"], settings)
        plain = encode(text_encoder, tokenize(sd1_tokenizer, [prefix + " red dog"], 150), settings)
    position = _position_of(sd1_tokenizer, prefix + " red dog", "red", 150)
    assert position == 91
    assert_only_position_scaled(weighted, plain, position, 2.0)


@pytest.mark.parametrize("tokenizer_name", ["sd1_tokenizer", "sd2_tokenizer"])
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_unweighted_caption_through_weighted_path_is_identical(request, tokenizer_name, text_encoder, max_token_length):
    tokenizer = request.getfixturevalue(tokenizer_name)
    captions = [LONG_CAPTION, "a photo of a cat", "", " ".join(["cat"] * 75)]
    ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
    assert torch.equal(ids, tokenize(tokenizer, captions, max_token_length))
    assert torch.equal(weights, torch.ones(len(captions), token_window(max_token_length)))


def test_weighted_truncation_keeps_weights_aligned(sd1_tokenizer):
    caption = " ".join(["cat"] * 74) + " (red:3) " + " ".join(["dog"] * 10)  # 'red' is content token 75
    ids, weights = tokenize_weighted(sd1_tokenizer, [caption], None)
    assert weights[0, 75] == pytest.approx(3.0)
    assert weights[0].tolist().count(1.0) == 76
    assert ids[0, 0, 75] == content_ids(sd1_tokenizer, "red")[0] and ids[0, 0, 76] == EOS


def test_sd2_weighted_chunking(sd2_tokenizer):
    ids, weights = tokenize_weighted(sd2_tokenizer, ["a (photo:1.4) of a cat"], 150)
    assert ids[0, 0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] + [SD2_PAD] * 70
    assert ids[0, 1].tolist() == [BOS, EOS] + [SD2_PAD] * 75
    assert weights[0, :4].tolist() == pytest.approx([1.0, 1.0, 1.4, 1.0])


def test_weights_follow_encoder_dtype(sd1_tokenizer, text_encoder):
    settings = TextEncoding(weighted=True)
    states = torch.ones(1, 77, 4, dtype=torch.bfloat16)
    weights = torch.ones(1, 77)
    weights[0, 3] = 1.5
    scaled = apply_token_weights(states, weights)
    assert scaled.dtype == torch.bfloat16 and scaled[0, 3, 0] == 1.5 and scaled[0, 4, 0] == 1.0
    encoder_bf16 = text_encoder.to(torch.bfloat16)
    try:
        with torch.no_grad():
            out = encode_prompts(sd1_tokenizer, encoder_bf16, ["a (red) circle"], settings)
        assert out.dtype == torch.bfloat16
    finally:
        text_encoder.to(torch.float32)


def test_encode_prompts_dispatches_on_weighted(sd1_tokenizer, text_encoder):
    caption = ["a (red:1.5) circle"]
    with torch.no_grad():
        weighted = encode_prompts(sd1_tokenizer, text_encoder, caption, TextEncoding(weighted=True))
        literal = encode_prompts(sd1_tokenizer, text_encoder, caption, TextEncoding(weighted=False))
        expected_literal = encode(text_encoder, tokenize(sd1_tokenizer, caption, None), TextEncoding())
    assert torch.equal(literal, expected_literal)
    assert not torch.allclose(weighted, literal)


def test_encode_prompts_warns_on_tokenizer_version_mismatch(sd1_tokenizer, sd2_tokenizer, text_encoder):
    with torch.no_grad():
        with pytest.warns(UserWarning, match="v2=True"):
            encode_prompts(sd1_tokenizer, text_encoder, ["a cat"], TextEncoding(v2=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encode_prompts(sd2_tokenizer, text_encoder, ["a cat"], TextEncoding(v2=True))
