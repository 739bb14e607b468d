"""Samplers at a given number of function evaluations (NFE = number of network calls).

* TCD students: the pack's `tcd.sampling.sample_tcd` (SSS, Algorithm 4) on `tcd.schedule.tcd_timesteps`, through
  a k-diffusion wrapper of the eps network exactly like ComfyUI's EPS model (x_VP = x / sqrt(1 + sigma^2),
  D = x - sigma * eps).
* LCM students: diffusers' `LCMScheduler` (multistep consistency sampling with c_skip / c_out, timestep_scaling 10).
* The teacher: diffusers' `DDIMScheduler` (eta 0) and `DPMSolverMultistepScheduler` (DPM-Solver++(2M)), both with
  "trailing" spacing so that step 1 starts at t = 999 like TCD and LCM (SD's default "leading" spacing would start
  a 1-step DDIM at t = 1, i.e. not sample at all), and a clean final x0.

Every sampler returns clean samples (x0 convention) so that all methods are compared on the same footing;
`sample_tcd` is therefore run with final_step="x0" (its default "diffusers" would add sigma_0 * eps_hat = 0.029 eps).
"""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from tcd.sampling import sample_tcd
from tcd.schedule import DiscreteSchedule, tcd_timesteps

# The SD noise schedule all diffusers schedulers below are built with (the same one `tcd.schedule` computes).
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def initial_noise(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T ~ N(0, I) from a CPU generator that the sampler keeps drawing its step noise from (diffusers' way)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, dim, generator=generator), generator


def eps_denoiser(net, schedule: DiscreteSchedule):
    """k-diffusion denoiser D(x_VE, sigma) of an eps network, as ComfyUI's EPS model_sampling builds it."""

    def model(x, sigma, **_):
        s = float(sigma.flatten()[0])
        t = torch.full((x.shape[0],), schedule.timestep(s), dtype=torch.int64)
        eps = net(x / math.sqrt(1.0 + s * s), t)
        return x - s * eps

    return model


@torch.no_grad()
def sample_tcd_student(net, schedule: DiscreteSchedule, n: int, dim: int, nfe: int, gamma: float, seed: int,
                       original_steps: int = 50) -> torch.Tensor:
    sigmas = schedule.sigmas_for(tcd_timesteps(nfe, original_steps=original_steps))
    noise, _ = initial_noise(n, dim, seed)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)   # VE scale at sigma_max, i.e. x_VP = noise
    # sample_tcd's own seeded noise stream (seed, first draw skipped) continues the initial-noise generator.
    return sample_tcd(eps_denoiser(net, schedule), x, sigmas, extra_args={"seed": int(seed)}, gamma=gamma,
                      schedule=schedule, final_step="x0")


@torch.no_grad()
def _diffusers_loop(net, scheduler, n: int, dim: int, nfe: int, seed: int, **step_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(nfe)
    x, generator = initial_noise(n, dim, seed)
    x = x * scheduler.init_noise_sigma
    last = None
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), torch.full((n,), int(t), dtype=torch.int64))
        out = scheduler.step(eps, t, x, **step_kwargs, **({"generator": generator}
                                                           if isinstance(scheduler, LCMScheduler) else {}))
        x = out.prev_sample
        last = out
    # LCM's sample is its last `denoised` (the consistency function's x0), not a re-noised prev_sample.
    return last.denoised if isinstance(scheduler, LCMScheduler) else x


def sample_lcm_student(net, n: int, dim: int, nfe: int, seed: int, original_steps: int = 50) -> torch.Tensor:
    return _diffusers_loop(net, LCMScheduler(**SD_BETAS, timestep_scaling=10.0,
                                             original_inference_steps=original_steps), n, dim, nfe, seed)


def sample_ddim(net, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    sched = DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False)
    return _diffusers_loop(net, sched, n, dim, nfe, seed, eta=0.0)


def sample_dpmpp_2m(net, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", final_sigmas_type="zero",
                                        lower_order_final=True)
    return _diffusers_loop(net, sched, n, dim, nfe, seed)
