"""LDM single-file <-> Diffusers / transformers state-dict conversion (library/models/ldm_conversion.py)."""

from __future__ import annotations

import accelerate
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.ldm_conversion import (
    clip_text_diffusers_to_ldm,
    clip_text_ldm_to_diffusers,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    is_v2_ldm,
    join_ldm_state_dict,
    open_clip_diffusers_to_ldm,
    open_clip_ldm_to_diffusers,
    split_ldm_state_dict,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)

# ---------------------------------------------------------------------------
# model configs

CROSS_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

TINY_UNET_SD1 = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=CROSS_DOWN,
    up_block_types=CROSS_UP,
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=8,
    norm_num_groups=32,
)
TINY_UNET_SD2 = {
    **TINY_UNET_SD1,
    "use_linear_projection": True,
    "attention_head_dim": [1, 1, 1, 1],
    "cross_attention_dim": 64,
}

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=list(CROSS_DOWN),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=list(CROSS_UP),
)
# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
UNET_STRUCTURAL_FIELDS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "upcast_attention",
    "norm_num_groups",
    "flip_sin_to_cos",
    "freq_shift",
)

TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

TINY_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=5,
    num_attention_heads=1,
    hidden_act="quick_gelu",
)
TINY_OPEN_CLIP = {**TINY_CLIP_L, "hidden_size": 64, "num_hidden_layers": 3, "hidden_act": "gelu"}


# ---------------------------------------------------------------------------
# helpers


def build_unet(config: dict) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def build_vae(config: dict) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**config)


def build_text(config: dict) -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**config))


def build_empty_unet(config: dict) -> UNet2DConditionModel:
    with accelerate.init_empty_weights():
        return UNet2DConditionModel(**config)


def assert_identical(expected: dict, actual: dict) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


def shapes(sd: dict) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in sd.items()}


def with_prefix(prefix: str, sd: dict) -> dict:
    return {prefix + key: tensor for key, tensor in sd.items()}


@pytest.fixture(scope="module")
def unet_sd1() -> UNet2DConditionModel:
    return build_unet(TINY_UNET_SD1)


@pytest.fixture(scope="module")
def unet_sd2() -> UNet2DConditionModel:
    return build_unet(TINY_UNET_SD2)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return build_vae(TINY_VAE)


@pytest.fixture(scope="module")
def clip_l() -> CLIPTextModel:
    return build_text(TINY_CLIP_L)


@pytest.fixture(scope="module")
def open_clip() -> CLIPTextModel:
    return build_text(TINY_OPEN_CLIP)


@pytest.fixture(params=["sd1", "sd2"])
def tiny_unet(request, unet_sd1, unet_sd2) -> UNet2DConditionModel:
    return unet_sd1 if request.param == "sd1" else unet_sd2


# ---------------------------------------------------------------------------
# U-Net


def test_unet_round_trip_is_bit_identical(tiny_unet):
    original = tiny_unet.state_dict()
    ldm = unet_diffusers_to_ldm(original, tiny_unet.config)
    assert len(ldm) == len(original)
    assert_identical(original, unet_ldm_to_diffusers(ldm, tiny_unet.config))


def test_unet_conversion_reuses_tensors_and_leaves_input_alone(unet_sd1):
    original = unet_sd1.state_dict()
    keys_before = list(original)
    ldm = unet_diffusers_to_ldm(original, unet_sd1.config)
    assert list(original) == keys_before
    assert ldm["input_blocks.0.0.weight"] is original["conv_in.weight"]


def test_unet_ldm_matches_diffusers_own_converter(tiny_unet):
    """Independent check of our LDM names: Diffusers' single-file loader must read them back."""
    original = tiny_unet.state_dict()
    ldm = with_prefix("model.diffusion_model.", unet_diffusers_to_ldm(original, tiny_unet.config))
    assert_identical(original, convert_ldm_unet_checkpoint(ldm, dict(tiny_unet.config)))


def test_unet_unknown_key_is_an_error(unet_sd1):
    ldm = unet_diffusers_to_ldm(unet_sd1.state_dict(), unet_sd1.config)
    ldm["label_emb.0.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="label_emb"):
        unet_ldm_to_diffusers(ldm, unet_sd1.config)


@pytest.mark.parametrize("v2", [False, True])
def test_inferred_tiny_unet_config_rebuilds_same_model(v2, unet_sd1, unet_sd2):
    unet = unet_sd2 if v2 else unet_sd1
    ldm = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    config = infer_unet_config(ldm, v2=v2, v_parameterization=False)
    assert config["attention_head_dim"] == ([1, 1, 1, 1] if v2 else 8)
    assert config["use_linear_projection"] is v2
    rebuilt = build_empty_unet(config)
    assert shapes(rebuilt.state_dict()) == shapes(unet.state_dict())
    assert_identical(unet.state_dict(), unet_ldm_to_diffusers(ldm, config))


@pytest.mark.parametrize(
    ("config", "v2", "v_parameterization"), [(SD15_UNET, False, False), (SD21_UNET, True, True)], ids=["sd15", "sd21"]
)
def test_inferred_full_size_unet_config(config, v2, v_parameterization):
    unet = build_empty_unet(config)
    ldm = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    inferred = infer_unet_config(ldm, v2=v2, v_parameterization=v_parameterization)
    for field in UNET_STRUCTURAL_FIELDS:
        assert inferred[field] == unet.config[field] or list(inferred[field]) == list(unet.config[field]), field
    assert shapes(build_empty_unet(inferred).state_dict()) == shapes(unet.state_dict())


def test_inferred_sd2_base_unet_uses_64px_latents():
    ldm = unet_diffusers_to_ldm(build_empty_unet(SD21_UNET).state_dict(), SD21_UNET)
    config = infer_unet_config(ldm, v2=True, v_parameterization=False)
    assert config["sample_size"] == 64
    assert config["upcast_attention"] is False


def test_full_size_sd15_unet_ldm_names():
    unet = build_empty_unet(SD15_UNET)
    original = unet.state_dict()
    ldm = unet_diffusers_to_ldm(original, unet.config)
    assert len(ldm) == 686
    expected = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        ),
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2.weight",
        "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "middle_block.2.emb_layers.1.weight": "mid_block.resnets.1.time_emb_proj.weight",
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "output_blocks.3.0.skip_connection.weight": "up_blocks.1.resnets.0.conv_shortcut.weight",
        "output_blocks.11.1.proj_out.weight": "up_blocks.3.attentions.2.proj_out.weight",
        "out.0.weight": "conv_norm_out.weight",
        "out.2.weight": "conv_out.weight",
        "time_embed.0.weight": "time_embedding.linear_1.weight",
        "time_embed.2.weight": "time_embedding.linear_2.weight",
        "input_blocks.0.0.weight": "conv_in.weight",
    }
    for ldm_key, diffusers_key in expected.items():
        assert ldm[ldm_key] is original[diffusers_key], ldm_key


# ---------------------------------------------------------------------------
# VAE


def test_vae_round_trip_is_bit_identical(vae):
    original = vae.state_dict()
    ldm = vae_diffusers_to_ldm(original, vae.config)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert ldm["decoder.mid.attn_1.q.bias"].shape == (64,)
    assert_identical(original, vae_ldm_to_diffusers(ldm, vae.config))


def test_vae_ldm_matches_diffusers_own_converter(vae):
    original = vae.state_dict()
    ldm = with_prefix("first_stage_model.", vae_diffusers_to_ldm(original, vae.config))
    assert_identical(original, convert_ldm_vae_checkpoint(ldm, dict(vae.config)))


def test_vae_accepts_legacy_diffusers_attention_names(vae):
    legacy_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    legacy = {}
    for key, tensor in vae.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        legacy[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    expected = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    assert_identical(expected, vae_diffusers_to_ldm(legacy, vae.config))


def test_inferred_vae_config_rebuilds_same_model(vae):
    ldm = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    config = infer_vae_config(ldm)
    assert config["scaling_factor"] == 0.18215
    assert list(config["block_out_channels"]) == [32, 32, 64, 64]
    assert config["layers_per_block"] == 1
    with accelerate.init_empty_weights():
        rebuilt = AutoencoderKL(**config)
    assert shapes(rebuilt.state_dict()) == shapes(vae.state_dict())


def test_full_size_vae_ldm_names():
    with accelerate.init_empty_weights():
        vae = AutoencoderKL(**SD_VAE)
    original = vae.state_dict()
    ldm = vae_diffusers_to_ldm(original, vae.config)
    assert len(ldm) == 248
    assert "encoder.down.0.block.0.norm1.weight" in ldm
    assert ldm["decoder.up.3.block.0.conv1.weight"] is original["decoder.up_blocks.0.resnets.0.conv1.weight"]
    shortcut = original["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"]
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"] is shortcut
    assert ldm["decoder.up.1.upsample.conv.weight"] is original["decoder.up_blocks.2.upsamplers.0.conv.weight"]
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["encoder.norm_out.weight"] is original["encoder.conv_norm_out.weight"]
    inferred = infer_vae_config(ldm)
    assert list(inferred["block_out_channels"]) == SD_VAE["block_out_channels"]
    assert inferred["layers_per_block"] == 2


# ---------------------------------------------------------------------------
# SD1 text encoder (CLIP-L, HF names)


def test_clip_text_round_trip_is_bit_identical(clip_l):
    original = clip_l.state_dict()
    assert not any(key.startswith("text_model.") for key in original)  # transformers 5 layout
    ldm = clip_text_diffusers_to_ldm(original)
    assert all(key.startswith("text_model.") for key in ldm)
    assert "text_model.encoder.layers.4.self_attn.q_proj.weight" in ldm
    assert_identical(original, clip_text_ldm_to_diffusers(ldm))


def test_clip_text_reads_ldm_without_text_model_and_drops_position_ids(clip_l):
    original = clip_l.state_dict()
    bare = {**original, "embeddings.position_ids": torch.arange(77)[None]}
    legacy = with_prefix("text_model.", bare)  # transformers 4.x / most LDM files
    assert_identical(original, clip_text_ldm_to_diffusers(bare))
    assert_identical(original, clip_text_ldm_to_diffusers(legacy))
    assert_identical(clip_text_diffusers_to_ldm(original), clip_text_diffusers_to_ldm(legacy))


def test_inferred_clip_text_config_rebuilds_same_model(clip_l):
    ldm = clip_text_diffusers_to_ldm(clip_l.state_dict())
    config = infer_text_config(ldm, v2=False)
    assert config["num_hidden_layers"] == 5
    assert config["num_attention_heads"] == 1
    assert config["hidden_act"] == "quick_gelu"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (49406, 49407, 49407)
    rebuilt = CLIPTextModel(CLIPTextConfig(**config))
    assert shapes(rebuilt.state_dict()) == shapes(clip_l.state_dict())


# ---------------------------------------------------------------------------
# SD2 text encoder (OpenCLIP-H names)


def test_open_clip_round_trip_is_bit_identical(open_clip):
    original = open_clip.state_dict()
    ldm = open_clip_diffusers_to_ldm(original, num_layers=3)
    assert_identical(original, open_clip_ldm_to_diffusers(ldm, num_layers=3))


def test_open_clip_ldm_layout(open_clip):
    original = open_clip.state_dict()
    ldm = open_clip_diffusers_to_ldm(original, num_layers=3)
    blocks = {int(key.split(".")[2]) for key in ldm if key.startswith("transformer.resblocks.")}
    assert blocks == {0, 1, 2, 3}  # one more than the model uses
    assert ldm["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert ldm["transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * 64,)
    assert torch.equal(
        ldm["transformer.resblocks.1.attn.in_proj_weight"][64:128], original["encoder.layers.1.self_attn.k_proj.weight"]
    )
    assert ldm["positional_embedding"] is original["embeddings.position_embedding.weight"]
    assert ldm["ln_final.weight"] is original["final_layer_norm.weight"]
    assert ldm["transformer.resblocks.2.mlp.c_fc.weight"] is original["encoder.layers.2.mlp.fc1.weight"]
    for key in [k for k in ldm if k.startswith("transformer.resblocks.3.")]:
        previous = ldm[key.replace("resblocks.3.", "resblocks.2.")]
        assert torch.equal(ldm[key], previous)
        assert ldm[key].data_ptr() != previous.data_ptr()  # safetensors refuses shared tensors
    assert torch.equal(ldm["text_projection"], torch.ones(64, 64))
    assert ldm["logit_scale"].item() == 1.0


def test_open_clip_ldm_matches_diffusers_own_converter(open_clip):
    original = open_clip.state_dict()
    ldm = with_prefix("cond_stage_model.model.", open_clip_diffusers_to_ldm(original, num_layers=3))
    theirs = convert_open_clip_checkpoint(open_clip, ldm)
    used = {k.removeprefix("text_model."): t for k, t in theirs.items() if "layers.3." not in k}
    assert_identical(original, used)


def test_open_clip_reads_text_model_prefixed_input(open_clip):
    original = open_clip.state_dict()
    expected = open_clip_diffusers_to_ldm(original, num_layers=3)
    assert_identical(expected, open_clip_diffusers_to_ldm(with_prefix("text_model.", original), num_layers=3))


def test_inferred_open_clip_config_rebuilds_same_model(open_clip):
    ldm = open_clip_diffusers_to_ldm(open_clip.state_dict(), num_layers=3)
    config = infer_text_config(ldm, v2=True)
    assert config["num_hidden_layers"] == 3
    assert config["num_attention_heads"] == 1
    assert config["hidden_act"] == "gelu"
    assert config["pad_token_id"] == 0
    rebuilt = CLIPTextModel(CLIPTextConfig(**config))
    assert shapes(rebuilt.state_dict()) == shapes(open_clip.state_dict())


# ---------------------------------------------------------------------------
# whole checkpoints


def test_split_and_join_sd1(unet_sd1, vae, clip_l):
    unet = unet_diffusers_to_ldm(unet_sd1.state_dict(), unet_sd1.config)
    vae_ldm = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    text = clip_text_diffusers_to_ldm(clip_l.state_dict())
    checkpoint = join_ldm_state_dict(unet, vae_ldm, text, v2=False)
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in checkpoint
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in checkpoint
    assert not is_v2_ldm(checkpoint)
    extra = {"model_ema.decay": torch.tensor(0.999), "alphas_cumprod": torch.ones(1000)}
    parts = split_ldm_state_dict({**checkpoint, **extra})
    for expected, actual in zip((unet, vae_ldm, text, extra), parts):
        assert_identical(expected, actual)


def test_split_sd1_file_without_text_model_level(clip_l):
    bare = with_prefix("cond_stage_model.transformer.", clip_l.state_dict())
    _, _, text, other = split_ldm_state_dict(bare)
    assert not other
    assert_identical(clip_l.state_dict(), clip_text_ldm_to_diffusers(text))


def test_split_and_join_sd2(unet_sd2, open_clip):
    unet = unet_diffusers_to_ldm(unet_sd2.state_dict(), unet_sd2.config)
    text = open_clip_diffusers_to_ldm(open_clip.state_dict(), num_layers=3)
    checkpoint = join_ldm_state_dict(unet, {}, text, v2=True)
    assert "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight" in checkpoint
    assert "cond_stage_model.model.text_projection" in checkpoint
    assert is_v2_ldm(checkpoint)
    split_unet, split_vae, split_text, other = split_ldm_state_dict(checkpoint)
    assert_identical(unet, split_unet)
    assert_identical(text, split_text)
    assert not split_vae and not other
    config = infer_text_config(split_text, v2=True)
    assert_identical(open_clip.state_dict(), open_clip_ldm_to_diffusers(split_text, config["num_hidden_layers"]))


@pytest.mark.parametrize("v2", [False, True], ids=["clip_l", "open_clip_h"])
def test_full_size_text_encoder_config(v2):
    hidden, layers = (1024, 23) if v2 else (768, 12)
    config = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers)
    with accelerate.init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig(num_attention_heads=hidden // 64, **config))
    original = model.state_dict()
    ldm = open_clip_diffusers_to_ldm(original, layers) if v2 else clip_text_diffusers_to_ldm(original)
    if v2:
        assert ldm["transformer.resblocks.23.attn.in_proj_weight"].shape == (3 * 1024, 1024)
        assert ldm["text_projection"].shape == (1024, 1024)
    inferred = infer_text_config(ldm, v2=v2)
    assert {k: inferred[k] for k in config} == config
    assert inferred["num_attention_heads"] == hidden // 64
    assert inferred["max_position_embeddings"] == 77
