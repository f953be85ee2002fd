"""LoRA-FA (`--network_module networks.lora_fa`): LoRA whose lora_down stays frozen, file-compatible with sd-scripts.

LoRA-FA ("frozen-A", Zhang et al. 2023, arXiv:2308.03303) keeps the projection-down matrix A at its
random initialisation and trains only the projection-up matrix B. The backward pass then needs only
the rank-r activations down(x), not the layer input x, which saves activation memory; the update
ΔW = B·A still spans a fixed random r-dimensional subspace of the inputs.

Everything else is networks.lora: the same layers (lora_targets), the same keys and shapes
(`lora_down.weight`, `lora_up.weight`, `alpha`), the same --network_args (conv_dim, block dims,
dropouts, block learning rates, LoRA+). A saved file is a plain LoRA file; any LoRA loader reads it.
"""

from __future__ import annotations

import math

import torch

from networks import lora
from networks.lora import LoRAModule, LoRANetwork

MODULE_NAME = "networks.lora_fa"


class LoRAFAModule(LoRAModule):
    """A LoRA module with a frozen lora_down."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # As the paper: A ~ N(0, 2/(in + r)) (LoRA's Kaiming-uniform A was meant to be trained).
        in_dim = self.lora_down.weight.shape[1]
        torch.nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (in_dim + self.lora_dim)))
        self.lora_down.weight.requires_grad_(False)


class LoRAFANetwork(LoRANetwork):
    """LoRANetwork built from LoRAFAModule; only the lora_up weights ever reach the optimizer."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("module_class", LoRAFAModule)
        super().__init__(*args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True):
        # The trainer and prepare_grad_etc switch the whole network on: lora_down must stay off, or
        # its gradient (and the input activations it needs) would be computed for nothing.
        super().requires_grad_(requires_grad)
        for module in self.text_encoder_loras + self.unet_loras:
            module.lora_down.weight.requires_grad_(False)
        return self

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None) -> list[dict]:
        groups = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        return [g for g in groups if g["params"]]

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def apply_max_norm_regularization(self, max_norm_value: float, device):
        """--scale_weight_norms: as LoRA, but the whole shrink goes into lora_up (lora_down is frozen)."""
        keys_scaled, norms = 0, []
        for module in self.text_encoder_loras + self.unet_loras:
            down, up = module.lora_down.weight, module.lora_up.weight
            with torch.no_grad():
                updown = lora.lora_delta(down.to(device), up.to(device), module.scale, (up.shape[0], -1))
                norm = updown.norm().clamp(min=max_norm_value / 2)
                ratio = float(torch.clamp(norm, max=max_norm_value) / norm)
                if ratio != 1:
                    keys_scaled += 1
                    up.mul_(ratio)
                norms.append(float(updown.norm()) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def network_args_problems(kwargs: dict) -> list[str]:
    """networks.lora's checks, naming this module."""
    return lora.network_args_problems(kwargs, module_name=MODULE_NAME)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A new LoRA-FA network; takes the --network_args of networks.lora."""
    return lora.build_network(
        LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs,
        module_name=MODULE_NAME,
    )  # fmt: skip


def create_network_from_weights(
    multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs
):
    """(network, weights_sd) with the sites, ranks and alphas of a LoRA file (any LoRA file will do)."""
    return lora.build_network_from_weights(
        LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs,
        module_name=MODULE_NAME,
    )  # fmt: skip
