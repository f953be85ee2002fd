"""Sample images during training (`--sample_every_n_steps`, `--sample_every_n_epochs`, `--sample_at_first`).

The trainer calls a `SamplingHook` (made by `make_sampling_hook`, given to the trainer as
`Hooks`, library/recipe.py) at the start, after each optimizer step and after each completed epoch. When a trigger fires, the main process re-reads the prompt
file (so it can be edited while training runs), generates one image per prompt with the model as
it is being trained (the LoRA network acts through hooks inside the U-Net / text encoder), writes
the images to `<output_dir>/sample/` and logs them to TensorBoard / W&B when those are active.
The other processes wait.

Sampling leaves training untouched: modules go to eval mode and back (each submodule's own flag
is restored), every RNG (torch CPU/CUDA, numpy, python) is saved and restored, each image draws
from its own seeded CPU generator, and nothing keeps gradients. A run with sampling therefore
trains bit for bit like one without.

Prompts are encoded as in training (`library.models.text_encoding`: `--clip_skip`, 75-token chunks)
with A1111 weights `(word:1.2)` always on and up to 225 tokens, as upstream's long-prompt pipeline
does; the embeddings go to diffusers' StableDiffusionPipeline. Samplers map to diffusers schedulers
as in reference/sampling.md §4.

The recipe's caption hook (`Attached.caption`, on the context as `ctx.caption`; textual inversion
expands its token string there) is applied to every prompt and negative prompt before encoding,
exactly as to training captions.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import logging
import math
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from library.recipe import Hooks
from library.training.sample_prompts import SamplePrompt, SamplePromptError, read_sample_prompts

logger = logging.getLogger(__name__)

# name -> (diffusers scheduler class, extra construction arguments); reference/sampling.md §4
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),  # only per prompt (--ss): upstream keeps it off the command line
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers 0.42 refuses algorithm_type="dpmsolver" with its default final_sigmas_type="zero"
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
# --sample_sampler choices, in upstream's order
SAMPLER_CHOICES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
DEFAULT_SAMPLER = "ddim"
# Fewest inference steps a class can run (PNDM's Runge-Kutta warm-up needs 4 timesteps in diffusers 0.42)
MIN_STEPS = {"PNDMScheduler": 4}
MAX_PROMPT_CHUNKS = 3  # 225 tokens, as upstream's long-prompt pipeline
SAMPLE_FOLDER = "sample"

# SD's training schedule, used when the model's own scheduler config does not say
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# --------------------------------------------------------------------------- options


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sample images during training (docs/sampling.md)")
    group.add_argument(
        "--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps"
    )
    group.add_argument(
        "--sample_every_n_epochs", type=int, default=None,
        help="generate sample images every N epochs (overrides --sample_every_n_steps)",
    )
    group.add_argument("--sample_at_first", action="store_true", help="generate sample images before training starts")
    group.add_argument(
        "--sample_prompts", type=str, default=None, help="prompt file for sample images: .txt, .toml or .json"
    )
    group.add_argument(
        "--sample_sampler", type=str, default=DEFAULT_SAMPLER, choices=SAMPLER_CHOICES,
        help=f"sampler for sample images (default {DEFAULT_SAMPLER}); a prompt's --ss overrides it",
    )


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


def _has_trigger(args: argparse.Namespace) -> bool:
    return bool(
        _positive(getattr(args, "sample_every_n_steps", None))
        or _positive(getattr(args, "sample_every_n_epochs", None))
        or getattr(args, "sample_at_first", False)
    )


def sampling_option_problems(args: argparse.Namespace) -> list[str]:
    """Problems of the sampling options, the prompt file included (parsed here, before training).
    Harmless oddities (N <= 0, a trigger without prompts, unknown prompt options) are logged as warnings."""
    problems: list[str] = []
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            logger.warning("--%s %d: not positive, so this trigger is off", name, value)
    sampler = getattr(args, "sample_sampler", DEFAULT_SAMPLER) or DEFAULT_SAMPLER
    if sampler not in SAMPLER_CHOICES:  # a --config_file value skips argparse's choices check
        problems.append(f"--sample_sampler {sampler}: unknown sampler (choose from {', '.join(SAMPLER_CHOICES)})")
    prompt_file = getattr(args, "sample_prompts", None)
    if not _has_trigger(args):
        if prompt_file:
            logger.warning(
                "--sample_prompts is given but no sample trigger (--sample_every_n_steps, --sample_every_n_epochs "
                "or --sample_at_first): no sample images will be made"
            )
        return problems
    if not prompt_file:
        logger.warning("a sample trigger is given without --sample_prompts: no sample images will be made")
        return problems
    try:
        prompts, prompt_warnings = read_sample_prompts(prompt_file, known_samplers=SAMPLERS)
    except SamplePromptError as err:
        return problems + [f"--sample_prompts {p}" for p in err.problems]
    for warning in prompt_warnings:
        logger.warning("--sample_prompts %s", warning)
    if not prompts:
        problems.append(f"--sample_prompts {prompt_file}: the file has no prompts")
    return problems


def make_sampling_hook(args: argparse.Namespace) -> "SamplingHook | None":
    """The trainer hook that makes sample images, or None when the options ask for none."""
    if not getattr(args, "sample_prompts", None) or not _has_trigger(args):
        return None
    return SamplingHook(args)


# --------------------------------------------------------------------------- schedulers


def make_scheduler(name: str, v_parameterization: bool = False, base_config: Any = None):
    """A fresh diffusers scheduler for sampler `name` (unknown names fall back to DDIM, as upstream).

    Betas come from `base_config` (the model's training scheduler config) when given, else SD's
    schedule; every other setting is the class default, plus `prediction_type="v_prediction"` for
    v-parameterization. Then what sd-scripts' samples effectively get: sd-scripts switches
    `clip_sample` on, but hands the scheduler to StableDiffusionPipeline's constructor, which rewrites
    `clip_sample` to False and `steps_offset` to 1 where a scheduler has them; we set that outcome
    directly (clipping the predicted clean latent to [-1, 1] also spoils images)."""
    import diffusers

    key = name.lower()
    if key not in SAMPLERS:
        logger.warning("unknown sampler %r: using %s", name, DEFAULT_SAMPLER)
        key = DEFAULT_SAMPLER
    class_name, extra = SAMPLERS[key]
    kwargs = {k: (base_config.get(k, v) if base_config is not None else v) for k, v in SD_SCHEDULE.items()}
    kwargs.update(extra)
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy __array__ notices from some classes
        warnings.simplefilter("ignore", FutureWarning)  # algorithm_type="dpmsolver" is deprecated in diffusers
        scheduler = getattr(diffusers, class_name)(**kwargs)
    if getattr(scheduler.config, "clip_sample", None) is True:
        scheduler.register_to_config(clip_sample=False)
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        scheduler.register_to_config(steps_offset=1)
    return scheduler


def sampler_class_name(name: str) -> str:
    return SAMPLERS.get(name.lower(), SAMPLERS[DEFAULT_SAMPLER])[0]


# --------------------------------------------------------------------------- generation


def derived_seed(run_seed: int, index: int) -> int:
    """The seed of prompt `index` when the prompt gives none: fixed by the run seed, so a prompt
    gets the same noise at every trigger and after --resume."""
    digest = hashlib.sha256(f"sample-prompt:{int(run_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_pipeline(parts):
    """A StableDiffusionPipeline sharing `parts`' modules; its scheduler is replaced per image.

    It is built around a throw-away scheduler so diffusers' constructor (which rewrites outdated
    scheduler configs in place) never touches the training scheduler or a sampling one."""
    from diffusers import DDIMScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placeholder = DDIMScheduler(steps_offset=1, clip_sample=False, **SD_SCHEDULE)
    pipeline = parts.to_pipeline(placeholder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _content_tokens(tokenizer, text: str) -> int:
    from library.models.prompt_weights import parse_prompt_weights

    fragments = [t for t, _ in parse_prompt_weights(text)]
    if not fragments:
        return 0
    ids = tokenizer(fragments, add_special_tokens=False, verbose=False).input_ids
    return sum(len(i) for i in ids)


def prompt_text_settings(tokenizer, texts: Iterable[str], base):
    """Text-encoding settings for a prompt pair: the run's clip_skip and token window, widened to
    as many 75-token chunks as the longer text needs (at most 3, like upstream), weights on."""
    from library.models.text_encoding import CHUNK_CONTENT, chunk_count

    longest = max(_content_tokens(tokenizer, t) for t in texts)
    needed = max(1, math.ceil(longest / CHUNK_CONTENT))
    if needed > MAX_PROMPT_CHUNKS:
        logger.warning("sample prompt has %d tokens; only the first %d are used", longest, MAX_PROMPT_CHUNKS * CHUNK_CONTENT)
        needed = MAX_PROMPT_CHUNKS
    chunks = max(needed, chunk_count(base.max_token_length))
    return replace(base, max_token_length=None if chunks == 1 else chunks * CHUNK_CONTENT, weighted=True)


def latents_to_image(vae, latents: torch.Tensor):
    """Decode one latent with the VAE (in its own dtype) to an RGB PIL image."""
    import numpy as np
    from PIL import Image

    vae_dtype = next(vae.parameters()).dtype
    latents = latents.to(vae_dtype) / vae.config.scaling_factor
    pixels = vae.decode(latents).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((pixels * 255).round().astype(np.uint8), mode="RGB")


@torch.no_grad()
def generate_image(
    parts,
    prompt: SamplePrompt,
    *,
    seed: int,
    default_sampler: str = DEFAULT_SAMPLER,
    text_settings=None,
    pipeline=None,
    autocast: Callable[[], Any] = nullcontext,
    rewrite: Callable[[str], str] | None = None,
    predict: Callable[..., torch.Tensor] | None = None,
):
    """Generate the image of one prompt with `parts` as they are now; returns a PIL image of the
    prompt's (floored) size. The caller puts the modules in eval mode and on their device.

    `predict` (a recipe's `Attached.predict`) replaces "encode the prompt, run the U-Net" in every
    denoising step, for recipes that condition the U-Net their own way (XTI)."""
    from library.models.text_encoding import TextEncoding, encode_prompts

    text = prompt.prompt
    negative = prompt.negative_prompt or ""
    if rewrite is not None:
        text, negative = rewrite(text), rewrite(negative)
    settings = prompt_text_settings(parts.tokenizer, (text, negative), text_settings or TextEncoding(v2=parts.v2))
    pipeline = pipeline or make_pipeline(parts)
    sampler = prompt.sample_sampler or default_sampler
    pipeline.scheduler = make_scheduler(sampler, parts.v_parameterization, parts.noise_scheduler.config)
    steps = prompt.sample_steps
    fewest = MIN_STEPS.get(type(pipeline.scheduler).__name__, 1)
    if steps < fewest:
        logger.warning("sampler %s needs at least %d steps; using %d instead of %d", sampler, fewest, fewest, steps)
        steps = fewest
    generator = torch.Generator("cpu").manual_seed(seed)
    if predict is not None:
        with autocast():
            encode = lambda captions: encode_prompts(parts.tokenizer, parts.text_encoder, captions, settings)  # noqa: E731
            latents = denoise_with_predict(
                parts, pipeline.scheduler, predict, encode, text, negative, prompt, steps, generator
            )
            return latents_to_image(parts.vae, latents)
    with autocast():
        embeds = encode_prompts(parts.tokenizer, parts.text_encoder, [text], settings)
        negative_embeds = encode_prompts(parts.tokenizer, parts.text_encoder, [negative], settings)
        latents = pipeline(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            height=prompt.image_height,
            width=prompt.image_width,
            num_inference_steps=steps,
            guidance_scale=prompt.scale,
            generator=generator,
            output_type="latent",
        ).images
        return latents_to_image(parts.vae, latents)


def denoise_with_predict(parts, scheduler, predict, encode, text, negative, prompt, steps, generator) -> torch.Tensor:
    """Classifier-free guided denoising where each step's prediction comes from `predict`."""
    unet = parts.unet
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    shape = (1, unet.config.in_channels, prompt.image_height // 8, prompt.image_width // 8)
    latents = torch.randn(shape, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    guided = prompt.scale > 1.0
    captions = [negative, text] if guided else [text]
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * len(captions))
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = predict(unet, encode, model_input, t, captions)
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + prompt.scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
    return latents


def sample_file_name(output_name: str | None, counter: str, index: int, seed: int, when: float | None = None) -> str:
    """`[<output_name>_]<counter>_<idx:02d>_<YYYYmmddHHMMSS>_<seed>.png` (upstream's pattern; the seed
    is always there since every image has one). counter: `e000003` (epoch) or `000500` (step)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(when))
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{counter}_{index:02d}_{stamp}_{seed}.png"


# --------------------------------------------------------------------------- keeping training intact


def _rng_states() -> dict:
    import numpy as np

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@contextmanager
def sampling_session(vae: torch.nn.Module, device: torch.device):
    """VAE on `device` and RNG states saved; both undone on exit (modes: the context's `evaluation`)."""
    states = _rng_states()
    vae_device = next(vae.parameters()).device
    try:
        if vae_device != device:
            vae.to(device)
        yield
    finally:
        if vae_device != device:
            vae.to(vae_device)
        _restore_rng_states(states)
        _free_memory(device)


# --------------------------------------------------------------------------- the hook


class SamplingHook:
    """Trainer hook: samples at the start (--sample_at_first), every N steps or every N epochs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prompt_file = args.sample_prompts
        self.every_n_steps = _positive(getattr(args, "sample_every_n_steps", None))
        self.every_n_epochs = _positive(getattr(args, "sample_every_n_epochs", None))
        self.at_first = bool(getattr(args, "sample_at_first", False))
        self.default_sampler = getattr(args, "sample_sampler", None) or DEFAULT_SAMPLER

    def hooks(self) -> Hooks:
        return Hooks(at_start=self.at_start, after_step=self.after_step, after_epoch=self.after_epoch)

    # ---- cadence (each called with the training context and progress)

    def at_start(self, ctx, progress) -> None:
        if self.at_first:
            # epoch counters when samples are per epoch, step counters otherwise: names keep sorting
            counter = f"e{progress.epoch:06d}" if self.every_n_epochs else f"{progress.global_step:06d}"
            self.sample(ctx, progress, counter)

    def after_step(self, ctx, progress) -> None:
        if self.every_n_epochs is None and self.every_n_steps and progress.global_step % self.every_n_steps == 0:
            self.sample(ctx, progress, f"{progress.global_step:06d}")

    def after_epoch(self, ctx, progress) -> None:
        if self.every_n_epochs and progress.epoch % self.every_n_epochs == 0:
            self.sample(ctx, progress, f"e{progress.epoch:06d}")

    # ---- work

    def sample(self, ctx, progress, counter: str) -> list[Path]:
        """Generate every prompt's image on the main process; the others wait. Returns the paths written."""
        accelerator = ctx.accelerator
        written: list[Path] = []
        if accelerator.is_main_process:
            try:
                prompts, _ = read_sample_prompts(self.prompt_file, known_samplers=SAMPLERS)
            except SamplePromptError as err:  # edited during training: skip this time, keep training
                logger.error("sample images skipped at step %d: %s", progress.global_step, "; ".join(err.problems))
                prompts = []
            if prompts:
                try:
                    written = self._generate(ctx, progress, counter, prompts)
                except Exception:  # noqa: BLE001 - e.g. out of memory: a long run must not die for a preview
                    logger.exception("sample images failed at step %d; training goes on", progress.global_step)
        accelerator.wait_for_everyone()
        return written

    def _generate(self, ctx, progress, counter: str, prompts: list[SamplePrompt]) -> list[Path]:
        from library.models.text_encoding import TextEncoding

        parts = ctx.parts
        folder = Path(ctx.output_dir) / SAMPLE_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        base_settings = TextEncoding.from_args(self.args)
        written = []
        print(f"sample images at step {progress.global_step}: {len(prompts)} prompt(s) -> {folder}")
        with ctx.evaluation(), sampling_session(parts.vae, ctx.device):
            pipeline = make_pipeline(parts)
            for prompt in prompts:
                seed = prompt.seed if prompt.seed is not None else derived_seed(ctx.seed, prompt.index)
                image = generate_image(
                    parts, prompt, seed=seed, default_sampler=self.default_sampler, text_settings=base_settings,
                    pipeline=pipeline, autocast=ctx.accelerator.autocast, rewrite=ctx.caption, predict=ctx.predict,
                )
                path = folder / sample_file_name(self.args.output_name, counter, prompt.index, seed)
                image.save(path)
                written.append(path)
                log_sample_image(ctx.accelerator, image, prompt, progress.global_step)
            del pipeline
        return written


def log_sample_image(accelerator, image, prompt: SamplePrompt, step: int) -> None:
    """TensorBoard: image `sample_<idx>` at `step`; W&B: `sample_<idx>` with the prompt as caption,
    not committing a step (upstream's behaviour)."""
    trackers = getattr(accelerator, "trackers", None) or []
    tag = f"sample_{prompt.index}"
    for tracker in trackers:
        try:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({tag: wandb.Image(image, caption=prompt.prompt)}, commit=False)
        except Exception as err:  # noqa: BLE001 - a tracker hiccup must not stop training
            logger.warning("could not log sample image to %s: %s", tracker.name, err)
