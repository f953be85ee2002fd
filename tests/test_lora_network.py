"""networks/lora.py: kohya-compatible targets, keys, math, files, dropout and diffusers interop."""

from __future__ import annotations

import argparse
import hashlib
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from bench.sd15_configs import SD15_TEXT, SD15_UNET
from library.training.metadata import precalculate_safetensors_hashes
from library.training.network_args import add_network_arguments, network_option_problems
from networks import lora
from tools.build_tiny_models import build_tiny_parts, tiny_text_config, tiny_unet_config

SD2_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
SD2_TEXT = {**SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "hidden_act": "gelu"}  # fmt: skip
KEY_EXAMPLES = (  # reference/formats.md §1.4
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj.lora_down.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    "lora_te_text_model_encoder_layers_11_mlp_fc2.alpha",
)


def meta_models(unet_config, text_config):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config), CLIPTextModel(CLIPTextConfig(**text_config))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers: with 2 threads on a busy 2-core machine each op waits on the other thread (8 ms vs 10 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd1():
    return build_tiny_parts(False, seed=0)


def randomize_up(network, std=0.5, seed=1):
    """Non-zero lora_up weights (they start at zero), so the network changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            w = module.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def unet_out(parts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 77, parts.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return parts.unet(sample, 10, cond).sample


def te_out(parts):
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with torch.no_grad():
        return parts.text_encoder(ids)[0]


# ---------------------------------------------------------------------- targets, counts, keys


@pytest.mark.parametrize(
    "unet_config, text_config, n_te", [(SD15_UNET, SD15_TEXT, 72), (SD2_UNET, SD2_TEXT, 138)], ids=["sd15", "sd2"]
)
def test_full_size_module_counts_and_keys(unet_config, text_config, n_te):
    unet, te = meta_models(unet_config, text_config)
    assert lora.count_lora_modules(unet, te) == (192, n_te)
    assert lora.count_lora_modules(unet, te, conv_dim=4) == (278, n_te)
    with torch.device("meta"):
        network = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4")
        plain = lora.create_network(1.0, 4, 1, None, te, unet)  # upstream bug #1: targets must not leak
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (278, n_te)
    assert (len(plain.unet_loras), len(plain.text_encoder_loras)) == (192, n_te)
    assert len(plain.state_dict()) == (192 + n_te) * 3
    keys = set(network.state_dict())
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    if n_te == 72:
        assert set(KEY_EXAMPLES) <= keys
    plain.apply_to(te, unet, apply_text_encoder=False)  # U-Net only: 576 tensors for SD1.5
    assert len(plain.state_dict()) == 576 and not plain.text_encoder_loras


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_tiny_model_counts_follow_its_config(v2):
    cfg, text = tiny_unet_config(v2), tiny_text_config(v2)
    lpb, channels = cfg["layers_per_block"], cfg["block_out_channels"]
    cross_down = sum(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    cross_up = sum(t.startswith("CrossAttn") for t in cfg["up_block_types"])
    transformers = cross_down * lpb + 1 + cross_up * (lpb + 1)
    resnets = len(channels) * lpb + 2 + len(channels) * (lpb + 1)
    # conv_shortcut where a down block changes width, and in every up resnet (skip concat widens it)
    shortcuts = sum(a != b for a, b in zip(channels, channels[1:])) + len(channels) * (lpb + 1)
    resamplers = 2 * (len(channels) - 1)
    expected_conv = transformers * 12 + resnets * 3 + shortcuts + resamplers
    n_te = text["num_hidden_layers"] * 6
    parts = build_tiny_parts(v2, seed=0)
    assert lora.count_lora_modules(parts.unet, parts.text_encoder) == (transformers * 12, n_te)
    assert lora.count_lora_modules(parts.unet, parts.text_encoder, conv_dim=2) == (expected_conv, n_te)


# ---------------------------------------------------------------------- math


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_wrapped_forward_adds_exactly_the_lora_delta(kind):
    torch.manual_seed(0)
    layer = {"linear": torch.nn.Linear(12, 10), "conv3x3": torch.nn.Conv2d(6, 5, 3, padding=1),
             "conv1x1": torch.nn.Conv2d(6, 5, 1)}[kind]  # fmt: skip
    x = torch.randn(2, 7, 12) if kind == "linear" else torch.randn(2, 6, 9, 9)
    before = layer(x)
    module = lora.LoRAModule("lora_unet_x", layer, multiplier=0.7, lora_dim=3, alpha=2.0)
    module.apply_to()
    assert torch.equal(layer(x), before)  # up starts at zero
    torch.nn.init.normal_(module.lora_up.weight)
    down, up = module.lora_down.weight, module.lora_up.weight
    if kind == "conv3x3":
        delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    else:
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    delta = delta * (2.0 / 3) * 0.7
    if kind == "linear":
        expected = torch.nn.functional.linear(x, layer.weight + delta, layer.bias)
    else:
        expected = torch.nn.functional.conv2d(x, layer.weight + delta, layer.bias, padding=layer.padding)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.delta_weight(), delta, atol=1e-6, rtol=1e-6)
    module.restore()
    assert torch.equal(layer(x), before)


def test_apply_keeps_base_keys_identity_at_init_and_merge_matches(sd1):
    keys = (set(sd1.unet.state_dict()), set(sd1.text_encoder.state_dict()))
    base_u, base_t = unet_out(sd1), te_out(sd1)
    network = lora.create_network(1.0, 4, 2, None, sd1.text_encoder, sd1.unet, conv_dim="2", conv_alpha="1")
    network.apply_to(sd1.text_encoder, sd1.unet)
    assert (set(sd1.unet.state_dict()), set(sd1.text_encoder.state_dict())) == keys
    assert torch.equal(unet_out(sd1), base_u) and torch.equal(te_out(sd1), base_t)
    randomize_up(network, std=0.05)
    network.set_multiplier(0.5)
    hooked_u, hooked_t = unet_out(sd1), te_out(sd1)
    assert (hooked_u - base_u).abs().max() > 1e-3
    assert network.merge_into_models() == len(network.unet_loras) + len(network.text_encoder_loras)
    torch.testing.assert_close(unet_out(sd1), hooked_u, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(te_out(sd1), hooked_t, atol=1e-4, rtol=1e-4)


def test_merge_to_from_weights_equals_hooked_network(sd1, tmp_path):
    network = lora.create_network(1.0, 4, 2, None, sd1.text_encoder, sd1.unet)
    randomize_up(network, std=0.05)
    network.save_weights(tmp_path / "a.safetensors", None, {})
    network.apply_to(sd1.text_encoder, sd1.unet)
    hooked = unet_out(sd1)
    fresh = build_tiny_parts(False, seed=0)
    merger, weights = lora.create_network_from_weights(1.0, str(tmp_path / "a.safetensors"), None,
                                                       fresh.text_encoder, fresh.unet, for_inference=True)  # fmt: skip
    merger.merge_to(fresh.text_encoder, fresh.unet, weights, torch.float32, "cpu")
    torch.testing.assert_close(unet_out(fresh), hooked, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- files


def test_save_load_round_trip_metadata_and_hashes(sd1, tmp_path):
    network = lora.create_network(1.0, 4, 2, None, sd1.text_encoder, sd1.unet, conv_dim="2")
    randomize_up(network)
    path = tmp_path / "net.safetensors"
    network.save_weights(path, None, {"ss_network_dim": "4", "modelspec.title": "t"})
    written = safetensors.torch.load_file(path)
    assert written.keys() == network.state_dict().keys()
    alpha = written["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.dim() == 0 and float(alpha) == 2.0
    assert float(written["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0  # conv_alpha default
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "t"
    # sshs_model_hash: SHA-256 of the file's tensor data section (independent of the header)
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(written, meta)

    other = lora.create_network(1.0, 4, 2, None, sd1.text_encoder, sd1.unet, conv_dim="2")
    info = other.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for key, value in network.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key

    network.save_weights(tmp_path / "net.pt", torch.float16, {"ss_x": "1"})
    plain = torch.load(tmp_path / "net.pt", weights_only=True)
    assert isinstance(plain, dict) and plain.keys() == written.keys()
    assert all(v.dtype == torch.float16 for v in plain.values())
    assert not any(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_create_network_from_weights_takes_sites_ranks_and_alphas(sd1):
    source = lora.create_network(1.0, 8, 4, None, sd1.text_encoder, sd1.unet, conv_dim="2", conv_alpha="0.5")
    source.apply_to(sd1.text_encoder, sd1.unet, apply_text_encoder=False)
    weights = source.state_dict()
    del weights["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]  # old file without alpha -> alpha = rank
    network, returned = lora.create_network_from_weights(1.0, None, None, sd1.text_encoder, sd1.unet, weights)
    assert returned is weights
    assert not network.text_encoder_loras and len(network.unet_loras) == len(source.unet_loras)
    by_name = {m.lora_name: m for m in network.unet_loras}
    assert by_name["lora_unet_down_blocks_0_attentions_0_proj_in"].lora_dim == 8
    assert by_name["lora_unet_down_blocks_0_attentions_0_proj_in"].scale == 1.0
    assert by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].scale == 0.5
    assert by_name["lora_unet_down_blocks_0_resnets_0_conv1"].lora_dim == 2
    assert by_name["lora_unet_down_blocks_0_resnets_0_conv1"].scale == 0.25


def test_sd2_proj_weights_load_in_either_linear_or_1x1_conv_form():
    parts = build_tiny_parts(True, seed=0)
    network = lora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet)
    randomize_up(network)
    as_conv = {k: (v[..., None, None] if "proj_in.lora" in k or "proj_out.lora" in k else v)
               for k, v in network.state_dict().items()}  # fmt: skip
    assert as_conv["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4
    loaded, _ = lora.create_network_from_weights(1.0, None, None, parts.text_encoder, parts.unet, as_conv)
    loaded.load_weights(as_conv)
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="different rank"):
        lora.create_network(1.0, 2, 1, None, parts.text_encoder, parts.unet).load_weights(network.state_dict())


def test_loaded_alpha_sets_the_scale(sd1):
    network = lora.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet)
    weights = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v) for k, v in network.state_dict().items()}
    network.load_weights(weights)
    assert all(m.scale == 2.0 for m in network.unet_loras + network.text_encoder_loras)


# ---------------------------------------------------------------------- training behaviour


def test_dropouts_only_act_in_train_mode(sd1):
    network = lora.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet, neuron_dropout=0.5,
                                  rank_dropout="0.3", module_dropout="0.2")  # fmt: skip
    module = network.text_encoder_loras[0]
    assert (module.dropout, module.rank_dropout, module.module_dropout) == (0.5, 0.3, 0.2)
    network.apply_to(sd1.text_encoder, sd1.unet)
    randomize_up(network)
    network.eval()
    assert torch.equal(te_out(sd1), te_out(sd1))
    network.on_epoch_start(sd1.text_encoder, sd1.unet)  # train mode
    torch.manual_seed(0)
    assert not torch.equal(te_out(sd1), te_out(sd1))


def test_optimizer_groups_loraplus_block_lr_and_max_norm(sd1):
    network = lora.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet, loraplus_unet_lr_ratio="16")
    groups = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-5), ("unet", 1e-4), ("unet plus", 1.6e-3)]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(network.parameters()))
    torch.optim.AdamW(groups)  # extra "name" keys are accepted
    network.apply_to(sd1.text_encoder, sd1.unet, apply_text_encoder=True, apply_unet=False)
    assert [g["name"] for g in network.prepare_optimizer_params(0, None, 1e-3)] == []  # TE lr 0 -> nothing

    zeros_mid = ",".join(["1"] * 12)
    blocks = lora.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet, down_lr_weight=zeros_mid,
                                 mid_lr_weight="0", up_lr_weight="sine+0.5")  # fmt: skip
    assert not any("mid_block" in m.lora_name for m in blocks.unet_loras)  # lr weight 0 -> no LoRA
    names = {g["name"]: g["lr"] for g in blocks.prepare_optimizer_params(None, 1.0, 1.0)}
    # up_blocks_3 attentions_1 is LDM output block 10 (block 23): sine curve at 10/11, plus 0.5
    assert names["unet_block1"] == 1.0
    assert names["unet_block23"] == pytest.approx(math.sin(math.pi / 2 * 10 / 11) + 0.5)

    randomize_up(network, std=5.0)
    scaled, mean, top = network.apply_max_norm_regularization(1.0, "cpu")
    assert scaled > 0 and top <= 1.0 + 1e-5
    norms = [m.delta_weight(1.0).norm() for m in network.text_encoder_loras]
    assert max(norms) <= 1.0 + 1e-4


def test_block_dims_set_rank_per_block(sd1):
    dims = ["4"] * 25
    dims[1] = "0"  # down_blocks_0 resnets/attentions 0: no LoRA
    dims[13 + 3 * 3 + 1] = "8"  # up_blocks_3 attentions/resnets 1 (LDM output block 10)
    network = lora.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet, block_dims=",".join(dims))
    names = {m.lora_name: m.lora_dim for m in network.unet_loras}
    assert not any(n.startswith("lora_unet_down_blocks_0_attentions_0_") for n in names)
    assert names["lora_unet_up_blocks_3_attentions_1_proj_in"] == 8
    assert names["lora_unet_up_blocks_3_attentions_0_proj_in"] == 4


def test_network_args_problems():
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    args = parser.parse_args(["--network_args", "conv_dm=4", "rank_dropout=1.5", "--network_train_unet_only",
                              "--network_train_text_encoder_only", "--dim_from_weights"])  # fmt: skip
    problems = " | ".join(network_option_problems(args))
    assert "exclude each other" in problems and "--dim_from_weights needs --network_weights" in problems
    assert "did you mean conv_dim?" in problems and "rank_dropout=1.5" in problems
    args = parser.parse_args(["--network_args", "conv_dim", "--text_encoder_lr", "1e-4", "2e-4"])
    problems = " | ".join(network_option_problems(args))
    assert "expected key=value" in problems and "one text encoder" in problems
    assert network_option_problems(parser.parse_args(["--network_args", "conv_dim=4", "conv_alpha=1"])) == []
    with pytest.raises(ValueError, match="did you mean"):
        lora.create_network(1.0, 4, 1, None, None, None, conv_dm="4")


# ---------------------------------------------------------------------- interop with diffusers (peft backend)


@pytest.mark.parametrize("model, conv", [("sd1", False), ("sd1", True), ("sd2", True)],
                         ids=["sd1-lora", "sd1-locon", "sd2-locon"])  # fmt: skip
def test_file_loads_in_diffusers_with_the_same_result(tiny_models, tmp_path, model, conv):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.models.loading import load_base_model

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(0)
        return pipe("a photo of a cat", num_inference_steps=3, height=64, width=64, generator=gen,
                    output_type="np").images  # fmt: skip

    folder = str(tiny_models[model])
    parts = load_base_model(folder, v2=model == "sd2", v_parameterization=model == "sd2")
    ours = parts.to_pipeline(scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))
    base = generate(ours)
    extra = {"conv_dim": "4", "conv_alpha": "2"} if conv else {}
    network = lora.create_network(1.0, 4, 2, parts.vae, parts.text_encoder, parts.unet, **extra)
    randomize_up(network, std=0.5)
    network.save_weights(tmp_path / "net.safetensors", None, {})
    network.apply_to(parts.text_encoder, parts.unet)
    with_ours = generate(ours)

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path), weight_name="net.safetensors")
    peft_unet = sum(hasattr(m, "lora_A") for m in pipe.unet.modules())
    peft_te = sum(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())
    assert (peft_unet, peft_te) == (len(network.unet_loras), len(network.text_encoder_loras))
    with_diffusers = generate(pipe)

    assert abs(with_ours - base).max() > 0.05  # the LoRA really changes the image
    assert abs(with_ours - with_diffusers).max() <= 1e-3
