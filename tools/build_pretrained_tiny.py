"""Train the shipped tiny base model `tiny-sd-shapes` from scratch on CPU.

An SD1-shaped model (UNet2DConditionModel with cross-attention, a 4-level AutoencoderKL whose
latents are image/8, a narrow CLIPTextModel with the real 49,408-token CLIP tokenizer) trained on
synthetic 64x64 images of flat shapes (tools/shape_data.py) captioned like
"a red circle on a white background", so that it generates recognisable images:

1. render the dataset (deterministic from --seed);
2. train the VAE (L1 + L2 reconstruction, a small KL), then fold a per-channel shift and scale into
   its quant convs so that latents * 0.18215 have zero mean and unit variance (SD's scaling factor
   is what single-file loaders assume);
3. encode the dataset once, then train U-Net and text encoder together (epsilon prediction on SD's
   scaled_linear DDPM schedule, min-SNR-5 loss weights, 10 % empty captions for classifier-free
   guidance, AdamW with warm-up and cosine decay, EMA of the weights);
4. save the EMA weights in fp16 as a diffusers folder and as an LDM single file, check both load
   with library.models.loading.load_base_model;
5. generate every trained (colour, shape) caption on a white background with several seeds (DDIM,
   CFG) and score them (tools/shape_metrics.py); write the model card with the figures.

    python tools/build_pretrained_tiny.py --out models          # about 35 min on a 2-core CPU
    python tools/build_pretrained_tiny.py --out /tmp/m --quick  # a few minutes, checks the pipeline

writes OUT/tiny-sd-shapes/ (diffusers + README.md model card + samples.png) and OUT/tiny-sd-shapes.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from tools.shape_data import BACKGROUND_WEIGHTS, BASE_SHAPES, COLORS, HELD_OUT_SHAPES, caption_for, make_dataset

MODEL_NAME = "tiny-sd-shapes"
SCALING_FACTOR = 0.18215

# 64 wide at the top (8x8) level: at equal training time (about 37 min with 1 thread next to another
# build) (32, 64, 64, 64) for 7000 steps drew the right shape in 95 % of white-background samples and
# stars in 72 %; (64, 64, 64, 64) for 5400 steps in 100 % and 100 %.
UNET_CHANNELS = (64, 64, 64, 64)
VAE_CHANNELS = (64, 64, 64, 64)  # 64 at the top: the decoder's last GroupNorm(32) then sees channel pairs, not single channels
# Latents x 0.18215 are standardized to this spread, not to 1, so that samplers which clip the
# predicted clean latent to [-1, 1] (diffusers' DDIM default `clip_sample=True`) still work: at unit
# spread the flat, saturated colours of this data were clipped to grey (measured: garbage samples).
LATENT_STD = 0.5
TEXT_HIDDEN = 24  # the 49,408-token embedding dominates the size: 24 wide keeps both files under 25 MB


def unet_config(channels=None, text_hidden=None) -> dict:
    channels, text_hidden = channels or UNET_CHANNELS, text_hidden or TEXT_HIDDEN
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": list(channels),
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": text_hidden,
        "attention_head_dim": 8,  # SD1: 8 heads at every level (what the single-file loader infers)
        "use_linear_projection": False,
        "upcast_attention": False,
        "norm_num_groups": 32,
    }


def channel_list(text: str) -> tuple[int, ...]:
    """"32,64,64,64" -> (32, 64, 64, 64): the --unet_channels option."""
    channels = tuple(int(c) for c in text.split(","))
    if len(channels) != 4 or any(c % 32 for c in channels):
        raise SystemExit(f"--unet_channels {text!r}: give 4 comma-separated widths, each a multiple of 32 (GroupNorm(32))")
    return channels


def vae_config(channels=None) -> dict:
    channels = channels or VAE_CHANNELS
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": SCALING_FACTOR,
        "mid_block_add_attention": False,
    }


def text_config(hidden=None) -> dict:
    hidden = hidden or TEXT_HIDDEN
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": 3,
        "num_attention_heads": max(1, hidden // 64),  # SD convention (64-wide heads), as the single-file loader infers
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


# --------------------------------------------------------------------------- logging


class Log:
    def __init__(self, path: Path | None):
        self.path = path
        self.start = time.perf_counter()
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


def lr_at(step: int, total: int, peak: float, warmup: int, final_fraction: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------- VAE


def random_crops(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """One crop per image, at offsets on the 8-pixel latent grid (the VAE is fully convolutional)."""
    size = x.shape[-1]
    if crop >= size:
        return x
    cells = (size - crop) // 8 + 1
    ox = torch.randint(0, cells, (len(x),), generator=gen) * 8
    oy = torch.randint(0, cells, (len(x),), generator=gen) * 8
    return torch.stack([img[:, y : y + crop, xx : xx + crop] for img, y, xx in zip(x, oy.tolist(), ox.tolist())])


def train_vae(images: np.ndarray, args, log: Log):
    """AutoencoderKL from scratch: first on random crops (cheap), then on whole images (GroupNorm
    statistics of whole images are what generation sees)."""
    from diffusers import AutoencoderKL

    seed, steps, lr = args.seed, args.vae_steps, args.vae_lr
    crop_steps = int(steps * args.vae_crop_fraction)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config()).train()
    with torch.no_grad():  # start with a nearly deterministic posterior (std ~0.05), as a trained VAE has
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images)
    start, running = time.perf_counter(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10))
        cropped = step < crop_steps
        if step == crop_steps and args.work_dir:  # a usable VAE already; kept in case a slow machine stops the run
            vae.save_pretrained(str(Path(args.work_dir) / "vae_after_crops"))
        batch = args.vae_batch if cropped else args.vae_batch_full
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cropped:
            x = random_crops(x, args.vae_crop, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample.float()
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + l2 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
        opt.step()
        values = torch.stack([l1, l2, kl, grad_norm]).detach()
        running = values if running is None else 0.98 * running + 0.02 * values
        if step % 100 == 0 or step == steps - 1:
            log(
                f"vae step {step:5d}/{steps}  l1 {running[0]:.4f}  l2 {running[1]:.5f}  kl {running[2]:.3f}  gnorm {running[3]:.2f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {(time.perf_counter() - start) / (step + 1):.3f}s/step"
            )
    return vae.eval()


@torch.no_grad()
def encode_means(vae, images: np.ndarray, batch: int = 128, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            moments = vae.quant_conv(vae.encoder(to_tensor(images[i : i + batch]))).float()
        mean, logvar = moments.chunk(2, dim=1)
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def standardize_latents(vae, images: np.ndarray, log: Log) -> None:
    """Fold a per-channel shift and scale into quant_conv / post_quant_conv: latents * 0.18215 get zero
    mean and standard deviation LATENT_STD per channel. Idempotent.

    quant_conv (1x1) gives [mean, logvar]; mean' = a * (mean - m) and logvar' = logvar + 2 ln a;
    post_quant_conv sees z = z' / a + m. The decoded image of any z' is unchanged.
    """
    means, _ = encode_means(vae, images)
    m = means.mean(dim=(0, 2, 3))
    s = means.std(dim=(0, 2, 3))
    a = LATENT_STD / (s * SCALING_FACTOR)
    c = m.numel()
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # [2c, 2c, 1, 1]
    qw[:c] *= a[:, None, None, None]
    qb[:c] = a * (qb[:c] - m)
    qb[c:] += 2 * torch.log(a)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # [c, c, 1, 1]
    pb += (pw[:, :, 0, 0] @ m)
    pw /= a[None, :, None, None]
    log(f"latent standardization: channel means {m.tolist()} stds {s.tolist()} -> scale {a.tolist()}")


@torch.no_grad()
def reconstruction_report(vae, images: np.ndarray, specs, log: Log) -> dict:
    from tools.shape_metrics import score_image, summarize

    means, _ = encode_means(vae, images)
    recon = []
    for i in range(0, len(means), 256):
        out = vae.decode(means[i : i + 256]).sample
        recon.append(((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    recon = np.concatenate(recon)
    mae = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
    summary = summarize([score_image(r) for r in recon], [(s.color, s.shape, s.background) for s in specs])
    summary["mean_abs_error_0_255"] = mae
    scaled = means * SCALING_FACTOR
    summary["latent_mean"], summary["latent_std"] = float(scaled.mean()), float(scaled.std())
    log(f"VAE reconstructions of {len(images)} held-out images: {json.dumps(summary)}")
    return summary


# --------------------------------------------------------------------------- U-Net + text encoder


def train_unet(latent_mean, latent_std, captions: list[str], tokenizer, args, log: Log):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.loading import make_noise_scheduler

    torch.manual_seed(args.seed + 1)
    channels = channel_list(args.unet_channels)
    unet = UNet2DConditionModel(**unet_config(channels)).train()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config())).train()
    ema_unet = UNet2DConditionModel(**unet_config(channels)).eval().requires_grad_(False)
    ema_text = CLIPTextModel(CLIPTextConfig(**text_config())).eval().requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    opt = torch.optim.AdamW(params, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)

    scheduler = make_noise_scheduler(v_parameterization=False)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=args.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    unique = sorted(set(captions)) + [""]
    caption_index = torch.tensor([unique.index(c) for c in captions])
    tokens = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = len(unique) - 1

    gen = torch.Generator().manual_seed(args.seed + 2)
    steps, batch = args.unet_steps, args.unet_batch
    start, running = time.perf_counter(), None
    for step in range(steps):
        lr = lr_at(step, steps, args.unet_lr, warmup=min(200, steps // 10))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latent_mean), (batch,), generator=gen)
        x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * SCALING_FACTOR
        cap = caption_index[idx].clone()
        cap[torch.rand(batch, generator=gen) < args.caption_dropout] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        # Offset noise: at 8x8 latents SD's schedule leaves each channel's mean (the colours) visible even
        # at t=999, so without it the U-Net reads colours off the noise instead of learning them from text
        # (measured: 31 % right colours on white, 5 % on black/gray backgrounds).
        noise = noise + args.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        b = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        noisy = a * x0 + b * noise
        hidden = text_encoder(tokens[cap])[0]  # fp32: bf16 autocast is slower here (small matrices, attention)
        pred = unet(noisy, t, hidden).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in ema_pairs:
                ema_p.lerp_(p, 1 - decay)
        value = per_sample.mean().detach()
        running = value if running is None else 0.99 * running + 0.01 * value
        if step % 200 == 0 or step == steps - 1:
            log(
                f"unet step {step:5d}/{steps}  mse {running:.4f}  lr {lr:.2e}  "
                f"{(time.perf_counter() - start) / (step + 1):.3f}s/step"
            )
    return ema_unet, ema_text


# --------------------------------------------------------------------------- evaluation, card


def eval_prompts(seeds_per_caption: int, backgrounds=("white",)) -> tuple[list[str], list[int], list[tuple[str, str, str]]]:
    prompts, seeds, expected = [], [], []
    for background in backgrounds:
        for shape in BASE_SHAPES:
            for color in COLORS:
                for seed in range(seeds_per_caption):
                    prompts.append(caption_for(color, shape, background))
                    seeds.append(1000 + seed)
                    expected.append((color, shape, background))
    return prompts, seeds, expected


def evaluate(parts, seeds_per_caption: int, steps: int, guidance: float, log: Log, backgrounds=("white",)):
    from tools.shape_metrics import generate_images, score_image, summarize

    prompts, seeds, expected = eval_prompts(seeds_per_caption, backgrounds)
    start = time.perf_counter()
    images = generate_images(parts, prompts, seeds, steps=steps, guidance=guidance)
    scores = [score_image(img) for img in images]
    summary = summarize(scores, expected)
    summary.update(sampler=f"DDIM {steps} steps", guidance=guidance, seconds=round(time.perf_counter() - start, 1))
    per_shape = {k: summarize([s for s, e in zip(scores, expected) if e[1] == k], [e for e in expected if e[1] == k]) for k in BASE_SHAPES}
    per_color = {c: summarize([s for s, e in zip(scores, expected) if e[0] == c], [e for e in expected if e[0] == c]) for c in COLORS}
    log(f"evaluation ({', '.join(backgrounds)}): {json.dumps(summary)}")
    for k, v in per_shape.items():
        log(f"  {k:9s} colour {v['color_accuracy']:.2f} shape {v['shape_accuracy']:.2f} IoU {v['mean_iou']:.3f}")
    return summary, per_shape, per_color, images, expected


def save_grid(images: np.ndarray, columns: int, path: Path) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    Image.fromarray(grid).save(path, optimize=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models", help="folder to write tiny-sd-shapes/ and tiny-sd-shapes.safetensors into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few minutes of training: checks the pipeline, not a usable model")
    parser.add_argument("--train_images", type=int, default=20000, help="rendered images the VAE trains on")
    parser.add_argument("--unet_images", type=int, default=10000, help="how many of them are encoded for the U-Net")
    parser.add_argument("--vae_steps", type=int, default=1700)
    parser.add_argument("--vae_batch", type=int, default=24, help="batch of the crop phase")
    parser.add_argument("--vae_batch_full", type=int, default=8, help="batch of the whole-image phase")
    parser.add_argument("--vae_lr", type=float, default=3e-3)
    parser.add_argument("--vae_crop", type=int, default=32, help="crop size (multiple of 8) of the first phase")
    parser.add_argument("--vae_crop_fraction", type=float, default=0.9, help="share of VAE steps on crops")
    parser.add_argument("--no_bf16", dest="bf16", action="store_false", help="train and run the VAE in fp32 instead of bf16 autocast")
    parser.add_argument("--vae_from", default=None, help="reuse a VAE saved by an earlier build (its work folder) instead of training one")
    parser.add_argument("--work_dir", default="bench/results/pretrained_tiny/work", help="where the trained VAE is kept for --vae_from")
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--unet_channels", default=",".join(map(str, UNET_CHANNELS)), help="U-Net block widths, top level first")
    parser.add_argument("--unet_steps", type=int, default=5400)
    parser.add_argument("--unet_batch", type=int, default=32)
    parser.add_argument("--unet_lr", type=float, default=1e-3)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--min_snr_gamma", type=float, default=5.0)
    parser.add_argument("--noise_offset", type=float, default=0.3, help="per-channel offset noise in U-Net training")
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--eval_seeds", type=int, default=4, help="images per (colour, shape) caption in the evaluation")
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae_only", action="store_true", help="stop after training the VAE (kept in --work_dir)")
    parser.add_argument("--log", default="bench/results/pretrained_tiny/build.log")
    args = parser.parse_args(argv)
    channel_list(args.unet_channels)  # a bad value stops here, not after the VAE stage
    if args.quick:
        args.train_images, args.unet_images, args.vae_steps, args.unet_steps, args.eval_seeds = 4000, 4000, 300, 400, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log(Path(args.log) if args.log else None)
    log(f"args: {json.dumps(vars(args))}")
    from library.models.components import StableDiffusionParts
    from library.models.loading import load_base_model, make_noise_scheduler
    from library.models.saving import save_diffusers_folder, save_model
    from library.models.tokenizer import build_clip_tokenizer

    timings = {}
    t0 = time.perf_counter()
    images, specs = make_dataset(args.train_images, seed=args.seed)
    check_images, check_specs = make_dataset(256, seed=args.seed + 10_000)
    timings["data"] = time.perf_counter() - t0
    log(f"rendered {len(images)} training images ({len({s.caption for s in specs})} captions) in {timings['data']:.1f}s")

    t0 = time.perf_counter()
    vae_args = {k: v for k, v in vars(args).items() if k.startswith(("vae_", "kl_", "train_images", "seed", "bf16", "threads"))}
    if args.vae_from:
        from diffusers import AutoencoderKL

        source = Path(args.vae_from)
        vae = AutoencoderKL.from_pretrained(str(source / "vae" if (source / "vae" / "config.json").is_file() else source)).eval()
        log(f"VAE reused from {args.vae_from}")
        standardize_latents(vae, images[:2000], log)  # to this version's LATENT_STD (no change if already there)
        earlier = source / "vae_report.json"
        if earlier.is_file():  # the stage's own time and settings, for the model card
            earlier = json.loads(earlier.read_text())
            vae_args, timings["vae"] = earlier["args"], earlier["seconds"]
    else:
        vae = train_vae(images, args, log)
        standardize_latents(vae, images[:2000], log)
        timings["vae"] = time.perf_counter() - t0
        if args.work_dir:
            vae.save_pretrained(str(Path(args.work_dir) / "vae"))
            report = {"args": vae_args, "seconds": round(timings["vae"], 1)}
            (Path(args.work_dir) / "vae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    vae_report = reconstruction_report(vae, check_images, check_specs, log)
    timings.setdefault("vae", time.perf_counter() - t0)
    if args.vae_only:
        return 0

    t0 = time.perf_counter()
    images, specs = images[: args.unet_images], specs[: args.unet_images]
    latent_mean, latent_std = encode_means(vae, images, bf16=args.bf16)
    timings["encode"] = time.perf_counter() - t0
    log(f"encoded {len(images)} images in {timings['encode']:.1f}s")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    t0 = time.perf_counter()
    unet, text_encoder = train_unet(latent_mean, latent_std, [s.caption for s in specs], tokenizer, args, log)
    timings["unet"] = time.perf_counter() - t0

    parts = StableDiffusionParts(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
        noise_scheduler=make_noise_scheduler(False), v2=False, v_parameterization=False,
        source=MODEL_NAME, source_format="diffusers",
    )
    out = Path(args.out)
    folder, single = out / MODEL_NAME, out / f"{MODEL_NAME}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_diffusers_folder(folder, parts, precision="fp16")
    # tokenizer.json (3.6 MB) repeats vocab.json + merges.txt, from which transformers 4.x and 5.x both
    # build the same tokenizer; dropping it is what leaves room for a wider U-Net within 25 MB.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    from library.models.modelspec import build_modelspec

    metadata = build_modelspec(v2=False, v_parameterization=False, title=MODEL_NAME, resolution=(64, 64))
    metadata["modelspec.description"] = "tiny SD1-shaped model trained from scratch on synthetic shapes (tools/build_pretrained_tiny.py)"
    save_model(single, parts, "safetensors", precision="fp16", metadata=metadata)

    # what users get: the fp16 files, loaded both ways
    loaded = load_base_model(str(folder))
    loaded_single = load_base_model(str(single))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(loaded_single, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the folder and the single file differ"
    log("saved; the diffusers folder and the single file load with load_base_model and hold the same weights")

    t0 = time.perf_counter()
    summary, per_shape, per_color, eval_images, _ = evaluate(loaded, args.eval_seeds, args.eval_steps, args.guidance, log)
    other_bg, _, _, _, _ = evaluate(loaded, 1, args.eval_steps, args.guidance, log, backgrounds=("black", "gray"))
    timings["eval"] = time.perf_counter() - t0
    # sample sheet: one image per caption (first seed), rows = shapes, columns = colours
    first = eval_images[:: args.eval_seeds]
    save_grid(first, len(COLORS), folder / "samples.png")

    sizes = {"folder": folder_size(folder), "single_file": folder_size(single), "tokenizer": folder_size(folder / "tokenizer")}
    report = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "vae_reconstruction": vae_report,
        "generation_white": summary,
        "generation_black_gray": other_bg,
        "per_shape": per_shape,
        "per_color": per_color,
        "sizes_bytes": sizes,
        "args": vars(args),
        "vae_args": vae_args,
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, threads: {torch.get_num_threads()}",
    }
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(report, args))
    sizes = {"folder": folder_size(folder), "single_file": folder_size(single)}
    log(f"timings {json.dumps(report['timings_s'])}; sizes {json.dumps(sizes)} (total {sum(sizes.values()) / 1e6:.1f} MB)")
    return 0


def model_card(report: dict, args) -> str:
    g, o, v = report["generation_white"], report["generation_black_gray"], report["vae_reconstruction"]
    va = argparse.Namespace(**{**vars(args), **report["vae_args"]})  # the VAE stage's own settings
    vae_note = (
        " (the VAE stage ran as its own invocation, `--vae_only`, and the rest with `--vae_from`; same"
        " settings as one run)" if args.vae_from else ""
    )
    t = report["timings_s"]
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    shape_rows = "\n".join(
        f"| {k} | {pct(s['color_accuracy'])} | {pct(s['shape_accuracy'])} | {s['mean_iou']:.2f} |" for k, s in report["per_shape"].items()
    )
    color_rows = "\n".join(
        f"| {c} | {pct(s['color_accuracy'])} | {pct(s['shape_accuracy'])} | {s['mean_iou']:.2f} |" for c, s in report["per_color"].items()
    )
    u, vc, tc = unet_config(channel_list(args.unet_channels)), vae_config(), text_config()
    return f"""# tiny-sd-shapes

A tiny Stable Diffusion 1.x-shaped model, trained from scratch in about {sum(t.values()) / 60:.0f} minutes on a
2-core CPU, that draws flat coloured shapes on plain backgrounds. It is the base model of this
project's quick start, learning tests and docs: small enough to commit and to train on CPU,
real enough that a LoRA, DreamBooth or textual-inversion run on it visibly learns something.

It is **not** a general image model: it knows {len(BASE_SHAPES)} shapes, {len(COLORS)} colours and 3 backgrounds, at 64x64 pixels.

![one sample per caption: rows are shapes, columns colours](samples.png)

`samples.png`: one image per caption "a COLOUR SHAPE on a white background" (rows: {', '.join(BASE_SHAPES)};
columns: {', '.join(COLORS)}), seed 1000, DDIM {args.eval_steps} steps, guidance {args.guidance}.

## Use

```python
from library.models.loading import load_base_model
parts = load_base_model("models/tiny-sd-shapes")            # or models/tiny-sd-shapes.safetensors
pipe = parts.to_pipeline()                                   # a diffusers StableDiffusionPipeline
image = pipe("a red star on a white background", height=64, width=64, guidance_scale=5.0,
             num_inference_steps=25).images[0]
```

It also loads directly with `diffusers.StableDiffusionPipeline.from_pretrained("models/tiny-sd-shapes")`, and
the trainers take either form with `--pretrained_model_name_or_path` (no `--v2`). Train and sample at
`--resolution 64`.

Vocabulary it was trained on, always as "a(n) COLOUR SHAPE on a BACKGROUND background":

* shapes: {', '.join(BASE_SHAPES)}
* colours: {', '.join(COLORS)}
* backgrounds: {', '.join(f'{b} ({int(100 * w)} %)' for b, w in BACKGROUND_WEIGHTS.items())}
* **never seen** (kept out on purpose, for teaching a new concept): {', '.join(HELD_OUT_SHAPES)}.
  `tools/shape_data.py` draws them with the same renderer.

## Quality (measured by the build)

Every trained (colour, shape) pair on a white background, {args.eval_seeds} seed(s) each ({g['images']} images), DDIM
{args.eval_steps} steps, classifier-free guidance {args.guidance}, scored by `tools/shape_metrics.py`: the colour is the
nearest named colour (shape colours and background colours) of the object's pixels; the shape is the
best-fitting of the {len(BASE_SHAPES)} rendered templates (intersection over union, IoU); IoU is that of the
expected shape.

| | colour correct | shape correct | colour and shape | background | mean IoU |
|---|---|---|---|---|---|
| white background | {pct(g['color_accuracy'])} | {pct(g['shape_accuracy'])} | {pct(g['color_and_shape_accuracy'])} | {pct(g['background_accuracy'])} | {g['mean_iou']:.2f} |
| black and gray (1 seed) | {pct(o['color_accuracy'])} | {pct(o['shape_accuracy'])} | {pct(o['color_and_shape_accuracy'])} | {pct(o['background_accuracy'])} | {o['mean_iou']:.2f} |

Per shape (white background):

| shape | colour | shape | IoU |
|---|---|---|---|
{shape_rows}

Per colour (white background):

| colour | colour | shape | IoU |
|---|---|---|---|
{color_rows}

For scale: the VAE alone (encode, decode) on {v['images']} unseen rendered images scores colour {pct(v['color_accuracy'])},
shape {pct(v['shape_accuracy'])}, IoU {v['mean_iou']:.2f} (mean absolute pixel error {v['mean_abs_error_0_255']:.1f}/255); the
rendered references themselves score IoU about 0.96.

## How it was made

`python tools/build_pretrained_tiny.py --out models` rebuilds it (deterministic for `--seed {args.seed}`, up to
floating-point differences between CPUs). Times below are from the run that made these files:
{report['machine']}{vae_note}.

* **Data** ({t['data']:.0f} s): {va.train_images} rendered 64x64 images (`tools/shape_data.py`, seed {args.seed}): a
  random shape, colour and background, half-size 12-24 px, random position, anti-aliased. The VAE trains on all of
  them, the U-Net on the first {args.unet_images}.
* **VAE** ({t['vae']:.0f} s): AutoencoderKL, 4 levels {vc['block_out_channels']}, 1 ResNet per level, no mid-block
  attention, 4 latent channels (latents 8x8). {va.vae_steps} steps: {int(va.vae_steps * va.vae_crop_fraction)} on random {va.vae_crop}x{va.vae_crop}
  crops (batch {va.vae_batch}), then whole images (batch {va.vae_batch_full}); AdamW lr {va.vae_lr} (warm-up, cosine), loss
  L1 + L2 + {va.kl_weight} x KL, bf16 autocast{'' if va.bf16 else ' off'}. 64 channels at the top level, because the decoder's last GroupNorm(32) then
  normalizes channel pairs: with single channels flat colours are hard to reproduce (measured: colours were
  wrong in most reconstructions with 32 channels). Afterwards a per-channel shift and scale is folded into
  `quant_conv` / `post_quant_conv` so that latents x 0.18215 (SD's scaling factor) have zero mean and
  standard deviation {LATENT_STD:g}, so that samplers which clip the predicted clean latent to [-1, 1] (diffusers'
  DDIM default) still work: at standard deviation 1 they clipped these saturated colours to grey.
* **U-Net and text encoder** ({t['unet']:.0f} s, trained together from scratch): UNet2DConditionModel
  {u['block_out_channels']}, 1 layer per block, cross-attention in the first three levels and the mid block,
  8 heads (SD1). 64 channels at the top (8x8) level too: in the same training time, 32 there drew the
  right shape in 95 % of these samples and stars in 72 % (measured while choosing the width; `--unet_channels`
  sets the widths, `--unet_steps` the length); CLIPTextModel with hidden size {tc['hidden_size']}, {tc['num_hidden_layers']} layers, MLP {tc['intermediate_size']}, the real CLIP
  tokenizer (77 tokens). Epsilon prediction on SD's DDPM schedule (scaled_linear 0.00085-0.012, 1000
  steps), min-SNR-{args.min_snr_gamma:g} loss weights, offset noise {args.noise_offset:g} (without it the
  colours were wrong: at 8x8 latents the schedule leaves colour visible at the last timestep), {int(100 * args.caption_dropout)} % empty captions (for classifier-free guidance),
  {args.unet_steps} steps of batch {args.unet_batch}, AdamW lr {args.unet_lr} (warm-up, cosine), EMA {args.ema_decay} of both
  (the EMA weights are what is saved).
* **Saved** in fp16: `tiny-sd-shapes/` (diffusers, {report['sizes_bytes']['folder'] / 1e6:.1f} MB, of which the tokenizer files are
  {report['sizes_bytes']['tokenizer'] / 1e6:.1f} MB: `vocab.json` and `merges.txt`, without the `tokenizer.json` that repeats them) and `tiny-sd-shapes.safetensors` (LDM single file, {report['sizes_bytes']['single_file'] / 1e6:.1f} MB). Both hold the same weights.
* **Evaluation** ({t['eval']:.0f} s). All figures and settings: `build_report.json`.

## Limits

* 64x64 only (it never saw another size); no text beyond the caption pattern above; one object per image,
  upright, no rotation, no overlap.
* Small shapes and thin parts (star points, the hole of a ring) are the least reliable, most of all on
  black and gray backgrounds.
* Weights are fp16; load them in fp32 on CPU (the default of `load_base_model`).

## License

The weights and the data generator are part of this project and under its license. They were trained only
on synthetic images made by `tools/shape_data.py`; no third-party images or weights were used. The
tokenizer vocabulary is OpenAI's CLIP BPE vocabulary (MIT license).
"""


if __name__ == "__main__":
    sys.exit(main())
