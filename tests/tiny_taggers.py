"""Tiny WD14-shaped ONNX taggers (the default ONNX + selected_tags.csv format and the tag_mapping format) whose
scores follow an image's mean colour, so tests can say exactly which tags an image must get."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32  # the tiny models' input size (the real ones take 448): read from the ONNX shape

# (name, category, weights on the mean (r, g, b) in 0..1, bias): score = clip(w . rgb + bias, 0, 1)
WD14_TAGS = [
    ("general", "9", (0, 1, 0), 0),
    ("sensitive", "9", (0, 0, 1), 0),
    ("questionable", "9", (0.9, 0, 0), 0),
    ("explicit", "9", (0, 0, 0), 0.1),
    ("red", "0", (1, 0, 0), 0),
    ("green", "0", (0, 1, 0), 0),
    ("blue", "0", (0, 0, 1), 0),
    ("long_hair", "0", (0, 0, 0), 0.5),
    ("^_^", "0", (0, 0, 1), 0),
    ("white_background", "0", (1, 1, 1), -2),
    ("hatsune_miku_(vocaloid)", "4", (0, 0.8, 0), 0),
    ("kaname_madoka", "4", (0.4, 0, 0), 0),
]
MAPPING_TAGS = [
    ("general", "Rating", (0, 1, 0), 0),
    ("sensitive", "Rating", (0, 0, 1), 0),
    ("questionable", "Rating", (0.9, 0, 0), 0),
    ("explicit", "Rating", (0, 0, 0), 0.1),
    ("best_quality", "Quality", (0, 0, 0), 0.7),
    ("normal_quality", "Quality", (1, 0, 0), 0),
    ("red", "General", (1, 0, 0), 0),
    ("green", "General", (0, 1, 0), 0),
    ("blue", "General", (0, 0, 1), 0),
    ("long_hair", "General", (0, 0, 0), 0.5),
    ("^_^", "General", (0, 0, 0.95), 0),
    ("hatsune_miku_(vocaloid)", "Character", (0, 0.8, 0), 0),
    ("kaname_madoka", "Character", (0.4, 0, 0), 0),
    ("vocaloid", "Copyright", (0, 0.7, 0), 0),
    ("absurdres", "Meta", (0, 0, 0.6), 0),
    ("some_artist", "Artist", (0.6, 0, 0), 0),
    ("some_model", "Model", (0, 0.55, 0), 0),
]
WD14_REPO, FIXED_REPO, MAPPING_REPO = "test/wd-tiny-tagger", "test/wd-fixed-batch", "test/cl-tiny/v1"


class ColourTagger(torch.nn.Module):
    """Scores from the mean B, G, R of a WD14 input (NHWC 0..255), or logits from an NCHW [-1, 1] input."""

    def __init__(self, tags, nchw: bool = False):
        super().__init__()
        weights = torch.tensor([w for _, _, w, _ in tags], dtype=torch.float32)
        self.register_buffer("weights_bgr", weights.flip(1).T.contiguous())  # the input is BGR
        self.register_buffer("bias", torch.tensor([b for _, _, _, b in tags], dtype=torch.float32))
        self.nchw = nchw

    def forward(self, x):
        if self.nchw:
            mean = (x.mean(dim=(2, 3)) + 1) / 2
        else:
            mean = x.mean(dim=(1, 2)) / 255
        scores = torch.clamp(mean @ self.weights_bgr + self.bias, 0, 1)
        if not self.nchw:
            return scores
        scores = torch.clamp(scores, 1e-4, 1 - 1e-4)
        return torch.log(scores) - torch.log(1 - scores)  # logits: the tool applies the sigmoid


def export(model, path: Path, shape, names, dynamic: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {names[0]: {0: "batch"}, names[1]: {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (torch.zeros(shape),), str(path), input_names=[names[0]], output_names=[names[1]],
                      dynamic_axes=axes, dynamo=False, opset_version=17)


def write_wd14_model(folder: Path, batch: int | None = None) -> None:
    export(ColourTagger(WD14_TAGS), folder / "model.onnx", (batch or 1, SIZE, SIZE, 3),
           ("input_1", "predictions_sigmoid"), dynamic=batch is None)
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _, _) in enumerate(WD14_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_mapping_model(folder: Path) -> None:
    export(ColourTagger(MAPPING_TAGS, nchw=True), folder / "model_optimized.onnx", (1, 3, SIZE, SIZE),
           ("input", "output"), dynamic=True)
    mapping = {str(i): {"tag": n, "category": c} for i, (n, c, _, _) in enumerate(MAPPING_TAGS)}
    (folder / "tag_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")
