"""tools/resize_images_to_resolution.py (shape kept, unlike upstream's swapped sides) and tools/show_metadata.py."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tools import resize_images_to_resolution, show_metadata


def test_resize_keeps_the_shape_never_enlarges_and_copies_captions(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    wide = np.zeros((200, 400, 3), dtype=np.uint8)
    wide[:, :200] = (255, 0, 0)  # left half red: a swapped resize would put red elsewhere
    Image.fromarray(wide).save(src / "wide.PNG")  # upper-case extension
    Image.fromarray(np.full((30, 20, 3), 200, dtype=np.uint8)).save(src / "small.png")
    (src / "wide.txt").write_text("a wide picture", encoding="utf-8")
    (src / "broken.png").write_bytes(b"no")
    assert resize_images_to_resolution.main([str(src), str(dst), "--max_resolution", "100x100,50x50",
                                             "--divisible_by", "8", "--copy_associated_files", "--save_as_png"]) == 0
    big = Image.open(dst / "wide+100x100.png")
    assert big.size == (136, 64)  # 400x200 scaled to ~100x100 area (141x70), floored to multiples of 8
    pixels = np.asarray(big)
    assert pixels[32, 10, 0] > 200 and pixels[32, 10, 2] < 50 and pixels[32, 125].max() < 50
    assert Image.open(dst / "wide+50x50.png").size == (64, 32)
    assert Image.open(dst / "small+100x100.png").size == (16, 24)  # not enlarged, only cropped to /8
    assert (dst / "wide.txt").read_text() == "a wide picture"
    assert (dst / "wide+100x100.txt").is_file() and (dst / "wide+50x50.txt").is_file()


def test_show_metadata_prints_sorted_decoded_json(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_tag_frequency": '{"a": {"sq": 2}}', "b": "2", "a": "1"})
    assert show_metadata.main(["--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"a": "1", "b": "2", "ss_tag_frequency": {"a": {"sq": 2}}} and out.index('"a"') < out.index('"b"')
    assert show_metadata.main(["--model", str(tmp_path / "x.ckpt")]) == 1
