"""Consistency-distillation objectives: TCD (arXiv 2402.19159) and LCM (arXiv 2310.04378) as the baseline.

One small class per objective, the papers' hyper-parameters as constructor defaults (NVlabs/edm style). Both
work on a path x_t = a(t) x0 + b(t) eps (tcd.paths): VP (SD1.x / SDXL; times are int64 timesteps, a = sqrt(abar_t))
or rectified flow (SD3 / Flux; times are float sigmas, a = 1 - sigma, b = sigma); an abar table stands for its VP
path. Both take three callables returning the raw model output (per `prediction_type`) for latents x_t on the path
and model times t of shape [B]:

    student(x_t, t, cond)   trainable (base + LoRA), gradients flow through it
    target(x_t, t, cond)    theta^- (EMA of the LoRA, or the online LoRA); called under no_grad
    teacher(x_t, t, cond)   the frozen base model; called under no_grad

With guidance="embedded" (a guidance-distilled teacher, Flux-dev class: the guidance scale is a model input, not a
second pass) all three are called model(x_t, t, cond, w) with the drawn scales w [B], and there is no uncond.

One training iteration (TCD paper §3; diffusers'
`train_lcm_distill_lora_*.py` with the TCD changes):

    1. n on the path's skipping grid g[0..N] (tcd.paths): t_{n+k} = g[j + 1], j ~ U{0..N-1}; t_n = g[j]
       (VP: g[i] = max(k i - 1, 0), k = T // N, i.e. t_{n+k} = k (j + 1) - 1, t_n = max(t_{n+k} - k, 0);
        flow: g[i] = the model's shifted sigma at time i / N)
    2. TCD: target time s ~ rho * delta_0 + (1 - rho) * U{g[0], ..., g[j]} (the grid points <= t_n);
       rho = 0 is the paper (s = g[m], m ~ U{0..j});  LCM: s = 0 (VP: timestep 0; flow: sigma 0, the clean end)
    3. x_{t_{n+k}} = a x0 + b z                                                           (forward noising)
    4. teacher: one DDIM step t_{n+k} -> t_n, x_n = a_n x0 + b_n eps, with CFG x0 = x0_c + w (x0_c - x0_u) (and eps
       alike), w ~ U[w_min, w_max]; on a flow path this is exactly the guided Euler step of the flow ODE
       (x + (sigma_n - sigma_{n+k}) v, v = eps - x0). Embedded guidance: one pass with w as the model's input.
    5. target = f_{theta^-}(x_hat_{t_n}, t_n, s)  under no_grad
    6. pred   = f_theta(x_{t_{n+k}}, t_{n+k}, s)
    7. loss   = mean d(pred, target), d one of DISTANCES:
         "huber"         elementwise pseudo-Huber sqrt((a - b)^2 + c^2) - c, c = 0.001 (diffusers' LCM scripts)
         "l2"            elementwise squared error (the LCM paper's L2)
         "huber_sample"  per-sample pseudo-Huber sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d), d = elements per
                         sample (Song & Dhariwal 2023, "Improved techniques for training consistency models", §3.3)

All randomness comes from `generator` (a CPU torch.Generator; draws are moved to x0's device), so a trainer that
checkpoints the generator state resumes the exact same sequence of draws. `generator` may also be a list with one
generator per sample: each sample then takes its draws from its own stream, so a global batch split over any number
of processes or accumulation steps draws exactly the same values.

Recipes (`RECIPES`): "paper" is the TCD paper's objective (rho = 0, elementwise pseudo-Huber); "recommended" is the
setting the toy benchmark (benchmarks/paper_toy, docs/recipe.md) measured best against LCM over 2-16 steps: rho 0.5
had the best mean rank; it beats LCM from 8 steps and still loses at 2 (docs/recipe.md has the intervals).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .paths import as_path
from .tcf import (PATH_PREDICTION_TYPES, PREDICTION_TYPES, TCF_ORDERS, trajectory_consistency_function,
                  x0_eps_from_output, x0_fn_from_model)

DISTANCES = ("huber", "l2", "huber_sample")
GUIDANCE_MODES = ("cfg", "embedded")       # two teacher passes (SD1.x-SD3), or w as a model input (Flux-dev)
LOSS_TYPES = DISTANCES                     # the name the node and the CLI use for the distance
ICT_HUBER_C_PER_SQRT_DIM = 0.00054         # iCT: c = 0.00054 sqrt(d)
RECIPES = {
    # Zheng et al. 2024 as far as published: s uniform on the grid below t_n, diffusers' pseudo-Huber (c = 0.001).
    "paper": dict(rho=0.0, loss="huber", tcf_order=1),
    # Chosen by measurement on the selection draw (docs/recipe.md, benchmarks/results/paper_toy/summary.md): mean
    # rank over datasets x NFE 2-16 of rho 0.5: 11, rho 0.25 and 0.75: 13, rho 0: 15, second-order TCF: 28.
    "recommended": dict(rho=0.5, loss="huber", tcf_order=1),
}
Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def _check_common(path, original_steps, w_min, w_max, loss, huber_c, prediction_type, guidance):
    path = as_path(path)
    path.check_original_steps(original_steps)
    if not 0.0 <= w_min <= w_max:
        raise ValueError(f"guidance range w_min={w_min}, w_max={w_max} must satisfy 0 <= w_min <= w_max "
                         f"(the paper's LCM/TCD scripts use [3, 15]; 0 disables classifier-free guidance)")
    if loss not in DISTANCES:
        raise ValueError(f"loss={loss!r} is not one of {DISTANCES} (elementwise pseudo-Huber, squared error, "
                         f"per-sample pseudo-Huber of iCT)")
    if loss == "huber" and not huber_c > 0:
        raise ValueError(f"huber_c={huber_c} must be > 0 (diffusers' default 0.001)")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    if prediction_type not in PATH_PREDICTION_TYPES[path.kind]:
        raise ValueError(f"prediction_type={prediction_type!r} does not apply to a {path.kind} model; use one of "
                         f"{PATH_PREDICTION_TYPES[path.kind]}")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance={guidance!r} is not one of {GUIDANCE_MODES}: 'cfg' guides the teacher with a "
                         f"second, unconditional pass; 'embedded' passes w to a guidance-distilled model (Flux-dev)")
    return path


def distance(pred: torch.Tensor, target: torch.Tensor, loss: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Batch mean of d(pred, target) for d in DISTANCES (module docstring, step 7).

    "huber" / "l2" average over every element (diffusers' LCM scripts); "huber_sample" takes the pseudo-Huber of each
    sample's whole difference vector with iCT's c = 0.00054 sqrt(d) (huber_c is not used) and averages over samples.
    """
    diff = pred.float() - target.float()
    if loss == "l2":
        return diff.pow(2).mean()
    if loss == "huber_sample":
        per_sample = diff.reshape(diff.shape[0], -1)
        c = ICT_HUBER_C_PER_SQRT_DIM * per_sample.shape[1] ** 0.5
        return (torch.sqrt(per_sample.pow(2).sum(dim=1) + c * c) - c).mean()
    if loss != "huber":
        raise ValueError(f"loss={loss!r} is not one of {DISTANCES}")
    return (torch.sqrt(diff.pow(2) + huber_c ** 2) - huber_c).mean()


def _check_rho(rho) -> float:
    if not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho={rho!r} must be in [0, 1]: the probability that the target time s is 0 (0 = the TCD "
                         f"paper's uniform s on the grid below t_n; 1 = always s = 0, LCM's jump)")
    return float(rho)


class _ConsistencyDistillation:
    """Shared parts: the skipping grid, forward noising, and the teacher's guided DDIM step."""

    rho = 0.0   # LCM's draws include the s = 0 coin too (unused), so both objectives consume the same values

    def __init__(self, path, original_steps, w_min, w_max, loss, huber_c, prediction_type, guidance="cfg"):
        self.path = _check_common(path, original_steps, w_min, w_max, loss, huber_c, prediction_type, guidance)
        self.original_steps = int(original_steps)
        self.grid = self.path.grid(self.original_steps)       # model times g[0..N], ascending
        if self.path.kind == "vp":
            self.alphas_cumprod = self.path.alphas_cumprod
            self.num_train_timesteps = self.path.num_train_timesteps
            self.skip = self.num_train_timesteps // self.original_steps      # k: the teacher's one-step jump
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.loss, self.huber_c = loss, float(huber_c)
        self.prediction_type = prediction_type
        self.guidance = guidance
        self.last_stats: dict = {}

    # 1. n on the skipping grid (VP: {k-1, 2k-1, ..., T-1}, diffusers' DDIMSolver grid)
    def sample_grid_index(self, batch: int, generator) -> torch.Tensor:
        return torch.randint(0, self.original_steps, (batch,), generator=generator, dtype=torch.int64)

    def grid_timestep(self, index: torch.Tensor) -> torch.Tensor:
        """t_{n+k} of grid index j: g[j + 1] (VP: (j + 1) k - 1)."""
        return self.grid[index + 1]

    def _call(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond, w=None) -> torch.Tensor:
        """model(x, t, cond), or model(x, t, cond, w) for an embedded-guidance model."""
        if self.guidance == "embedded":
            return model(x, t, cond, w.to(x.device))
        return model(x, t, cond)

    def guidance_scale(self, batch: int, generator) -> torch.Tensor:
        u = torch.rand((batch,), generator=generator, dtype=torch.float32)
        return self.w_min + (self.w_max - self.w_min) * u

    def _x0_eps(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond, w=None):
        alpha, sigma = self.path.coefficients(t, x.ndim)
        return x0_eps_from_output(self._call(model, x, t, cond, w).float(), x.float(), alpha, sigma,
                                  self.prediction_type)

    @torch.no_grad()
    def teacher_step(self, teacher: Model, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, cond,
                     uncond, w: torch.Tensor) -> torch.Tensor:
        """x_hat_{t_n}: one DDIM step of the guided teacher, x0 = x0_c + w (x0_c - x0_u), eps likewise (diffusers);
        with embedded guidance one pass of the teacher given w."""
        if self.guidance == "embedded":
            if uncond is not None:
                raise ValueError("a guidance-distilled teacher (guidance='embedded', Flux-dev class) takes the "
                                 "guidance scale as an input and needs no unconditional pass; give no negative "
                                 "conditioning, or use guidance='cfg' with a model trained for classifier-free "
                                 "guidance")
            x0, eps = self._x0_eps(teacher, x, t_start, cond, w)
        else:
            x0, eps = self._x0_eps(teacher, x, t_start, cond)
            if uncond is not None and bool((w != 0).any()):
                x0_u, eps_u = self._x0_eps(teacher, x, t_start, uncond)
                w = w.to(x0.device).reshape(-1, *([1] * (x.ndim - 1)))
                x0 = x0 + w * (x0 - x0_u)
                eps = eps + w * (eps - eps_u)
        alpha_n, sigma_n = self.path.coefficients(t_end, x.ndim)
        return alpha_n * x0 + sigma_n * eps

    def draw(self, x0: torch.Tensor, generator):
        """Timesteps, target-time indices, noise and guidance scales of one iteration, drawn in a fixed order.

        `generator`: one CPU generator for the batch, or a list with one generator per sample (each sample then
        draws from its own stream, independently of how a global batch is split over processes).
        Returns (index, end_index, noise, w); end_index is 0 (s = 0) with probability rho.
        """
        if isinstance(generator, (list, tuple)):
            if len(generator) != x0.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {x0.shape[0]}: give one per sample, or "
                                 f"a single torch.Generator")
            parts = [self._draw_batch(x0.shape[1:], 1, g) for g in generator]
            return tuple(torch.cat(p) for p in zip(*parts))
        return self._draw_batch(x0.shape[1:], x0.shape[0], generator)

    def _draw_batch(self, sample_shape, batch: int, generator):
        index = self.sample_grid_index(batch, generator)
        end_index = (torch.rand((batch,), generator=generator, dtype=torch.float64) * (index + 1)).long()
        noise = torch.randn((batch, *sample_shape), generator=generator, dtype=torch.float32)
        w = self.guidance_scale(batch, generator)
        # The s = 0 coin is drawn for every objective, so TCD at any rho and LCM consume the generator identically
        # (paired comparisons see the same t, noise and w).
        at_zero = torch.rand((batch,), generator=generator, dtype=torch.float64) < self.rho
        return index, torch.where(at_zero, torch.zeros_like(end_index), end_index), noise, w

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.path.coefficients(t, x0.ndim)
        return alpha * x0.float() + sigma * noise

    def teacher_pair(self, teacher: Model, x0: torch.Tensor, cond, uncond, generator):
        """One iteration's draws and the two points both objectives compare from.

        t_{n+k} on the grid and t_n one cell below; x_{t_{n+k}} by forward noising; x_{t_n} by one guided DDIM
        step of the teacher. Returns (end_index, w, t_{n+k}, t_n, x_{t_{n+k}}, teacher's x_{t_n}).
        """
        index, end_index, noise, w = self.draw(x0, generator)
        t_start = self.grid[index + 1].to(x0.device)
        t_end = self.grid[index].to(x0.device)
        x_start = self.noised(x0, t_start, noise.to(x0.device))
        x_prev = self.teacher_step(teacher, x_start, t_start, t_end, cond, uncond, w)
        return end_index, w, t_start, t_end, x_start, x_prev


class TCDLoss(_ConsistencyDistillation):
    """Trajectory consistency distillation (TCD paper §3): student and target TCFs meet at a random s <= t_n.

    rho: probability that s = 0 (the rest uniform on the grid points <= t_n). The student never sees s, so its one
    x0 prediction serves every s: rho > 0 weights the long jumps that few-step sampling makes (docs/recipe.md).
    """

    def __init__(self, path, original_steps: int = 50, w_min: float = 3.0, w_max: float = 15.0,
                 loss: str = "huber", huber_c: float = 0.001, tcf_order: int = 1, prediction_type: str = "epsilon",
                 rho: float = 0.0, guidance: str = "cfg"):
        super().__init__(path, original_steps, w_min, w_max, loss, huber_c, prediction_type, guidance)
        self.rho = _check_rho(rho)
        if tcf_order not in TCF_ORDERS:
            raise ValueError(f"tcf_order={tcf_order!r} is not one of {TCF_ORDERS} (1 = DDIM form, "
                             f"2 = DPM-Solver++(2S) midpoint)")
        self.tcf_order = int(tcf_order)

    def __call__(self, student: Model, target: Model, teacher: Model, x0: torch.Tensor, cond,
                 uncond=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # 1-4. t_{n+k}, t_n, x_{t_{n+k}} and the teacher's x_{t_n} (shared with LCM)
        end_index, w, t_start, t_end, x_start, x_prev = self.teacher_pair(teacher, x0, cond, uncond, generator)
        # s on the grid at or below t_n (rootonchair's TCD trainer; VP: max(k m - 1, 0))
        s = self.grid[end_index].to(x0.device)
        path = self.path
        w_in = w.to(x0.device) if self.guidance == "embedded" else None
        # 5. target TCF under no_grad from the teacher's point
        with torch.no_grad():
            target_fn = x0_fn_from_model(_float_out(target), cond, path, self.prediction_type, w_in)
            tgt = trajectory_consistency_function(target_fn, x_prev, t_end, s, path, self.tcf_order)
        # 6. student TCF from the noised point
        student_fn = x0_fn_from_model(_float_out(student), cond, path, self.prediction_type, w_in)
        pred = trajectory_consistency_function(student_fn, x_start, t_start, s, path, self.tcf_order)
        # 7. distance
        value = distance(pred, tgt, self.loss, self.huber_c)
        # Tensors, not lists: reading them (a device sync) is left to whoever looks.
        self.last_stats = {"t": t_start.detach(), "t_n": t_end.detach(), "s": s.detach(), "w": w,
                           "loss": value.detach()}
        return value


class LCMLoss(_ConsistencyDistillation):
    """Latent consistency distillation baseline: s = 0 with LCM's boundary condition c_skip / c_out.

    VP: f(x, t) = c_skip(t) x + c_out(t) x0_hat, c_skip = sd^2 / ((t * scaling)^2 + sd^2), c_out = t * scaling /
    sqrt((t * scaling)^2 + sd^2), sd = sigma_data = 0.5, scaling = 10 (diffusers' LCM-LoRA scripts).
    Flow: f(x, sigma) = x0_hat = x - sigma v, the jump to sigma = 0; the velocity parametrisation already gives the
    boundary condition f(x, 0) = x, so no c_skip / c_out is needed (c_skip 0, c_out 1).
    """

    def __init__(self, path, original_steps: int = 50, w_min: float = 3.0, w_max: float = 15.0,
                 loss: str = "huber", huber_c: float = 0.001, prediction_type: str = "epsilon",
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5, guidance: str = "cfg"):
        super().__init__(path, original_steps, w_min, w_max, loss, huber_c, prediction_type, guidance)
        self.timestep_scaling, self.sigma_data = float(timestep_scaling), float(sigma_data)

    def boundary_scalings(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """c_skip, c_out of diffusers' `scalings_for_boundary_conditions` at timestep t ([B] -> [B, 1, ...])."""
        scaled = t.double() * self.timestep_scaling
        c_skip = self.sigma_data ** 2 / (scaled ** 2 + self.sigma_data ** 2)
        c_out = scaled / (scaled ** 2 + self.sigma_data ** 2).sqrt()
        shape = (-1, *([1] * (ndim - 1)))
        return c_skip.float().reshape(shape), c_out.float().reshape(shape)

    def consistency_function(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond, w=None) -> torch.Tensor:
        x0, _ = self._x0_eps(model, x, t, cond, w)
        if self.path.kind == "flow":
            return x0
        c_skip, c_out = self.boundary_scalings(t, x.ndim)
        return c_skip * x.float() + c_out * x0

    def __call__(self, student: Model, target: Model, teacher: Model, x0: torch.Tensor, cond,
                 uncond=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Same draws as TCDLoss (end_index unused), so both objectives see the same t, noise and w for one seed.
        _, w, t_start, t_end, x_start, x_prev = self.teacher_pair(teacher, x0, cond, uncond, generator)
        with torch.no_grad():
            tgt = self.consistency_function(target, x_prev, t_end, cond, w)
        pred = self.consistency_function(student, x_start, t_start, cond, w)
        value = distance(pred, tgt, self.loss, self.huber_c)
        self.last_stats = {"t": t_start.detach(), "t_n": t_end.detach(), "s": torch.zeros_like(t_start), "w": w,
                           "loss": value.detach()}
        return value


def _float_out(model: Model) -> Model:
    """Model outputs in float32, so low-precision (bf16/fp16) passes meet the TCF arithmetic in fp32."""
    return lambda x, t, cond, *guidance: model(x, t, cond, *guidance).float()


# ----------------------------------------------------------------------------------------------- shared by both trainers
OBJECTIVES = ("tcd", "lcm")


def make_objective(objective: str, path, *, original_steps: int, w_min: float, w_max: float,
                   loss: str, huber_c: float, prediction_type: str, tcf_order: int, rho: float, guidance: str = "cfg"):
    """The distillation objective both trainers use on `path` (tcd.paths.VPPath / FlowPath, or an abar table):
    TCDLoss, or the LCMLoss baseline (which has no target time, so tcf_order and rho do not apply to it)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}: 'tcd' trains TCD, 'lcm' the LCM "
                         f"baseline")
    common = dict(original_steps=original_steps, w_min=w_min, w_max=w_max, loss=loss, huber_c=huber_c,
                  prediction_type=prediction_type, guidance=guidance)
    if objective == "lcm":
        return LCMLoss(path, **common)
    return TCDLoss(path, tcf_order=tcf_order, rho=rho, **common)


@torch.no_grad()
def ema_update_(shadow: torch.Tensor, online: torch.Tensor, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta, in place: the target network's EMA of diffusers' LCM
    distillation scripts (`update_ema`), written as a lerp towards the online weights."""
    shadow.lerp_(online.to(shadow.dtype), 1.0 - decay)
