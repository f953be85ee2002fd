"""Does a network file (--network_weights) fit the network this run built? Said before loading it.

Works for any network module: it compares the file's tensor names and shapes with the network's
`state_dict()`. A different rank shows up as a different first dimension of `lora_down` (second of
`lora_up`); a different base model as different layer widths or names.
"""

from __future__ import annotations

import os

from library.errors import UserError


class NetworkWeightsMismatch(UserError, ValueError):
    """--network_weights made for another network shape or another base model."""


def file_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a .safetensors file's tensors from its header, or of a .pt/.ckpt by reading it."""
    from library.models.checkpoint_io import check_weights_file

    path = check_weights_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    from library.models.checkpoint_io import read_state_dict

    return {key: tuple(value.shape) for key, value in read_state_dict(path).items()}


def _rank_of(key: str, shape: tuple) -> int | None:
    if key.endswith("lora_down.weight") and shape:
        return shape[0]
    if key.endswith("lora_up.weight") and len(shape) >= 2:
        return shape[1]
    return None


def _same_but_rank(key: str, a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    axis = 0 if key.endswith("lora_down.weight") else 1 if key.endswith("lora_up.weight") else None
    return axis is not None and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis)


def network_weights_problem(
    option: str, path: str | os.PathLike, network_shapes: dict[str, tuple], from_file: bool
) -> str | None:
    """Why the file's weights cannot load into a network with `network_shapes` (None if they can).

    `from_file`: the network was built from this file (--dim_from_weights), so ranks match by design
    and a difference means another base model.
    """
    file_shapes = file_tensor_shapes(path)
    common = set(file_shapes) & set(network_shapes)
    if not common:
        example = next(iter(sorted(file_shapes)), "(none)")
        return (
            f"{option} {path}: none of its {len(file_shapes)} tensors belongs to this network (e.g. {example}); it was "
            "made for another model family (SDXL?) or another network module (--network_module)"
        )
    differing = sorted(
        k for k in common
        # A 1x1 conv saved as Linear (SD2 proj_in/proj_out) loads fine: same size, other rank of dims.
        if file_shapes[k] != network_shapes[k] and _numel(file_shapes[k]) != _numel(network_shapes[k])
    )  # fmt: skip
    if not differing:
        return None
    rank_only = [k for k in differing if _same_but_rank(k, file_shapes[k], network_shapes[k])]
    key = differing[0]
    if len(rank_only) == len(differing) and not from_file:
        file_ranks = sorted({_rank_of(k, file_shapes[k]) for k in rank_only})
        now_ranks = sorted({_rank_of(k, network_shapes[k]) for k in rank_only})
        return (
            f"{option} {path}: it was trained with rank {', '.join(map(str, file_ranks))}, this run's network has rank "
            f"{', '.join(map(str, now_ranks))} (e.g. {key}: {list(file_shapes[key])} in the file, "
            f"{list(network_shapes[key])} here); give the same --network_dim (and --conv_dim), or add "
            "--dim_from_weights to take the ranks from the file"
        )
    return (
        f"{option} {path}: it was made for another base model: {len(differing)} of its layers have other widths (e.g. "
        f"{key}: {list(file_shapes[key])} in the file, {list(network_shapes[key])} in this model); use it with the "
        "model it was trained on (SD1.x vs SD2.x: --v2), or start without it"
    )


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
