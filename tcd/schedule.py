"""Noise-schedule tables and TCD timestep selection.

Everything here reproduces diffusers' `TCDScheduler` (0.42.1) exactly, in pure torch/numpy:

* `tcd_timesteps` is `TCDScheduler.set_timesteps` (the "origin" skipping grid, `strength`, the linspace pick);
* `vp_alphas_cumprod` is its `alphas_cumprod` (float32, as diffusers computes it);
* `DiscreteSchedule` is a 1000-entry sigma table with ComfyUI's `timestep(sigma)` rule (nearest log-sigma),
  the sigma-space view a ComfyUI EPS / V / X0 model lives in (sigma_t = sqrt((1 - abar_t) / abar_t)).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

DENOISE_MODES = ("comfyui", "diffusers_strength", "diffusers_pipeline")
MIDPOINT_RATIO = 0.5    # r of DPM-Solver++(2S): u halfway between t and s in lambda


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """abar_t of a VP diffusion, computed in float32 as diffusers' schedulers do."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def origin_grid(original_steps: int = 50, strength: float = 1.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """The skipping grid TCD picks its timesteps from (ascending).

    diffusers: k = T // original_steps, origin = [1 .. int(original_steps * strength)] * k - 1, i.e. {19, 39, ..., 999}
    for the default 50 steps. original_steps = T gives every timestep [0 .. int(T * strength) - 1], which is also what
    diffusers does whenever `original_inference_steps` is passed explicitly (a diffusers quirk: 999/749/499/249).
    """
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps={original_steps} is outside 1..{num_train_timesteps}; "
                         f"use 50 (TCD/LCM default grid) or {num_train_timesteps} (every timestep)")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    skip = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * skip - 1


def tcd_timesteps(steps: int, original_steps: int = 50, strength: float = 1.0,
                  num_train_timesteps: int = 1000) -> list[int]:
    """Descending TCD timesteps, identical to `TCDScheduler.set_timesteps(steps, strength=strength)`.

    steps=4 -> [999, 759, 499, 259]; with original_steps=1000 -> [999, 749, 499, 249].
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    origin = origin_grid(original_steps, strength, num_train_timesteps)
    if steps > original_steps:
        raise ValueError(f"steps={steps} exceeds original_steps={original_steps}: TCD picks its timesteps from a "
                         f"{original_steps}-step grid; lower steps or raise original_steps (e.g. 1000)")
    if len(origin) // steps < 1:
        raise ValueError(f"steps={steps} needs at least {steps} grid points but strength={strength} leaves "
                         f"{len(origin)} of the {original_steps}-step grid; raise strength or lower steps")
    origin = origin[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[picks]]


def tcd_timesteps_denoised(steps: int, denoise: float = 1.0, mode: str = "comfyui", original_steps: int = 50,
                           num_train_timesteps: int = 1000) -> list[int]:
    """TCD timesteps for partial denoising (img2img / inpaint), in one of three semantics (the README's
    "denoise" paragraph):

    * ``comfyui``: KSampler's rule, a schedule of int(steps / denoise) steps of which the last `steps` run.
    * ``diffusers_strength``: `TCDScheduler.set_timesteps(steps, strength=denoise)`; the grid itself is cut
      (what diffusers' LCM img2img pipeline does); `steps` steps run.
    * ``diffusers_pipeline``: the SD/SDXL img2img pipelines' `get_timesteps`: the full `steps` schedule is cut to
      its last min(int(steps * denoise), steps) entries, so fewer steps run.
    """
    if not 0.0 < denoise <= 1.0 or math.isnan(denoise):
        raise ValueError(f"denoise={denoise} must be in (0, 1]; 1 is text-to-image, lower keeps more of the input")
    if mode == "comfyui":
        total = int(steps / denoise)
        if total > original_steps and denoise < 1.0:
            raise ValueError(f"steps={steps} at denoise={denoise} needs a {total}-step schedule, more than "
                             f"original_steps={original_steps}; raise denoise, lower steps, or use "
                             f"original_steps=1000 or denoise_mode='diffusers_strength'")
        return tcd_timesteps(total, original_steps, 1.0, num_train_timesteps)[-steps:]
    if mode == "diffusers_strength":
        return tcd_timesteps(steps, original_steps, denoise, num_train_timesteps)
    if mode == "diffusers_pipeline":
        full = tcd_timesteps(steps, original_steps, 1.0, num_train_timesteps)
        keep = min(int(steps * denoise), steps)
        if keep < 1:
            raise ValueError(f"denoise={denoise} with steps={steps} keeps int({steps}*{denoise}) = 0 steps "
                             f"(diffusers_pipeline semantics); raise denoise or steps")
        return full[steps - keep:]
    raise ValueError(f"denoise mode {mode!r} is not one of {DENOISE_MODES}")


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """abar_t = 1 / (1 + sigma_t^2): the VP schedule behind a ComfyUI sigma table (the inverse of
    sigma_t = sqrt((1 - abar_t) / abar_t))."""
    return 1.0 / (1.0 + sigmas ** 2)


def vp_to_ve_scale(sigma: torch.Tensor) -> torch.Tensor:
    """x_VE / x_VP = sqrt(1 + sigma^2): a VP latent x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, divided by sqrt(abar),
    is the VE latent x0 + sigma eps that ComfyUI's EPS / V models take (their calculate_input divides it back)."""
    return (1 + sigma ** 2).sqrt()


def sigmas_at_timesteps(table: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """SIGMAS for a sampler: entries `timesteps` of a model's ascending sigma table, then a final 0.

    Using the model's own table (not interpolation) lets ComfyUI's `timestep(sigma)` recover each integer t exactly.
    """
    for t in timesteps:
        if not 0 <= int(t) < table.numel():
            raise ValueError(f"timestep {t} is outside the model's table 0..{table.numel() - 1}")
    return torch.tensor([float(table[int(t)]) for t in timesteps] + [0.0], dtype=torch.float32)


class DiscreteSchedule:
    """A discrete VP noise schedule seen in sigma (VE) space: sigma_t = sqrt((1 - abar_t) / abar_t).

    `timestep` is ComfyUI's ModelSamplingDiscrete.timestep (nearest table entry in log-sigma), so a schedule built
    from a model's own `sigmas` table maps every on-grid sigma back to its integer timestep exactly.
    """

    kind = "discrete"

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if sigmas.numel() < 2 or not torch.all(sigmas[1:] >= sigmas[:-1]) or not torch.all(sigmas > 0):
            raise ValueError("a discrete schedule needs an ascending table of positive sigmas")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "DiscreteSchedule":
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(((1 - abar) / abar).sqrt().float())

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.numel()

    def timestep(self, sigma: float) -> int:
        """Nearest integer timestep of `sigma` (0 for sigma == 0, where log would be -inf)."""
        if sigma <= 0:
            return 0
        return int(torch.argmin((math.log(sigma) - self.log_sigmas).abs()))

    def sigma_at(self, t: int) -> float:
        return float(self.sigmas[int(t)])

    def sigmas_for(self, timesteps: Sequence[int]) -> torch.Tensor:
        return sigmas_at_timesteps(self.sigmas, timesteps)

    # x = a(sigma) * x0 + b(sigma) * eps in the sampler's space: VE for discrete VP models (docs/flow_models.md).
    @staticmethod
    def a(sigma: float) -> float:
        return 1.0

    @staticmethod
    def b(sigma: float) -> float:
        return sigma

    def sigma_s(self, sigma_next: float, gamma: float) -> float:
        """sigma of the SSS target time s = floor((1 - gamma) * t_next) (paper's Algorithm 4, diffusers' step).

        The product is taken on an int64 tensor times a Python float, i.e. in float32, exactly like diffusers
        (`torch.floor((1 - eta) * prev_timestep).long()`): float64 disagrees for some (t, gamma) pairs, e.g. (500, 0.07).
        The result never exceeds sigma_next, so snapped off-grid sigmas (karras, sgm_uniform) never add noise
        "backwards".
        """
        t_next = torch.tensor(self.timestep(sigma_next), dtype=torch.int64)
        t_s = int(torch.floor((1 - gamma) * t_next).long())
        return min(self.sigma_at(t_s), sigma_next) if sigma_next > 0 else self.sigma_at(t_s)

    def sigma_mid(self, sigma_t: float, sigma_s: float, r: float = MIDPOINT_RATIO) -> float:
        """sigma of the second-order TCF's intermediate point u, lambda_u = lambda_t + r (lambda_s - lambda_t),
        snapped to the table (a discrete model only saw its table's noise levels in training).

        Here a = 1 and b = sigma, so lambda = log(a / b) = -log(sigma) and "nearest in lambda" is ComfyUI's own
        nearest-log-sigma rule. u is the entry nearest to lambda_u among those in [sigma_s, sigma_t): strictly below
        t (u = t would make r = 0), and for r = 1/2 strictly above s whenever an entry lies between s and t (one is
        always nearer to the midpoint than s). With none between them (adjacent timesteps) u = s, i.e. r = 1: the
        exponential-Heun form of DPM-Solver-2, still second order. On grid points this is exactly
        `tcd.tcf.midpoint_timesteps`, the midpoint the trainer's second-order TCF uses. An empty jump
        (sigma_s >= sigma_t) gives sigma_t.
        """
        _check_midpoint_args(sigma_t, sigma_s, r)
        if sigma_s >= sigma_t:
            return float(sigma_t)
        log_u = (1.0 - r) * math.log(sigma_t) + r * math.log(sigma_s)
        candidates = self.sigmas[(self.sigmas >= sigma_s) & (self.sigmas < sigma_t)]
        if candidates.numel() == 0:
            return float(sigma_s)
        return float(candidates[torch.argmin((candidates.double().log() - log_u).abs())])


def time_shift(shift: float, t: float) -> float:
    """sigma = shift t / (1 + (shift - 1) t): SD3's timestep shift (ComfyUI's time_snr_shift, diffusers'
    FlowMatchEulerDiscreteScheduler with `shift`); t in [0, 1] is the unshifted time."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flux_time_shift(mu: float, t: float) -> float:
    """sigma = e^mu / (e^mu + 1/t - 1): Flux's resolution-dependent shift (ComfyUI's flux_time_shift with exponent 1,
    diffusers' `use_dynamic_shifting` with the exponential shift); t in [0, 1]."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


class FlowSchedule:
    """Rectified-flow / CONST models (SD3, Flux): x = (1 - sigma) * x0 + sigma * eps, sigma in [0, 1].

    The target time is taken in the model's own time, which is the shifted sigma the network is conditioned on:
    sigma_s = (1 - gamma) * sigma_next, the flow form of diffusers' s = floor((1 - gamma) * t_next), never through
    ComfyUI's timestep/sigma round trip (not an identity when shift != 1). gamma 0 is then the flow Euler step,
    gamma 1 LCM's step (docs/flow_models.md).
    """

    kind = "flow"

    @staticmethod
    def a(sigma: float) -> float:
        return 1.0 - sigma

    @staticmethod
    def b(sigma: float) -> float:
        return sigma

    @staticmethod
    def sigma_s(sigma_next: float, gamma: float) -> float:
        return (1.0 - gamma) * sigma_next

    @staticmethod
    def half_log_snr(sigma: float) -> float:
        """lambda = log(a / b) = log((1 - sigma) / sigma), finite for 0 < sigma < 1."""
        return math.log((1.0 - sigma) / sigma)

    @staticmethod
    def sigma_mid(sigma_t: float, sigma_s: float, r: float = MIDPOINT_RATIO) -> float:
        """sigma of the second-order TCF's intermediate point u: lambda_u = lambda_t + r (lambda_s - lambda_t) exactly
        (flow models take continuous time, so no snapping): sigma_u = 1 / (1 + e^{lambda_u}).

        Needs a finite h: 0 < sigma_s and sigma_t < 1 (pure noise, a_t = 0, and the clean endpoint, b_s = 0, sit at
        lambda = -inf and +inf). An empty jump (sigma_s >= sigma_t) gives sigma_t.
        """
        _check_midpoint_args(sigma_t, sigma_s, r)
        if sigma_t >= 1.0:
            raise ValueError(f"sigma_t={sigma_t} is pure noise (a_t = 0, lambda_t = -inf): the second-order TCF has no "
                             f"midpoint there; take a first-order jump from sigma = 1")
        if sigma_s >= sigma_t:
            return float(sigma_t)
        lam_t = FlowSchedule.half_log_snr(sigma_t)
        lam_u = lam_t + r * (FlowSchedule.half_log_snr(sigma_s) - lam_t)
        return 1.0 / (1.0 + math.exp(lam_u))


def _check_midpoint_args(sigma_t: float, sigma_s: float, r: float) -> None:
    if not 0.0 < r <= 1.0:
        raise ValueError(f"midpoint ratio r={r} must be in (0, 1]; 0.5 is DPM-Solver++(2S)'s midpoint")
    if not sigma_s > 0:
        raise ValueError(f"sigma_s={sigma_s} is the clean endpoint (b_s = 0, lambda_s = +inf): the second-order TCF "
                         f"has no midpoint there; take a first-order jump to sigma = 0")
