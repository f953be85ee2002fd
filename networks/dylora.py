"""DyLoRA (`--network_module networks.dylora`): one LoRA that works at every rank up to its own.

DyLoRA (Valipour et al. 2022, arXiv:2210.07558) trains a rank-r LoRA so that its first b ranks are a
good LoRA on their own, for every b that is a multiple of `unit`. Each training forward pass draws a
random b in {unit, 2·unit, ..., r} and uses only the first b ranks, scaled by alpha/b; only the last
unit of those b (ranks b-unit .. b-1) gets a gradient, the ones before it are used as they are. The
ranks are thus ordered by importance, like a nested dropout, and the file can later be cut to any
multiple of `unit` (sd-scripts' networks/extract_lora_from_dylora.py keeps the first b ranks and alpha).

Outside training (sampling, merging) every rank is used with scale alpha/r: the network is then a
plain LoRA. The file is one too: `lora_down.weight` [r, in(, k, k)], `lora_up.weight` [out, r(, 1, 1)]
and `alpha` per layer, on networks.lora's layers (lora_targets), read by every LoRA loader.

sd-scripts' own training forward differs (it always uses all r ranks, scaled by alpha/r·sqrt(r/b),
and ignores conv_alpha); files are interchangeable both ways.

Each unit of ranks is its own parameter, so the optimizer skips the units that got no gradient in a
step (no momentum or weight decay moving them); `state_dict()` joins them into the LoRA keys.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from networks import lora
from networks.lora import LayerHook, LoRANetwork

logger = logging.getLogger(__name__)

MODULE_NAME = "networks.dylora"
# Only the drawn rank unit gets a gradient in a step: DDP must not wait for the others (train_network.py reads this).
SKIPS_PARAMETERS_IN_A_STEP = True
SUPPORTED_NETWORK_ARGS = ("unit", "conv_dim", "conv_alpha", "dropout") + lora._LORAPLUS_ARGS
_FILE_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")


class DyLoRAModule(LayerHook):
    """A rank-r LoRA of one layer kept as r/unit units: down_i [unit, in(, k, k)], up_i [out, unit(, 1, 1)]."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, *dropouts, unit=1):
        super().__init__(lora_name, org_module, multiplier)
        self.lora_dim, self.unit = int(lora_dim), int(unit)
        if self.lora_dim % self.unit:
            raise ValueError(f"DyLoRA {lora_name}: rank {self.lora_dim} is not a multiple of unit {self.unit}")
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        if self.is_conv:
            kernel = tuple(org_module.kernel_size)
            down_shape, up_shape = (self.unit, org_module.in_channels, *kernel), (org_module.out_channels, self.unit, 1, 1)
            self.stride, self.padding = org_module.stride, org_module.padding
        else:
            down_shape, up_shape = (self.unit, org_module.in_features), (org_module.out_features, self.unit)
        self.num_units = self.lora_dim // self.unit
        for i in range(self.num_units):
            down = torch.nn.Parameter(torch.empty(down_shape))
            # Kaiming-uniform over the whole [r, in] matrix as LoRA does (fan-in is the input size either way).
            torch.nn.init.kaiming_uniform_(down, a=5**0.5)
            self.register_parameter(f"lora_down_{i}", down)
            self.register_parameter(f"lora_up_{i}", torch.nn.Parameter(torch.zeros(up_shape)))
        alpha = lora.alpha_value(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim

    @property
    def downs(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_down_{i}") for i in range(self.num_units)]

    @property
    def ups(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_up_{i}") for i in range(self.num_units)]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (lora_down, lora_up) as one LoRA's weights."""
        return torch.cat(self.downs, 0), torch.cat(self.ups, 1)

    def forward(self, x):
        org_out = self.org_forward(x)
        units = self.num_units
        if self.training:
            # Drawn from torch's generator, so gradient checkpointing's re-run draws the same b.
            units = int(torch.randint(self.num_units, (1,)).item()) + 1
        downs, ups = self.downs[:units], self.ups[:units]
        if self.training:  # the units before the newest one are used, not trained
            downs = [d.detach() for d in downs[:-1]] + downs[-1:]
            ups = [u.detach() for u in ups[:-1]] + ups[-1:]
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        rank = units * self.unit
        x = x.to(down.dtype)
        if self.is_conv:
            lx = F.conv2d(F.conv2d(x, down, stride=self.stride, padding=self.padding), up)
        else:
            lx = F.linear(F.linear(x, down), up)
        # alpha/b: the first b ranks make the LoRA a rank-b file cut from this one would be.
        return org_out + (lx * (self.multiplier * self.scale * self.lora_dim / rank)).to(org_out.dtype)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """ΔW of all r ranks (what inference uses), shaped like the base weight (fp32)."""
        m = self.multiplier if multiplier is None else multiplier
        down, up = self.weights()
        return lora.lora_delta(down, up, self.scale * m, self.org_module.weight.shape)

    # The file has LoRA's three keys per layer, not one pair per unit.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down, up = self.weights()
        for key, value in zip(_FILE_KEYS, (down, up, self.alpha)):
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        down, up = self.weights()
        for key, target, dim, params in (("lora_down.weight", down, 0, self.downs), ("lora_up.weight", up, 1, self.ups)):
            value = state_dict.get(prefix + key)
            if value is None:
                missing.append(prefix + key)
                continue
            if value.shape != target.shape and value.numel() == target.numel():
                value = value.reshape(target.shape)  # SD2 proj_in/proj_out saved as Linear or as 1x1 conv
            if value.shape != target.shape:
                error_msgs.append(
                    f"size mismatch for {prefix}{key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(target.shape)}."
                )
                continue
            with torch.no_grad():
                for param, piece in zip(params, value.split(self.unit, dim)):
                    param.copy_(piece)
        if prefix + "alpha" in state_dict:
            with torch.no_grad():
                self.alpha.copy_(state_dict[prefix + "alpha"])
            self.scale = lora.alpha_value(self.alpha, self.lora_dim) / self.lora_dim
        else:
            missing.append(prefix + "alpha")
        unexpected += [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in _FILE_KEYS]


class DyLoRANetwork(LoRANetwork):
    """networks.lora's network (layers, applying, merging, LoRA+, files) with DyLoRA modules."""

    def apply_max_norm_regularization(self, max_norm_value: float, device):
        """--scale_weight_norms on the full-rank ΔW; every unit shrinks by the same factor."""
        keys_scaled, norms = 0, []
        for module in self.text_encoder_loras + self.unet_loras:
            with torch.no_grad():
                down, up = module.weights()
                norm_now = lora.lora_delta(down.to(device), up.to(device), module.scale, (up.shape[0], -1)).norm()
                norm = norm_now.clamp(min=max_norm_value / 2)
                ratio = float(torch.clamp(norm, max=max_norm_value) / norm)
                if ratio != 1:
                    keys_scaled += 1
                    for param in module.downs + module.ups:
                        param.mul_(ratio**0.5)
                norms.append(float(norm_now) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def network_args_problems(kwargs: dict) -> list[str]:
    """Unknown keys and bad values of --network_args for DyLoRA."""
    problems = lora.network_args_problems(
        {k: v for k, v in kwargs.items() if k != "unit"}, supported=SUPPORTED_NETWORK_ARGS, module_name=MODULE_NAME
    )
    unit = kwargs.get("unit")
    if unit is not None:
        try:
            if int(unit) < 1:
                problems.append(f"--network_args unit={unit}: must be at least 1")
            elif kwargs.get("conv_dim") not in (None, "None") and int(kwargs["conv_dim"]) % int(unit):
                problems.append(f"--network_args conv_dim={kwargs['conv_dim']}: must be a multiple of unit={unit}")
        except ValueError:
            problems.append(f"--network_args unit={unit}: expected an integer")
    return problems


def _checked(kwargs: dict) -> int:
    problems = network_args_problems(kwargs)
    if problems:
        raise ValueError("; ".join(problems))
    if lora.optional_arg(kwargs, "dropout", float):
        logger.warning("DyLoRA has no dropout (sd-scripts' has none either); --network_dropout is ignored")
    return lora.optional_arg(kwargs, "unit", int) or 1


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A new DyLoRA network: rank network_dim in units of `unit`; conv_dim adds the 3x3 convs (LoCon layers)."""
    unit = _checked({**kwargs, "dropout": kwargs.get("dropout", neuron_dropout)})
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    if network_dim % unit:
        raise ValueError(f"DyLoRA: --network_dim {network_dim} must be a multiple of --network_args unit={unit}")
    conv_dim = lora.optional_arg(kwargs, "conv_dim", int)
    conv_alpha = lora.optional_arg(kwargs, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = network_alpha  # what sd-scripts' files have (it uses network_alpha for every layer)
    logger.info(
        "create DyLoRA network: dim %d, alpha %s, unit %d, conv dim %s, conv alpha %s",
        network_dim, network_alpha, unit, conv_dim, conv_alpha,
    )  # fmt: skip
    network = DyLoRANetwork(
        lora.single_text_encoder(text_encoder), unet, multiplier=multiplier, lora_dim=network_dim,
        alpha=network_alpha, conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
        module_class=functools.partial(DyLoRAModule, unit=unit),
    )  # fmt: skip
    return lora.finish_network(network, kwargs)


def create_network_from_weights(
    multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs
):
    """(network, weights_sd) with the layers, ranks and alphas of a LoRA file (DyLoRA's or any other).

    Every rank must be a multiple of `unit` (--network_args unit=N, default 1).
    """
    unit = _checked(kwargs)
    weights_sd = lora.read_weights(file) if weights_sd is None else weights_sd
    dims, alphas = lora.ranks_and_alphas(weights_sd)
    uneven = sorted(name for name, dim in dims.items() if dim % unit)
    if uneven:
        raise ValueError(f"DyLoRA: rank {dims[uneven[0]]} of {uneven[0]} in the weights is not a multiple of unit={unit}")
    network = DyLoRANetwork(
        lora.single_text_encoder(text_encoder), unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
        module_class=functools.partial(DyLoRAModule, unit=unit),
    )  # fmt: skip
    lora.warn_unused_modules(network, dims)
    return lora.finish_network(network, kwargs), weights_sd
