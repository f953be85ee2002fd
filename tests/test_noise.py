"""library/training/noise.py against hand-written sd-scripts formulas (tiny CPU tensors)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.training import noise as N
from library.training.noise import NoiseSettings


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def latents(b=2, c=4, h=8, w=8, seed=123):
    return torch.randn(b, c, h, w, generator=gen(seed))


def parse(argv):
    parser = argparse.ArgumentParser()
    N.add_noise_arguments(parser)
    return parser.parse_args(argv)


# ---- options --------------------------------------------------------------------------------


def test_argument_defaults_match_sd_scripts():
    a = parse([])
    assert (a.noise_offset, a.adaptive_noise_scale, a.multires_noise_iterations, a.ip_noise_gamma) == (None,) * 4
    assert a.multires_noise_discount == 0.3 and a.loss_type == "l2" and a.huber_schedule == "snr"
    assert (a.huber_c, a.huber_scale, a.min_snr_gamma, a.v_pred_like_loss) == (0.1, 1.0, None, None)
    assert not (a.noise_offset_random_strength or a.ip_noise_gamma_random_strength or a.zero_terminal_snr)
    assert not (a.scale_v_pred_loss_like_noise_pred or a.debiased_estimation_loss)
    assert (a.min_timestep, a.max_timestep) == (None, None)
    a = parse(["--noise_offset", "0.1", "--multires_noise_iterations", "6", "--loss_type", "huber", "--min_timestep", "5"])
    assert (a.noise_offset, a.multires_noise_iterations, a.loss_type, a.min_timestep) == (0.1, 6, "huber", 5)
    with pytest.raises(SystemExit):
        parse(["--loss_type", "l3"])


def test_settings_from_args_fills_missing_options():
    s = NoiseSettings.from_args(argparse.Namespace(noise_offset=0.05, v_parameterization=True))
    assert s.noise_offset == 0.05 and s.v_parameterization and s.loss_type == "l2" and s.multires_noise_discount == 0.3
    assert NoiseSettings.from_args(parse(["--min_snr_gamma", "5"])).min_snr_gamma == 5.0


def test_option_problems():
    assert N.noise_option_problems(NoiseSettings()) == []
    # noise_offset together with multires is allowed (applied in that order upstream)
    assert N.noise_option_problems(NoiseSettings(noise_offset=0.1, multires_noise_iterations=6)) == []
    assert N.noise_option_problems(NoiseSettings(min_timestep=500, max_timestep=500)) == []
    cases = {
        "adaptive_noise_scale requires --noise_offset": NoiseSettings(adaptive_noise_scale=0.01),
        "only with --v_parameterization": NoiseSettings(scale_v_pred_loss_like_noise_pred=True),
        "cannot be used with --v_parameterization": NoiseSettings(v_pred_like_loss=0.1, v_parameterization=True),
        "is above --max_timestep": NoiseSettings(min_timestep=401, max_timestep=400),
        "--max_timestep must be between 0 and 1000": NoiseSettings(max_timestep=1200),
        "--min_timestep must be between": NoiseSettings(min_timestep=-1),
        "one timestep": NoiseSettings(min_timestep=1000),
        "--min_snr_gamma must be positive": NoiseSettings(min_snr_gamma=0.0),
        "--huber_c must be positive": NoiseSettings(loss_type="huber", huber_c=0.0),
    }
    for message, settings in cases.items():
        problems = N.noise_option_problems(settings)
        assert len(problems) == 1 and message in problems[0], (message, problems)
    with pytest.raises(N.NoiseOptionError, match="adaptive_noise_scale"):
        NoiseSettings(adaptive_noise_scale=0.01).check()
    assert N.noise_option_warnings(NoiseSettings(zero_terminal_snr=True))
    assert not N.noise_option_warnings(NoiseSettings(zero_terminal_snr=True, v_parameterization=True))


# ---- noise ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_shape_dtype_and_determinism(dtype):
    x = latents().to(dtype)
    s = NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True, multires_noise_iterations=3)
    a, b = N.sample_noise(x, s, gen(7)), N.sample_noise(x, s, gen(7))
    assert a.shape == x.shape and a.dtype == dtype and torch.equal(a, b)
    assert not torch.equal(a, N.sample_noise(x, s, gen(8)))


def test_plain_noise_is_the_generators_gaussian():
    x = latents()
    assert torch.equal(N.sample_noise(x, NoiseSettings(), gen(3)), torch.randn(x.shape, generator=gen(3)))


def test_noise_offset_shifts_channel_means():
    x, g = latents(), gen(1)
    expected = torch.randn(x.shape, generator=g)
    channel = torch.randn(2, 4, 1, 1, generator=g)
    got = N.sample_noise(x, NoiseSettings(noise_offset=0.5), gen(1))
    torch.testing.assert_close(got, expected + 0.5 * channel)
    shift = got.mean(dim=(2, 3)) - expected.mean(dim=(2, 3))
    torch.testing.assert_close(shift, 0.5 * channel[:, :, 0, 0])


def test_noise_offset_random_strength_is_one_draw_per_batch():
    x, g = latents(), gen(2)
    expected = torch.randn(x.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.2
    expected = expected + strength * torch.randn(2, 4, 1, 1, generator=g)
    s = NoiseSettings(noise_offset=0.2, noise_offset_random_strength=True)
    torch.testing.assert_close(N.sample_noise(x, s, gen(2)), expected)


def test_adaptive_noise_scale_and_clamp():
    x = latents()
    x[0, 1] += 3.0  # large |mean| in one channel
    for scale in (0.05, -0.5):
        g = gen(4)
        expected = torch.randn(x.shape, generator=g)
        offset = (0.1 + scale * x.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        expected = expected + offset * torch.randn(2, 4, 1, 1, generator=g)
        got = N.sample_noise(x, NoiseSettings(noise_offset=0.1, adaptive_noise_scale=scale), gen(4))
        torch.testing.assert_close(got, expected)
    assert offset[0, 1].item() == 0.0  # negative scale clamped


def test_multires_noise_matches_pyramid_formula():
    x, iterations, discount = latents(h=16, w=12), 10, 0.3
    g = gen(5)
    expected = torch.randn(x.shape, generator=g)
    levels = 0
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(16 / r**i)), max(1, int(12 / r**i))
        level = torch.randn(2, 4, hn, wn, generator=g)
        expected = expected + F.interpolate(level, size=(16, 12), mode="bilinear") * discount**i
        levels += 1
        if hn == 1 or wn == 1:
            break
    assert levels < iterations  # stopped at 1 pixel
    expected = expected / expected.std()
    got = N.sample_noise(x, NoiseSettings(multires_noise_iterations=iterations, multires_noise_discount=discount), gen(5))
    torch.testing.assert_close(got, expected)
    assert abs(got.std().item() - 1.0) < 1e-4
    assert not torch.allclose(got, torch.randn(x.shape, generator=gen(5)), atol=0.1)


def test_offset_then_multires():
    x, g = latents(), gen(6)
    base = torch.randn(x.shape, generator=g) + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    expected = N.pyramid_noise(base, 2, 0.3, g)
    got = N.sample_noise(x, NoiseSettings(noise_offset=0.1, multires_noise_iterations=2), gen(6))
    torch.testing.assert_close(got, expected)


# ---- timesteps, forward process, targets ----------------------------------------------------


def test_timesteps_range():
    t = N.sample_timesteps(4000, 1000, NoiseSettings(), gen(0), "cpu")
    assert t.dtype == torch.long and t.shape == (4000,) and t.min() >= 0 and t.max() <= 999 and t.max() >= 990
    t = N.sample_timesteps(4000, 1000, NoiseSettings(min_timestep=100, max_timestep=200), gen(0), "cpu")
    assert t.min() == 100 and t.max() == 199
    t = N.sample_timesteps(3, 1000, NoiseSettings(min_timestep=500, max_timestep=500), gen(0), "cpu")
    assert t.tolist() == [500, 500, 500]
    assert torch.equal(N.sample_timesteps(8, 1000, NoiseSettings(), gen(9), "cpu"),
                       N.sample_timesteps(8, 1000, NoiseSettings(), gen(9), "cpu"))


def test_noisy_latents_and_input_perturbation(sched):
    x, eps = latents(), latents(seed=9)
    t = torch.tensor([10, 900])
    before = sched.alphas_cumprod
    got = N.noisy_latents(sched, x, eps, t, NoiseSettings(), gen(0))
    assert torch.equal(got, sched.add_noise(x, eps, t)) and sched.alphas_cumprod is before
    g = gen(1)
    gamma = torch.rand(1, generator=g) * 0.1
    expected = sched.add_noise(x, eps + gamma * torch.randn(x.shape, generator=g), t)
    s = NoiseSettings(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    torch.testing.assert_close(N.noisy_latents(sched, x, eps, t, s, gen(1)), expected)
    half = N.noisy_latents(sched, x.half(), eps.half(), t, NoiseSettings(ip_noise_gamma=0.1), gen(1))
    assert half.dtype == torch.float16


def test_v_target(sched):
    x, eps = latents(), latents(seed=9)
    t = torch.tensor([0, 999])
    assert N.training_target(sched, x, eps, t, False) is eps
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ac.sqrt() * eps - (1 - ac).sqrt() * x
    torch.testing.assert_close(N.training_target(sched, x, eps, t, True), expected)


# ---- SNR weights ----------------------------------------------------------------------------

T = torch.tensor([0, 10, 100, 500, 999])


def snr_of(sched, t=T):
    ac = sched.alphas_cumprod[t].double()
    return ac / (1 - ac)


def test_compute_snr(sched):
    torch.testing.assert_close(N.compute_snr(sched, T).double(), snr_of(sched), rtol=1e-5, atol=0)


def test_min_snr_weights(sched):
    snr = snr_of(sched)
    eps = N.snr_loss_weights(T, sched, NoiseSettings(min_snr_gamma=5.0)).double()
    torch.testing.assert_close(eps, snr.clamp(max=5) / snr, rtol=1e-5, atol=0)
    assert eps[-1] == 1.0 and eps[0] < 0.01  # low-noise timesteps are weighted down
    v = N.snr_loss_weights(T, sched, NoiseSettings(min_snr_gamma=5.0, v_parameterization=True)).double()
    torch.testing.assert_close(v, snr.clamp(max=5) / (snr + 1), rtol=1e-5, atol=0)


def test_other_snr_weights(sched):
    snr = snr_of(sched).clamp(max=1000)
    w = N.snr_loss_weights(T, sched, NoiseSettings(scale_v_pred_loss_like_noise_pred=True, v_parameterization=True))
    torch.testing.assert_close(w.double(), snr / (snr + 1), rtol=1e-5, atol=0)
    w = N.snr_loss_weights(T, sched, NoiseSettings(v_pred_like_loss=0.2))  # loss + loss / scale * 0.2
    torch.testing.assert_close(w.double(), 1 + 0.2 * (snr + 1) / snr, rtol=1e-5, atol=0)
    w = N.snr_loss_weights(T, sched, NoiseSettings(debiased_estimation_loss=True))
    torch.testing.assert_close(w.double(), 1 / snr.sqrt(), rtol=1e-5, atol=0)
    w = N.snr_loss_weights(T, sched, NoiseSettings(debiased_estimation_loss=True, v_parameterization=True))
    torch.testing.assert_close(w.double(), 1 / (snr + 1), rtol=1e-5, atol=0)
    assert torch.equal(N.snr_loss_weights(T, sched, NoiseSettings()), torch.ones(5))


# ---- losses ---------------------------------------------------------------------------------


def test_huber_thresholds(sched):
    t = torch.tensor([0, 500, 1000 - 1])
    assert N.huber_c_for(t, sched, NoiseSettings()) is None
    s = NoiseSettings(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0)
    torch.testing.assert_close(N.huber_c_for(t, sched, s), torch.full((3,), 0.4))
    s = NoiseSettings(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    expected = torch.tensor([2.0 * 0.1 ** (k / 1000) for k in (0, 500, 999)])
    torch.testing.assert_close(N.huber_c_for(t, sched, s), expected)
    s = NoiseSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=5.0)  # scale unused
    ac = sched.alphas_cumprod[t]
    torch.testing.assert_close(N.huber_c_for(t, sched, s), 0.9 / (1 + ((1 - ac) / ac).sqrt()) ** 2 + 0.1)


def test_elementwise_losses():
    p, y = torch.tensor([[0.0, 1.0, -2.0]]), torch.tensor([[0.5, 1.0, 1.0]])
    torch.testing.assert_close(N.elementwise_loss(p, y, "l2"), torch.tensor([[0.25, 0.0, 9.0]]))
    torch.testing.assert_close(N.elementwise_loss(p, y, "l1"), torch.tensor([[0.5, 0.0, 3.0]]))
    c = 0.5
    root = torch.tensor([[math.sqrt(0.25 + 0.25) - c, 0.0, math.sqrt(9 + 0.25) - c]])
    torch.testing.assert_close(N.elementwise_loss(p, y, "huber", torch.tensor([c])), 2 * c * root)
    torch.testing.assert_close(N.elementwise_loss(p, y, "smooth_l1", torch.tensor([c])), 2 * root)
    with pytest.raises(ValueError):
        N.elementwise_loss(p, y, "huber")


def test_per_sample_loss_weights_mask_and_snr(sched):
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    t = torch.tensor([100, 800])
    s = NoiseSettings()
    loss = N.per_sample_loss(pred, target, t, sched, s, torch.tensor([1.0, 0.5]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([1.0, 2.0]))  # [1, 4] * [1, 0.5]
    pred2 = pred.float().clone()
    pred2[:, :, 0, :] = 100.0  # huge error in the masked-out row
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).expand(2, 1, 2, 2)
    loss = N.per_sample_loss(pred2, target, t, sched, s, None, mask=mask.flip(2))
    torch.testing.assert_close(loss, torch.tensor([0.5, 2.0]))  # masked pixels count 0, mean over all
    pixel_mask = torch.zeros(2, 16, 16)  # image-sized [B, H, W] mask is area-resized to the latent size
    pixel_mask[:, 8:, :] = 1.0
    pixel_mask[:, :8, ::2] = 1.0  # half of the top latent row
    expected = torch.tensor([(99.0**2 * 0.5 * 2 + 1.0 * 2) / 4, (98.0**2 * 0.5 * 2 + 4.0 * 2) / 4])
    torch.testing.assert_close(N.per_sample_loss(pred2, target, t, sched, s, None, mask=pixel_mask), expected)
    s = NoiseSettings(min_snr_gamma=5.0)
    expected = torch.tensor([1.0, 4.0]) * N.snr_loss_weights(t, sched, s)
    torch.testing.assert_close(N.per_sample_loss(pred, target, t, sched, s, torch.ones(2)), expected)


# ---- zero terminal SNR ----------------------------------------------------------------------


def test_zero_terminal_snr(sched):
    zsched = N.apply_zero_terminal_snr(sched)
    assert zsched is not sched and sched.alphas_cumprod[-1] > 0.004  # original untouched
    assert zsched.alphas_cumprod[-1].abs() < 1e-12
    torch.testing.assert_close(zsched.alphas_cumprod[0], sched.alphas_cumprod[0])
    assert torch.all(zsched.alphas_cumprod[1:] <= zsched.alphas_cumprod[:-1])
    torch.testing.assert_close(zsched.betas, N.zero_terminal_snr_betas(sched.betas))
    # min-SNR (epsilon) stays finite at SNR 0; v-prediction weight is 0 there
    t = torch.tensor([999])
    assert N.snr_loss_weights(t, zsched, NoiseSettings(min_snr_gamma=5.0)).item() == 1.0
    assert N.snr_loss_weights(t, zsched, NoiseSettings(min_snr_gamma=5.0, v_parameterization=True)).item() == 0.0
