"""Strategic Stochastic Sampling (SSS, TCD paper Algorithm 4) in k-diffusion form.

A TCD step from sigma_t to sigma_next (TCD_SPEC §2.1, §2.5), with x = a(sigma) * x0 + b(sigma) * eps:

    D        = model(x, sigma_t)                                   # x0 prediction (eps / v / x0 models alike)
    eps_hat  = (x - a_t * D) / b_t
    x_s      = a_s * D + b_s * eps_hat                             # first-order TCF jump t -> s <= t_next
    x_next   = (a_n / a_s) * x_s + sqrt(b_n^2 - (a_n * b_s / a_s)^2) * z     # forward kernel s -> t_next

with s = floor((1 - gamma) * t_next) on the model's discrete grid (or sigma_s = (1 - gamma) * sigma_next for flow
models). For discrete models (a = 1, b = sigma) this is an Euler-ancestral step with sigma_down = sigma_s and
sigma_up = sqrt(sigma_next^2 - sigma_s^2): gamma = 0 is DDIM (eta 0), gamma = 1 re-noises the x0 prediction as LCM
does. It reproduces diffusers' `TCDScheduler.step` (the final step included) to float32 precision.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

FINAL_STEP_MODES = ("diffusers", "x0")
GammaSpec = Union[float, Sequence[float]]


def parse_gamma_schedule(text: str) -> list[float]:
    """'0.5, 0.3, 0.2' -> [0.5, 0.3, 0.2]; an empty string gives []."""
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"gamma schedule entry {part!r} is not a number; write comma-separated values in "
                             f"[0, 1], e.g. '0.5, 0.3, 0.2'") from None
    return values


def expand_gamma(gamma: GammaSpec, steps: int) -> list[float]:
    """One gamma per step: a float repeats; a shorter sequence repeats its last value; all checked in [0, 1]."""
    values = [gamma] if isinstance(gamma, (int, float)) else list(gamma)
    if not values:
        raise ValueError("gamma schedule is empty; give a float in [0, 1] or at least one value")
    for g in values:
        if not isinstance(g, (int, float)) or math.isnan(g) or not 0.0 <= g <= 1.0:
            raise ValueError(f"gamma={g!r} is outside [0, 1]: 0 is deterministic (DDIM-like), 1 is LCM-like; "
                             f"0.3 is the TCD default (diffusers' eta)")
    if len(values) > steps:
        raise ValueError(f"gamma schedule has {len(values)} values but the sampler runs {steps} steps; "
                         f"give at most one value per step")
    return [float(g) for g in values] + [float(values[-1])] * (steps - len(values))


def seeded_noise_sampler(x: torch.Tensor, seed: int, skip_first: bool = True) -> Callable[..., torch.Tensor]:
    """Step noise from a CPU generator seeded with `seed`, drawn in float32 and moved to x's device and dtype.

    skip_first discards one x-sized draw, the one ComfyUI's `prepare_noise` used for the initial latent, so the
    stream continues exactly like diffusers' pipeline generator (`torch.Generator("cpu").manual_seed(seed)`).
    Never the global RNG: results must not depend on the hardware or on other RNG consumers (TCD_SPEC §2.4.4).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if skip_first:
        torch.randn(x.shape, generator=generator, dtype=torch.float32)

    def sample(sigma=None, sigma_next=None):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def _values(sigmas: torch.Tensor, limit: int = 12) -> str:
    values = [round(float(v), 6) for v in sigmas.flatten()[:limit]]
    return str(values)[:-1] + (f", ... ({sigmas.numel() - limit} more)]" if sigmas.numel() > limit else "]")


def check_sigmas(sigmas: torch.Tensor) -> None:
    """Refuse SIGMAS no sampling loop can run, naming what was given, what is allowed and the usual cause."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"SIGMAS must hold at least 2 values (a start and an end), got shape {tuple(sigmas.shape)}: "
                         f"{_values(sigmas)}. Fewer than two values leave no step to take: SplitSigmas at step 0 "
                         f"(high_sigmas) or at the last step (low_sigmas) gives one; split at a step in between, or "
                         f"connect the TCD Scheduler directly")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"SIGMAS contain NaN or inf: {_values(sigmas)}. Allowed: finite noise levels >= 0; check the "
                         f"node that made them (a NaN or extreme value typed into a scheduler or SetFirstSigma)")
    if (sigmas < 0).any() or (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"SIGMAS must be non-negative and non-increasing (from high noise down to 0), got "
                         f"{_values(sigmas)}. Sampling removes noise step by step; remove FlipSigmas or use the TCD "
                         f"Scheduler")


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma: GammaSpec = 0.3,
               noise_sampler=None, schedule=None, final_step: str = "diffusers"):
    """Strategic Stochastic Sampling of Trajectory Consistency Distillation (Zheng et al. 2024, Algorithm 4).

    schedule: `DiscreteSchedule` (the model's sigma table) or `FlowSchedule`; gamma: float or one per step;
    final_step: "diffusers" returns diffusers' last latent sqrt(abar_0) * x_s (TCD_SPEC §1.3), "x0" the clean D.
    """
    if schedule is None:
        raise ValueError("sample_tcd needs schedule=DiscreteSchedule(model_sigmas) or FlowSchedule()")
    if final_step not in FINAL_STEP_MODES:
        raise ValueError(f"final_step={final_step!r} is not one of {FINAL_STEP_MODES}")
    check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    gammas = expand_gamma(gamma, steps)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed") or 0)
    s_in = x.new_ones([x.shape[0]])
    sigma_list = [float(s) for s in sigmas]

    for i in range(steps):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        # 1. target time s of the TCF jump (s <= t_next)
        sigma_s = schedule.sigma_s(sigma_next, gammas[i])
        # 2. eps implied by the x0 prediction, then the first-order TCF: x_s = a_s * D + b_s * eps_hat
        a_t, b_t = schedule.a(sigma), schedule.b(sigma)
        a_s, b_s = schedule.a(sigma_s), schedule.b(sigma_s)
        eps_hat = (x - a_t * denoised) / b_t
        x = a_s * denoised + b_s * eps_hat
        if sigma_next > 0:
            # 3. forward kernel s -> t_next: scale, then add the missing noise
            a_n, b_n = schedule.a(sigma_next), schedule.b(sigma_next)
            x = (a_n / a_s) * x
            sigma_up = math.sqrt(max(b_n ** 2 - (a_n * b_s / a_s) ** 2, 0.0))
            if sigma_up > 0:
                x = x + sigma_up * noise_sampler(sigma, sigma_next)
        elif final_step == "x0" or schedule.kind == "flow":
            x = denoised
        else:
            # 4. final step of diffusers' TCD: the VP latent sqrt(abar_s) * x_s, abar_s = 1 / (1 + sigma_s^2)
            x = x / math.sqrt(1.0 + sigma_s ** 2)
    return x
