"""U-Net state dicts: Diffusers `UNet2DConditionModel` <-> original LDM naming (SD 1.x / 2.x).

LDM keys here carry no `model.diffusion_model.` prefix. Both layouts store the same
tensors with the same shapes, so conversion is a pure key rename: the output dict holds
the very tensor objects of the input (no copies; the input dict is left untouched).

The mapping is built from the architecture numbers in the Diffusers config (levels,
layers per level, which levels have attention), so tiny test models convert like
full-size SD1.5 / SD2.x ones.

Also here: `rename_by_prefix`, the longest-prefix key renamer shared with the VAE
converter, and `infer_unet_config`, which reads a Diffusers config off LDM shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]
PrefixPairs = list[tuple[str, str]]

# Children of a Diffusers ResnetBlock2D -> their place inside an LDM ResBlock
# (in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv]).
UNET_RESNET_PARTS = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)

UNET_TOP_LEVEL_PARTS = (
    ("conv_in.", "input_blocks.0.0."),
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
)

SD_HEAD_CHANNELS = 64  # SD2 convention: fixed head size, heads grow with channels
SD1_NUM_HEADS = 8  # SD1 convention: 8 heads at every level


# ---------------------------------------------------------------------------
# generic key renaming


def rename_by_prefix(sd: Mapping[str, torch.Tensor], prefix_map: Mapping[str, str], what: str) -> StateDict:
    """Rename every key by its longest prefix found in `prefix_map` (prefixes end with '.').

    Raises KeyError when a key has no mapping or two keys land on the same name, so that a
    wrong config never yields a silently incomplete model.
    """
    renamed: StateDict = {}
    unmatched: list[str] = []
    for key, tensor in sd.items():
        new_key = _renamed_key(key, prefix_map)
        if new_key is None:
            unmatched.append(key)
        elif new_key in renamed:
            raise KeyError(f"{what}: two keys map to {new_key!r} (last one: {key!r})")
        else:
            renamed[new_key] = tensor
    if unmatched:
        raise KeyError(f"{what}: {len(unmatched)} key(s) have no mapping, e.g. {unmatched[:5]}")
    return renamed


def _renamed_key(key: str, prefix_map: Mapping[str, str]) -> str | None:
    end = key.rfind(".")
    while end > 0:
        target = prefix_map.get(key[: end + 1])
        if target is not None:
            return target + key[end + 1 :]
        end = key.rfind(".", 0, end)
    return None


def resnet_prefix_pairs(diffusers_prefix: str, ldm_prefix: str, parts: Sequence[tuple[str, str]]) -> PrefixPairs:
    """Pairs for one resnet block: the block itself plus its renamed children."""
    pairs = [(diffusers_prefix, ldm_prefix)]
    pairs += [(diffusers_prefix + child, ldm_prefix + ldm_child) for child, ldm_child in parts]
    return pairs


# ---------------------------------------------------------------------------
# the U-Net mapping


def layers_per_level(config: Mapping) -> list[int]:
    """Diffusers allows an int or one count per level; normalise to a list."""
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    if isinstance(layers, int):
        return [layers] * levels
    return list(layers)


def unet_prefix_pairs(config: Mapping) -> PrefixPairs:
    """(diffusers prefix, LDM prefix) pairs covering every U-Net module."""
    pairs: PrefixPairs = list(UNET_TOP_LEVEL_PARTS)
    pairs += _down_pairs(config)
    pairs += _mid_pairs()
    pairs += _up_pairs(config)
    return pairs


def _down_pairs(config: Mapping) -> PrefixPairs:
    layers = layers_per_level(config)
    pairs: PrefixPairs = []
    ldm_index = 1  # input_blocks.0 is conv_in
    for level, count in enumerate(layers):
        has_attention = "CrossAttn" in config["down_block_types"][level]
        for layer in range(count):
            ldm_block = f"input_blocks.{ldm_index}."
            pairs += resnet_prefix_pairs(f"down_blocks.{level}.resnets.{layer}.", ldm_block + "0.", UNET_RESNET_PARTS)
            if has_attention:
                pairs.append((f"down_blocks.{level}.attentions.{layer}.", ldm_block + "1."))
            ldm_index += 1
        if level < len(layers) - 1:  # LDM gives the downsampler its own input block
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{ldm_index}.0.op."))
            ldm_index += 1
    return pairs


def _mid_pairs() -> PrefixPairs:
    pairs = resnet_prefix_pairs("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET_PARTS)
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += resnet_prefix_pairs("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET_PARTS)
    return pairs


def _up_pairs(config: Mapping) -> PrefixPairs:
    layers = list(reversed(layers_per_level(config)))
    pairs: PrefixPairs = []
    ldm_index = 0
    for level, count in enumerate(layers):
        has_attention = "CrossAttn" in config["up_block_types"][level]
        for layer in range(count + 1):  # up levels have one resnet more than down levels
            ldm_block = f"output_blocks.{ldm_index}."
            pairs += resnet_prefix_pairs(f"up_blocks.{level}.resnets.{layer}.", ldm_block + "0.", UNET_RESNET_PARTS)
            if has_attention:
                pairs.append((f"up_blocks.{level}.attentions.{layer}.", ldm_block + "1."))
            ldm_index += 1
        if level < len(layers) - 1:  # LDM appends the upsampler to the level's last output block
            slot = 2 if has_attention else 1
            pairs.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{ldm_index - 1}.{slot}.conv."))
    return pairs


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """Diffusers U-Net state dict -> LDM keys (without `model.diffusion_model.`)."""
    prefix_map = dict(unet_prefix_pairs(config))
    return rename_by_prefix(sd, prefix_map, "U-Net diffusers->LDM")


def unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """LDM U-Net state dict (without `model.diffusion_model.`) -> Diffusers keys."""
    prefix_map = {ldm: diffusers for diffusers, ldm in unet_prefix_pairs(config)}
    return rename_by_prefix(sd, prefix_map, "U-Net LDM->diffusers")


# ---------------------------------------------------------------------------
# config inference from LDM shapes


def infer_unet_config(unet_ldm_sd: Mapping[str, torch.Tensor], v2: bool, v_parameterization: bool) -> dict:
    """A Diffusers UNet2DConditionModel config for an LDM U-Net, read off tensor shapes.

    What shapes cannot tell follows SD conventions: 8 heads (SD1) or 64-channel heads (SD2),
    GroupNorm 32, sample size 64 (96 for the SD2 768-v models, which also upcast attention).
    """
    layers, levels = _infer_layers_and_levels(unet_ldm_sd)
    first_blocks = [1 + level * (layers + 1) for level in range(levels)]
    channels = [int(unet_ldm_sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]) for i in first_blocks]
    has_attention = [f"input_blocks.{i}.1.proj_in.weight" in unet_ldm_sd for i in first_blocks]
    down_types = ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in has_attention]
    up_types = ["CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(has_attention)]
    conv_in = unet_ldm_sd["input_blocks.0.0.weight"]
    upcast = v2 and v_parameterization
    config = {
        "sample_size": 96 if upcast else 64,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(unet_ldm_sd["out.2.weight"].shape[0]),
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up_types,
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": _infer_cross_attention_dim(unet_ldm_sd, v2),
        "transformer_layers_per_block": _infer_transformer_depth(unet_ldm_sd),
        "attention_head_dim": _sd_head_counts(channels, v2),
        "dual_cross_attention": False,
        "use_linear_projection": _uses_linear_projection(unet_ldm_sd),
        "num_class_embeds": None,
        "upcast_attention": upcast,
    }
    time_embed_dim = int(unet_ldm_sd["time_embed.0.weight"].shape[0])
    if time_embed_dim != 4 * channels[0]:  # Diffusers' default is 4x the first level
        config["time_embedding_dim"] = time_embed_dim
    return config


def _block_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(match.group(1)) for key in sd if (match := regex.match(key))}


def _infer_layers_and_levels(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """input_blocks = conv_in, then per level `layers` blocks and (but the last level) a downsampler."""
    input_count = max(_block_indices(sd, r"input_blocks\.(\d+)\.")) + 1
    downsamplers = _block_indices(sd, r"input_blocks\.(\d+)\.0\.op\.")
    if not downsamplers:
        return input_count - 1, 1
    layers = min(downsamplers) - 1
    return layers, input_count // (layers + 1)


def _infer_cross_attention_dim(sd: Mapping[str, torch.Tensor], v2: bool) -> int:
    for key, tensor in sd.items():
        if key.endswith("attn2.to_k.weight"):
            return int(tensor.shape[1])
    return 1024 if v2 else 768


def _infer_transformer_depth(sd: Mapping[str, torch.Tensor]) -> int:
    depth = _block_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    return max(depth) + 1 if depth else 1


def _uses_linear_projection(sd: Mapping[str, torch.Tensor]) -> bool:
    for key, tensor in sd.items():
        if key.endswith(".proj_in.weight"):
            return tensor.dim() == 2
    return False


def _sd_head_counts(channels: Sequence[int], v2: bool) -> int | list[int]:
    """Diffusers calls the head *count* `attention_head_dim` (a historic naming quirk)."""
    if not v2:
        return SD1_NUM_HEADS
    return [max(1, c // SD_HEAD_CHANNELS) for c in channels]
