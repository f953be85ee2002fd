"""LoRA / LoCon network for SD1.x/SD2.x (`--network_module networks.lora`), file-compatible with sd-scripts.

Each LoRA wraps the `forward` of one Linear/Conv2d of the U-Net or text encoder instead of
replacing the layer, so the base models keep their state-dict keys and can still be saved or
merged as usual. Keys, shapes and math follow reference/formats.md §1; which layers are targeted
lives in networks/lora_targets.py. This module knows nothing about the trainer: the trainer
calls the upstream entry points `create_network` / `create_network_from_weights`.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from pathlib import Path

import torch

from networks import lora_targets as targets
from networks.lora_targets import count_lora_modules  # noqa: F401 - public helper

logger = logging.getLogger(__name__)

_LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_BLOCK_LR_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
_DIM_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
SUPPORTED_NETWORK_ARGS = _DIM_ARGS + ("dropout", "rank_dropout", "module_dropout") + _BLOCK_LR_ARGS + _LORAPLUS_ARGS
_INT_ARGS = ("conv_dim",)
_FLOAT_ARGS = ("conv_alpha", "block_lr_zero_threshold") + _LORAPLUS_ARGS
_PROBABILITY_ARGS = ("dropout", "rank_dropout", "module_dropout")
_BLOCK_LIST_ARGS = (
    ("block_dims", int), ("block_alphas", float), ("conv_block_dims", int), ("conv_block_alphas", float),
)  # fmt: skip


class LayerHook(torch.nn.Module):
    """Base of every network module here: it reroutes one base layer's `forward` through its own.

    The base layer is held in a tuple so it is not registered as a submodule (its weights stay out of
    the network's state dict); networks.dylora and networks.oft build on this too.
    """

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = multiplier
        self._org = (org_module,)
        self.org_forward = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (idempotent)."""
        if self.org_forward is None:
            self.org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        if self.org_forward is not None:
            if self.org_module.__dict__.get("forward") == self.forward:
                del self.org_module.forward
            self.org_forward = None


def alpha_value(alpha, rank: int) -> float:
    """A LoRA alpha as a float; None or 0 (old files) mean alpha = rank, i.e. scale 1."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().float().item()
    return float(rank if alpha is None or alpha == 0 else alpha)


class LoRAModule(LayerHook):
    """The low-rank pair (lora_down, lora_up) + alpha of one layer; adds up(down(x))·multiplier·alpha/r to it."""

    def __init__(
        self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0,
        dropout=None, rank_dropout=None, module_dropout=None,
    ):  # fmt: skip
        super().__init__(lora_name, org_module, multiplier)
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            org = org_module
            self.lora_down = torch.nn.Conv2d(
                org.in_channels, self.lora_dim, org.kernel_size, org.stride, org.padding, bias=False
            )
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        alpha = alpha_value(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        # Same init as Microsoft's LoRA: the delta starts at exactly zero.
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_scale()  # a loaded alpha must change the scale too (upstream keeps the old one)

    def refresh_scale(self) -> None:
        if self.alpha.is_meta:
            return
        alpha = float(self.alpha)
        if alpha == 0:  # old files: alpha 0 means "no scaling"
            self.alpha.fill_(self.lora_dim)
            alpha = float(self.lora_dim)
        self.scale = alpha / self.lora_dim

    def forward(self, x):
        org_out = self.org_forward(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # (batch, tokens, rank)
            elif lx.dim() == 4:
                mask = mask[:, :, None, None]  # (batch, rank, h, w)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return org_out + (self.lora_up(lx) * (self.multiplier * scale)).to(org_out.dtype)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """ΔW = up·down·alpha/r·multiplier, shaped like the base weight (fp32)."""
        m = self.multiplier if multiplier is None else multiplier
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.scale * m, self.org_module.weight.shape)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """Weight delta of a LoRA pair; accepts Linear [r,in] or 1x1-conv [r,in,1,1] forms for either shape."""
    down, up = down.float(), up.float()
    if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(shape)


class LoRANetwork(torch.nn.Module):
    """All LoRA modules of one network; `state_dict()` has exactly the kohya keys."""

    def __init__(
        self, text_encoder, unet, *, multiplier=1.0, lora_dim=4, alpha=1.0,
        dropout=None, rank_dropout=None, module_dropout=None, conv_lora_dim=None, conv_alpha=None,
        block_dims=None, block_alphas=None, conv_block_dims=None, conv_block_alphas=None,
        modules_dim=None, modules_alpha=None, module_class=None,
    ):  # fmt: skip
        """`module_class(name, layer, multiplier, dim, alpha, dropout, rank_dropout, module_dropout)` builds
        each module (default LoRAModule); networks.dylora and networks.lora_fa pass their own."""
        super().__init__()
        module_class = module_class or LoRAModule
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight = None

        def dim_alpha(site: targets.LoraSite, is_unet: bool):
            if modules_dim is not None:
                return modules_dim.get(site.name), modules_alpha.get(site.name)
            if is_unet and block_dims is not None:
                i = targets.block_index(site.name)
                if not site.is_3x3:
                    return block_dims[i], block_alphas[i]
                return (conv_block_dims[i], conv_block_alphas[i]) if conv_block_dims is not None else (None, None)
            if not site.is_3x3:
                return lora_dim, alpha
            return conv_lora_dim, conv_alpha

        def build(sites, is_unet):
            loras = []
            for site in sites:
                dim, a = dim_alpha(site, is_unet)
                if not dim:  # None or rank 0: no LoRA on this layer
                    continue
                lora = module_class(site.name, site.module, multiplier, dim, a, dropout, rank_dropout, module_dropout)
                self.add_module(site.name, lora)
                loras.append(lora)
            return loras

        with_conv = modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None
        self.text_encoder_loras = build(targets.text_encoder_sites(text_encoder), False)
        self.unet_loras = build(targets.unet_sites(unet, include_conv=with_conv), True)
        logger.info("create LoRA for Text Encoder: %d modules.", len(self.text_encoder_loras))
        logger.info("create LoRA for U-Net: %d modules.", len(self.unet_loras))

    # ------------------------------------------------------------------ applying and merging

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True) -> None:
        """Hook the LoRAs into the models; the part not applied is dropped (and is not saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Add the LoRA deltas of `weights_sd` (default: this network's weights) into the base weights."""
        weights_sd = self.state_dict() if weights_sd is None else weights_sd
        device = device or "cpu"
        merged = 0
        for lora in self.text_encoder_loras + self.unet_loras:
            down = weights_sd.get(f"{lora.lora_name}.lora_down.weight")
            up = weights_sd.get(f"{lora.lora_name}.lora_up.weight")
            if down is None or up is None:
                continue
            alpha = weights_sd.get(f"{lora.lora_name}.alpha")
            alpha = float(alpha) if alpha is not None and float(alpha) != 0 else float(down.shape[0])
            weight = lora.org_module.weight
            delta = lora_delta(down.to(device), up.to(device), lora.multiplier * alpha / down.shape[0], weight.shape)
            with torch.no_grad():
                weight.copy_((weight.to(device, torch.float32) + delta).to(dtype or weight.dtype))
            merged += 1
        logger.info("merged %d LoRA modules into the base weights", merged)

    def merge_into_models(self) -> int:
        """Bake the current weights (× multiplier) into the hooked layers and unhook them; returns the count."""
        loras = self.text_encoder_loras + self.unet_loras
        for lora in loras:
            weight = lora.org_module.weight
            with torch.no_grad():
                weight.copy_((weight.float() + lora.delta_weight().to(weight.device)).to(weight.dtype))
            lora.restore()
        return len(loras)

    def restore(self) -> None:
        """Unhook every LoRA (the base models behave as before apply_to)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    # ------------------------------------------------------------------ training hooks

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_loraplus_lr_ratio(self, lr_ratio=None, unet_lr_ratio=None, text_encoder_lr_ratio=None) -> None:
        self.loraplus_lr_ratio = lr_ratio
        self.loraplus_unet_lr_ratio = unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_lr_ratio

    def set_block_lr_weight(self, block_lr_weight) -> None:
        self.block_lr_weight = block_lr_weight

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None) -> list[dict]:
        """Optimizer param groups {"params", "lr", "name"}; LoRA+ puts lora_up in its own "... plus" group.

        Groups whose learning rate is 0 are left out (nothing to train there), like upstream.
        """
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        groups = []

        def add(loras, lr, ratio, name):
            named = [(n, p) for lora in loras for n, p in lora.named_parameters()]
            plain = [p for n, p in named if ratio is None or "lora_up" not in n]
            plus = [p for n, p in named if ratio is not None and "lora_up" in n]
            plus_lr = None if lr is None or ratio is None else lr * ratio
            for params, group_lr, group_name in ((plain, lr, name), (plus, plus_lr, f"{name} plus")):
                if not params or group_lr == 0:
                    continue
                group = {"params": params, "name": group_name}
                if group_lr is not None:
                    group["lr"] = group_lr
                groups.append(group)

        te_lr = text_encoder_lr if text_encoder_lr is not None else default_lr
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        add(self.text_encoder_loras, te_lr, te_ratio, "textencoder")
        u_lr = unet_lr if unet_lr is not None else default_lr
        u_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        if self.block_lr_weight is None:
            add(self.unet_loras, u_lr, u_ratio, "unet")
        else:
            by_block: dict[int, list] = {}
            for lora in self.unet_loras:
                by_block.setdefault(targets.block_index(lora.lora_name), []).append(lora)
            for idx, loras in by_block.items():
                weight = self.block_lr_weight[idx] if idx >= 0 else 1.0
                add(loras, None if u_lr is None else u_lr * weight, u_ratio, f"unet_block{idx}")
        return groups

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA layers are tiny; the base models checkpoint themselves."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return list(self.parameters())

    def apply_max_norm_regularization(self, max_norm_value: float, device):
        """Scale down LoRAs whose ΔW norm exceeds max_norm (--scale_weight_norms); (keys_scaled, mean, max)."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            with torch.no_grad():
                updown = lora_delta(down.to(device), up.to(device), lora.scale, (up.shape[0], -1))
                norm = updown.norm().clamp(min=max_norm_value / 2)
                ratio = float(torch.clamp(norm, max=max_norm_value) / norm)
                if ratio != 1:
                    keys_scaled += 1
                    down.mul_(ratio**0.5)
                    up.mul_(ratio**0.5)
                norms.append(float(updown.norm()) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # ------------------------------------------------------------------ files

    def load_weights(self, file_or_state_dict):
        """Load a .safetensors/.pt file or a state dict; returns torch's (missing_keys, unexpected_keys)."""
        return self.load_state_dict(self._conform(read_weights(file_or_state_dict)), strict=False)

    def _conform(self, weights_sd: dict) -> dict:
        """Match the file's SD2 proj_in/proj_out form (Linear vs 1x1 conv) to ours; explain rank mismatches."""
        own = self.state_dict(keep_vars=True)
        out = {}
        for key, value in weights_sd.items():
            target = own.get(key)
            if target is not None and value.shape != target.shape:
                if value.numel() == target.numel() and value.dim() != target.dim():
                    value = value.reshape(target.shape)
                else:
                    raise ValueError(
                        f"LoRA weights {key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the "
                        "network (different rank?). Create the network from the file (--dim_from_weights)."
                    )
            out[key] = value
        return out

    def save_weights(self, file, dtype=None, metadata=None) -> None:
        """Write .safetensors (with metadata + sshs_* hashes) or .pt/.ckpt (tensors only), atomically."""
        write_weights(self.state_dict(), file, dtype, metadata)


def read_weights(file_or_state_dict) -> dict:
    """The tensors of a .safetensors/.pt/.ckpt network file, or a copy of a state dict given as such."""
    if isinstance(file_or_state_dict, (str, os.PathLike)):
        from library.models.checkpoint_io import read_state_dict

        return read_state_dict(file_or_state_dict)
    return dict(file_or_state_dict)


def write_weights(state_dict: dict, file, dtype=None, metadata=None) -> None:
    """A network's state dict to .safetensors (metadata + sshs_* hashes) or .pt/.ckpt (tensors only), atomically."""
    from library.hashing import precalculate_safetensors_hashes
    from library.models.checkpoint_io import write_state_dict

    state_dict = {k: v.detach().to("cpu", dtype=dtype).contiguous().clone() for k, v in state_dict.items()}
    if Path(file).suffix.lower() == ".safetensors":
        metadata = dict(metadata or {})
        model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, metadata)
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hash, legacy_hash
        write_state_dict(file, state_dict, metadata=metadata)
    else:
        write_state_dict(file, state_dict)


# ---------------------------------------------------------------------- entry points


def network_args_problems(kwargs: dict, supported=SUPPORTED_NETWORK_ARGS, module_name="networks.lora") -> list[str]:
    """Every problem with --network_args for this network (unknown keys with a suggestion, bad values).

    Other modules reuse it with their own `supported` keys (a subset of ours plus keys they check).
    """
    problems = []
    for key, value in kwargs.items():
        if key not in supported:
            close = difflib.get_close_matches(key, supported, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(supported)})"
            problems.append(f"--network_args: unknown key '{key}' for {module_name}{hint}")
        elif value is None or value == "None":  # the trainer injects dropout=None (upstream does too)
            continue
        elif key in _INT_ARGS + _FLOAT_ARGS + _PROBABILITY_ARGS:
            kind = int if key in _INT_ARGS else float
            try:
                number = kind(value)
            except (TypeError, ValueError):
                expected = "an integer" if kind is int else "a number"
                problems.append(f"--network_args {key}={value}: expected {expected}")
                continue
            if key in _PROBABILITY_ARGS and not 0 <= number < 1:
                problems.append(f"--network_args {key}={value}: must be in [0, 1)")
            elif number < 0:
                problems.append(f"--network_args {key}={value}: must not be negative")
    for key, kind in _BLOCK_LIST_ARGS:
        if kwargs.get(key) is not None:
            try:
                targets.parse_number_list(key, kwargs[key], kind)
            except ValueError as err:
                problems.append(f"--{err}")
    try:
        targets.block_lr_weights({k: v for k, v in kwargs.items() if k in supported})
    except ValueError as err:
        problems.append(f"--{err}")
    return list(dict.fromkeys(problems))


def optional_arg(kwargs, key, kind):
    """A --network_args value converted, or None when absent or 'None' (the trainer injects dropout=None)."""
    value = kwargs.get(key)
    return None if value is None or value == "None" else kind(value)


def single_text_encoder(text_encoder):
    if isinstance(text_encoder, (list, tuple)):
        if len(text_encoder) > 1:
            raise ValueError("networks.lora here supports SD1.x/SD2.x (one text encoder); SDXL is not supported")
        return text_encoder[0] if text_encoder else None
    return text_encoder


def _dropouts(kwargs, neuron_dropout):
    if neuron_dropout is None:
        neuron_dropout = optional_arg(kwargs, "dropout", float)  # set by --network_args dropout=… or the trainer
    return neuron_dropout, optional_arg(kwargs, "rank_dropout", float), optional_arg(kwargs, "module_dropout", float)


def finish_network(network: LoRANetwork, kwargs: dict) -> LoRANetwork:
    """LoRA+ ratios and block learning-rate weights from --network_args."""
    ratios = [optional_arg(kwargs, k, float) for k in _LORAPLUS_ARGS]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    network.set_block_lr_weight(targets.block_lr_weights(kwargs))
    return network


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A new LoRA (or LoCon with conv_dim) network for these models; kwargs are --network_args strings."""
    return build_network(LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs)


def build_network(network_class, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs,
                  module_name="networks.lora"):  # fmt: skip
    """create_network for LoRANetwork or a subclass taking the same arguments (networks.lora_fa)."""
    problems = network_args_problems(kwargs, module_name=module_name)
    if problems:
        raise ValueError("; ".join(problems))
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim, conv_alpha = optional_arg(kwargs, "conv_dim", int), optional_arg(kwargs, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    block_lr = targets.block_lr_weights(kwargs)
    blocks = {}
    if kwargs.get("block_dims") is not None or block_lr is not None:
        dims, alphas, conv_dims, conv_alphas = targets.block_dims_and_alphas(
            kwargs, network_dim, network_alpha, conv_dim, conv_alpha
        )
        for i, weight in enumerate(block_lr or ()):
            if weight == 0:  # a block that does not learn gets no LoRA at all
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
        blocks = dict(block_dims=dims, block_alphas=alphas, conv_block_dims=conv_dims, conv_block_alphas=conv_alphas)
    dropout, rank_dropout, module_dropout = _dropouts(kwargs, neuron_dropout)
    logger.info(
        "create LoRA network: dim %d, alpha %s, conv dim %s, conv alpha %s; dropout: neuron %s, rank %s, module %s",
        network_dim, network_alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout,
    )  # fmt: skip
    network = network_class(
        single_text_encoder(text_encoder), unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha, **blocks,
    )  # fmt: skip
    return finish_network(network, kwargs)


def create_network_from_weights(
    multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs
):
    """(network, weights_sd): a network with exactly the sites, ranks and alphas of a LoRA file.

    Weights are not loaded (call load_weights or merge_to). Missing or zero alpha means alpha = rank.
    kwargs may carry dropouts, LoRA+ ratios and block lr weights; dims in kwargs are ignored.
    """
    return build_network_from_weights(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs)


def ranks_and_alphas(weights_sd: dict) -> tuple[dict[str, int], dict[str, float]]:
    """{module name: rank} from each lora_down.weight, {module name: alpha} (missing or 0 -> rank)."""
    dims, alphas = {}, {}
    for key, value in weights_sd.items():
        name, _, leaf = key.partition(".")
        if leaf == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif leaf == "alpha":
            alphas[name] = float(value)
    return dims, {name: (alphas.get(name) or dim) for name, dim in dims.items()}


def warn_unused_modules(network, names) -> None:
    unused = sorted(set(names) - {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras})
    if unused:
        logger.warning(
            "%d modules in the weights match no layer of this model (SDXL or another architecture?), e.g. %s",
            len(unused), unused[0],
        )  # fmt: skip


def build_network_from_weights(network_class, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs,
                               module_name="networks.lora"):  # fmt: skip
    """create_network_from_weights for LoRANetwork or a subclass taking the same arguments."""
    weights_sd = read_weights(file) if weights_sd is None else weights_sd
    dims, alphas = ranks_and_alphas(weights_sd)
    problems = network_args_problems(kwargs, module_name=module_name)
    if problems:
        raise ValueError("; ".join(problems))
    ignored = [k for k in _DIM_ARGS if k in kwargs]
    if ignored:
        logger.warning("network_args %s ignored: ranks and alphas come from the weights file", ", ".join(ignored))
    dropout, rank_dropout, module_dropout = (None, None, None) if for_inference else _dropouts(kwargs, None)
    network = network_class(
        single_text_encoder(text_encoder), unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
        dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
    )  # fmt: skip
    warn_unused_modules(network, dims)
    return finish_network(network, kwargs), weights_sd
