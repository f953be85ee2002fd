"""Textual-inversion embedding files: what we write, and every common kind we read (formats.md §3).

Written: `{"emb_params": Tensor[n_vectors, width]}` as `.pt` (torch.save) or `.safetensors` (+ modelspec
metadata), exactly as sd-scripts writes them; A1111, ComfyUI and diffusers' `load_textual_inversion`
read both. Read: those, A1111's `.pt` (`string_to_param` → `{"*": Tensor}`), and diffusers'
`learned_embeds.bin/.safetensors` (`{"<token>": Tensor[width]}`). Pickles are opened with
`weights_only` (nothing in them runs); XTI files (16 per-layer keys) are recognised and refused here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from library.errors import UserError
from library.models.checkpoint_io import (
    SAFETENSORS_SUFFIXES,
    check_weights_file,
    read_pickle_checkpoint,
    write_state_dict,
)

EMBEDDING_KEY = "emb_params"
XTI_LAYERS = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip


class EmbeddingFileError(UserError, ValueError):
    """An embedding file that cannot be used; the message names it and says why."""


def read_embedding(path: str | os.PathLike) -> torch.Tensor:
    """The vectors of an embedding file as a float32 `[n_vectors, width]` tensor."""
    path = check_weights_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = read_pickle_checkpoint(path)
    return _vectors(path, data)


def _vectors(path: Path, data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        tensor = data
    elif not isinstance(data, dict):
        raise EmbeddingFileError(f"{path}: holds a {type(data).__name__}, not an embedding (a dict of tensors)")
    elif set(data) >= set(XTI_LAYERS):
        raise EmbeddingFileError(
            f"{path}: an XTI embedding (one per U-Net layer: {', '.join(XTI_LAYERS[:3])}...); use it with "
            "train_textual_inversion_XTI.py"
        )
    elif isinstance(data.get(EMBEDDING_KEY), torch.Tensor):
        tensor = data[EMBEDDING_KEY]
    elif "string_to_param" in data:  # A1111: {"string_to_param": {"*": Tensor}, "name": ..., "step": ...}
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # a pickled ParameterDict
        tensor = next((v for v in dict(params).values() if isinstance(v, torch.Tensor)), None)
    else:  # diffusers learned_embeds ({"<token>": Tensor}) and other one-tensor files
        tensor = next((v for v in data.values() if isinstance(v, torch.Tensor)), None)
    if tensor is None:
        raise EmbeddingFileError(f"{path}: no tensor in it (keys: {', '.join(map(str, list(data)[:5]))})")
    tensor = tensor.detach().float()
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise EmbeddingFileError(f"{path}: its tensor has shape {list(tensor.shape)}, not [vectors, width]")
    return tensor.contiguous()


def write_embedding(
    path: str | os.PathLike, vectors: torch.Tensor, dtype: torch.dtype | None = None, metadata: dict | None = None
) -> Path:
    """Write `{"emb_params": vectors}` atomically as .pt/.ckpt (torch.save) or .safetensors (with metadata)."""
    path = Path(path)
    tensors = {EMBEDDING_KEY: vectors.detach().to("cpu", dtype=dtype or vectors.dtype).contiguous()}
    safetensors = path.suffix.lower() in SAFETENSORS_SUFFIXES
    write_state_dict(path, tensors, metadata=metadata if safetensors else None)
    return path
