"""Weighted average of LDM checkpoints (tools/merge_models.py), read and merged tensor by tensor.

Only the result is held in memory: each input is opened lazily (safetensors) or memory-mapped (.ckpt) and
every tensor is read, weighted and added one at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_tools.files import dtype_of
from library.models.checkpoint_io import check_weights_file, read_safetensors_metadata, read_state_dict

logger = logging.getLogger(__name__)

NON_UNET_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.")
_TEXT_MODEL_FIXES = (  # SD1 files whose text encoder lacks the `text_model.` level
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)


def normalized_key(key: str) -> str:
    for old, new in _TEXT_MODEL_FIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def is_unet_key(key: str) -> bool:
    return not key.startswith(NON_UNET_PREFIXES)


class LazyCheckpoint:
    """Tensors of a .safetensors (read on demand) or .ckpt (memory-mapped) file under normalized keys."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.path = check_weights_file(path)
        self.device = device
        if self.path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._names = {normalized_key(k): k for k in self._file.keys()}
            self._tensors = None
            self.metadata = read_safetensors_metadata(self.path)
        else:
            self._file = None
            self._tensors = {normalized_key(k): v for k, v in read_state_dict(self.path).items()}
            self._names = {k: k for k in self._tensors}
            self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def get(self, key: str) -> torch.Tensor:
        tensor = self._file.get_tensor(self._names[key]) if self._file is not None else self._tensors[key]
        return tensor.to(self.device)


def merge_checkpoints(paths: list[str], ratios: list[float] | None = None, *, unet_only: bool = False,
                      device: str = "cpu", precision: str = "float", save_precision: str | None = "float",
                      show_skipped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """(state dict, metadata) of Σ ratio_i · model_i over the first model's keys.

    Ratios default to 1/n each. A key missing from a model takes the first model's value for that share.
    With `unet_only` the VAE and text encoder are the first model's. Integer tensors (position ids) are
    the first model's, unchanged.
    """
    if len(paths) < 2:
        raise UserError("--models: give at least two checkpoints to merge")
    if ratios is None:
        ratios = [1.0 / len(paths)] * len(paths)
    if len(ratios) != len(paths):
        raise UserError(f"--ratios: {len(ratios)} values for {len(paths)} models; give one ratio per model")
    if abs(sum(ratios) - 1.0) > 1e-6:
        logger.warning("the ratios add up to %g, not 1: the result is scaled, not an average", sum(ratios))
    models = [LazyCheckpoint(p, device) for p in paths]
    first = models[0]
    dtype, save_dtype = dtype_of(precision, torch.float32), dtype_of(save_precision, torch.float32)
    out = {}
    for key in tqdm(first.keys(), desc="merging", unit="tensor"):
        base = first.get(key)
        if not base.is_floating_point() or (unet_only and not is_unet_key(key)):
            out[key] = base.to(save_dtype).cpu() if base.is_floating_point() else base.cpu()
            continue
        total = torch.zeros(base.shape, dtype=dtype, device=device)
        for model, ratio in zip(models, ratios):
            tensor = model.get(key) if key in model else base
            if tensor.shape != base.shape:
                raise UserError(f"{model.path}: {key} has shape {tuple(tensor.shape)}, the first model {tuple(base.shape)}")
            total += ratio * tensor.to(dtype)
        out[key] = total.to(save_dtype).cpu()
    for model in models[1:]:
        missing = [k for k in first.keys() if k not in model and (is_unet_key(k) or not unet_only)]
        if missing:
            logger.warning("%s lacks %d keys of the first model (e.g. %s); the first model's values were used",
                           model.path, len(missing), missing[0])  # fmt: skip
        extra = [k for k in model.keys() if k not in first]
        if extra:
            logger.info("%s: %d keys not in the first model were skipped", model.path, len(extra))
            if show_skipped:
                for key in extra:
                    logger.info("Skip: %s", key)
    return out, _metadata(first, paths, out)


def _metadata(first: LazyCheckpoint, paths: list[str], state_dict: dict) -> dict[str, str]:
    from library.models.ldm_conversion import is_v2_ldm
    from library.models.modelspec import build_modelspec

    metadata = {k: v for k, v in first.metadata.items() if k.startswith("modelspec.")}
    if not metadata:
        metadata = build_modelspec(v2=is_v2_ldm(state_dict), v_parameterization=False)
    metadata["modelspec.merged_from"] = ", ".join(Path(p).name for p in paths)
    return metadata
