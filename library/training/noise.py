"""Noise, timesteps and loss of one training step, with the semantics of kohya-ss/sd-scripts.

Everything here is a pure function of its inputs. All randomness comes from an explicit
`torch.Generator`, so a trainer that seeds a fresh generator per step gets bit-exact resumes.
Random tensors are drawn in float32 on the generator's device, then moved to the latents'
device; results come back in the latents' dtype and losses are computed in float32.

Deliberate differences from sd-scripts (formulas are otherwise the same):
* Randomness: upstream draws from the global torch RNG and, in pyramid noise, Python's
  `random`; here every draw (in the same order as upstream) comes from the given generator.
* Min-SNR weighting for epsilon prediction is 1 (its limit) instead of NaN where SNR is 0,
  which only happens at the last timestep with --zero_terminal_snr.
* `noisy_latents` / `training_target` leave the scheduler's `alphas_cumprod` where it was
  (diffusers moves it to the latents' device; upstream moves it back by hand).
* `noise_option_problems` also rejects timesteps outside 0..1000 and min_timestep >
  max_timestep (upstream fails later, or silently trains on a constant timestep).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from library.errors import UserError

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x/2.x training schedule


class NoiseOptionError(UserError, ValueError):
    """A bad combination of noise/loss options (the user's to fix)."""


# (name, type or "flag", default, help); names and defaults are sd-scripts'.
_OPTIONS = (
    ("noise_offset", float, None, "offset noise per channel (~0.1): lets the model learn very dark/bright images"),
    ("noise_offset_random_strength", "flag", False, "random offset strength in 0..noise_offset each step"),
    ("adaptive_noise_scale", float, None, "add |mean of latent| x this to the noise offset (needs --noise_offset)"),
    ("multires_noise_iterations", int, None, "multi-resolution (pyramid) noise iterations (6-10)"),
    ("multires_noise_discount", float, 0.3, "weight decay per pyramid noise level (default 0.3)"),
    ("ip_noise_gamma", float, None, "input-perturbation noise strength (~0.1)"),
    ("ip_noise_gamma_random_strength", "flag", False, "random strength in 0..ip_noise_gamma each step"),
    ("zero_terminal_snr", "flag", False, "rescale betas so the last timestep is pure noise (use with v-param)"),
    ("min_timestep", int, None, "lowest timestep to train on (default 0)"),
    ("max_timestep", int, None, "train on timesteps below this (default 1000)"),
    ("loss_type", LOSS_TYPES, "l2", "loss function (default l2)"),
    ("huber_schedule", HUBER_SCHEDULES, "snr", "how the Huber threshold varies with the timestep (default snr)"),
    ("huber_c", float, 0.1, "Huber / smooth L1 threshold (default 0.1)"),
    ("huber_scale", float, 1.0, "scale of the Huber threshold (constant and exponential schedules)"),
    ("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (5 recommended)"),
    ("scale_v_pred_loss_like_noise_pred", "flag", False, "weight v-pred loss like noise-pred loss (needs v-param)"),
    ("v_pred_like_loss", float, None, "add a v-prediction-like loss times this value (not with v-param)"),
    ("debiased_estimation_loss", "flag", False, "debiased estimation loss weighting"),
)


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noise and loss")
    for name, kind, default, help_text in _OPTIONS:
        if kind == "flag":
            group.add_argument(f"--{name}", action="store_true", help=help_text)
        elif isinstance(kind, tuple):
            group.add_argument(f"--{name}", type=str, default=default, choices=kind, help=help_text)
        else:
            group.add_argument(f"--{name}", type=kind, default=default, help=help_text)


@dataclass(frozen=True)
class NoiseSettings:
    """The options that shape noise, timesteps and loss; built once from the parsed args."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False

    @classmethod
    def from_args(cls, args: Any) -> NoiseSettings:
        """Options missing from `args` keep their defaults (a recipe may not own them all)."""
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    def check(self) -> None:
        problems = noise_option_problems(self)
        if problems:
            raise NoiseOptionError("; ".join(problems))


def noise_option_problems(s: NoiseSettings) -> list[str]:
    """Every bad combination at once (the first three are sd-scripts' verify_training_args checks)."""
    p = []
    if s.adaptive_noise_scale is not None and s.noise_offset is None:
        p.append("--adaptive_noise_scale requires --noise_offset")
    if s.scale_v_pred_loss_like_noise_pred and not s.v_parameterization:
        p.append("--scale_v_pred_loss_like_noise_pred can be used only with --v_parameterization")
    if s.v_pred_like_loss and s.v_parameterization:
        p.append("--v_pred_like_loss cannot be used with --v_parameterization")
    for name in ("min_timestep", "max_timestep"):
        v = getattr(s, name)
        if v is not None and not 0 <= v <= NUM_TRAIN_TIMESTEPS:
            p.append(f"--{name} must be between 0 and {NUM_TRAIN_TIMESTEPS} (got {v})")
    lo = 0 if s.min_timestep is None else s.min_timestep
    hi = NUM_TRAIN_TIMESTEPS if s.max_timestep is None else s.max_timestep
    if lo > hi:
        p.append(f"--min_timestep ({lo}) is above --max_timestep ({hi})")
    elif lo == hi == NUM_TRAIN_TIMESTEPS:
        p.append(f"--min_timestep = --max_timestep trains on that one timestep; it must be below {NUM_TRAIN_TIMESTEPS}")
    if s.min_snr_gamma is not None and s.min_snr_gamma <= 0:
        p.append(f"--min_snr_gamma must be positive (got {s.min_snr_gamma})")
    if s.loss_type not in LOSS_TYPES:
        p.append(f"--loss_type must be one of {', '.join(LOSS_TYPES)} (got {s.loss_type!r})")
    if s.loss_type in ("huber", "smooth_l1"):
        if s.huber_schedule not in HUBER_SCHEDULES:
            p.append(f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)} (got {s.huber_schedule!r})")
        if not s.huber_c > 0:
            p.append(f"--huber_c must be positive (got {s.huber_c})")
    return p


def noise_option_warnings(s: NoiseSettings) -> list[str]:
    """Combinations upstream allows but warns about."""
    if s.zero_terminal_snr and not s.v_parameterization:
        return ["--zero_terminal_snr without --v_parameterization: training will be unexpected"]
    return []


def _randn(shape, generator: torch.Generator, fn=torch.randn) -> torch.Tensor:
    return fn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def _rand(shape, generator: torch.Generator) -> torch.Tensor:
    return _randn(shape, generator, torch.rand)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise (sd-scripts' pyramid_noise_like): level i is drawn at 1/r**i size
    (r random in [2, 4), level 0 full size), upsampled bilinearly, weighted discount**i, then the
    sum is rescaled to unit std over the whole batch."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(_rand((), generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _randn((b, c, hn, wn), generator).to(noise.device)
        noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break  # lowest resolution reached
    return noise / noise.std()


def sample_noise(latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like `latents`, with offset noise (crosslabs.org/blog/diffusion-with-offset-noise)
    and pyramid noise as configured. Upstream draws one random offset strength per batch, not per
    sample; so does this."""
    s, dev = settings, latents.device
    noise = _randn(latents.shape, generator).to(dev)
    if s.noise_offset:
        offset: Any = s.noise_offset
        if s.noise_offset_random_strength:
            offset = _rand((1,), generator).to(dev) * offset
        if s.adaptive_noise_scale is not None:
            latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(offset + s.adaptive_noise_scale * latent_mean, min=0.0)
        noise = noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator).to(dev)
    if s.multires_noise_iterations:
        noise = pyramid_noise(noise, s.multires_noise_iterations, s.multires_noise_discount, generator)
    return noise.to(latents.dtype)


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, settings: NoiseSettings, generator: torch.Generator, device
) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep or 0, max_timestep or num_train_timesteps);
    all equal to max_timestep when min == max (as upstream)."""
    lo = 0 if settings.min_timestep is None else settings.min_timestep
    hi = num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    if lo < hi:
        t = torch.randint(lo, hi, (batch_size,), generator=generator, device=generator.device)
    else:
        t = torch.full((batch_size,), hi, dtype=torch.long)
    return t.long().to(device)


def _keeping_schedule(noise_scheduler, fn, *args):
    """Call a diffusers scheduler method without letting it move alphas_cumprod for good."""
    alphas_cumprod = noise_scheduler.alphas_cumprod
    try:
        return fn(*args)
    finally:
        noise_scheduler.alphas_cumprod = alphas_cumprod


def noisy_latents(noise_scheduler, latents, noise, timesteps, settings: NoiseSettings, generator) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0). With --ip_noise_gamma the noise fed to the model input is
    perturbed (arXiv 2301.11706) while the target keeps the unperturbed noise."""
    if settings.ip_noise_gamma:
        gamma: Any = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            gamma = _rand((1,), generator).to(latents.device) * gamma
        perturbed = noise.float() + gamma * _randn(latents.shape, generator).to(latents.device)
        noise = perturbed.to(noise.dtype)
    return _keeping_schedule(noise_scheduler, noise_scheduler.add_noise, latents, noise, timesteps).to(latents.dtype)


def training_target(noise_scheduler, latents, noise, timesteps, v_parameterization: bool) -> torch.Tensor:
    """What the U-Net must predict: the noise, or v = alpha_t * noise - sigma_t * x0."""
    if v_parameterization:
        return _keeping_schedule(noise_scheduler, noise_scheduler.get_velocity, latents, noise, timesteps)
    return noise


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod / (1 - alphas_cumprod) at each timestep (float32, on timesteps' device),
    computed as upstream's all_snr = (sqrt(a) / sqrt(1 - a)) ** 2."""
    ac = noise_scheduler.alphas_cumprod
    all_snr = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2
    return all_snr[timesteps.to(ac.device)].float().to(timesteps.device)


def _uses_snr_weights(s: NoiseSettings) -> bool:
    flags = (s.min_snr_gamma, s.v_pred_like_loss, s.scale_v_pred_loss_like_noise_pred, s.debiased_estimation_loss)
    return any(bool(f) for f in flags)


def snr_loss_weights(timesteps: torch.Tensor, noise_scheduler, settings: NoiseSettings) -> torch.Tensor:
    """Per-sample weight of min-SNR, scale_v_pred_loss_like_noise_pred, v_pred_like_loss and debiased
    estimation, applied in upstream's order; the loss is linear in each, so their product is
    exactly upstream's post-processing. Ones when none is set."""
    s, v = settings, settings.v_parameterization
    snr = compute_snr(noise_scheduler, timesteps)
    snr_c = torch.minimum(snr, torch.full_like(snr, 1000.0))  # snr at t=0 can be huge; upstream caps at 1000
    scale = snr_c / (snr_c + 1)
    w = torch.ones_like(snr)
    if s.min_snr_gamma:
        clipped = torch.minimum(snr, torch.full_like(snr, s.min_snr_gamma))
        if v:
            w = w * clipped / (snr + 1)
        else:
            w = w * torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if s.scale_v_pred_loss_like_noise_pred:
        w = w * scale
    if s.v_pred_like_loss:
        w = w + w / scale * s.v_pred_like_loss
    if s.debiased_estimation_loss:
        w = w * (1 / (snr_c + 1) if v else 1 / torch.sqrt(snr_c))
    return w


def huber_c_for(timesteps: torch.Tensor, noise_scheduler, settings: NoiseSettings) -> torch.Tensor | None:
    """Per-sample Huber threshold (upstream get_huber_threshold_if_needed); None unless the loss is
    huber or smooth_l1. As upstream, huber_scale scales the constant and exponential schedules only."""
    s = settings
    if s.loss_type not in ("huber", "smooth_l1"):
        return None
    if s.huber_schedule == "exponential":
        alpha = -math.log(s.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * s.huber_scale
    if s.huber_schedule == "snr":
        ac = noise_scheduler.alphas_cumprod[timesteps.to(noise_scheduler.alphas_cumprod.device)]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return ((1 - s.huber_c) / (1 + sigmas) ** 2 + s.huber_c).to(timesteps.device)
    if s.huber_schedule == "constant":
        return torch.full((timesteps.shape[0],), s.huber_c * s.huber_scale, device=timesteps.device)
    raise ValueError(f"unknown huber schedule {s.huber_schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c=None) -> torch.Tensor:
    """Unreduced loss (upstream conditional_loss with reduction='none'). huber_c: [B] or a scalar."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c")
        c = torch.as_tensor(huber_c, dtype=pred.dtype, device=pred.device)
        if c.ndim == 1:
            c = c.view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}")


def per_sample_loss(
    pred, target, timesteps, noise_scheduler, settings: NoiseSettings, loss_weights=None, mask=None
) -> torch.Tensor:
    """Loss of each sample [B] as upstream's train step computes it: elementwise loss in float32,
    times the mask (area-resized to the latent size if needed; not renormalised, as upstream),
    mean over non-batch dims, times the per-sample loss weights (prior_loss_weight), times the
    SNR-based weights. The trainer takes its mean."""
    huber_c = huber_c_for(timesteps, noise_scheduler, settings)
    loss = elementwise_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    if mask is not None:
        mask = mask.to(loss.device, torch.float32)
        if mask.ndim == loss.ndim - 1:
            mask = mask.unsqueeze(1)
        if mask.shape[-2:] != loss.shape[-2:]:
            mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
        loss = loss * mask
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * torch.as_tensor(loss_weights, dtype=loss.dtype, device=loss.device)
    if _uses_snr_weights(settings):
        loss = loss * snr_loss_weights(timesteps, noise_scheduler, settings).to(loss.device)
    return loss


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR 0 and the first keeps its value
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891, Alg. 1)."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def apply_zero_terminal_snr(noise_scheduler):
    """A new scheduler of the same class with zero-terminal-SNR betas (the given one is untouched);
    its betas/alphas/alphas_cumprod equal what upstream writes into the scheduler in place."""
    betas = zero_terminal_snr_betas(noise_scheduler.betas.float())
    return type(noise_scheduler).from_config(noise_scheduler.config, trained_betas=betas.tolist())
