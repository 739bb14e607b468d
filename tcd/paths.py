"""The two probability paths TCD distils on, x = a(t) * x0 + b(t) * eps, in one interface.

* `VPPath`: a discrete VP diffusion (SD1.x / SD2.x / SDXL), a = sqrt(abar_t), b = sqrt(1 - abar_t) at integer
  timesteps t; the model's time is the integer t.
* `FlowPath`: rectified flow (SD3, Flux), a = 1 - sigma, b = sigma; the model's time is sigma itself, a float in
  [0, 1], already shifted the way the model was trained (SD3's shift 3, Flux's resolution-dependent mu).

The TCF (tcd.tcf) and the distillation objectives (tcd.losses) only ever ask a path for a(t), b(t), the half
log-SNR lambda = log(a / b) and the second-order midpoint, so one implementation serves both (TCD paper §3 writes the
exponential integrator for any x_t = alpha_t x0 + sigma_t eps; the flow path is such a path with alpha = 1 - sigma).

The skipping grid. Consistency distillation draws t_{n+k} on a grid of `original_steps` + 1 points and lets the
teacher jump one grid cell down (diffusers' DDIMSolver with k = T // original_steps for VP):
    VP:   grid[i] = max(k i - 1, 0)                     i = 0..N   ({0, 19, 39, ..., 999} for T 1000, N 50)
    flow: grid[i] = sigma_of_time(i / N)                 i = 0..N   (grid[0] = 0 is the clean end, grid[N] = 1 noise)
i.e. for a flow model the grid is uniform in the model's own unshifted time and passes through its shift, as its
sampler's schedule does (ComfyUI's percent_to_sigma, diffusers' FlowMatchEulerDiscreteScheduler).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .schedule import time_shift, flux_time_shift


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample coefficient broadcasts against an ndim-D batch."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


class VPPath:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on the integer timesteps of an abar table."""

    kind = "vp"

    def __init__(self, alphas_cumprod):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32).flatten()
        if abar.numel() < 2 or not torch.all((abar > 0) & (abar < 1)):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1) (e.g. "
                             "tcd.schedule.vp_alphas_cumprod()); a zero-terminal-SNR schedule needs abar_T clamped "
                             "above 0")
        self.alphas_cumprod = abar
        self.num_train_timesteps = abar.numel()

    def check_original_steps(self, original_steps: int) -> None:
        if not 1 <= int(original_steps) <= self.num_train_timesteps:
            raise ValueError(f"original_steps={original_steps} must be in 1..{self.num_train_timesteps}; 50 is TCD's "
                             f"/ LCM's skipping grid (k = {self.num_train_timesteps // 50})")

    def grid(self, original_steps: int) -> torch.Tensor:
        """Model times of the skipping grid, ascending: max(k i - 1, 0), i = 0..N (int64)."""
        self.check_original_steps(original_steps)
        k = self.num_train_timesteps // int(original_steps)
        return (torch.arange(int(original_steps) + 1, dtype=torch.int64) * k - 1).clamp(min=0)

    def coefficients(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timesteps t [B], shaped [B, 1, ...]."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return _per_sample(abar.sqrt(), ndim), _per_sample((1 - abar).sqrt(), ndim)

    def midpoint(self, t: torch.Tensor, s: torch.Tensor, r: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, second_order): the integer timestep nearest (in lambda) to lambda_t + r (lambda_s - lambda_t)
        (tcd.tcf.midpoint_timesteps: a discrete model only saw integer t), and a mask of the rows where the
        second-order formula applies. On a VP table lambda is finite everywhere, so every row qualifies."""
        from .tcf import midpoint_timesteps
        return midpoint_timesteps(self.alphas_cumprod, t, s, r), torch.ones_like(t, dtype=torch.bool)


class FlowPath:
    """x_sigma = (1 - sigma) x0 + sigma eps; the model's time is sigma (float32), sigma = sigma_of_time(t).

    sigma_of_time maps the unshifted time t in [0, 1] to the model's sigma (identity for shift 1). Build it with
    `FlowPath.shifted(shift)` (SD3: time_snr_shift, diffusers' FlowMatchEulerDiscreteScheduler `shift`) or
    `FlowPath.flux(mu)` (Flux's resolution-dependent exp(mu) shift), or from a host's own function.
    """

    kind = "flow"

    def __init__(self, sigma_of_time: Callable[[float], float] = lambda t: t, name: str = "shift 1"):
        self.sigma_of_time = sigma_of_time
        self.name = name

    @classmethod
    def shifted(cls, shift: float = 1.0) -> "FlowPath":
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift={shift!r} must be a positive number (SD3: 3.0; 1.0 = no shift)")
        return cls(lambda t: time_shift(float(shift), t), f"shift {shift:g}")

    @classmethod
    def flux(cls, mu: float) -> "FlowPath":
        if not (isinstance(mu, (int, float)) and math.isfinite(mu)):
            raise ValueError(f"mu={mu!r} must be a finite number (Flux: 0.5 at 256 tokens .. 1.15 at 4096)")
        return cls(lambda t: flux_time_shift(float(mu), t), f"flux mu {mu:g}")

    @staticmethod
    def check_original_steps(original_steps: int) -> None:
        if not 1 <= int(original_steps) <= 1000:
            raise ValueError(f"original_steps={original_steps} must be in 1..1000; 50 is TCD's / LCM's skipping grid")

    def grid(self, original_steps: int) -> torch.Tensor:
        """Model times (sigmas) of the skipping grid, ascending, float32: sigma_of_time(i / N), i = 0..N, with the
        ends exactly 0 (clean) and 1 (pure noise)."""
        self.check_original_steps(original_steps)
        n = int(original_steps)
        inner = [float(self.sigma_of_time(i / n)) for i in range(1, n)]
        values = torch.tensor([0.0, *inner, 1.0], dtype=torch.float32)
        if not torch.all(values[1:] > values[:-1]):
            raise ValueError(f"the flow path's sigma_of_time ({self.name}) is not increasing on [0, 1]")
        return values

    @staticmethod
    def coefficients(sigma: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) = (1 - sigma, sigma), shaped [B, 1, ...]."""
        sigma = sigma.float()
        return _per_sample(1.0 - sigma, ndim), _per_sample(sigma, ndim)

    @staticmethod
    def midpoint(t: torch.Tensor, s: torch.Tensor, r: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, second_order): sigma_u with lambda_u = lambda_t + r (lambda_s - lambda_t) exactly (continuous time,
        tcd.schedule.FlowSchedule.sigma_mid), and the mask of rows where it exists. Rows starting at pure noise
        (sigma_t = 1, lambda_t = -inf), landing on the clean end (sigma_s = 0, lambda_s = +inf) or with s = t have
        no finite midpoint: there u = t and the TCF takes the first-order jump, as the sampler does."""
        if not 0.0 < r <= 1.0:
            raise ValueError(f"midpoint ratio r={r} must be in (0, 1]; 0.5 is DPM-Solver++(2S)'s midpoint")
        t64, s64 = t.double(), s.double()
        ok = (t64 < 1.0) & (s64 > 0.0) & (s64 < t64)
        safe_t = torch.where(ok, t64, torch.full_like(t64, 0.5))
        safe_s = torch.where(ok, s64, torch.full_like(s64, 0.25))
        lam_t = torch.log1p(-safe_t) - torch.log(safe_t)
        lam_s = torch.log1p(-safe_s) - torch.log(safe_s)
        u = torch.sigmoid(-(lam_t + r * (lam_s - lam_t)))          # sigma = 1 / (1 + e^lambda)
        return torch.where(ok, u, t64).to(t.dtype), ok


Path = VPPath | FlowPath


def as_path(path_or_alphas_cumprod) -> Path:
    """A path object from a path or an abar table (the VP form every earlier caller passes)."""
    if isinstance(path_or_alphas_cumprod, (VPPath, FlowPath)):
        return path_or_alphas_cumprod
    return VPPath(path_or_alphas_cumprod)
