"""networks.dylora, networks.oft, networks.lora_fa: sd-scripts' keys and shapes, each method's math, files
both ways, --network_args checks, and train_network.py runs (train, sample, save a state, resume exactly)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from networks import dylora, lora, lora_fa, lora_targets, oft
from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script
from tools.build_tiny_models import tiny_text_config, tiny_unet_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1():
    """A tiny SD1 U-Net and text encoder shared by the tests; every test unhooks what it hooks (restore())."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(False)).eval()
    return SimpleNamespace(unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**tiny_text_config(False))), vae=None)


def make(module, parts, dim=4, alpha=1.0, **args):
    return module.create_network(1.0, dim, alpha, parts.vae, parts.text_encoder, parts.unet, **args)


def randomize(network, std=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def shapes(network) -> dict:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def pick(modules, conv3x3: bool):
    return next(m for m in modules if isinstance(m.org_module, torch.nn.Conv2d) and m.org_module.kernel_size == (3, 3)) \
        if conv3x3 else next(m for m in modules if isinstance(m.org_module, torch.nn.Linear))  # fmt: skip


def layer_input(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    org = module.org_module
    if isinstance(org, torch.nn.Conv2d):
        return torch.randn(2, org.in_channels, 8, 8, generator=gen)
    return torch.randn(2, 5, org.in_features, generator=gen)


# ---------------------------------------------------------------------- DyLoRA


def test_dylora_file_is_a_lora_file(sd1):
    """Same layers, keys and shapes as networks.lora (LoCon layers with conv_dim); 3x3 convs get network_alpha."""
    dy = make(dylora, sd1, dim=4, alpha=2.0, unit="2", conv_dim="4")
    plain = make(lora, sd1, dim=4, alpha=2.0, conv_dim="4")
    assert shapes(dy) == shapes(plain)
    assert len(dy.unet_loras) == len(plain.unet_loras) and len(dy.text_encoder_loras) == len(plain.text_encoder_loras)
    assert {float(v) for k, v in dy.state_dict().items() if k.endswith(".alpha")} == {2.0}
    assert set(dict(dy.named_parameters())) >= {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down_1"}  # 2 units


def test_dylora_at_full_rank_is_lora_math(sd1):
    """Outside training every rank is used with scale alpha/r: exactly a LoRA with the same tensors."""
    dy = make(dylora, sd1, dim=4, alpha=2.0, unit="2", conv_dim="4")
    randomize(dy)
    plain, weights = lora.create_network_from_weights(1.0, None, None, sd1.text_encoder, sd1.unet, weights_sd=dy.state_dict())
    plain.load_state_dict(weights, strict=True)
    dy.eval()
    for conv in (False, True):
        mod = pick(dy.unet_loras, conv)
        x = layer_input(mod)
        twin = getattr(plain, mod.lora_name)
        with torch.no_grad():
            mod.apply_to()
            out_dy = mod.org_module(x)
            mod.restore()
            twin.apply_to()
            out_lora = twin.org_module(x)
            twin.restore()
            base = mod.org_module(x)
        assert (out_dy - base).abs().max() > 1e-4
        torch.testing.assert_close(out_dy, out_lora, rtol=1e-5, atol=1e-6)


def test_dylora_training_uses_a_random_prefix_and_trains_its_last_unit(sd1):
    dy = make(dylora, sd1, dim=6, alpha=3.0, unit="2")
    randomize(dy)
    mod = pick(dy.unet_loras, False)
    x = layer_input(mod)
    down, up = mod.weights()
    seen = set()
    mod.apply_to()
    try:
        for seed in range(12):
            torch.manual_seed(seed)
            units = int(torch.randint(mod.num_units, (1,)).item()) + 1
            seen.add(units)
            torch.manual_seed(seed)
            dy.zero_grad(set_to_none=True)
            out = mod.org_module(x)
            b = units * 2
            with torch.no_grad():
                expected = mod.org_forward(x) + x @ down[:b].T @ up[:, :b].T * (3.0 / b)  # alpha/b on the first b ranks
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            out.sum().backward()
            trained = [i for i in range(mod.num_units) if getattr(mod, f"lora_down_{i}").grad is not None]
            assert trained == [units - 1] and getattr(mod, f"lora_up_{units - 1}").grad is not None
    finally:
        mod.restore()
    assert seen == {1, 2, 3}


def test_dylora_rank_must_be_a_multiple_of_unit(sd1):
    with pytest.raises(ValueError, match="multiple of --network_args unit=3"):
        make(dylora, sd1, dim=4, unit="3")
    assert dylora.network_args_problems({"unit": "x"}) == ["--network_args unit=x: expected an integer"]
    assert "did you mean unit?" in dylora.network_args_problems({"units": "2"})[0]
    assert "multiple of unit=3" in dylora.network_args_problems({"unit": "3", "conv_dim": "4"})[0]


# ---------------------------------------------------------------------- OFT


def attention_sites(unet) -> set[str]:
    """The definition: every Linear of each U-Net attention (to_q, to_k, to_v, to_out.0)."""
    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ == "Attention":
            for child, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    names.add(f"oft_unet.{path}.{child}".replace(".", "_"))
    return names


def test_oft_keys_and_shapes(sd1):
    net = make(oft, sd1, dim=4, alpha=1e-3)
    sites = attention_sites(sd1.unet)
    assert len(sites) == 10 * 2 * 4  # tiny U-Net: 10 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    assert set(net.state_dict()) == {f"{s}.{leaf}" for s in sites for leaf in ("oft_blocks", "alpha")}
    assert net.text_encoder_loras == [] and len(net.unet_loras) == len(sites)
    for module in net.unet_loras:
        bs = module.org_module.out_features // 4
        assert tuple(module.oft_blocks.shape) == (4, bs, bs) and module.alpha.shape == () and float(module.alpha) == pytest.approx(1e-3)
    wide = make(oft, sd1, dim=4, alpha=1e-3, enable_all_linear="true", enable_conv="true")
    lora_names = {s.name.replace("lora_unet", "oft_unet", 1) for s in lora_targets.unet_sites(sd1.unet, include_conv=True)}
    assert {m.lora_name for m in wide.unet_loras} == lora_names
    linear_only = make(oft, sd1, dim=4, alpha=1e-3, enable_all_linear="true")
    assert {m.lora_name for m in linear_only.unet_loras} == {
        s.name.replace("lora_unet", "oft_unet", 1) for s in lora_targets.unet_sites(sd1.unet, include_conv=False)
    }
    with pytest.raises(ValueError, match="do not split into 3 blocks"):
        make(oft, sd1, dim=3)


def test_oft_is_identity_at_zero_and_rotates_orthogonally(sd1):
    net = make(oft, sd1, dim=4, alpha=1e-2, enable_conv="true")
    for conv in (False, True):
        mod = pick(net.unet_loras, conv)
        x = layer_input(mod)
        mod.apply_to()
        try:
            with torch.no_grad():
                torch.testing.assert_close(mod.org_module(x), mod.org_forward(x))  # B = 0: R = I
                mod.oft_blocks.copy_(torch.randn(mod.oft_blocks.shape, generator=torch.Generator().manual_seed(1)))
                rot = mod.rotation()
                eye = torch.eye(mod.block_size).expand_as(rot)
                torch.testing.assert_close(rot.transpose(1, 2) @ rot, eye, atol=1e-5, rtol=0)
                q = mod.oft_blocks - mod.oft_blocks.transpose(1, 2)
                assert q.norm() > mod.constraint  # the constraint is active: R = Cayley(Q clipped to it)
                q = q * mod.constraint / q.norm()
                torch.testing.assert_close(rot, (eye + q) @ torch.linalg.inv(eye - q), atol=1e-5, rtol=0)
                w = mod.org_module.weight
                blocks = w.reshape(4, mod.block_size, -1)
                rotated = torch.stack([rot[k].T @ blocks[k] for k in range(4)]).reshape(w.shape)  # R_kᵀ·W_k
                torch.testing.assert_close(mod.rotated_weight(w), rotated, atol=1e-6, rtol=1e-5)
                # the rotation keeps every column's norm within each block (it is orthogonal)
                torch.testing.assert_close(rotated.reshape(4, mod.block_size, -1).norm(dim=1), blocks.norm(dim=1))
                org = mod.org_module
                ref = torch.nn.functional.conv2d(x, rotated, org.bias, org.stride, org.padding) if conv \
                    else torch.nn.functional.linear(x, rotated, org.bias)  # fmt: skip
                torch.testing.assert_close(org(x), ref, atol=1e-5, rtol=1e-5)
                mod.multiplier = 0.0
                torch.testing.assert_close(org(x), mod.org_forward(x))
                mod.multiplier = 1.0
        finally:
            mod.restore()


def test_oft_merge_bakes_the_rotation(sd1):
    net = make(oft, sd1, dim=4, alpha=1e-2)
    randomize(net, std=0.01)
    mod = net.unet_loras[0]
    x = layer_input(mod)
    mod.apply_to()
    with torch.no_grad():
        hooked = mod.org_module(x)
    net.restore()
    originals = {m.lora_name: m.org_module.weight.detach().clone() for m in net.unet_loras}
    try:
        net.merge_to(sd1.text_encoder, sd1.unet, net.state_dict(), torch.float32, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(mod.org_module(x), hooked, atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            for m in net.unet_loras:
                m.org_module.weight.copy_(originals[m.lora_name])
    assert oft.network_args_problems({"enable_conv": "maybe"}) == ["--network_args enable_conv=maybe: expected true or false"]
    assert "did you mean enable_conv?" in oft.network_args_problems({"enable_convs": "true"})[0]


# ---------------------------------------------------------------------- LoRA-FA


def test_lora_fa_trains_only_lora_up(sd1):
    net = make(lora_fa, sd1, dim=4, alpha=4.0, conv_dim="4")
    assert shapes(net) == shapes(make(lora, sd1, dim=4, alpha=4.0, conv_dim="4"))
    groups = net.prepare_optimizer_params(None, None, 1e-3)
    net.prepare_grad_etc(None, None)
    net.requires_grad_(True)  # whatever switches the network on, lora_down stays frozen
    in_groups = {id(p) for g in groups for p in g["params"]}
    ups = [m.lora_up.weight for m in net.text_encoder_loras + net.unet_loras]
    assert in_groups == {id(p) for p in ups} and {id(p) for p in net.get_trainable_params()} == in_groups
    mod = pick(net.unet_loras, False)
    # the paper's init of the frozen A: N(0, 2 / (in + r))
    big = torch.cat([m.lora_down.weight.flatten() for m in net.unet_loras if m.lora_down.weight.shape[1] == 64])
    assert abs(float(big.std()) - math.sqrt(2 / 68)) < 0.02
    x = layer_input(mod)
    mod.apply_to()
    try:
        (mod.org_module(x) ** 2).sum().backward()
    finally:
        mod.restore()
    assert mod.lora_down.weight.grad is None and mod.lora_up.weight.grad is not None
    down_before = mod.lora_down.weight.clone()
    with torch.no_grad():
        mod.lora_up.weight.fill_(1.0)
    keys_scaled, _, top = net.apply_max_norm_regularization(0.5, "cpu")
    assert keys_scaled == 1 and top <= 0.5 + 1e-5 and torch.equal(mod.lora_down.weight, down_before)
    assert "for networks.lora_fa" in lora_fa.network_args_problems({"conv_dims": "4"})[0]


# ---------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "module, dim, alpha, args",
    [(dylora, 4, 2.0, {"unit": "2", "conv_dim": "4"}), (oft, 4, 1e-3, {"enable_all_linear": "true", "enable_conv": "true"}),
     (lora_fa, 4, 1.0, {"conv_dim": "4", "conv_alpha": "2"})],
    ids=["dylora", "oft", "lora_fa"],
)  # fmt: skip
def test_files_round_trip(module, dim, alpha, args, sd1, tmp_path):
    net = make(module, sd1, dim, alpha, **args)
    randomize(net)
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), torch.float16, {"ss_network_module": module.__name__})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == module.__name__ and "sshs_model_hash" in meta
    saved = load_file(path)
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes(net)
    assert all(v.dtype == torch.float16 for v in saved.values())
    back, weights = module.create_network_from_weights(1.0, str(path), None, sd1.text_encoder, sd1.unet, **args)
    back.apply_to(sd1.text_encoder, sd1.unet)
    try:
        back.load_state_dict(weights, strict=True)
        loaded = back.state_dict()
        assert {k: tuple(v.shape) for k, v in loaded.items()} == shapes(net)
        assert all(torch.equal(loaded[k].half(), v) for k, v in saved.items())
        assert back.load_weights(str(path)) is not None
    finally:
        back.restore()
    if module is dylora:  # a DyLoRA file is a LoRA file for every LoRA loader
        plain, weights = lora.create_network_from_weights(1.0, str(path), None, sd1.text_encoder, sd1.unet)
        plain.load_state_dict(weights, strict=True)


# ---------------------------------------------------------------------- train_network.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dreambooth_folders(tmp_path_factory.mktemp("modules_data"), count=2)


@pytest.mark.parametrize(
    "module, args", [("dylora", ["unit=2", "conv_dim=4"]), ("oft", ["enable_all_linear=true", "--network_alpha", "1e-2"])]
)
def test_train_network_trains_samples_and_resumes_exactly(module, args, tiny_models, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks square --w 64 --h 64 --s 2\n")
    common = ["--network_module", f"networks.{module}", "--max_train_steps", "2", "--network_args", *args]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, straight, *common, "--save_every_n_steps", "1",
                        "--save_state", "--sample_every_n_steps", "2", "--sample_prompts", str(prompts)))  # fmt: skip
    assert_ok(result)
    assert len(list((straight / "sample").glob("*.png"))) == 1
    final = load_file(straight / "tiny.safetensors")
    first = load_file(straight / "tiny-step00000001.safetensors")
    assert max(float((final[k].float() - first[k].float()).abs().max()) for k in final) > 0  # it trains
    with safe_open(str(straight / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == f"networks.{module}" and meta["ss_steps"] == "2"
    leaves = ("oft_blocks", "alpha") if module == "oft" else ("lora_down.weight", "lora_up.weight", "alpha")
    assert all(k.endswith(leaves) for k in final)
    state = straight / "tiny-step00000001-state"
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, resumed, *common, "--resume", str(state))))
    again = load_file(resumed / "tiny.safetensors")
    assert max(float((final[k] - again[k]).abs().max()) for k in final) == 0.0


def test_lora_fa_continues_from_a_file_with_lora_down_frozen(tiny_models, data, tmp_path):
    """--network_weights + --dim_from_weights: ranks from the file; after training lora_down is the file's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_models["sd1"], subfolder="text_encoder")
    start = lora_fa.create_network(1.0, 2, 1.0, None, text_encoder, unet, conv_dim="2")
    randomize(start, std=0.02)
    start.save_weights(str(tmp_path / "start.safetensors"), None, {})
    out = tmp_path / "out"
    result = run_script("train_network.py", *lora_args(
        tiny_models["sd1"], data, out, "--network_module", "networks.lora_fa", "--max_train_steps", "2",
        "--network_weights", str(tmp_path / "start.safetensors"), "--dim_from_weights",
    ))  # fmt: skip
    assert_ok(result)
    before, after = load_file(tmp_path / "start.safetensors"), load_file(out / "tiny.safetensors")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}  # rank 2, conv layers too
    assert all(torch.equal(after[k], before[k]) for k in after if k.endswith("lora_down.weight"))
    assert max(float((after[k] - before[k]).abs().max()) for k in after if k.endswith("lora_up.weight")) > 0
