"""Diffusers folders we write with transformers 5 must load in transformers 4.x with the same weights.

transformers 4.x is installed beside the venv (`make install` puts it in .venv/compat-transformers4)
and run in a subprocess with that folder first on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPAT = Path(sys.prefix) / "compat-transformers4"
READER = """
import sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from transformers import CLIPTextModel, CLIPTokenizer
model = CLIPTextModel.from_pretrained(sys.argv[1])
torch.save(model.state_dict(), sys.argv[2])
if len(sys.argv) > 3:
    print(CLIPTokenizer.from_pretrained(sys.argv[3])("a photo of a cat").input_ids)
"""

pytestmark = pytest.mark.skipif(not COMPAT.is_dir(), reason=f"transformers 4.x not installed in {COMPAT} (run make install)")


def read_with_transformers4(folder: Path, out: Path, tokenizer: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(COMPAT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", READER, str(folder), str(out)] + ([str(tokenizer)] if tokenizer else [])
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_transformers4_reads_our_text_encoder_and_tokenizer(tmp_path, tiny_models):
    from library.models.loading import load_base_model

    parts = load_base_model(str(tiny_models["sd1"]))
    out = tmp_path / "sd.pt"
    printed = read_with_transformers4(tiny_models["sd1"] / "text_encoder", out, tiny_models["sd1"] / "tokenizer")
    assert printed.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407]"
    theirs = torch.load(out, weights_only=True)
    ours = parts.text_encoder.state_dict()
    assert len(theirs) == len(ours)
    for key, value in ours.items():
        assert torch.equal(theirs[f"text_model.{key}"], value), key


def test_a_plain_transformers5_save_would_be_reinitialised_by_4x(tmp_path, tiny_models):
    """Why we rewrite the keys: 4.x does not fail on a 5.x-layout file, it silently starts from random weights."""
    from transformers import CLIPTextModel

    fresh = CLIPTextModel(CLIPTextModel.from_pretrained(str(tiny_models["sd1"] / "text_encoder")).config)
    torch.nn.init.constant_(fresh.final_layer_norm.weight, 3.0)
    fresh.save_pretrained(str(tmp_path / "native"))
    out = tmp_path / "sd.pt"
    read_with_transformers4(tmp_path / "native", out)
    theirs = torch.load(out, weights_only=True)
    assert not torch.equal(theirs["text_model.final_layer_norm.weight"], fresh.final_layer_norm.weight)
