"""VAE state dicts: Diffusers `AutoencoderKL` <-> original LDM naming (SD 1.x / 2.x).

LDM keys here carry no `first_stage_model.` prefix. Two layout differences besides names:
- the decoder's up levels are numbered in the opposite order (LDM `up.0` is the last,
  full-resolution level; Diffusers `up_blocks.0` is the first, lowest-resolution one);
- the mid-block attention projections q/k/v/proj_out are 1x1 convs `[C, C, 1, 1]` in LDM and
  Linear `[C, C]` in Diffusers. Reshaping those gives views, so no tensor data is copied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .ldm_unet import PrefixPairs, StateDict, rename_by_prefix, resnet_prefix_pairs

VAE_RESNET_PARTS = (("conv_shortcut.", "nin_shortcut."),)  # other resnet children share names

VAE_ATTENTION_PARTS = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)

# Names used by Diffusers before the Attention refactor; accepted on input only.
LEGACY_VAE_ATTENTION_PARTS = (
    ("query.", "q."),
    ("key.", "k."),
    ("value.", "v."),
    ("proj_attn.", "proj_out."),
)

VAE_TOP_LEVEL_PARTS = (
    ("encoder.conv_in.", "encoder.conv_in."),
    ("encoder.conv_norm_out.", "encoder.norm_out."),
    ("encoder.conv_out.", "encoder.conv_out."),
    ("decoder.conv_in.", "decoder.conv_in."),
    ("decoder.conv_norm_out.", "decoder.norm_out."),
    ("decoder.conv_out.", "decoder.conv_out."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
)

LDM_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")
DIFFUSERS_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
VAE_HALVES = ("encoder", "decoder")


# ---------------------------------------------------------------------------
# the mapping


def vae_prefix_pairs(config: Mapping, legacy_attention_names: bool = False) -> PrefixPairs:
    """(diffusers prefix, LDM prefix) pairs covering every VAE module."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs: PrefixPairs = list(VAE_TOP_LEVEL_PARTS)
    pairs += _encoder_pairs(levels, layers)
    pairs += _decoder_pairs(levels, layers)
    for half in VAE_HALVES:
        pairs += _mid_pairs(half, legacy_attention_names)
    return pairs


def _encoder_pairs(levels: int, layers: int) -> PrefixPairs:
    pairs: PrefixPairs = []
    for level in range(levels):
        for layer in range(layers):
            diffusers_prefix = f"encoder.down_blocks.{level}.resnets.{layer}."
            pairs += resnet_prefix_pairs(diffusers_prefix, f"encoder.down.{level}.block.{layer}.", VAE_RESNET_PARTS)
        if level < levels - 1:
            downsampler = f"encoder.down_blocks.{level}.downsamplers.0.conv."
            pairs.append((downsampler, f"encoder.down.{level}.downsample.conv."))
    return pairs


def _decoder_pairs(levels: int, layers: int) -> PrefixPairs:
    pairs: PrefixPairs = []
    for level in range(levels):
        ldm_level = levels - 1 - level  # reversed numbering
        for layer in range(layers + 1):  # decoder levels have one resnet more
            diffusers_prefix = f"decoder.up_blocks.{level}.resnets.{layer}."
            pairs += resnet_prefix_pairs(diffusers_prefix, f"decoder.up.{ldm_level}.block.{layer}.", VAE_RESNET_PARTS)
        if level < levels - 1:
            upsampler = f"decoder.up_blocks.{level}.upsamplers.0.conv."
            pairs.append((upsampler, f"decoder.up.{ldm_level}.upsample.conv."))
    return pairs


def _mid_pairs(half: str, legacy_attention_names: bool) -> PrefixPairs:
    pairs = resnet_prefix_pairs(f"{half}.mid_block.resnets.0.", f"{half}.mid.block_1.", VAE_RESNET_PARTS)
    pairs += resnet_prefix_pairs(f"{half}.mid_block.resnets.1.", f"{half}.mid.block_2.", VAE_RESNET_PARTS)
    parts = VAE_ATTENTION_PARTS + (LEGACY_VAE_ATTENTION_PARTS if legacy_attention_names else ())
    pairs += resnet_prefix_pairs(f"{half}.mid_block.attentions.0.", f"{half}.mid.attn_1.", parts)
    return pairs


# ---------------------------------------------------------------------------
# conversion


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """Diffusers VAE state dict (new or legacy attention names) -> LDM keys (without `first_stage_model.`)."""
    prefix_map = dict(vae_prefix_pairs(config, legacy_attention_names=True))
    converted = rename_by_prefix(sd, prefix_map, "VAE diffusers->LDM")
    for key in _attention_weight_keys(("mid.attn_1",), LDM_ATTENTION_PROJECTIONS):
        if key in converted and converted[key].dim() == 2:
            weight = converted[key]
            converted[key] = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
    return converted


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """LDM VAE state dict (without `first_stage_model.`) -> Diffusers keys."""
    prefix_map = {ldm: diffusers for diffusers, ldm in vae_prefix_pairs(config)}
    converted = rename_by_prefix(sd, prefix_map, "VAE LDM->diffusers")
    for key in _attention_weight_keys(("mid_block.attentions.0",), DIFFUSERS_ATTENTION_PROJECTIONS):
        if key in converted and converted[key].dim() == 4:
            weight = converted[key]
            converted[key] = weight.reshape(weight.shape[0], weight.shape[1])
    return converted


def _attention_weight_keys(blocks: tuple[str, ...], projections: tuple[str, ...]) -> list[str]:
    return [f"{half}.{block}.{proj}.weight" for half in VAE_HALVES for block in blocks for proj in projections]


# ---------------------------------------------------------------------------
# config inference from LDM shapes


def infer_vae_config(vae_ldm_sd: Mapping[str, torch.Tensor]) -> dict:
    """An AutoencoderKL config for an LDM VAE, read off tensor shapes (SD conventions elsewhere)."""
    levels = _count_indices(vae_ldm_sd, "encoder.down.{}.block.0.conv1.weight")
    channels = [int(vae_ldm_sd[f"encoder.down.{level}.block.0.conv1.weight"].shape[0]) for level in range(levels)]
    return {
        "in_channels": int(vae_ldm_sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae_ldm_sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": _count_indices(vae_ldm_sd, "encoder.down.0.block.{}.conv1.weight"),
        "act_fn": "silu",
        "latent_channels": int(vae_ldm_sd["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "sample_size": 512,  # SD1.x value; only used as the tiling size
        "scaling_factor": 0.18215,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in vae_ldm_sd,
        "use_post_quant_conv": "post_quant_conv.weight" in vae_ldm_sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae_ldm_sd,
    }


def _count_indices(sd: Mapping[str, torch.Tensor], key_template: str) -> int:
    """Number of consecutive indices i (from 0) for which key_template.format(i) is present."""
    count = 0
    while key_template.format(count) in sd:
        count += 1
    return count
