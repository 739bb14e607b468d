"""Consistency distillation of a student from the teacher with the pack's objectives (`tcd.losses`).

LCM and TCD students get the same budget: same initialisation (a full copy of the teacher), optimiser, learning
rate, batch, number of steps, data order and draws (`LCMLoss` and `TCDLoss` consume the generator identically), and
the same target network (an EMA of the student, theta^-, as diffusers' full-model LCM scripts keep; decay 0 is the
LoRA scripts' "online student under no_grad").
"""
from __future__ import annotations

import copy

import torch

from tcd.losses import LCMLoss, TCDLoss
from tcd.tcf import trajectory_consistency_function, x0_fn_from_model

from .teacher import ema_update


def make_objective(method: str, alphas_cumprod: torch.Tensor, *, tcf_order: int = 1, original_steps: int = 50,
                   loss: str = "huber", huber_c: float = 0.001):
    """`tcd.losses` objective without classifier-free guidance (unconditional toy teachers: w_min = w_max = 0)."""
    common = dict(original_steps=original_steps, w_min=0.0, w_max=0.0, loss=loss, huber_c=huber_c)
    if method == "lcm":
        return LCMLoss(alphas_cumprod, **common)
    if method == "tcd":
        return TCDLoss(alphas_cumprod, tcf_order=tcf_order, **common)
    raise ValueError(f"method {method!r} is not one of 'lcm', 'tcd'")


def distill(teacher: torch.nn.Module, train: torch.Tensor, objective, *, steps: int, batch: int, lr: float,
            seed: int, ema_decay: float = 0.95, grad_clip: float = 1.0) -> tuple[torch.nn.Module, list[float]]:
    """Full fine-tune of a copy of the teacher on `objective`; returns the student and its loss curve (per 25 steps)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    curve, running = [], 0.0
    for step in range(steps):
        x0 = train[torch.randint(0, train.shape[0], (batch,), generator=generator)]
        loss = objective(student, target, teacher, x0, None, None, generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"distillation loss became {float(loss)} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
        ema_update(target, student, ema_decay)
        running += float(loss.detach())
        if (step + 1) % 25 == 0:
            curve.append(running / 25)
            running = 0.0
    return student.eval().requires_grad_(False), curve


# ------------------------------------------------------------------------------------------- trajectory error
@torch.no_grad()
def teacher_trajectory(teacher, alphas_cumprod: torch.Tensor, noise: torch.Tensor, checkpoints: list[int],
                       stride: int = 5) -> dict[int, torch.Tensor]:
    """The teacher's PF-ODE solution from x_999 = noise, recorded at `checkpoints` (descending, ending at 0).

    Integrated with the first-order TCF (a DDIM step) every `stride` timesteps: 200 small steps, the "exact" ODE
    path the distilled jumps are scored against.
    """
    x0_fn = x0_fn_from_model(teacher, None, alphas_cumprod)
    n = noise.shape[0]
    grid = list(range(checkpoints[0], 0, -stride)) + [0]
    grid = sorted(set(grid) | set(checkpoints), reverse=True)
    states, x = {grid[0]: noise.clone()}, noise
    for t, s in zip(grid[:-1], grid[1:]):
        x = trajectory_consistency_function(x0_fn, x, torch.full((n,), t), torch.full((n,), s), alphas_cumprod, 1)
        if s in checkpoints:
            states[s] = x
    return states


@torch.no_grad()
def jump_errors(model, alphas_cumprod: torch.Tensor, states: dict[int, torch.Tensor], order: int | None,
                lcm: LCMLoss | None = None) -> dict[str, float]:
    """RMS error of one model jump f(x_t, t, s) against the teacher's ODE state x_s, for every checkpoint pair t > s.

    TCD students / the teacher jump with the TCF of `order`; an LCM student (lcm given) can only jump to s = 0, through
    its consistency function c_skip x + c_out x0_hat.
    """
    x0_fn = x0_fn_from_model(model, None, alphas_cumprod)
    ts = sorted(states, reverse=True)
    out = {}
    for i, t in enumerate(ts):
        for s in ts[i + 1:]:
            x_t = states[t]
            tt, ss = torch.full((x_t.shape[0],), t), torch.full((x_t.shape[0],), s)
            if lcm is not None:
                if s != 0:
                    continue
                pred = lcm.consistency_function(model, x_t, tt, None)
            else:
                pred = trajectory_consistency_function(x0_fn, x_t, tt, ss, alphas_cumprod, order)
            out[f"{t}->{s}"] = float((pred - states[s]).pow(2).mean().sqrt())
    return out
