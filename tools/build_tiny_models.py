"""Build tiny SD1-shaped and SD2-shaped (v-prediction) models for tests, as diffusers folders and LDM files.

They keep SD's structure — a 4-level U-Net with cross-attention in the first three
levels, a 4-level VAE (latents are image/8), a CLIP text encoder and the real
49,408-token CLIP tokenizer — with small widths, so they follow the same naming,
conversion and config-inference rules as the real models.

    python tools/build_tiny_models.py OUT_DIR [--seed 0]

writes OUT_DIR/sd1/ (diffusers), OUT_DIR/sd1.safetensors (LDM), OUT_DIR/sd2/, OUT_DIR/sd2.safetensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from library.models.components import StableDiffusionParts
from library.models.loading import make_noise_scheduler
from library.models.saving import save_diffusers_folder, save_single_file
from library.models.tokenizer import build_clip_tokenizer

CHANNELS = (32, 32, 64, 64)


def tiny_unet_config(v2: bool) -> dict:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": list(CHANNELS),
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 64 if v2 else 32,
        # diffusers calls the number of heads "attention_head_dim": SD1 uses 8 heads,
        # SD2 uses 64-wide heads (channels // 64, at least one here).
        "attention_head_dim": [max(1, c // 64) for c in CHANNELS] if v2 else 8,
        "use_linear_projection": v2,
        "upcast_attention": False,
        "norm_num_groups": 32,
    }


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(CHANNELS),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def tiny_text_config(v2: bool) -> dict:
    return {
        "vocab_size": 49408,
        "hidden_size": 64 if v2 else 32,
        "intermediate_size": 37,
        "num_hidden_layers": 3 if v2 else 5,
        "num_attention_heads": 1,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if v2 else "quick_gelu",
        "projection_dim": 64 if v2 else 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0 if v2 else 49407,
    }


def build_tiny_parts(v2: bool, seed: int = 0, tokenizer_dir: str | None = None) -> StableDiffusionParts:
    """Randomly initialised tiny parts (deterministic for a seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(v2))
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(v2)))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tokenizer_dir or tmp, v2=v2)
    return StableDiffusionParts(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        noise_scheduler=make_noise_scheduler(v_parameterization=v2),
        v2=v2,
        v_parameterization=v2,
        source="tiny",
        source_format="diffusers",
    )


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write both tiny models in both layouts; returns {"sd1": folder, "sd1_file": file, "sd2": ..., "sd2_file": ...}."""
    out = Path(out_dir)
    paths = {}
    for name, v2 in (("sd1", False), ("sd2", True)):
        parts = build_tiny_parts(v2, seed=seed)
        save_diffusers_folder(out / name, parts)
        save_single_file(out / f"{name}.safetensors", parts.unet, parts.vae, parts.text_encoder, v2=v2)
        paths[name], paths[f"{name}_file"] = out / name, out / f"{name}.safetensors"
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write sd1/, sd1.safetensors, sd2/, sd2.safetensors into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in build_tiny_models(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
