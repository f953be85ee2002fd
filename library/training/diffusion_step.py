"""One diffusion training step's arithmetic: batch -> latents -> noise and timesteps -> prediction -> loss.

Kept apart from the loop (trainer.py) so the maths reads in one place; every random draw comes from
a generator seeded per batch (schedule.batch_seed), which is what makes resume and multi-process
runs reproducible.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from library.training.noise import (
    NoiseSettings,
    noisy_latents,
    per_sample_loss,
    sample_noise,
    sample_timesteps,
    training_target,
)


class DiffusionTrainingModel(torch.nn.Module):
    """What DDP wraps: captions -> conditioning -> U-Net prediction, plus the recipe's trained module
    when it has one (registered so its parameters are found; it acts through hooks inside the U-Net /
    text encoder). `train_caption`, `caption` and `predict` are the recipe's optional hooks (library/recipe.py)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        conditioner: torch.nn.Module,
        trained: torch.nn.Module | None,
        caption: Callable[[str], str] | None = None,
        predict: Callable[..., torch.Tensor] | None = None,
        train_caption: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.trained = trained
        self.caption = caption
        self.predict = predict
        self.train_caption = train_caption

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if self.train_caption is not None:
            captions = [self.train_caption(c) for c in captions]
        if self.caption is not None:
            captions = [self.caption(c) for c in captions]
        if self.predict is not None:
            return self.predict(self.unet, self.conditioner, noisy_latents, timesteps, captions)
        hidden = self.conditioner(captions)
        return self.unet(noisy_latents, timesteps, hidden.to(noisy_latents.dtype)).sample


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def vae_dtype_for(mixed_precision: str, no_half_vae: bool = False) -> torch.dtype:
    """fp16 VAE encodes can overflow, so fp16 runs keep it in float32; bf16 is safe and saves memory
    (--no_half_vae keeps float32 there too)."""
    return torch.bfloat16 if mixed_precision == "bf16" and not no_half_vae else torch.float32


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move, and cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class DiffusionStep:
    """Loss of one batch for a model predicting noise (or v) at random timesteps."""

    def __init__(
        self,
        noise_scheduler,
        vae: torch.nn.Module,
        settings: NoiseSettings,
        device: torch.device,
        weight_dtype: torch.dtype,
        vae_dtype: torch.dtype,
    ) -> None:
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        self.settings = settings
        self.device = device
        self.weight_dtype = weight_dtype
        self.vae_dtype = vae_dtype

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict,
        seed: int,
        autocast: Callable[[], AbstractContextManager],
        timestep: int | None = None,
    ) -> torch.Tensor:
        """The batch's loss; `timestep` fixes every sample's timestep (validation) instead of drawing them."""
        torch.manual_seed(seed)  # dropout and anything else drawing from the global stream
        generator = torch.Generator().manual_seed(seed)
        latents = self.latents(batch, generator)
        noise = sample_noise(latents, self.settings, generator)
        if timestep is None:
            timesteps = sample_timesteps(
                latents.shape[0], self.noise_scheduler.config.num_train_timesteps, self.settings, generator, self.device
            )
        else:
            timesteps = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=self.device)
        noisy = noisy_latents(self.noise_scheduler, latents, noise, timesteps, self.settings, generator)
        with autocast():
            prediction = model(noisy.to(self.weight_dtype), timesteps, batch["captions"])
        target = training_target(self.noise_scheduler, latents, noise, timesteps, self.settings.v_parameterization)
        weights = batch["loss_weights"].to(self.device)
        mask = loss_mask(batch, latents)
        return per_sample_loss(
            prediction.float(), target.float(), timesteps, self.noise_scheduler, self.settings, weights, mask
        ).mean()

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Cached latents, or the VAE's sample of the batch's pixels; scaled for the U-Net."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
        else:
            with torch.no_grad():
                pixels = batch["images"].to(self.device, dtype=self.vae_dtype)
                latents = self.vae.encode(pixels).latent_dist.sample(generator=generator).float()
        return latents * self.vae.config.scaling_factor


def loss_mask(batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
    """Alpha masks (image size) averaged down to latent size, or None."""
    masks = batch.get("alpha_masks")
    if masks is None:
        return None
    masks = masks.to(latents.device, torch.float32).unsqueeze(1)
    return torch.nn.functional.interpolate(masks, size=latents.shape[-2:], mode="area")
