"""tcd.schedule against diffusers' TCDScheduler.set_timesteps (the parity oracle)."""
import pytest
import torch
from diffusers import TCDScheduler

from tcd.schedule import DiscreteSchedule, tcd_timesteps, tcd_timesteps_denoised, vp_alphas_cumprod

STRENGTHS = [1.0, 0.99, 0.75, 0.5, 0.3, 0.1]


def diffusers_timesteps(steps, strength=1.0, original_steps=None):
    sched = TCDScheduler()
    kwargs = {} if original_steps is None else {"original_inference_steps": original_steps}
    sched.set_timesteps(steps, strength=strength, **kwargs)
    return sched.timesteps.tolist()


@pytest.mark.parametrize("strength", STRENGTHS)
def test_timesteps_equal_diffusers_for_every_step_count(strength):
    compared = 0
    for steps in range(1, 51):
        try:
            expected = diffusers_timesteps(steps, strength)
        except ValueError:
            with pytest.raises(ValueError):
                tcd_timesteps(steps, 50, strength)
            continue
        assert tcd_timesteps(steps, 50, strength) == expected, (steps, strength)
        compared += 1
    assert compared >= int(50 * strength) - 1


def test_published_schedules():
    assert tcd_timesteps(1) == [999]
    assert tcd_timesteps(2) == [999, 499]
    assert tcd_timesteps(4) == [999, 759, 499, 259]
    assert tcd_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert tcd_timesteps(4, strength=0.5) == [499, 379, 259, 139]
    assert tcd_timesteps(4, strength=0.3) == [299, 239, 159, 79]


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25, 50, 100])
def test_thousand_step_grid_is_diffusers_explicit_original_steps(steps):
    # diffusers switches to every timestep whenever original_inference_steps is passed
    assert tcd_timesteps(steps, original_steps=1000) == diffusers_timesteps(steps, original_steps=1000)
    assert tcd_timesteps(4, original_steps=1000) == [999, 749, 499, 249]


def test_denoise_semantics_differ_as_documented():
    assert tcd_timesteps_denoised(4, 0.3, "diffusers_strength") == [299, 239, 159, 79]
    assert tcd_timesteps_denoised(4, 0.3, "comfyui") == [319, 239, 159, 79]
    # SD img2img pipeline: get_timesteps keeps the last min(int(N*strength), N) of the full schedule
    sched = TCDScheduler()
    sched.set_timesteps(8)
    keep = min(int(8 * 0.99), 8)
    assert tcd_timesteps_denoised(8, 0.99, "diffusers_pipeline") == sched.timesteps[8 - keep:].tolist()
    assert tcd_timesteps_denoised(8, 0.99, "diffusers_pipeline")[0] == 879


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps=0"),
    (dict(steps=51), "exceeds original_steps"),
    (dict(steps=4, strength=0.0), "strength"),
    (dict(steps=30, strength=0.5), "strength=0.5 leaves 25"),
    (dict(steps=4, original_steps=0), "original_steps=0"),
])
def test_bad_schedule_arguments_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        tcd_timesteps(**bad)


@pytest.mark.parametrize("denoise", [0.0, -0.1, 1.5, float("nan")])
def test_bad_denoise(denoise):
    with pytest.raises(ValueError, match="denoise"):
        tcd_timesteps_denoised(4, denoise)


def test_schedule_table_matches_diffusers_alphas():
    sched = TCDScheduler()
    assert torch.equal(vp_alphas_cumprod(), sched.alphas_cumprod)
    table = DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    for t in (0, 19, 259, 499, 999):
        assert table.timestep(table.sigma_at(t)) == t
    assert table.timestep(0.0) == 0
    sig = table.sigmas_for([999, 759, 499, 259])
    assert sig[-1] == 0 and sig.shape == (5,)
    assert sig[0] == pytest.approx(14.6146, rel=1e-4)


def test_sigma_s_floor_is_float32_like_diffusers():
    # (t, gamma) = (500, 0.07): float32 and float64 products floor differently
    table = DiscreteSchedule.from_alphas_cumprod(vp_alphas_cumprod())
    t_s = int(torch.floor((1 - 0.07) * torch.tensor(500)).long())
    assert table.sigma_s(table.sigma_at(500), 0.07) == pytest.approx(table.sigma_at(t_s), rel=0, abs=0)
    # off-grid sigma_next (karras): sigma_s never exceeds it
    assert table.sigma_s(1.2345, 0.0) <= 1.2345
