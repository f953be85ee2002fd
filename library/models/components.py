"""The parts of a Stable Diffusion model that the recipes work with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StableDiffusionParts:
    """Tokenizer, text encoder, U-Net, VAE and the training noise scheduler of one SD1.x/2.x model.

    `source` is where it came from (path or hub id); `source_format` is one of
    "diffusers" or "single_file", used to pick the default save format.
    """

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    noise_scheduler: Any
    v2: bool
    v_parameterization: bool
    source: str
    source_format: str

    def to_pipeline(self, scheduler=None):
        """A diffusers StableDiffusionPipeline sharing these modules (no copies)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
