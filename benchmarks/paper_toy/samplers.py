"""Samplers at a given number of function evaluations (NFE = number of network calls).

* SSS (the TCD paper's Algorithm 4): the pack's `tcd.sampling.sample_tcd` on `tcd.schedule.tcd_timesteps`, through
  a k-diffusion wrapper of the eps network exactly like ComfyUI's EPS model (x_VP = x / sqrt(1 + sigma^2),
  D = x - sigma * eps). First-order jumps cost 1 NFE per step; second-order jumps (tcf_order=2) cost 2, except the
  last step, which returns the clean x0 prediction (1 call): N steps cost 2N - 1, so at a budget of n NFE they take
  (n + 1) // 2 steps and spend n - 1 calls for even n (`tcd.sampling.sss_model_calls` counts them).
* LCM's sampler: diffusers' `LCMScheduler` (multistep consistency sampling with c_skip / c_out, timestep_scaling 10).
* The teacher: diffusers' `DDIMScheduler` (eta 0) and `DPMSolverMultistepScheduler` (DPM-Solver++(2M)), both with
  "trailing" spacing so that step 1 starts at t = 999 like TCD and LCM, and a clean final x0; with classifier-free
  guidance x0 = x0_c + w (x0_c - x0_u) (two network calls per step: NFE counts steps, as the paper's tables do).

Every sampler returns clean samples (x0 convention) so that all methods are compared on the same footing;
`sample_tcd` is therefore run with final_step="x0".
"""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from tcd.sampling import sample_tcd, sss_model_calls
from tcd.schedule import DiscreteSchedule, tcd_timesteps

# The SD noise schedule all diffusers schedulers below are built with (the same one `tcd.schedule` computes).
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def initial_noise(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T ~ N(0, I) from a CPU generator that the sampler keeps drawing its step noise from (diffusers' way)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, dim, generator=generator), generator


def eps_function(net, labels: torch.Tensor | None = None, guidance: float = 0.0):
    """eps(x_VP, t) of a network, conditional on `labels` when given, with CFG eps_c + w (eps_c - eps_u) when
    guidance w > 0 (the same w convention as tcd.losses' teacher step)."""
    if labels is None or guidance == 0.0:
        return lambda x, t: net(x, t, labels)
    null = net.null_label(labels.shape[0])

    def eps(x, t):
        e_c, e_u = net(x, t, labels), net(x, t, null)
        return e_c + guidance * (e_c - e_u)
    return eps


def eps_denoiser(eps_fn, schedule: DiscreteSchedule):
    """k-diffusion denoiser D(x_VE, sigma) of an eps function, as ComfyUI's EPS model_sampling builds it."""

    def model(x, sigma, **_):
        s = float(sigma.flatten()[0])
        t = torch.full((x.shape[0],), schedule.timestep(s), dtype=torch.int64)
        return x - s * eps_fn(x / math.sqrt(1.0 + s * s), t)

    return model


def sss_steps(nfe: int, tcf_order: int) -> int:
    """The most steps whose network calls stay within `nfe` (module docstring)."""
    steps = nfe if tcf_order == 1 else (nfe + 1) // 2
    assert sss_model_calls(steps, tcf_order, "discrete", final_step="x0") <= nfe
    return steps


@torch.no_grad()
def sample_sss(eps_fn, schedule: DiscreteSchedule, n: int, dim: int, nfe: int, gamma: float, seed: int,
               tcf_order: int = 1, original_steps: int = 50) -> torch.Tensor:
    steps = sss_steps(nfe, tcf_order)
    sigmas = schedule.sigmas_for(tcd_timesteps(steps, original_steps=original_steps))
    noise, _ = initial_noise(n, dim, seed)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)   # VE scale at sigma_max, i.e. x_VP = noise
    kwargs = {"tcf_order": tcf_order} if tcf_order != 1 else {}
    # sample_tcd's own seeded noise stream (seed, first draw skipped) continues the initial-noise generator.
    return sample_tcd(eps_denoiser(eps_fn, schedule), x, sigmas, extra_args={"seed": int(seed)}, gamma=gamma,
                      schedule=schedule, final_step="x0", **kwargs)


@torch.no_grad()
def _diffusers_loop(eps_fn, scheduler, n: int, dim: int, nfe: int, seed: int, **step_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(nfe)
    x, generator = initial_noise(n, dim, seed)
    x = x * scheduler.init_noise_sigma
    last = None
    for t in scheduler.timesteps:
        eps = eps_fn(scheduler.scale_model_input(x, t), torch.full((n,), int(t), dtype=torch.int64))
        out = scheduler.step(eps, t, x, **step_kwargs, **({"generator": generator}
                                                           if isinstance(scheduler, LCMScheduler) else {}))
        x = out.prev_sample
        last = out
    # LCM's sample is its last `denoised` (the consistency function's x0), not a re-noised prev_sample.
    return last.denoised if isinstance(scheduler, LCMScheduler) else x


def sample_lcm(eps_fn, n: int, dim: int, nfe: int, seed: int, original_steps: int = 50) -> torch.Tensor:
    return _diffusers_loop(eps_fn, LCMScheduler(**SD_BETAS, timestep_scaling=10.0,
                                                original_inference_steps=original_steps), n, dim, nfe, seed)


def sample_ddim(eps_fn, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    sched = DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False)
    return _diffusers_loop(eps_fn, sched, n, dim, nfe, seed, eta=0.0)


def sample_dpmpp_2m(eps_fn, n: int, dim: int, nfe: int, seed: int) -> torch.Tensor:
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", final_sigmas_type="zero",
                                        lower_order_final=True)
    return _diffusers_loop(eps_fn, sched, n, dim, nfe, seed)


# ------------------------------------------------------------------------------------------------ the factorial
def student_samplers(declared_gamma: dict) -> dict:
    """name -> (kind, gamma, tcf_order). Every student is sampled by every one of these at every NFE."""
    return {
        "lcm": ("lcm", None, None),                  # LCM's multistep consistency sampler
        "sss_g0": ("sss", 0.0, 1),                   # deterministic SSS (DDIM-like jumps)
        "sss_g0.3": ("sss", 0.3, 1),                 # the paper's / diffusers' default gamma
        "sss2_g0.3": ("sss", 0.3, 2),                # second-order TCF jumps, 2 NFE per step
        "sss_declared": ("sss", declared_gamma, 1),  # one gamma per NFE, declared before measuring
    }


def run_sampler(spec, eps_fn, schedule, n: int, dim: int, nfe: int, seed: int):
    """Samples of one factorial cell, or None where the sampler cannot spend exactly `nfe` calls."""
    kind, gamma, order = spec
    if kind == "lcm":
        return sample_lcm(eps_fn, n, dim, nfe, seed)
    g = gamma[str(nfe)] if isinstance(gamma, dict) else gamma
    return sample_sss(eps_fn, schedule, n, dim, nfe, g, seed, tcf_order=order)
