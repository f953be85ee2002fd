"""The CLIP BPE tokenizer, built offline.

Stable Diffusion 1.x and 2.x both use OpenAI's CLIP byte-pair vocabulary
(49,408 ids). Upstream downloads it from the hub; we build the same
`vocab.json` / `merges.txt` from the BPE file that the `open_clip_torch`
package ships (installed with --no-deps; never imported, it needs torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # vocab size of CLIP minus byte symbols and the two specials
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def find_bpe_file() -> Path:
    """Locate the CLIP BPE file shipped by open_clip_torch (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The CLIP vocabulary file is missing: install it with "
            "`pip install --no-deps open_clip_torch==3.3.0` (make install does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall open_clip_torch with --no-deps")
    return path


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_and_merges(num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge rules of CLIP, optionally truncated to `num_merges`."""
    lines = gzip.decompress(find_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + num_merges]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | os.PathLike, v2: bool = False, num_merges: int = NUM_MERGES) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) readable by transformers 4.x and 5.x.

    SD2's tokenizer pads with "!" (id 0) instead of the end token; everything else is identical.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(num_merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": "!" if v2 else EOS_TOKEN,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return out


def load_clip_tokenizer(path: str | os.PathLike):
    """Load a tokenizer folder, forcing the 77-token window SD was trained with."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), model_max_length=MODEL_MAX_LENGTH)


def build_clip_tokenizer(cache_dir: str | os.PathLike, v2: bool = False):
    """The SD1 (or SD2) tokenizer, written once into `cache_dir` and loaded from there."""
    folder = Path(cache_dir) / ("stabilityai_stable-diffusion-2" if v2 else "openai_clip-vit-large-patch14")
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer(folder, v2=v2)
    return load_clip_tokenizer(folder)


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """save_pretrained, plus the vocab.json / merges.txt pair that transformers 4.x needs.

    transformers 5 writes only tokenizer.json, which 4.x cannot read; the BPE model
    inside it holds the vocabulary and merges, so we write them out beside it.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a 4.x slow tokenizer already wrote vocab.json/merges.txt
        return
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    for token, index in tokenizer.get_added_vocab().items():
        vocab.setdefault(token, index)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
