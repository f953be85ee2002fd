"""A small third-party-style network module for tests: the sd-scripts protocol in its older form
(`prepare_optimizer_params(text_encoder_lr, unet_lr)` returning bare parameters) plus every optional call,
each counted, so a test can check the trainer calls them when sd-scripts does.

The network adds a trained offset to the output of every U-Net attention query projection.
"""

from __future__ import annotations

from collections import Counter

import torch
from safetensors.torch import load_file, save_file


class OffsetModule(torch.nn.Module):
    def __init__(self, lora_name: str, org_module: torch.nn.Linear):
        super().__init__()
        self.lora_name = lora_name
        self.offset = torch.nn.Parameter(torch.zeros(org_module.out_features))
        self._org = (org_module,)
        self.org_forward = None

    def apply_to(self):
        self.org_forward = self._org[0].forward
        self._org[0].forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.offset.to(x.dtype)


class OffsetNetwork(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.calls = Counter()
        self.text_encoder_loras = []
        self.unet_loras = [
            OffsetModule("lora_unet_" + name.replace(".", "_"), module)
            for name, module in unet.named_modules()
            if name.endswith("to_q") and isinstance(module, torch.nn.Linear)
        ]
        for module in self.unet_loras:
            self.add_module(module.lora_name, module)

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        for module in self.unet_loras:
            module.apply_to()

    def load_weights(self, file):
        return self.load_state_dict(load_file(file), strict=False)

    def save_weights(self, file, dtype, metadata):
        self.calls["save_weights"] += 1
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, file, metadata)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
        self.calls["prepare_optimizer_params"] += 1
        return list(self.parameters())

    # the optional calls
    def prepare_network(self, args):
        self.calls["prepare_network"] += 1

    def prepare_grad_etc(self, text_encoder, unet):
        self.calls["prepare_grad_etc"] += 1
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.calls["on_epoch_start"] += 1
        self.train()

    def on_step_start(self, text_encoder, unet):
        self.calls["on_step_start"] += 1

    def update_norms(self):
        # gradients are final here: every offset has one
        self.calls["update_norms"] += 1
        assert all(p.grad is not None for p in self.parameters())

    def enable_gradient_checkpointing(self):
        self.calls["enable_gradient_checkpointing"] += 1

    def apply_max_norm_regularization(self, max_norm, device):
        self.calls["apply_max_norm_regularization"] += 1
        with torch.no_grad():
            norms = torch.stack([m.offset.norm() for m in self.unet_loras])
            scaled = 0
            for module in self.unet_loras:
                norm = module.offset.norm()
                if norm > max_norm:
                    module.offset.mul_(max_norm / norm)
                    scaled += 1
        return scaled, float(norms.mean()), float(norms.max())


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    return OffsetNetwork(unet)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs):
    return OffsetNetwork(unet), (weights_sd if weights_sd is not None else load_file(file))
