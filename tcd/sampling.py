"""Strategic Stochastic Sampling (SSS, TCD paper Algorithm 4) in k-diffusion form.

A TCD step from sigma_t to sigma_next, with x = a(sigma) * x0 + b(sigma) * eps (a = 1, b = sigma for discrete VP
models in ComfyUI's sigma space; a = 1 - sigma, b = sigma for flow models) and lambda = log(a / b):

    D        = model(x, sigma_t)                                   # x0 prediction (eps / v / x0 models alike)
    eps_hat  = (x - a_t * D) / b_t
    x_s      = a_s * D + b_s * eps_hat                             # first-order TCF jump t -> s <= t_next
    x_next   = (a_n / a_s) * x_s + sqrt(b_n^2 - (a_n * b_s / a_s)^2) * z     # forward kernel s -> t_next

with s = floor((1 - gamma) * t_next) on the model's discrete grid (or sigma_s = (1 - gamma) * sigma_next for flow
models, whose time is continuous). For discrete models this is an Euler-ancestral step with sigma_down = sigma_s and
sigma_up = sqrt(sigma_next^2 - sigma_s^2): gamma = 0 is DDIM (eta 0), gamma = 1 re-noises the x0 prediction as LCM
does. With tcf_order=1 this is the paper's SSS exactly (Algorithm 4 with its first-order TCF, the DDIM form
(b_s / b_t) x_t - a_s (e^{-h} - 1) D, h = lambda_s - lambda_t) and reproduces diffusers' `TCDScheduler.step` (the
final step included) to float32 precision.

tcf_order=2 swaps the jump t -> s for the paper's higher-order TCF: the exponential-integrator solution
x_s = (b_s / b_t) x_t + b_s * integral_{lambda_t}^{lambda_s} e^lambda x0_hat dlambda with x0_hat Taylor-expanded to
first order in lambda, evaluated DPM-Solver++(2S)-style (`tcd.tcf.tcf_second_order`):

    u        : lambda_u = lambda_t + r h, r = 1/2 (snapped to the model's sigma table on discrete models)
    x_u      = a_u * D + b_u * eps_hat                             # first-order jump t -> u
    D_u      = model(x_u, sigma_u)
    x_s      = (b_s / b_t) x_t - a_s (e^{-h} - 1) [(1 - 1/(2r')) D + 1/(2r') D_u],  r' = (lambda_u - lambda_t) / h

r' is the actual u's ratio, so snapping keeps the step second order. gamma keeps its meaning (where s lies, how much
is re-noised) and the forward kernel draws the same noise, so each step costs 2 model calls (2 NFE) instead of 1.
Where h is infinite, i.e. the jump starts at pure noise (a_t = 0, a flow model at sigma = 1) or lands on the clean
endpoint (b_s = 0: a flow model's last step or gamma = 1, and every "return x0" last step), the expansion has no
midpoint and the step takes the first-order jump, 1 model call, as k-diffusion's dpmpp_2s_ancestral takes an Euler
step where sigma_down = 0. `sss_model_calls` counts the calls of a run.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .schedule import FlowSchedule
from .tcf import TCF_ORDERS, tcf_first_order, tcf_second_order

try:
    from tqdm.auto import trange
except ImportError:     # tqdm comes with ComfyUI and diffusers; without it the loop simply shows no console bar
    def trange(n, disable=None, **_):
        return range(n)

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
    Never the global RNG: results must not depend on the hardware or on other RNG consumers.
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


def check_tcf_order(tcf_order) -> int:
    if isinstance(tcf_order, bool) or tcf_order not in TCF_ORDERS:
        raise ValueError(f"tcf_order={tcf_order!r} is not one of {TCF_ORDERS}: 1 = the paper's first-order TCF jump "
                         f"(1 model call per step), 2 = second-order DPM-Solver++(2S) jump (2 model calls per step)")
    return int(tcf_order)


def returns_clean(sigma_next: float, final_step: str, schedule_kind: str) -> bool:
    """Whether a step's output is the clean prediction D itself (the last step of a flow model, or final_step="x0")."""
    return sigma_next == 0 and (final_step == "x0" or schedule_kind == "flow")


def step_model_calls(tcf_order: int, a_t: float, b_s: float, clean_output: bool) -> int:
    """Model calls of one SSS step: 2 with the second-order TCF, 1 where h = lambda_s - lambda_t is infinite
    (a_t = 0: pure noise; b_s = 0: the clean endpoint) or the step returns D itself, and 1 with the first-order TCF."""
    return 2 if tcf_order == 2 and not clean_output and a_t > 0 and b_s > 0 else 1


def sss_model_calls(sigmas_or_steps, tcf_order: int = 1, schedule_kind="discrete", gamma: GammaSpec = 0.3,
                    final_step: str = "diffusers") -> int:
    """Model calls (NFE) of one `sample_tcd` run: the sum of `step_model_calls`, the rule the loop itself follows.

    sigmas_or_steps: the SIGMAS of the run, or (discrete schedules only) a step count, meaning a run that ends at
    sigma 0. schedule_kind: "discrete" or "flow", or a schedule object (its `kind`). A discrete schedule's table is
    positive, so its s never reaches b_s = 0 and a_t = 1 always; a flow run's cost depends on its sigmas and gammas.
    """
    tcf_order = check_tcf_order(tcf_order)
    kind = getattr(schedule_kind, "kind", schedule_kind)
    if kind not in ("discrete", "flow"):
        raise ValueError(f"schedule_kind={schedule_kind!r} is not 'discrete' or 'flow' (or a schedule object)")
    if final_step not in FINAL_STEP_MODES:
        raise ValueError(f"final_step={final_step!r} is not one of {FINAL_STEP_MODES}")
    if isinstance(sigmas_or_steps, numbers.Integral):
        if kind == "flow":
            raise ValueError("a flow run's model calls depend on its sigmas (sigma = 1 and sigma_s = 0 steps are "
                             "first order); pass the SIGMAS, not a step count")
        if sigmas_or_steps < 1:
            raise ValueError(f"steps={sigmas_or_steps} must be >= 1")
        sigmas = [1.0] * int(sigmas_or_steps) + [0.0]    # only sigma_next == 0 matters for a discrete run
    else:
        sigmas = torch.as_tensor(sigmas_or_steps, dtype=torch.float32).flatten()
        check_sigmas(sigmas)
        sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    gammas = expand_gamma(gamma, steps)
    total = 0
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if kind == "flow":
            a_t, b_s = FlowSchedule.a(sigma), FlowSchedule.b(FlowSchedule.sigma_s(sigma_next, gammas[i]))
        else:
            a_t, b_s = 1.0, 1.0     # DiscreteSchedule: a = 1, and b_s is a (positive) table sigma
        total += step_model_calls(tcf_order, a_t, b_s, returns_clean(sigma_next, final_step, kind))
    return total


def _scalar(value: float) -> torch.Tensor:
    """A float64 0-dim tensor: tcd.tcf's coefficient functions take tensors; 0-dim ones keep x's dtype and device."""
    return torch.tensor(float(value), dtype=torch.float64)


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma: GammaSpec = 0.3,
               noise_sampler=None, schedule=None, final_step: str = "diffusers", tcf_order: int = 1):
    """Strategic Stochastic Sampling of Trajectory Consistency Distillation (Zheng et al. 2024, Algorithm 4).

    schedule: `DiscreteSchedule` (the model's sigma table) or `FlowSchedule`; gamma: float or one per step;
    final_step: "diffusers" returns diffusers' last latent sqrt(abar_0) * x_s, "x0" the clean D; tcf_order: 1 (the
    paper's SSS, 1 model call per step) or 2 (second-order TCF jumps, 2 calls per step; see the module docstring).
    disable turns off the console progress bar, as in k-diffusion's samplers.
    """
    if schedule is None:
        raise ValueError("sample_tcd needs schedule=DiscreteSchedule(model_sigmas) or FlowSchedule()")
    if final_step not in FINAL_STEP_MODES:
        raise ValueError(f"final_step={final_step!r} is not one of {FINAL_STEP_MODES}")
    tcf_order = check_tcf_order(tcf_order)
    check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    gammas = expand_gamma(gamma, steps)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed") or 0)
    s_in = x.new_ones([x.shape[0]])
    sigma_list = [float(s) for s in sigmas]

    for i in trange(steps, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        clean_output = returns_clean(sigma_next, final_step, schedule.kind)
        if clean_output:
            # the jump to the clean endpoint (b_s = 0) is D itself: the last step of a flow model, or final_step x0
            x = denoised
            continue
        # 1. target time s of the TCF jump (s <= t_next)
        sigma_s = schedule.sigma_s(sigma_next, gammas[i])
        # 2. eps implied by the x0 prediction, then the TCF jump t -> s
        a_t, b_t = schedule.a(sigma), schedule.b(sigma)
        a_s, b_s = schedule.a(sigma_s), schedule.b(sigma_s)
        eps_hat = (x - a_t * denoised) / b_t
        if step_model_calls(tcf_order, a_t, b_s, clean_output) == 2:
            # second order: D at the midpoint u reached by a first-order jump, then the DPM-Solver++(2S) combination
            sigma_u = schedule.sigma_mid(sigma, sigma_s)
            a_u, b_u = schedule.a(sigma_u), schedule.b(sigma_u)
            x_u = tcf_first_order(denoised, eps_hat, a_u, b_u)
            denoised_u = model(x_u, sigmas.new_tensor(sigma_u) * s_in, **extra_args)
            x = tcf_second_order(x, denoised, denoised_u, *map(_scalar, (a_t, b_t, a_u, b_u, a_s, b_s)))
        else:
            # first order: x_s = a_s * D + b_s * eps_hat
            x = tcf_first_order(denoised, eps_hat, a_s, b_s)
        if sigma_next > 0:
            # 3. forward kernel s -> t_next: scale, then add the missing noise
            a_n, b_n = schedule.a(sigma_next), schedule.b(sigma_next)
            x = (a_n / a_s) * x
            sigma_up = math.sqrt(max(b_n ** 2 - (a_n * b_s / a_s) ** 2, 0.0))
            if sigma_up > 0:
                x = x + sigma_up * noise_sampler(sigma, sigma_next)
        else:
            # 4. final step of diffusers' TCD: the VP latent sqrt(abar_s) * x_s, abar_s = 1 / (1 + sigma_s^2)
            x = x / math.sqrt(1.0 + sigma_s ** 2)
    return x
