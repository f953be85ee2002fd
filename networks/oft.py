"""OFT (`--network_module networks.oft`): orthogonal finetuning of the U-Net, file-compatible with sd-scripts.

OFT (Qiu et al. 2023, arXiv:2306.07280) does not add a low-rank delta: it rotates each layer's
output neurons with a learned orthogonal matrix, which keeps the angles between neurons (the
"hyperspherical energy") of the pretrained weight. The matrix is block-diagonal: the out_dim output
rows are split into `network_dim` blocks of block_size = out_dim / network_dim rows, and block k of
the weight becomes R_kᵀ·W_k. Each R_k comes from a free parameter B_k through the Cayley transform:

    Q = B - Bᵀ (skew-symmetric)  ->  R = (I + Q)(I - Q)⁻¹ (orthogonal; R = I when B = 0)

The constraint (COFT) keeps R near the identity: ‖Q‖ (over all blocks) is clipped to
network_alpha · out_dim (sd-scripts' scaling; the paper's ε is per squared dimension). The multiplier
blends R with I: R' = multiplier·(R - I) + I. The bias is not rotated.

Which layers: the U-Net's attention projections (to_q, to_k, to_v, to_out.0); with
`enable_all_linear=true` every Linear / 1x1 conv of the transformer blocks (proj_in, proj_out, ff);
with `enable_conv=true` also the ResNet, down- and up-sampler layers (3x3 convs included). The text
encoder gets nothing. The file has per layer `oft_unet_<layer>.oft_blocks` [network_dim, block_size,
block_size] and `oft_unet_<layer>.alpha` (the constraint, a scalar), as sd-scripts writes them.
"""

from __future__ import annotations

import difflib
import logging

import torch
import torch.nn.functional as F

from library.errors import UserError
from networks import lora, lora_targets
from networks.lora import LayerHook

logger = logging.getLogger(__name__)

MODULE_NAME = "networks.oft"
PREFIX = "oft_unet"
ATTENTION_CONTAINERS = ("Attention", "CrossAttention")  # diffusers' class; sd-scripts' own U-Net's
ALL_LINEAR_CONTAINERS = lora_targets.UNET_CONTAINERS  # Transformer2DModel
CONV_CONTAINERS = lora_targets.UNET_CONV_CONTAINERS  # ResnetBlock2D, Downsample2D, Upsample2D
SUPPORTED_NETWORK_ARGS = ("enable_all_linear", "enable_conv", "dropout")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class OFTOptionError(UserError, ValueError):
    """An option OFT cannot honour (shown as a one-line error)."""


class OFTModule(LayerHook):
    """Block-diagonal orthogonal rotation of one layer's output rows."""

    def __init__(self, oft_name, org_module, multiplier=1.0, dim=4, alpha=1e-3):
        super().__init__(oft_name, org_module, multiplier)
        self.out_dim = org_module.out_channels if isinstance(org_module, torch.nn.Conv2d) else org_module.out_features
        self.num_blocks = int(dim)
        if self.num_blocks < 1 or self.out_dim % self.num_blocks:
            raise ValueError(
                f"OFT {oft_name}: {self.out_dim} outputs do not split into {self.num_blocks} blocks; give a "
                "--network_dim that divides every layer's width (e.g. 4 or 8 for SD1/SD2)"
            )
        self.block_size = self.out_dim // self.num_blocks
        alpha = float(alpha.detach().float().item() if isinstance(alpha, torch.Tensor) else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.constraint = alpha * self.out_dim
        self.oft_blocks = torch.nn.Parameter(torch.zeros(self.num_blocks, self.block_size, self.block_size))

    @property
    def oft_name(self) -> str:
        return self.lora_name  # sd-scripts' name for it

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not self.alpha.is_meta:
            self.constraint = float(self.alpha) * self.out_dim  # a loaded alpha is a new constraint

    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        """R' = m·(R - I) + I per block, [num_blocks, block_size, block_size] in fp32."""
        m = self.multiplier if multiplier is None else multiplier
        blocks = self.oft_blocks.float()
        q = blocks - blocks.transpose(1, 2)
        norm = q.norm()
        q = q * ((norm.clamp(max=self.constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        # (I + Q)(I - Q)⁻¹ = (I - Q)⁻¹(I + Q): both are functions of Q, so they commute; solve beats inverse.
        rot = torch.linalg.solve(eye - q, eye + q)
        return m * (rot - eye) + eye

    def rotated_weight(self, weight: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """Block k of the output rows W_k -> R_kᵀ·W_k (fp32, shaped like `weight`)."""
        rot = self.rotation(multiplier).to(weight.device)
        blocks = weight.float().reshape(self.num_blocks, self.block_size, -1)
        return torch.einsum("knm,knc->kmc", rot, blocks).reshape(weight.shape)

    def forward(self, x):
        if self.multiplier == 0:
            return self.org_forward(x)
        org = self.org_module
        weight = self.rotated_weight(org.weight).to(x.dtype)
        bias = None if org.bias is None else org.bias.to(x.dtype)
        if isinstance(org, torch.nn.Conv2d):
            return F.conv2d(x, weight, bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, weight, bias)


class OFTNetwork(torch.nn.Module):
    """The OFT modules of one U-Net; `state_dict()` has exactly sd-scripts' keys."""

    def __init__(
        self, unet, multiplier=1.0, dim=4, alpha=1e-3, enable_all_linear=False, enable_conv=False, modules=None,
    ):  # fmt: skip
        """`modules` {name: (num_blocks, alpha)} (from a file) picks the layers instead of the flags."""
        super().__init__()
        self.multiplier, self.dim, self.alpha = multiplier, dim, alpha
        containers = ALL_LINEAR_CONTAINERS if enable_all_linear or modules is not None else ATTENTION_CONTAINERS
        if enable_conv or modules is not None:
            containers = containers + CONV_CONTAINERS
        self.unet_loras: list[OFTModule] = []
        for site in lora_targets.find_sites(unet, PREFIX, containers):
            blocks, a = (dim, alpha) if modules is None else modules.get(site.name, (None, None))
            if blocks is None:
                continue
            module = OFTModule(site.name, site.module, multiplier, blocks, a)
            self.add_module(site.name, module)
            self.unet_loras.append(module)
        self.text_encoder_loras: list = []  # OFT leaves the text encoder alone
        logger.info("create OFT for U-Net: %d modules.", len(self.unet_loras))

    @property
    def unet_ofts(self) -> list[OFTModule]:
        return self.unet_loras  # sd-scripts' name

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True) -> None:
        if not apply_unet:
            raise OFTOptionError("--network_module networks.oft trains only the U-Net; drop --network_train_text_encoder_only")
        for module in self.unet_loras:
            module.apply_to()

    def restore(self) -> None:
        for module in self.unet_loras:
            module.restore()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Rotate the base weights by `weights_sd`'s blocks (default: this network's) × multiplier."""
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=False)
        for module in self.unet_loras:
            weight = module.org_module.weight
            with torch.no_grad():
                merged = module.rotated_weight(weight.to(device or weight.device))
                weight.copy_(merged.to(weight.device, dtype or weight.dtype))
        logger.info("merged %d OFT modules into the base weights", len(self.unet_loras))

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.unet_loras:
            module.multiplier = multiplier

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None) -> list[dict]:
        self.requires_grad_(True)
        lr = unet_lr if unet_lr is not None else default_lr
        if lr == 0 or not self.unet_loras:
            return []
        group = {"params": list(self.parameters()), "name": "unet"}
        if lr is not None:
            group["lr"] = lr
        return [group]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the base models checkpoint themselves."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return list(self.parameters())

    # No apply_max_norm_regularization: the constraint (network_alpha) already bounds each rotation,
    # so --scale_weight_norms is refused for this module (as it fails in sd-scripts).

    def load_weights(self, file_or_state_dict):
        """Load a .safetensors/.pt file or a state dict; returns torch's (missing_keys, unexpected_keys)."""
        return self.load_state_dict(lora.read_weights(file_or_state_dict), strict=False)

    def save_weights(self, file, dtype=None, metadata=None) -> None:
        lora.write_weights(self.state_dict(), file, dtype, metadata)


# ---------------------------------------------------------------------- entry points


def _boolean(value) -> bool | None:
    return None if value is None or value == "None" else _BOOLEANS.get(str(value).strip().lower())


def network_args_problems(kwargs: dict) -> list[str]:
    """Unknown keys and non-boolean flags of --network_args for OFT."""
    problems = []
    for key, value in kwargs.items():
        if key not in SUPPORTED_NETWORK_ARGS:
            close = difflib.get_close_matches(key, SUPPORTED_NETWORK_ARGS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(SUPPORTED_NETWORK_ARGS[:2])})"
            problems.append(f"--network_args: unknown key '{key}' for {MODULE_NAME}{hint}")
        elif key != "dropout" and value not in (None, "None") and _boolean(value) is None:
            # sd-scripts takes bool() of the string, so even "False" switches it on; we read it.
            problems.append(f"--network_args {key}={value}: expected true or false")
    return problems


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A new OFT network: network_dim blocks per layer, network_alpha the constraint (1e-3 .. 1e-5 typical)."""
    problems = network_args_problems(kwargs)
    if problems:
        raise ValueError("; ".join(problems))
    if neuron_dropout or lora.optional_arg(kwargs, "dropout", float):
        logger.warning("OFT has no dropout; --network_dropout is ignored")
    network_dim = 4 if network_dim is None else int(network_dim)
    if network_alpha is None:
        network_alpha = 1e-3
    elif network_alpha >= 1:
        logger.warning("OFT: network_alpha %s is the constraint; >= 1 hardly constrains; 1e-3 is typical", network_alpha)
    all_linear = bool(_boolean(kwargs.get("enable_all_linear")))
    conv = bool(_boolean(kwargs.get("enable_conv")))
    logger.info(
        "create OFT network: %d blocks, constraint %s, enable_all_linear %s, enable_conv %s",
        network_dim, network_alpha, all_linear, conv,
    )  # fmt: skip
    return OFTNetwork(unet, multiplier, network_dim, float(network_alpha), all_linear, conv)


def create_network_from_weights(
    multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs
):
    """(network, weights_sd) with the layers, block counts and constraints of an OFT file; weights not loaded."""
    weights_sd = lora.read_weights(file) if weights_sd is None else weights_sd
    blocks = {k.rpartition(".")[0]: int(v.shape[0]) for k, v in weights_sd.items() if k.endswith(".oft_blocks")}
    alphas = {k.rpartition(".")[0]: v for k, v in weights_sd.items() if k.endswith(".alpha")}
    if not blocks:
        raise ValueError(f"{file}: no '.oft_blocks' tensors; not an OFT file (use its own --network_module)")
    modules = {name: (n, alphas.get(name, 1e-3)) for name, n in blocks.items()}
    network = OFTNetwork(unet, multiplier, modules=modules)
    lora.warn_unused_modules(network, modules)
    return network, weights_sd
