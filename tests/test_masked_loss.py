"""Masked loss: --alpha_mask, --masked_loss with mask images (conditioning_data_dir), --conditioning_data_dir.

What is masked out contributes nothing to the loss or its gradient; a mask weighs the loss pixel by pixel
without renormalising (as upstream); mask pixels stay on their image pixels through bucket resize, crop and
flip, with and without cached latents; and every mistake is found before the model loads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.config_schema import DatasetConfigError
from library.data.masks import MaskFilesError
from library.data.pipeline import prepare_datasets
from library.training.diffusion_step import DiffusionStep
from library.training.noise import NoiseSettings
from tests.recipe_infos import parser_for, support
from tests.training_helpers import assert_ok, lora_args, run_script

RED = (220, 30, 30)


# ---------------------------------------------------------------- data


def picture_and_mask(folder, masks, name: str, size=(96, 64), box=(10, 6, 50, 40), mask_scale: float = 1.0, alpha=False):
    """A white picture with a red box, and its mask: white on the box, black elsewhere (optionally smaller)."""
    w, h = size
    x0, y0, x1, y1 = box
    pixels = np.full((h, w, 3), 255, np.uint8)
    pixels[y0:y1, x0:x1] = RED
    folder.mkdir(parents=True, exist_ok=True)
    if alpha:
        rgba = np.dstack([pixels, np.zeros((h, w), np.uint8)])
        rgba[y0:y1, x0:x1, 3] = 255
        Image.fromarray(rgba, "RGBA").save(folder / f"{name}.png")
    else:
        Image.fromarray(pixels).save(folder / f"{name}.png")
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 255
        image = Image.fromarray(mask, "L")
        if mask_scale != 1.0:
            image = image.resize((round(w * mask_scale), round(h * mask_scale)), Image.Resampling.NEAREST)
        image.save(masks / f"{name}.png")


def options(script: str, *argv: str):
    return parser_for(script).parse_args(list(argv))


def mask_config(tmp_path, body: str) -> str:
    path = tmp_path / "dataset.toml"
    path.write_text(body, encoding="utf-8")
    return str(path)


@pytest.fixture()
def masked_data(tmp_path):
    """train/2_sks box/ (3 pictures, boxes at different places) and masks/ (masks at half size)."""
    train, masks = tmp_path / "train" / "2_sks box", tmp_path / "masks"
    for i, box in enumerate([(10, 6, 50, 40), (40, 20, 90, 60), (0, 0, 30, 64)]):
        picture_and_mask(train, masks, f"img{i}", box=box, mask_scale=0.5)
    return tmp_path


def red_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,H,W] bool: the red box."""
    return (images[:, 0] > 0.3) & (images[:, 1] < -0.3)


# ---------------------------------------------------------------- the loss


class Pointwise(torch.nn.Module):
    """A 'U-Net' whose prediction at a latent pixel depends on that pixel only (1x1 convolution)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, noisy, timesteps, captions):
        return self.conv(noisy)


def step_and_loss(latents: torch.Tensor, mask: torch.Tensor | None, model: torch.nn.Module):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0))
    settings = NoiseSettings.from_args(SimpleNamespace())
    step = DiffusionStep(scheduler, vae, settings, torch.device("cpu"), torch.float32, torch.float32)
    batch = {"latents": latents, "captions": [""] * len(latents), "loss_weights": torch.ones(len(latents))}
    if mask is not None:
        batch["alpha_masks"] = mask
    model.zero_grad()
    loss = step.loss(model, batch, seed=3, autocast=nullcontext)
    loss.backward()
    return loss.detach(), model.conv.weight.grad.clone()


def test_masked_out_pixels_contribute_nothing():
    """Latents changed only where the mask is 0 give the same loss and the same gradients, bit for bit."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 64, 64)
    mask[:, :, :32] = 0  # the left half of the image = the left 4 latent columns
    changed = latents.clone()
    changed[:, :, :, :4] = torch.randn(2, 4, 8, 4) * 5
    model = Pointwise()
    loss, grad = step_and_loss(latents, mask, model)
    loss2, grad2 = step_and_loss(changed, mask, model)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    unmasked, _ = step_and_loss(changed, None, model)  # without the mask the change shows
    assert not torch.equal(unmasked, loss2)


def test_a_mask_weighs_each_pixel_without_renormalising():
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    model = Pointwise()
    full, _ = step_and_loss(latents, None, model)
    half, _ = step_and_loss(latents, torch.full((1, 64, 64), 0.5), model)
    assert torch.allclose(half, full * 0.5, rtol=1e-6)
    # one half of the image at weight 1, the other at 0: the loss is that half's sum over ALL pixels
    right = torch.zeros(1, 64, 64)
    right[:, :, 32:] = 1
    masked, _ = step_and_loss(latents, right, model)
    left = 1 - right
    other, _ = step_and_loss(latents, left, model)
    assert torch.allclose(masked + other, full, rtol=1e-5)
    assert masked < full and other < full


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("bucket", [False, True])
def test_mask_pixels_stay_on_their_image_pixels(masked_data, bucket):
    """Bucket resize (mask given at half size), random crop and flips: mask == the red box, pixel for pixel."""
    argv = ["--train_data_dir", str(masked_data / "train"), "--masked_loss", "--conditioning_data_dir",
            str(masked_data / "masks"), "--resolution", "64", "--flip_aug", "--random_crop", "--seed", "1",
            "--max_data_loader_n_workers", "0"]
    argv += ["--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"] if bucket else []
    group = prepare_datasets(options("train_network", *argv), support("train_network"))
    flips = set()
    for epoch in range(3):
        for plan in group.batches_for_epoch(epoch):
            batch = group.load_batch(plan, epoch)
            masks, red = batch["alpha_masks"], red_pixels(batch["images"])
            assert masks.shape == red.shape
            disagree = ((masks > 0.5) != red).float().mean()
            assert disagree < 0.03, f"{plan}: {float(disagree):.3f}"
            flips.update(batch["flipped"])
    assert flips == {True, False}


def test_alpha_mask_option_masks_with_transparency(tmp_path):
    train = tmp_path / "train" / "1_sks box"
    for i, box in enumerate([(10, 6, 50, 40), (40, 20, 90, 60)]):
        picture_and_mask(train, None, f"img{i}", box=box, alpha=True)
    argv = ["--train_data_dir", str(tmp_path / "train"), "--alpha_mask", "--resolution", "64", "--flip_aug",
            "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    for script in ("train_network", "fine_tune", "train_textual_inversion"):
        assert parser_for(script).parse_args(["--alpha_mask"]).alpha_mask
    group = prepare_datasets(options("train_network", *argv), support("train_network"))
    for plan in group.batches_for_epoch(0):
        batch = group.load_batch(plan, 0)
        # transparent pixels are flattened onto white; the mask is 1 exactly on the (opaque) red box
        assert ((batch["alpha_masks"] > 0.5) != red_pixels(batch["images"])).float().mean() < 0.03


# ---------------------------------------------------------------- latent cache


class FakeVAE(torch.nn.Module):
    """'Latents' = the pixels average-pooled 8x8 (enough to check what the cache serves)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def encode(self, pixels):
        from types import SimpleNamespace

        pooled = torch.nn.functional.avg_pool2d(pixels.float(), 8)
        latents = torch.cat([pooled, pooled[:, :1]], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: latents))


@pytest.mark.parametrize("to_disk", [False, True])
@pytest.mark.parametrize("source", ["files", "alpha"])
def test_cached_latents_keep_their_masks(tmp_path, to_disk, source):
    """The masks served with cached latents (memory or .npz) are the masks of the pixel path."""
    from library.data.latent_cache import cache_latents, read_alpha_mask

    train = tmp_path / "train" / "1_sks box"
    for i, box in enumerate([(10, 6, 50, 40), (40, 20, 90, 60)]):
        picture_and_mask(train, tmp_path / "masks" if source == "files" else None, f"img{i}", box=box,
                         mask_scale=0.5, alpha=source == "alpha")
    argv = ["--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--flip_aug", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    argv += ["--masked_loss", "--conditioning_data_dir", str(tmp_path / "masks")] if source == "files" else ["--alpha_mask"]
    group = prepare_datasets(options("train_network", *argv), support("train_network"))
    pixel_batches = [group.load_batch(plan, epoch) for epoch in range(2) for plan in group.batches_for_epoch(epoch)]
    result = cache_latents(group.cache_items(), FakeVAE(), batch_size=2, to_disk=to_disk, flip_aug=True,
                           alpha_mask=source == "alpha", show_progress=False)
    if to_disk and source == "alpha":  # stored as upstream's alpha_mask entry of the .npz
        assert all(read_alpha_mask(npz) is not None for npz in result.npz_paths.values())
    group.set_latents(result)
    cached = [group.load_batch(plan, epoch) for epoch in range(2) for plan in group.batches_for_epoch(epoch)]
    flips = set()
    for pixels, latents in zip(pixel_batches, cached):
        assert pixels["flipped"] == latents["flipped"] and "images" not in latents
        assert torch.equal(pixels["alpha_masks"], latents["alpha_masks"])
        flips.update(latents["flipped"])
        # the cached (flipped) latents are the latents of the served pixels: masks and latents line up
        expected = torch.nn.functional.avg_pool2d(pixels["images"], 8)
        assert torch.allclose(latents["latents"][:, :3], expected, atol=1e-5)
    assert flips == {True, False}


# ---------------------------------------------------------------- errors before the model loads


def test_masked_loss_needs_a_mask_source_for_every_training_subset(tmp_path, masked_data):
    config = mask_config(tmp_path, f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{masked_data / "train" / "2_sks box"}'
""")
    with pytest.raises(DatasetConfigError) as info:
        prepare_datasets(options("train_db", "--dataset_config", config, "--masked_loss"), support("train_db"))
    message = str(info.value)
    assert "2_sks box" in message and "no conditioning_data_dir" in message and "add conditioning_data_dir" in message
    # the same dataset with alpha_mask needs no mask images; reg subsets may go without masks
    prepare_datasets(options("train_db", "--dataset_config", config, "--masked_loss", "--alpha_mask"), support("train_db"))
    picture_and_mask(tmp_path / "reg" / "1_box", None, "r0")
    reg = mask_config(tmp_path, f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{masked_data / "train" / "2_sks box"}'
  conditioning_data_dir = '{masked_data / "masks"}'
  class_tokens = 'sks box'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg" / "1_box"}'
  is_reg = true
""")
    group = prepare_datasets(options("train_db", "--dataset_config", reg, "--masked_loss"), support("train_db"))
    assert group.datasets[0].blueprint.kind == "mask" and group.datasets[0].num_reg_images == 1
    batches = [group.load_batch(plan, 0) for plan in group.batches_for_epoch(0)]
    reg_masks = [b["alpha_masks"][i] for b in batches for i, path in enumerate(b["image_paths"]) if "r0" in path]
    assert reg_masks and all(m.min() == 1 for m in reg_masks)  # full weight


def test_an_image_without_its_mask_is_named_with_the_fix(masked_data):
    (masked_data / "masks" / "img1.png").unlink()
    args = options("train_network", "--train_data_dir", str(masked_data / "train"), "--resolution", "64",
                   "--masked_loss", "--conditioning_data_dir", str(masked_data / "masks"))
    with pytest.raises(MaskFilesError) as info:
        prepare_datasets(args, support("train_network"))
    message = str(info.value)
    assert "img1.png" in message and str(masked_data / "masks") in message and "same name" in message
    assert "img0" not in message


def test_mask_option_mistakes(masked_data, tmp_path):
    train = str(masked_data / "train")
    with pytest.raises(DatasetConfigError, match="--conditioning_data_dir is the folder of mask images for --masked_loss"):
        prepare_datasets(options("train_network", "--train_data_dir", train, "--resolution", "64",
                                 "--conditioning_data_dir", str(masked_data / "masks")), support("train_network"))
    with pytest.raises(DatasetConfigError, match="no conditioning_data_dir"):
        prepare_datasets(options("train_network", "--train_data_dir", train, "--resolution", "64", "--masked_loss"),
                         support("train_network"))
    wrong = tmp_path / "wrong_masks"
    picture_and_mask(tmp_path / "unused", wrong, "img0", size=(64, 96))  # portrait mask for a landscape image
    for i in (1, 2):
        picture_and_mask(tmp_path / "unused", wrong, f"img{i}")
    with pytest.raises(MaskFilesError, match="do not have the shape of their image"):
        prepare_datasets(options("train_network", "--train_data_dir", train, "--resolution", "64", "--masked_loss",
                                 "--conditioning_data_dir", str(wrong)), support("train_network"))
    # the options exist where upstream has them
    assert not hasattr(parser_for("fine_tune").parse_args([]), "masked_loss")
    for script in ("train_network", "train_db", "train_textual_inversion", "train_textual_inversion_XTI"):
        assert parser_for(script).parse_args(["--masked_loss"]).masked_loss


def test_prepare_buckets_latents_accepts_alpha_mask(tmp_path):
    from finetune.prepare_buckets_latents import build_parser, training_options

    args = build_parser().parse_args([str(tmp_path), str(tmp_path / "m.json"), str(tmp_path / "o.json"), "model",
                                      "--alpha_mask"])
    assert training_options(args).alpha_mask


def test_train_network_with_masked_loss_and_cached_latents(tiny_models, masked_data, tmp_path):
    """The whole path: folder form with --conditioning_data_dir, cached latents, a LoRA written."""
    out = tmp_path / "out"
    result = run_script("train_network.py", *lora_args(
        tiny_models["sd1"], masked_data / "train", out, "--max_train_steps", "2", "--masked_loss",
        "--conditioning_data_dir", str(masked_data / "masks"), "--cache_latents", "--flip_aug",
        "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
    ))
    assert_ok(result)
    assert (out / "tiny.safetensors").is_file() and "finished at step 2" in result.stdout
