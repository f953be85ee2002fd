"""The CPU product path for the U-Net's large convolutions (library/training/cpu_convolutions.py): same
results as torch's own convolution, taken exactly where the routing rule says, and training through it
equal to training without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train_network
from library.training import cpu_convolutions
from library.training.cpu_convolutions import conv3x3_as_product, routable, route_weight_bound_convolutions
from library.training.entry import run_recipe
from networks.lora import LoRAModule
from tests.training_helpers import dreambooth_folders, lora_args, max_state_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_product_matches_conv2d_with_gradients(batch, with_bias):
    torch.manual_seed(0)
    x = torch.randn(batch, 16, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, weight, bias) if with_bias else (x, weight)
    assert torch.autograd.gradcheck(lambda *a: conv3x3_as_product(*a) if with_bias else conv3x3_as_product(*a, None), inputs)
    torch.testing.assert_close(conv3x3_as_product(x, weight, bias), F.conv2d(x, weight, bias, 1, 1))


def test_only_large_plain_3x3_convolutions_are_routed():
    large = torch.nn.Conv2d(1920, 640, 3, padding=1)  # the smallest SD1.5 U-Net shape routed
    assert routable(large)
    assert not routable(torch.nn.Conv2d(1280, 640, 3, padding=1))  # oneDNN is as fast there
    assert not routable(torch.nn.Conv2d(1920, 640, 3, padding=1, stride=2))
    assert not routable(torch.nn.Conv2d(1920, 640, 1))
    assert not routable(torch.nn.Conv2d(1920, 640, 3, padding=1, groups=2))
    model = torch.nn.Sequential(large, torch.nn.Conv2d(640, 640, 3, padding=1))
    keys = list(model.state_dict())
    assert route_weight_bound_convolutions(model) == 1
    assert route_weight_bound_convolutions(model) == 1  # idempotent
    assert list(model.state_dict()) == keys  # nothing added: files and optimizers see the same weights


def count_product_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = cpu_convolutions.conv3x3_as_product

    def counting(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(cpu_convolutions, "conv3x3_as_product", counting)
    return calls


def test_routed_module_takes_the_product_only_at_few_positions_in_fp32_and_bf16(monkeypatch):
    monkeypatch.setattr(cpu_convolutions, "MIN_WEIGHT_ELEMENTS", 0)
    calls = count_product_calls(monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 3, padding=1)
    plain = torch.nn.Conv2d(32, 16, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    route_weight_bound_convolutions(conv)
    for shape, expect_product in [((1, 32, 16, 16), True), ((2, 32, 8, 8), True), ((1, 32, 17, 16), False)]:
        before = calls[0]
        x = torch.randn(shape, requires_grad=True)
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)
        assert (calls[0] > before) == expect_product, shape
    x = torch.randn(1, 32, 4, 4)
    before = calls[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cast as autocast casts conv2d: bf16 out, bf16 rounding
        routed, reference = conv(x), plain(x)
    assert calls[0] == before + 1 and routed.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(routed.float(), reference.float(), rtol=0.02, atol=0.02)
    conv(x.to(memory_format=torch.channels_last))  # these keep torch's own path
    conv.half()(x.half())
    assert calls[0] == before + 1


def test_lora_on_a_routed_convolution(monkeypatch):
    """A LoCon module wraps the routed layer's forward: output and gradients as on a plain layer."""
    monkeypatch.setattr(cpu_convolutions, "MIN_WEIGHT_ELEMENTS", 0)
    torch.manual_seed(0)
    conv, plain = torch.nn.Conv2d(24, 24, 3, padding=1), torch.nn.Conv2d(24, 24, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    route_weight_bound_convolutions(conv)
    loras = [LoRAModule(f"lora_unet_{i}", m, 1.0, 4, 2) for i, m in enumerate((conv, plain))]
    loras[1].load_state_dict(loras[0].state_dict())
    torch.nn.init.normal_(loras[0].lora_up.weight)
    loras[1].lora_up.weight.data.copy_(loras[0].lora_up.weight)
    x = torch.randn(1, 24, 6, 6)
    grads = []
    for layer, lora in zip((conv, plain), loras):
        lora.apply_to()
        layer(x).square().sum().backward()
        grads.append(lora.lora_down.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_training_through_the_product_path_equals_training_without(tiny_models, tmp_path, monkeypatch):
    """train_network.py routes the U-Net's convolutions on the CPU; forced onto the tiny model's
    convolutions, the trained LoRA is the one trained without the routing (to float rounding; SGD, as
    Adam's first steps turn rounding-sized gradients into full-size updates)."""
    data = dreambooth_folders(tmp_path / "data", count=2)
    outputs = {}
    for name, min_elements in (("torch", 10**12), ("product", 0)):
        monkeypatch.setattr(cpu_convolutions, "MIN_WEIGHT_ELEMENTS", min_elements)
        calls = count_product_calls(monkeypatch)
        out = tmp_path / name
        argv = lora_args(tiny_models["sd1"], data, out, "--max_train_steps", "3", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.1")
        assert run_recipe(train_network.NetworkRecipe(), argv) == 0
        assert (calls[0] > 0) == (name == "product")
        outputs[name] = load_file(out / "tiny.safetensors")
    moved = max(float(v.abs().max()) for k, v in outputs["torch"].items() if ".lora_up." in k)  # from zeros
    assert moved > 1e-3
    assert max_state_diff(outputs["torch"], outputs["product"]) < 1e-2 * moved  # a wrong convolution is off by ~moved
