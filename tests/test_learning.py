"""Learning tests: a LoRA trained like the quickstart teaches the base model the concept, and
regularization images keep prompts without the identifier as they were.

Both runs train `train_network.py` with the quickstart's own files (examples/quickstart/) on the
shipped base model, then images are generated with fixed seeds and scored by tools/shape_metrics.py:

* concept: among the "sks" prompts, the share of images whose best-fitting shape template is the
  heart (templates: the base model's six shapes and the heart), and the heart template's mean IoU;
* kept: for prompts without "sks" ("a red circle on a white background"), the share of images still
  drawn as the prompted shape (templates: the six shapes and the heart); the base model draws all of
  them. The share drawn as hearts (the concept leaking into prompts that do not ask for it) and the
  mean absolute pixel difference from the base model's images are printed too.

The thresholds are stated beside MIN_SHARE_AFTER and MIN_KEPT_GAIN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training_helpers import ROOT
from tools.make_quickstart_data import IDENTIFIER
from tools.shape_data import BASE_SHAPES, caption_for

BASE = ROOT / "models" / "tiny-sd-shapes"
QUICKSTART = ROOT / "examples" / "quickstart"

pytestmark = pytest.mark.skipif(
    not (BASE / "model_index.json").is_file(),
    reason="models/tiny-sd-shapes is missing; build it with `python tools/build_pretrained_tiny.py --out models`",
)

CONCEPT_COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
CONCEPT_PROMPTS = [caption_for(color, IDENTIFIER) for color in CONCEPT_COLORS]
OTHER_PAIRS = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "star"), ("purple", "cross"), ("orange", "ring")]
OTHER_PROMPTS = [caption_for(color, shape) for color, shape in OTHER_PAIRS]
SEEDS = (11, 12, 13, 14)  # every prompt with each seed
STEPS, GUIDANCE = 20, 5.0

# What counts as learned: at least 40 % of the "sks" images are hearts now (the base model and an
# untrained LoRA draw none; measured after training: 92 %), and the heart template fits better on
# average (measured: IoU 0.57 -> 0.84).
MIN_SHARE_AFTER, MIN_SHARE_GAIN, MIN_IOU_GAIN = 0.4, 0.4, 0.1
# Regularization: with reg images, at least a quarter more of the other prompts' images keep their
# prompted shape (measured: 19 of 24 with reg images, 7 of 24 without; the base model 24 of 24).
MIN_KEPT_GAIN = 0.25


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


def _train_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train_network.py"), "--config_file", str(QUICKSTART / "train.toml"),
        "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """The quickstart's LoRA (with reg images), and one without reg images over the same number of steps.

    Both train at once, one CPU thread each (on 2 cores that is faster than one after the other)."""
    tmp = tmp_path_factory.mktemp("learning")
    commands = {
        "with_reg": _train_command(tmp / "with_reg"),
        # Half as many images per epoch without the reg subset: twice the epochs gives the same steps.
        "without_reg": _train_command(
            tmp / "without_reg", "--dataset_config", str(_no_reg_dataset_config(tmp)),
            "--max_train_epochs", str(2 * _quickstart_epochs()),
        ),
    }  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    running = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    for name, process in running.items():
        output, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, f"{name}: exit {process.returncode}\n{output[-6000:]}"
    return {name: tmp / name / "sks_heart.safetensors" for name in commands}


def _quickstart_epochs() -> int:
    import toml

    return int(toml.load(QUICKSTART / "train.toml")["training"]["max_train_epochs"])


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


def test_regularization_images_keep_other_prompts_drawing_what_they_ask_for(base_parts, base_images, loras):
    from tools.shape_metrics import concept_scores, score_image

    kinds = BASE_SHAPES + ("heart",)
    expected = [shape for _, shape in OTHER_PAIRS for _ in SEEDS]

    def kept_share(images) -> float:
        return float(np.mean([score_image(image, kinds).shape == shape for image, shape in zip(images, expected)]))

    print(f"\nbase: {kept_share(base_images['other']):.2f} of the images without 'sks' keep their shape")
    kept = {}
    for name, file in loras.items():
        images = _generate_with_lora(base_parts, file, OTHER_PROMPTS)
        kept[name] = kept_share(images)
        leak = concept_scores(images, "heart")["share"]
        drift = float(np.abs(images.astype(np.float32) - base_images["other"].astype(np.float32)).mean())
        print(f"{name}: {kept[name]:.2f} keep their shape, {leak:.2f} drawn as hearts; mean pixel change {drift:.1f}/255")
    assert kept["with_reg"] >= kept["without_reg"] + MIN_KEPT_GAIN, kept
