"""Sample images during training: samplers, generation on the tiny models, the hook's cadence, file
names and trackers, option checks, and (in subprocess runs of train_network.py) that sampling never
changes training and gives the same image after --resume."""

from __future__ import annotations

import argparse
import random
import re
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.training.checkpoints import Progress
from library.training.modes import eval_mode
from library.training.sample_prompts import SamplePrompt
from library.training.sampling import (
    SAMPLER_CHOICES,
    SAMPLERS,
    SamplingHook,
    derived_seed,
    generate_image,
    make_sampling_hook,
    make_scheduler,
    prompt_text_settings,
    sample_file_name,
    sampling_option_problems,
)
from tests.recipe_infos import parser_for
from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script

NAME = re.compile(r"^(?:(?P<name>.+)_)?(?P<counter>e?\d{6})_(?P<idx>\d{2,})_(?P<stamp>\d{14})_(?P<seed>\d+)\.png$")


@pytest.fixture(scope="module")
def sd1(tiny_models):
    from library.models.loading import load_base_model

    torch.set_num_threads(1)
    parts = load_base_model(str(tiny_models["sd1"]))
    parts.unet.eval()
    parts.text_encoder.eval()
    return parts


def parse(*argv: str) -> argparse.Namespace:

    return parser_for("train_network").parse_args(list(argv))


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, (str, Path)) else path_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --------------------------------------------------------------------------- samplers


def test_sampler_choices_follow_sd_scripts():
    assert SAMPLER_CHOICES == (
        "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
        "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
    )
    assert parse().sample_sampler == "ddim"
    for name in SAMPLER_CHOICES:
        assert parse("--sample_sampler", name).sample_sampler == name
    with pytest.raises(SystemExit):
        parse("--sample_sampler", "ddpm")  # per prompt only, as upstream


@pytest.mark.parametrize(
    "name, class_name",
    [
        ("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"), ("pndm", "PNDMScheduler"),
        ("lms", "LMSDiscreteScheduler"), ("k_lms", "LMSDiscreteScheduler"),
        ("euler", "EulerDiscreteScheduler"), ("k_euler", "EulerDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"), ("k_euler_a", "EulerAncestralDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"), ("dpm_2", "KDPM2DiscreteScheduler"), ("k_dpm_2", "KDPM2DiscreteScheduler"),
        ("dpm_2_a", "KDPM2AncestralDiscreteScheduler"), ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler"),
        ("dpmsolver", "DPMSolverMultistepScheduler"), ("dpmsolver++", "DPMSolverMultistepScheduler"),
        ("dpmsingle", "DPMSolverSinglestepScheduler"), ("no_such_sampler", "DDIMScheduler"),
    ],
)
def test_scheduler_classes_and_settings(name, class_name):
    scheduler = make_scheduler(name)
    config = scheduler.config
    assert type(scheduler).__name__ == class_name
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert config.prediction_type == "epsilon"
    assert make_scheduler(name, v_parameterization=True).config.prediction_type == "v_prediction"
    if "clip_sample" in config:
        assert config.clip_sample is False  # what upstream's pipeline constructor leaves
    if "steps_offset" in config:
        assert config.steps_offset == 1
    if name.startswith("dpmsolver"):
        assert config.algorithm_type == name
    if name == "dpmsolver":
        assert config.final_sigmas_type == "sigma_min"


def test_scheduler_betas_come_from_the_models_schedule():
    scheduler = make_scheduler("euler", base_config={"beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 500})
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule, scheduler.config.num_train_timesteps) == (
        0.001, 0.02, "linear", 500
    )


def test_lms_samplers_have_scipy():
    import scipy  # noqa: F401 - LMSDiscreteScheduler integrates with scipy; requirements.txt pins it


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_makes_an_image_of_the_requested_size(sd1, name):
    prompt = SamplePrompt(0, "a red square", "blurry", width=75, height=64, sample_steps=2, sample_sampler=name)
    image = generate_image(sd1, prompt, seed=3)
    assert image.size == (72, 64) and image.mode == "RGB"
    assert pixels(image).std() > 0


def test_default_sampler_is_used_when_the_prompt_names_none(sd1):
    prompt = SamplePrompt(0, "a red square", width=64, height=64, sample_steps=2)
    a = generate_image(sd1, prompt, seed=1, default_sampler="euler_a")
    b = generate_image(sd1, replace(prompt, sample_sampler="euler_a"), seed=1, default_sampler="ddim")
    c = generate_image(sd1, prompt, seed=1, default_sampler="ddim")
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))


def test_seed_fixes_the_image(sd1):
    prompt = SamplePrompt(0, "a (red:1.3) square", "blurry", width=64, height=64, sample_steps=2, sample_sampler="euler_a")
    a, b, c = (generate_image(sd1, prompt, seed=s) for s in (5, 5, 6))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert derived_seed(7, 0) == derived_seed(7, 0) != derived_seed(7, 1) != derived_seed(8, 1)


def test_v_parameterization_on_sd2(tiny_models):
    from library.models.loading import load_base_model

    parts = load_base_model(str(tiny_models["sd2"]), v2=True, v_parameterization=True)
    parts.unet.eval()
    parts.text_encoder.eval()
    prompt = SamplePrompt(0, "a blue square", "lowres", width=64, height=80, sample_steps=2, sample_sampler="euler")
    v_image = generate_image(parts, prompt, seed=2)
    eps_image = generate_image(replace(parts, v_parameterization=False), prompt, seed=2)
    assert v_image.size == (64, 80)
    assert not np.array_equal(pixels(v_image), pixels(eps_image))  # the prediction type reaches the scheduler


def test_prompt_text_settings_follow_training_and_long_prompts(sd1, caplog):
    from library.models.text_encoding import TextEncoding

    base = TextEncoding(clip_skip=2)
    short = prompt_text_settings(sd1.tokenizer, ["a cat", ""], base)
    assert (short.max_token_length, short.clip_skip, short.weighted) == (None, 2, True)
    long = prompt_text_settings(sd1.tokenizer, ["cat " * 100, "dog"], base)
    assert long.max_token_length == 150
    assert prompt_text_settings(sd1.tokenizer, ["a cat", ""], TextEncoding(max_token_length=225)).max_token_length == 225
    too_long = prompt_text_settings(sd1.tokenizer, ["cat " * 300, ""], base)
    assert too_long.max_token_length == 225 and "only the first 225 are used" in caplog.text
    image = generate_image(sd1, SamplePrompt(0, "(cat:1.2) " * 120, "dog", width=64, height=64, sample_steps=2), seed=1, text_settings=base)
    assert image.size == (64, 64)


def test_sample_file_names_sort_and_carry_index_and_seed():
    name = sample_file_name("mylora", "000500", 1, 42, when=0)
    match = NAME.match(name)
    assert match and match["name"] == "mylora" and match["counter"] == "000500" and match["idx"] == "01" and match["seed"] == "42"
    assert NAME.match(sample_file_name(None, "e000003", 12, 7)).group("name") is None
    assert sample_file_name(None, "e000003", 12, 7).startswith("e000003_12_")


# --------------------------------------------------------------------------- the hook, in process


class FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, array, global_step=None, dataformats="CHW"):
        self.images.append((tag, array.shape, global_step, dataformats))


class FakeAccelerator:
    is_main_process = True
    device = torch.device("cpu")

    def __init__(self, trackers=()):
        self.trackers = list(trackers)
        self.waits = 0

    def wait_for_everyone(self):
        self.waits += 1

    def autocast(self):
        return nullcontext()


def fake_ctx(parts, output_dir, trackers=(), caption=None, trained=None, predict=None):
    """The training context a hook receives, as the trainer fills it (modes: the trainer's evaluation)."""
    accelerator = FakeAccelerator(trackers)
    return SimpleNamespace(
        accelerator=accelerator,
        parts=parts,
        device=accelerator.device,
        output_dir=output_dir,
        seed=7,
        caption=caption or (lambda text: text),
        predict=predict,
        evaluation=lambda: eval_mode([parts.unet, parts.text_encoder, parts.vae, trained]),
    )


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# two prompts\n"
        "a red square --n blurry --w 64 --h 72 --d 5 --l 5 --s 2\n"
        "a blue square --w 64 --h 64 --s 2 --ss euler_a\n",
        encoding="utf-8",
    )
    return path


def test_hook_writes_files_and_logs_to_tensorboard(sd1, prompt_file, tmp_path):
    args = parse("--sample_every_n_steps", "2", "--sample_prompts", str(prompt_file), "--output_name", "run")
    hook = make_sampling_hook(args)
    writer = FakeWriter()
    tracker = SimpleNamespace(name="tensorboard", writer=writer)
    trainer = fake_ctx(sd1, tmp_path / "out", trackers=[tracker])
    hook.after_step(trainer, Progress(1, 0, 1))
    assert not (tmp_path / "out" / "sample").exists()
    hook.after_step(trainer, Progress(2, 0, 2))
    files = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    parsed = [NAME.match(f).groupdict() for f in files]
    assert [(p["name"], p["counter"], p["idx"], p["seed"]) for p in parsed] == [
        ("run", "000002", "00", "5"), ("run", "000002", "01", str(derived_seed(7, 1)))
    ]
    sizes = [Image.open(tmp_path / "out" / "sample" / f).size for f in files]
    assert sizes == [(64, 72), (64, 64)]
    assert writer.images == [("sample_0", (72, 64, 3), 2, "HWC"), ("sample_1", (64, 64, 3), 2, "HWC")]
    assert trainer.accelerator.waits == 1


def test_hook_leaves_modes_rng_and_vae_as_they_were(sd1, prompt_file, tmp_path):
    args = parse("--sample_at_first", "--sample_prompts", str(prompt_file))
    hook = make_sampling_hook(args)
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    network.train()
    sd1.unet.train()
    sd1.text_encoder.train()
    list(sd1.text_encoder.modules())[3].eval()  # a mixed state must come back as it was
    modes_before = [m.training for module in (sd1.unet, sd1.text_encoder, sd1.vae, network) for m in module.modules()]
    seen = {}

    def rewrite(text):
        seen.setdefault("training", (sd1.unet.training, network.training, sd1.text_encoder.training))
        return text

    try:
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        expected = (torch.rand(3), np.random.rand(3), random.random())
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        trainer = fake_ctx(sd1, tmp_path / "out", caption=rewrite, trained=network)
        hook.at_start(trainer, Progress())
        after = (torch.rand(3), np.random.rand(3), random.random())
        modes_after = [m.training for module in (sd1.unet, sd1.text_encoder, sd1.vae, network) for m in module.modules()]
    finally:
        sd1.unet.eval()
        sd1.text_encoder.eval()
    assert seen["training"] == (False, False, False)
    assert torch.equal(expected[0], after[0]) and np.array_equal(expected[1], after[1]) and expected[2] == after[2]
    assert modes_after == modes_before
    assert len(list((tmp_path / "out" / "sample").glob("000000_*.png"))) == 2


def test_cadence_steps_epochs_and_first(monkeypatch):
    calls = []
    monkeypatch.setattr(SamplingHook, "sample", lambda self, ctx, progress, counter: calls.append(counter))

    def run(*argv):
        calls.clear()
        hook = make_sampling_hook(parse("--sample_prompts", "p.txt", *argv))
        if hook is None:
            return None
        hook.at_start(None, Progress())
        step = 0
        for epoch in range(1, 4):  # 3 epochs of 2 steps; the trainer ends the epoch before after_step
            for batch in (1, 2):
                step += 1
                if batch == 2:
                    hook.after_epoch(None, Progress(step, epoch, 0))
                hook.after_step(None, Progress(step, epoch - (batch < 2), batch % 2))
        return list(calls)

    assert run("--sample_every_n_steps", "2", "--sample_at_first") == ["000000", "000002", "000004", "000006"]
    assert run("--sample_every_n_steps", "4") == ["000004"]
    assert run("--sample_every_n_epochs", "2", "--sample_every_n_steps", "1", "--sample_at_first") == ["e000000", "e000002"]
    assert run("--sample_every_n_epochs", "1") == ["e000001", "e000002", "e000003"]
    assert run("--sample_at_first") == ["000000"]
    assert run("--sample_every_n_steps", "0") is None
    assert run() is None


def test_a_prompt_file_broken_during_training_only_skips_sampling(sd1, prompt_file, tmp_path, caplog):
    hook = make_sampling_hook(parse("--sample_every_n_steps", "1", "--sample_prompts", str(prompt_file)))
    prompt_file.write_text("a --w wide\n", encoding="utf-8")
    trainer = fake_ctx(sd1, tmp_path / "out")
    assert hook.sample(trainer, Progress(3, 0, 3), "000003") == []
    assert "sample images skipped at step 3" in caplog.text and f"{prompt_file}:1: --w wide" in caplog.text
    assert trainer.accelerator.waits == 1


def test_a_failing_generation_is_logged_and_training_state_restored(sd1, prompt_file, tmp_path, caplog, monkeypatch):
    import library.training.sampling as sampling

    def explode(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(sampling, "generate_image", explode)
    hook = make_sampling_hook(parse("--sample_every_n_steps", "1", "--sample_prompts", str(prompt_file)))
    sd1.unet.train()
    try:
        torch.manual_seed(5)
        expected = torch.rand(2)
        torch.manual_seed(5)
        assert hook.sample(fake_ctx(sd1, tmp_path / "out"), Progress(1, 0, 1), "000001") == []
        assert sd1.unet.training and torch.equal(torch.rand(2), expected)
    finally:
        sd1.unet.eval()
    assert "sample images failed at step 1; training goes on" in caplog.text and "simulated" in caplog.text


# --------------------------------------------------------------------------- option checks


def test_option_problems(tmp_path, caplog):
    good = tmp_path / "p.txt"
    good.write_text("a cat --d 1\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_text("# ok\na cat --d 1\nb --ss nope --w x\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")

    assert sampling_option_problems(parse("--sample_every_n_steps", "5", "--sample_prompts", str(good))) == []
    missing = sampling_option_problems(parse("--sample_every_n_steps", "5", "--sample_prompts", str(tmp_path / "no.txt")))
    assert missing == [f"--sample_prompts {tmp_path / 'no.txt'}: file not found"]
    problems = sampling_option_problems(parse("--sample_at_first", "--sample_prompts", str(bad)))
    assert len(problems) == 2 and all(p.startswith(f"--sample_prompts {bad}:3: ") for p in problems)
    assert "unknown sampler 'nope'" in problems[0]
    assert sampling_option_problems(parse("--sample_at_first", "--sample_prompts", str(empty))) == [
        f"--sample_prompts {empty}: the file has no prompts"
    ]
    config = parse("--sample_at_first", "--sample_prompts", str(good))
    config.sample_sampler = "nope"  # what a --config_file value would give
    assert sampling_option_problems(config)[0].startswith("--sample_sampler nope: unknown sampler")

    caplog.clear()
    no_trigger = parse("--sample_prompts", str(tmp_path / "no.txt"))
    assert sampling_option_problems(no_trigger) == [] and make_sampling_hook(no_trigger) is None
    assert "no sample trigger" in caplog.text
    no_prompts = parse("--sample_every_n_epochs", "1")
    assert sampling_option_problems(no_prompts) == [] and make_sampling_hook(no_prompts) is None
    assert "without --sample_prompts" in caplog.text
    off = parse("--sample_every_n_steps", "0", "--sample_prompts", str(good))
    assert sampling_option_problems(off) == [] and make_sampling_hook(off) is None
    assert "not positive" in caplog.text


def test_training_script_lists_prompt_file_problems_before_loading(tiny_models, tmp_path):
    data = dreambooth_folders(tmp_path / "data", count=1)
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --l loud\n", encoding="utf-8")
    result = run_script(
        "train_network.py",
        *lora_args(tiny_models["sd1"], data, tmp_path / "out", "--sample_every_n_steps", "1", "--sample_prompts", str(bad)),
    )
    assert result.returncode == 1
    assert f"--sample_prompts {bad}:1: --l loud" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- train_network.py runs

PROMPTS = (
    "# a seeded prompt and one whose seed derives from the run seed\n"
    "a red square --n blurry --w 64 --h 64 --d 5 --l 5 --s 2\n"
    "a blue square --w 64 --h 64 --s 2 --ss euler_a\n"
)
SAVE = ("--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state")


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """4 steps sampling every 2 (and at first), saving states every 2; and the same without sampling."""
    root = tmp_path_factory.mktemp("sampling_runs")
    data = dreambooth_folders(root / "data", count=4)
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    sampling = ("--sample_every_n_steps", "2", "--sample_at_first", "--sample_prompts", str(prompts))
    sampled, plain = root / "sampled", root / "plain"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], data, sampled, *SAVE, *sampling))
    assert_ok(result)
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, plain, *SAVE)))
    return SimpleNamespace(root=root, data=data, sampling=sampling, sampled=sampled, plain=plain, stdout=result.stdout)


def samples(folder: Path) -> dict[tuple[str, str], Path]:
    found = {}
    for path in sorted((folder / "sample").iterdir()):
        match = NAME.match(path.name)
        assert match, path.name
        key = (match["counter"], match["idx"])
        assert key not in found
        found[key] = path
    return found


def test_step_cadence_writes_samples_at_0_2_4(runs):
    found = samples(runs.sampled)
    assert sorted(found) == [(c, i) for c in ("000000", "000002", "000004") for i in ("00", "01")]
    assert {NAME.match(p.name)["seed"] for (c, i), p in found.items() if i == "00"} == {"5"}
    assert {NAME.match(p.name)["seed"] for (c, i), p in found.items() if i == "01"} == {str(derived_seed(7, 1))}
    assert all(Image.open(p).size == (64, 64) for p in found.values())
    assert "sample images at step 4" in runs.stdout
    # the same seed at step 0 and step 4: the trained LoRA changed the image
    assert not np.array_equal(pixels(found["000000", "00"]), pixels(found["000004", "00"]))
    assert not (runs.plain / "sample").exists()


def test_sampling_does_not_change_training(runs):
    a, b = load_file(runs.sampled / "tiny.safetensors"), load_file(runs.plain / "tiny.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_samples_the_same_images(tiny_models, runs):
    resumed = runs.root / "resumed"
    state = runs.sampled / "tiny-step00000002-state"
    result = run_script("train_network.py", *lora_args(tiny_models["sd1"], runs.data, resumed, *SAVE, *runs.sampling, "--resume", str(state)))
    assert_ok(result)
    before, after = samples(runs.sampled), samples(resumed)
    assert sorted(after) == [(c, i) for c in ("000002", "000004") for i in ("00", "01")]  # at first = the resumed step
    for key, path in after.items():
        assert NAME.match(path.name)["seed"] == NAME.match(before[key].name)["seed"]
        assert np.array_equal(pixels(path), pixels(before[key])), key


def test_epoch_cadence_overrides_steps(tiny_models, tmp_path):
    data = dreambooth_folders(tmp_path / "data", count=2)  # 2 steps per epoch
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["a red square --w 64 --h 64 --s 2 --d 1"]', encoding="utf-8")
    out = tmp_path / "out"
    extra = ("--max_train_steps", "4", "--sample_every_n_epochs", "1", "--sample_every_n_steps", "1", "--sample_at_first",
             "--sample_prompts", str(prompts), "--sample_sampler", "k_euler")
    assert_ok(run_script("train_network.py", *lora_args(tiny_models["sd1"], data, out, *extra)))
    assert sorted(samples(out)) == [("e000000", "00"), ("e000001", "00"), ("e000002", "00")]


def test_a_recipes_own_prediction_draws_the_same_image_as_the_unet_it_wraps(tiny_models):
    """`Attached.predict` in samples: a predict that just encodes and runs the U-Net gives the pipeline's image."""
    import numpy as np

    from library.models.loading import load_base_model
    from library.training.sample_prompts import SamplePrompt
    from library.training.sampling import generate_image

    parts = load_base_model(str(tiny_models["sd1"]))
    prompt = SamplePrompt(index=0, prompt="a red square", negative_prompt="blurry", width=64, height=64,
                          sample_steps=4, scale=5.0, seed=None, sample_sampler="ddim")
    calls = []

    def plain(unet, encode, latents, timesteps, captions):
        calls.append(list(captions))
        return unet(latents, timesteps, encode(captions)).sample

    via_pipeline = np.asarray(generate_image(parts, prompt, seed=3))
    via_predict = np.asarray(generate_image(parts, prompt, seed=3, predict=plain))
    assert calls and calls[0] == ["blurry", "a red square"]  # guided: negative and prompt in one batch
    assert np.abs(via_pipeline.astype(int) - via_predict.astype(int)).max() <= 2
