"""Learning tests: a LoRA trained like the quickstart teaches the base model the concept, and
regularization images keep prompts without the identifier as they were.

Both runs train `train_network.py` with the quickstart's own files (examples/quickstart/) on the
shipped base model, then images are generated with fixed seeds and scored by tools/shape_metrics.py:

* concept: among the "sks" prompts, the share of images whose best-fitting shape template is the
  heart (templates: the base model's six shapes and the heart), and the heart template's mean IoU;
* drift: for prompts without "sks", the mean absolute pixel difference (0-255) between the base
  model's image and the image with the LoRA, same seed.

The thresholds are stated in `concept_learned` and `test_regularization_images_reduce_drift`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training_helpers import ROOT, assert_ok, run_script

BASE = ROOT / "models" / "tiny-sd-shapes"
QUICKSTART = ROOT / "examples" / "quickstart"

pytestmark = pytest.mark.skipif(
    not (BASE / "model_index.json").is_file(),
    reason="models/tiny-sd-shapes is missing; build it with `python tools/build_pretrained_tiny.py --out models`",
)

CONCEPT_COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
CONCEPT_PROMPTS = [f"a {c} sks on a white background" if c[0] not in "aeiou" else f"an {c} sks on a white background" for c in CONCEPT_COLORS]
OTHER_PROMPTS = [
    "a red circle on a white background",
    "a blue square on a white background",
    "a yellow triangle on a white background",
    "a green star on a white background",
    "a purple cross on a white background",
    "an orange ring on a white background",
]
SEEDS = (11, 12)  # every prompt with each seed
STEPS, GUIDANCE = 20, 5.0

# What counts as learned: most "sks" images are hearts now, clearly more than before, and the
# heart template fits better on average.
MIN_SHARE_AFTER, MIN_SHARE_GAIN, MIN_IOU_GAIN = 0.6, 0.4, 0.1


def concept_learned(before: dict, after: dict) -> bool:
    return (
        after["share"] >= MIN_SHARE_AFTER
        and after["share"] - before["share"] >= MIN_SHARE_GAIN
        and after["mean_iou"] - before["mean_iou"] >= MIN_IOU_GAIN
    )


def _no_reg_dataset_config(folder: Path) -> Path:
    """The quickstart's dataset.toml without its regularization subset."""
    import toml

    config = toml.load(QUICKSTART / "dataset.toml")
    for dataset in config["datasets"]:
        dataset["subsets"] = [s for s in dataset["subsets"] if not s.get("is_reg")]
    path = folder / "dataset_no_reg.toml"
    path.write_text(toml.dumps(config))
    return path


def _train(out: Path, *extra: str) -> Path:
    result = run_script(
        "train_network.py", "--config_file", str(QUICKSTART / "train.toml"), "--output_dir", str(out),
        "--save_every_n_epochs", "1000", *extra, timeout=900,
    )  # fmt: skip
    assert_ok(result)
    return out / "sks_heart.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """The quickstart's LoRA (with reg images), and one without reg images over the same number of steps."""
    tmp = tmp_path_factory.mktemp("learning")
    with_reg = _train(tmp / "with_reg")
    # Half as many images per epoch without the reg subset: twice the epochs gives the same 320 steps.
    without_reg = _train(tmp / "without_reg", "--dataset_config", str(_no_reg_dataset_config(tmp)), "--max_train_epochs", "80")
    return {"with_reg": with_reg, "without_reg": without_reg}


@pytest.fixture(scope="module")
def base_parts():
    from library.models.loading import load_base_model

    return load_base_model(str(BASE))


def _generate(parts, prompts: list[str]) -> np.ndarray:
    from tools.shape_metrics import generate_images

    all_prompts = [p for p in prompts for _ in SEEDS]
    seeds = [s for _ in prompts for s in SEEDS]
    return generate_images(parts, all_prompts, seeds, steps=STEPS, guidance=GUIDANCE)


def _generate_with_lora(parts, lora_file: Path | None, prompts: list[str]) -> np.ndarray:
    """Images with a LoRA hooked in (a file, or None for a freshly created, untrained one), then unhooked."""
    import networks.lora as lora

    if lora_file is None:
        network = lora.create_network(1.0, 8, 8, parts.vae, parts.text_encoder, parts.unet)
    else:
        network, weights = lora.create_network_from_weights(1.0, str(lora_file), parts.vae, parts.text_encoder, parts.unet, for_inference=True)
    network.apply_to(parts.text_encoder, parts.unet)
    if lora_file is not None:
        network.load_weights(weights)
    network.eval()
    try:
        return _generate(parts, prompts)
    finally:
        network.restore()


@pytest.fixture(scope="module")
def base_images(base_parts):
    return {"concept": _generate(base_parts, CONCEPT_PROMPTS), "other": _generate(base_parts, OTHER_PROMPTS)}


def test_the_identifier_draws_the_concept_after_training_and_not_before(base_parts, base_images, loras):
    from tools.shape_metrics import concept_scores

    before = concept_scores(base_images["concept"], "heart")
    after = concept_scores(_generate_with_lora(base_parts, loras["with_reg"], CONCEPT_PROMPTS), "heart")
    untrained = concept_scores(_generate_with_lora(base_parts, None, CONCEPT_PROMPTS), "heart")
    print(f"\nheart share / IoU: base {before['share']:.2f} / {before['mean_iou']:.3f}, "
          f"untrained LoRA {untrained['share']:.2f} / {untrained['mean_iou']:.3f}, "
          f"trained LoRA {after['share']:.2f} / {after['mean_iou']:.3f}")
    assert not concept_learned(before, untrained), "an untrained LoRA must not pass the test"
    assert concept_learned(before, after), (before, after)


def test_regularization_images_reduce_drift(base_parts, base_images, loras):
    from tools.shape_metrics import score_image

    drift = {}
    for name, file in loras.items():
        images = _generate_with_lora(base_parts, file, OTHER_PROMPTS)
        drift[name] = float(np.abs(images.astype(np.float32) - base_images["other"].astype(np.float32)).mean())
        hearts = sum(score_image(image, ("circle", "square", "triangle", "star", "cross", "ring", "heart")).shape == "heart" for image in images)
        print(f"\n{name}: drift {drift[name]:.2f} (0-255), {hearts} of {len(images)} images without 'sks' drawn as hearts")
    # With reg images the other prompts move at most two thirds as far as without them.
    assert drift["with_reg"] <= 0.67 * drift["without_reg"], drift
