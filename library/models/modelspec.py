"""SAI ModelSpec 1.0.1 metadata (the `modelspec.*` keys other tools read from .safetensors headers)."""

from __future__ import annotations

import datetime
import time

SPEC_VERSION = "1.0.1"
IMPLEMENTATION_SD = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_LORA = "diffusers"
TITLE_FALLBACK = {"checkpoint": "Checkpoint", "lora": "LoRA", "textual-inversion": "TextualInversion"}


def architecture(v2: bool, v_parameterization: bool) -> str:
    if not v2:
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"


def build_modelspec(
    *,
    v2: bool,
    v_parameterization: bool,
    kind: str = "checkpoint",
    title: str | None = None,
    resolution: tuple[int, int] | None = None,
    clip_skip: int | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """modelspec.* strings for a full checkpoint, a LoRA (`kind="lora"`) or an embedding."""
    timestamp = time.time() if timestamp is None else timestamp
    arch = architecture(v2, v_parameterization)
    if kind != "checkpoint":
        arch += "/" + kind
    if resolution is None:
        resolution = (768, 768) if v2 and v_parameterization else (512, 512)
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": IMPLEMENTATION_LORA if kind == "lora" else IMPLEMENTATION_SD,
        "modelspec.title": title or f"{TITLE_FALLBACK.get(kind, 'Checkpoint')}@{int(timestamp)}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return spec
