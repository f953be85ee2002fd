"""Learning test of XTI / P+ (train_textual_inversion_XTI.py) on the shipped base, with the
Textual Inversion example's own files (examples/textual_inversion/): the "sks" token gets one vector
per U-Net cross-attention layer (16 keys in the file; this tiny U-Net has 10 of the layers), trained on the
quickstart's hearts. Images of the "sks" prompts are then generated with per-layer conditioning (each
cross-attention layer attends to the prompt encoded with its own vectors) and compared with the same
prompts where "sks" is the init word: the vectors every layer starts from, so untrained vectors give
exactly those images and fail the test.

As for plain TI (tests/test_learning_textual_inversion.py), the U-Net is frozen and has never drawn a
heart; the measured numbers are beside the thresholds.

Generation: `generate_per_layer` mirrors tools/shape_metrics.generate_images (same DDIM pipeline,
seeds, steps, guidance and batch as tests/learning_helpers.generate) with the conditioning of
xti.per_layer_predict: every layer's encoding of the negative and positive prompts is set in
xti.LayerContexts before the pipeline runs. The encodings do not depend on the step, so they are
computed once rather than at every step as per_layer_predict does; the U-Net sees the same tensors.
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from tests.learning_helpers import (
    BASE,
    CONCEPT_PROMPTS,
    GUIDANCE,
    OTHER_PROMPTS,
    SEEDS,
    STEPS,
    concept,
    generate,
    kept_share,
    needs_base,
    run_together,
)
from tests.test_learning_textual_inversion import EXAMPLE, _options, color_share
from tests.training_helpers import ROOT

pytestmark = needs_base

# Training: the example's train.toml (AdamW, constant learning rate 5e-3, one vector, seed 42) with
# these overrides. 10 epochs (160 steps) rather than the example's 20: XTI settles as fast as TI.
EPOCHS = 10
OUTPUT_NAME = "sks_heart_xti"

# Learned: the heart template fits the "sks" images at least 0.1 better than the init word's images
# (measured: init word "shape" 0.52 (15 circles, 7 crosses, 2 triangles of 24, 0 hearts) -> trained
# 0.67 after these 160 steps (24 circles, 0 hearts); 320 steps 0.68 (22 circles, 2 squares); 320 at
# learning rate 2e-2 0.67 (24 circles); 2 vectors per layer, 320 steps, 0.71 (23 circles, 1 square,
# colour 23 of 24). Never a heart: no closer than TI's one vector (0.67), far from the quickstart's
# LoRA (0.83, 24 of 24 hearts)), and at least 0.6 in all. The colour of the prompt is still drawn in
# at least 9 of 10 images (measured 24 of 24 before and after). Prompts without "sks": the base
# model's images, bit for bit (measured), though every layer gets its own encoding.
MIN_IOU_GAIN, MIN_IOU_AFTER, MIN_COLOR = 0.1, 0.6, 0.9


@pytest.fixture(scope="module")
def xti_file(tmp_path_factory):
    """The 16-key XTI file trained with the example's train.toml (output moved, fewer epochs)."""
    out = tmp_path_factory.mktemp("learning_xti") / "xti"
    command = [sys.executable, str(ROOT / "train_textual_inversion_XTI.py"), "--config_file", str(EXAMPLE / "train.toml"),
               "--output_dir", str(out), "--output_name", OUTPUT_NAME, "--save_model_as", "safetensors",
               "--max_train_epochs", str(EPOCHS), "--sample_every_n_epochs", str(EPOCHS)]  # fmt: skip
    output = run_together({"xti": command})["xti"]
    assert "XTI: tokens sks" in output
    return out / f"{OUTPUT_NAME}.safetensors"


@pytest.fixture(scope="module")
def xti_parts(xti_file):
    """A fresh copy of the base model with the token added and routed through the trained layer
    vectors; the per-layer contexts; the prompt expander."""
    from library.models.loading import load_base_model
    from library.recipes import xti
    from library.recipes.textual_inversion import add_tokens, expand_token, token_names

    options = _options()
    vectors = xti.read_xti_file(xti_file)  # [16, N, width]
    assert vectors.shape[:2] == (len(xti.XTI_LAYERS), options["num_vectors_per_token"])
    parts = load_base_model(str(BASE))
    names = token_names(options["token_string"], vectors.shape[1])
    ids = add_tokens(parts.tokenizer, parts.text_encoder, names)
    layer_vectors = xti.LayerVectors(
        parts.text_encoder.get_input_embeddings(), ids, vectors
    )
    xti.install_lookup(parts.text_encoder, layer_vectors)
    contexts = xti.LayerContexts(parts.unet)
    return parts, layer_vectors, contexts, expand_token(options["token_string"], names)


def generate_per_layer(
    parts, layer_vectors, contexts, prompts: list[str], size: int = 64
) -> np.ndarray:
    """tests/learning_helpers.generate with per-layer conditioning: uint8 [len(prompts) x len(SEEDS), size, size, 3]."""
    import torch

    from library.recipes import xti
    from library.training.sampling import make_scheduler

    all_prompts = [p for p in prompts for _ in SEEDS]
    seeds = [s for _ in prompts for s in SEEDS]
    scheduler = make_scheduler(
        "ddim", parts.v_parameterization, parts.noise_scheduler.config
    )
    pipe = parts.to_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    device = next(parts.unet.parameters()).device
    with torch.no_grad():
        encoded = {}
        for layer in (
            contexts.layers
        ):  # as xti.per_layer_predict: this layer's vectors, then encode
            layer_vectors.layer = xti.XTI_LAYERS.index(layer)
            positive, negative = pipe.encode_prompt(
                all_prompts, device, 1, True, [""] * len(all_prompts)
            )
            encoded[layer] = (positive, negative)
        reference = encoded["MID"] if "MID" in encoded else next(iter(encoded.values()))
        try:
            for layer, (positive, negative) in encoded.items():
                contexts.states[layer] = torch.cat(
                    [negative, positive]
                )  # the pipeline's guidance batch
            result = pipe(
                prompt_embeds=reference[0],
                negative_prompt_embeds=reference[1],
                height=size,
                width=size,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                output_type="np",
            ).images
        finally:
            contexts.states.clear()
    return (np.clip(result, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def images(base_parts, xti_parts):
    parts, layer_vectors, contexts, expand = xti_parts
    token, init_word = _options()["token_string"], _options()["init_word"]
    return {
        "init_word": generate(
            base_parts, [p.replace(token, init_word) for p in CONCEPT_PROMPTS]
        ),
        "concept": generate_per_layer(
            parts, layer_vectors, contexts, [expand(p) for p in CONCEPT_PROMPTS]
        ),
        "other": generate_per_layer(parts, layer_vectors, contexts, OTHER_PROMPTS),
    }


def test_the_layers_of_this_unet_trained_and_the_others_kept_the_start(
    base_parts, xti_file
):
    """10 of the 16 layers are in this U-Net: each trained its own vectors; the 6 absent ones are the
    init word's vector, as they started (measured: lengths 0.29-0.47 from 0.08)."""
    import torch

    from library.recipes import xti

    vectors = xti.read_xti_file(xti_file)
    present = [
        xti.XTI_LAYERS.index(layer)
        for layer in xti.cross_attention_layers(base_parts.unet)
    ]
    absent = [i for i in range(len(xti.XTI_LAYERS)) if i not in present]
    print(
        f"\nlayer vector lengths: {dict(zip(xti.XTI_LAYERS, [round(v, 3) for v in vectors.norm(dim=-1).max(-1).values.tolist()]))}"
    )
    assert len(present) == 10 and len(absent) == 6
    assert all(torch.equal(vectors[i], vectors[absent[0]]) for i in absent)
    assert all(not torch.equal(vectors[i], vectors[absent[0]]) for i in present)
    assert len({tuple(vectors[i].flatten().tolist()) for i in present}) == len(present)


def test_the_token_learns_the_nearest_shape_the_frozen_model_draws(base_images, images):
    init_word = _options()["init_word"]
    base, before, after = (
        concept(x)
        for x in (base_images["concept"], images["init_word"], images["concept"])
    )
    n = len(after["shapes"])
    print(
        f"\nheart share / IoU: base model 'sks' {base['share']:.2f} / {base['mean_iou']:.3f}, "
        f"init word '{init_word}' {before['share']:.2f} / {before['mean_iou']:.3f}, "
        f"trained XTI token {after['share']:.2f} / {after['mean_iou']:.3f} (of {n} images)"
    )
    print(
        f"drawn as: init word {dict(Counter(before['shapes']))}, trained {dict(Counter(after['shapes']))}"
    )
    colors = {name: color_share(images[name]) for name in ("init_word", "concept")}
    print(
        f"prompted colour drawn: init word {colors['init_word']:.2f}, trained {colors['concept']:.2f}"
    )
    assert after["mean_iou"] - before["mean_iou"] >= MIN_IOU_GAIN, (before, after)
    assert after["mean_iou"] >= MIN_IOU_AFTER, after
    assert after["share"] >= before["share"]
    assert colors["concept"] >= MIN_COLOR, colors


def test_prompts_without_the_token_are_exactly_the_base_models(base_images, images):
    print(
        f"\nother prompts keep their shape: base {kept_share(base_images['other']):.2f}, "
        f"with the XTI vectors {kept_share(images['other']):.2f}"
    )
    assert np.array_equal(images["other"], base_images["other"])
