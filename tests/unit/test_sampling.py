"""tcd.sampling.sample_tcd against diffusers' TCDScheduler loop on the same model function and noise."""
import math

import pytest
import torch
from diffusers import TCDScheduler

from tcd.sampling import expand_gamma, parse_gamma_schedule, sample_tcd, seeded_noise_sampler
from tcd.schedule import DiscreteSchedule, FlowSchedule, tcd_timesteps

SHAPE = (2, 4, 8, 8)


def net(x_vp, t):
    """A deterministic, nonlinear, timestep-dependent stand-in network (same function on both sides)."""
    t = float(t)
    return torch.tanh(x_vp * (0.5 + t / 1000.0)) * 0.8 + 0.05 * math.sin(t / 97.0) + 0.1 * x_vp.roll(1, -1)


def diffusers_loop(pred, steps, gamma, seed, latents=None, zsnr=False):
    sched = TCDScheduler(prediction_type=pred, rescale_betas_zero_snr=zsnr)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) if latents is None else latents.clone()
    gammas = expand_gamma(gamma, steps)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(net(x, t), t, x, eta=gammas[i], generator=g).prev_sample
    return x, sched


def denoiser_for(pred, schedule):
    """x0-predicting model in sigma (VE) space, converted the way ComfyUI's EPS / V_PREDICTION / X0 do."""
    def model(x, sigma, **_):
        s = float(sigma[0])
        x_vp = x / math.sqrt(1 + s * s)
        out = net(x_vp, schedule.timestep(s))
        if pred == "epsilon":
            return x - out * s
        if pred == "v_prediction":
            return x / (s * s + 1) - out * s / math.sqrt(s * s + 1)
        return out
    return model


def tcd_loop(pred, steps, gamma, seed, sched, latents=None):
    schedule = DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    sigmas = schedule.sigmas_for(tcd_timesteps(steps))
    if latents is None:
        latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed))
        noise = seeded_noise_sampler(latents, seed, skip_first=True)
    else:
        noise = seeded_noise_sampler(latents, seed, skip_first=False)
    x = latents * math.sqrt(1 + float(sigmas[0]) ** 2)   # ComfyUI's noise_scaling at full denoise
    return sample_tcd(denoiser_for(pred, schedule), x, sigmas, gamma=gamma, schedule=schedule,
                      noise_sampler=noise, disable=True)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_full_loop_matches_diffusers(pred, steps, gamma):
    expected, sched = diffusers_loop(pred, steps, gamma, seed=steps * 7 + 1)
    got = tcd_loop(pred, steps, gamma, steps * 7 + 1, sched)
    assert rel_err(got, expected) <= 1e-4


def test_per_step_gamma_matches_diffusers_with_varying_eta():
    gammas = [0.6, 0.4, 0.2, 0.0]
    expected, sched = diffusers_loop("epsilon", 4, gammas, seed=3)
    assert rel_err(tcd_loop("epsilon", 4, gammas, 3, sched), expected) <= 1e-4
    # and differs from a constant gamma, so the schedule is really applied
    constant, _ = diffusers_loop("epsilon", 4, 0.3, seed=3)
    assert rel_err(constant, expected) > 1e-2


def published_sample():
    """diffusers' SchedulerCommonTest.dummy_sample_deter: batch 4, 3 channels, 8x8."""
    return torch.arange(768, dtype=torch.float32).flip(-1).reshape(3, 8, 8, 4).permute(3, 0, 1, 2) / 768


@pytest.mark.parametrize("steps, total", [(1, 29.8715), (10, 181.2040)])
def test_diffusers_published_full_loop_values(steps, total):
    """diffusers' test_full_loop_onestep_deter / multistep_deter: model out = x * t / (t + 1), eta 0."""
    sched = TCDScheduler()
    schedule = DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    sigmas = schedule.sigmas_for(tcd_timesteps(steps))

    def model(x, sigma, **_):
        s = float(sigma[0])
        t = schedule.timestep(s)
        return x - (x / math.sqrt(1 + s * s)) * t / (t + 1) * s

    x = published_sample() * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = sample_tcd(model, x, sigmas, gamma=0.0, schedule=schedule, disable=True)
    assert float(out.abs().sum()) == pytest.approx(total, abs=1e-3)
    assert float(out.abs().mean()) == pytest.approx(total / 768, abs=1e-3)


def test_zero_terminal_snr_v_prediction_is_close_to_diffusers():
    expected, sched = diffusers_loop("v_prediction", 4, 0.3, seed=5, zsnr=True)
    abar = sched.alphas_cumprod.clone().double()
    abar[-1] = 4.8973451890853435e-08          # ComfyUI's clamp of the zero-SNR terminal step
    schedule = DiscreteSchedule(((1 - abar) / abar).sqrt().float())
    sigmas = schedule.sigmas_for(tcd_timesteps(4))
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(5))
    x = latents * math.sqrt(1 + float(sigmas[0]) ** 2)
    got = sample_tcd(denoiser_for("v_prediction", schedule), x, sigmas, gamma=0.3, schedule=schedule,
                     noise_sampler=seeded_noise_sampler(latents, 5), disable=True)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= 1e-3


def test_seeded_noise_is_reproducible_and_not_global_rng():
    x = torch.zeros(SHAPE)
    torch.manual_seed(123)
    a = seeded_noise_sampler(x, 7)()
    torch.manual_seed(456)
    b = seeded_noise_sampler(x, 7)()
    assert torch.equal(a, b)
    assert not torch.equal(a, seeded_noise_sampler(x, 8)())


def flow_model(x, sigma, **_):
    return torch.tanh(x) * (1 - float(sigma[0]))


def test_flow_gamma_zero_is_euler_and_gamma_one_renoises_x0():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    got = sample_tcd(flow_model, x0.clone(), sigmas, gamma=0.0, schedule=FlowSchedule(), disable=True)
    x = x0.clone()
    for i in range(4):   # rectified-flow Euler
        d = (x - flow_model(x, sigmas[i:i + 1])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    assert rel_err(got, x) <= 1e-5

    noises = []
    def recording_noise(*_):
        noises.append(torch.randn(SHAPE, generator=torch.Generator().manual_seed(len(noises) + 10)))
        return noises[-1]
    x, steps_seen = x0.clone(), []
    sample_tcd(flow_model, x, sigmas, gamma=1.0, schedule=FlowSchedule(), noise_sampler=recording_noise,
               callback=lambda d: steps_seen.append(d), disable=True)
    d1 = steps_seen[1]["denoised"]
    # gamma = 1: x_next = (1 - sigma_next) * D + sigma_next * z  (LCM-like re-noising)
    expected_x1 = (1 - 0.75) * steps_seen[0]["denoised"] + 0.75 * noises[0]
    assert rel_err(steps_seen[1]["x"], expected_x1) <= 1e-6 and torch.isfinite(d1).all()


def test_callback_passes_x0_prediction():
    sched = TCDScheduler()
    schedule = DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    seen = []
    model = denoiser_for("epsilon", schedule)
    sigmas = schedule.sigmas_for(tcd_timesteps(2))
    sample_tcd(model, torch.randn(SHAPE), sigmas, schedule=schedule, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == [0, 1]
    assert torch.equal(seen[0]["denoised"], model(seen[0]["x"], sigmas[0:1]))


def test_final_step_modes():
    sched = TCDScheduler()
    schedule = DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    sigmas = schedule.sigmas_for(tcd_timesteps(2))
    model = denoiser_for("epsilon", schedule)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 14.6
    seen = []
    clean = sample_tcd(model, x, sigmas, schedule=schedule, final_step="x0", callback=seen.append, disable=True)
    assert torch.equal(clean, seen[-1]["denoised"])
    vp = sample_tcd(model, x, sigmas, schedule=schedule, final_step="diffusers", disable=True)
    assert 0 < rel_err(vp, clean) < 0.1


@pytest.mark.parametrize("gamma, match", [(1.5, r"outside \[0, 1\]"), (-0.1, r"outside \[0, 1\]"),
                                          (float("nan"), r"outside \[0, 1\]"), ([], "empty"),
                                          ([0.1] * 5, "at most one value per step")])
def test_bad_gamma_is_refused_with_allowed_range(gamma, match):
    with pytest.raises(ValueError, match=match):
        expand_gamma(gamma, 4)


def test_gamma_schedule_parsing():
    assert parse_gamma_schedule(" 0.5, 0.3;0.2 ,") == [0.5, 0.3, 0.2]
    assert expand_gamma([0.5, 0.3], 4) == [0.5, 0.3, 0.3, 0.3]
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_gamma_schedule("0.5, abc")


@pytest.mark.parametrize("sigmas, match", [
    (torch.tensor([1.0]), "at least 2"), (torch.tensor([]), "at least 2"),
    (torch.tensor([1.0, float("nan")]), "NaN"), (torch.tensor([0.5, 1.0]), "non-increasing"),
])
def test_bad_sigmas(sigmas, match):
    with pytest.raises(ValueError, match=match):
        sample_tcd(flow_model, torch.zeros(SHAPE), sigmas, schedule=FlowSchedule())


def test_schedule_is_required():
    with pytest.raises(ValueError, match="schedule"):
        sample_tcd(flow_model, torch.zeros(SHAPE), torch.tensor([1.0, 0.0]))
