"""Samplers of the rectified-flow variant of the study (`python -m benchmarks.paper_toy.run --path flow`).

The teachers are velocity networks (`models.VelocityMLP`, trained by `teacher.flow_training_pair`) on
x_sigma = (1 - sigma) x0 + sigma eps, i.e. ComfyUI's CONST sampling space; the students are distilled from them
with `tcd.losses` on `tcd.paths.FlowPath.shifted(shift)` with prediction_type "flow".

* Timesteps: N steps uniform in the model's unshifted time from sigma = 1 (trailing), sigma_i = shift(1 - i / N),
  then 0, as the pack's flow presets and diffusers' FlowMatchEulerDiscreteScheduler space them.
* SSS: the pack's `tcd.sampling.sample_tcd` with `tcd.schedule.FlowSchedule` (sigma_s = (1 - gamma) sigma_next),
  through the k-diffusion denoiser D = x - sigma v of ComfyUI's CONST models. On a flow path the first-order TCF
  jump (DDIM) is exactly the Euler step, so gamma = 0 is deterministic flow Euler of the student, and gamma = 1
  (x0, then re-noised to sigma_next: x = (1 - sigma_next) D + sigma_next z) is LCM's multistep sampler in flow form.
  Every step costs one model call (the last one returns D).
* The teacher: flow Euler (x += (sigma_next - sigma) v) on the same timesteps, with classifier-free guidance
  v = v_c + w (v_c - v_u) (two passes per step; NFE counts steps, as the VP study's tables do).
"""
from __future__ import annotations

import torch

from tcd.paths import FlowPath
from tcd.sampling import sample_tcd, sss_model_calls
from tcd.schedule import FlowSchedule

from .samplers import initial_noise


def flow_sigmas(steps: int, path: FlowPath) -> torch.Tensor:
    """[sigma(1), sigma(1 - 1/N), ..., sigma(1/N), 0]: uniform in the unshifted time, starting at pure noise."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return torch.tensor([float(path.sigma_of_time(1.0 - i / steps)) for i in range(steps)] + [0.0],
                        dtype=torch.float32)


def velocity_denoiser(v_fn):
    """k-diffusion denoiser D(x, sigma) = x - sigma v(x, sigma) of a velocity function (ComfyUI's CONST model:
    calculate_input is the identity)."""

    def model(x, sigma, **_):
        return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) * v_fn(x, sigma)

    return model


@torch.no_grad()
def sample_flow_sss(v_fn, path: FlowPath, n: int, dim: int, nfe: int, gamma: float, seed: int) -> torch.Tensor:
    sigmas = flow_sigmas(nfe, path)
    assert sss_model_calls(sigmas, 1, "flow", gamma, final_step="x0") == nfe
    noise, _ = initial_noise(n, dim, seed)      # x at sigma = 1 is the noise itself
    # sample_tcd's own seeded noise stream (seed, first draw skipped) continues the initial-noise generator.
    return sample_tcd(velocity_denoiser(v_fn), noise, sigmas, extra_args={"seed": int(seed)}, gamma=gamma,
                      schedule=FlowSchedule(), final_step="x0", disable=True)


@torch.no_grad()
def sample_flow_euler(v_fn, path: FlowPath, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    """The flow ODE dx/dsigma = v by Euler on `flow_sigmas` (the last step lands on x - sigma v, the x0 estimate)."""
    sigmas = [float(s) for s in flow_sigmas(nfe, path)]
    x, _ = initial_noise(n, dim, seed)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * v_fn(x, torch.full((n,), sigma))
    return x


def student_samplers(declared_gamma: dict) -> dict:
    """name -> gamma (a float, or one per NFE). Every flow student is sampled by every one of these at every NFE."""
    return {
        "lcm": 1.0,                   # LCM's multistep sampler in flow form: x0, re-noised to sigma_next
        "sss_g0": 0.0,                # deterministic: the student's flow Euler
        "sss_g0.3": 0.3,              # the paper's / diffusers' default gamma
        "sss_declared": declared_gamma,
    }


def run_sampler(gamma, v_fn, path: FlowPath, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    g = gamma[str(nfe)] if isinstance(gamma, dict) else gamma
    return sample_flow_sss(v_fn, path, n, dim, nfe, g, seed)
