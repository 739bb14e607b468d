"""Consistency distillation of a student from the teacher with the pack's objectives (`tcd.losses`).

Every objective gets the same budget: same initialisation (a full copy of the teacher), optimiser, learning rate,
batch, number of steps, data order and draws (`LCMLoss` and `TCDLoss` at any rho consume the generator identically,
so two objectives trained with one seed see the same x0, t, noise and w at every step), and the same target
network theta^- (an EMA of the student, as diffusers' full-model LCM scripts keep). The student that is sampled is
a separate evaluation EMA of the student's weights (`eval_ema`), as diffusion models are sampled.
"""
from __future__ import annotations

import copy

import torch

from tcd.losses import make_objective as make_loss

from .teacher import ema_update

# objective name -> the tcd.losses settings that define it
OBJECTIVES = {
    "lcm": dict(method="lcm"),
    "tcd_rho0": dict(method="tcd", rho=0.0),          # the paper
    "tcd_rho0.25": dict(method="tcd", rho=0.25),
    "tcd_rho0.5": dict(method="tcd", rho=0.5),
    "tcd_rho0.75": dict(method="tcd", rho=0.75),
    "tcd_tcf2": dict(method="tcd", rho=0.0, tcf_order=2),
}


def make_objective(name: str, path, *, w_min: float = 0.0, w_max: float = 0.0, loss: str = "huber",
                   original_steps: int = 50, prediction_type: str = "epsilon"):
    """The objective `name` through the pack's own factory (`tcd.losses.make_objective`) on `path`: an abar table or
    tcd.paths.VPPath (eps teachers), or tcd.paths.FlowPath with prediction_type "flow" (velocity teachers; LCM is
    then the jump to sigma 0)."""
    spec = dict(OBJECTIVES[name])
    return make_loss(spec.pop("method"), path, original_steps=original_steps, w_min=w_min, w_max=w_max, loss=loss,
                     huber_c=0.001, prediction_type=prediction_type, tcf_order=spec.get("tcf_order", 1),
                     rho=spec.get("rho", 0.0))


def distill(teacher: torch.nn.Module, train: torch.Tensor, labels: torch.Tensor | None, objective, *, steps: int,
            batch: int, lr: float, seed: int, ema_decay: float = 0.95, eval_ema: float = 0.99,
            grad_clip: float = 1.0, probe=None, probe_every: int = 0) -> tuple[torch.nn.Module, dict]:
    """Full fine-tune of a copy of the teacher on `objective`.

    Returns the evaluation EMA of the student and a record: the loss curve (mean per 25 steps) and, every
    `probe_every` steps, probe(eval-EMA student) -> {metric: value} (the convergence curve).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    evaluated = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    record = {"loss": [], "probe": []}
    running = 0.0
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,), generator=generator)
        x0 = train[idx]
        cond = uncond = None
        if labels is not None:
            cond, uncond = labels[idx], teacher.null_label(batch)
        loss = objective(student, target, teacher, x0, cond, uncond, generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"distillation loss became {float(loss)} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
        ema_update(target, student, ema_decay)
        ema_update(evaluated, student, eval_ema)
        running += float(loss.detach())
        if (step + 1) % 25 == 0:
            record["loss"].append(running / 25)
            running = 0.0
        if probe is not None and probe_every and ((step + 1) % probe_every == 0 or step == 0):
            record["probe"].append({"step": step + 1, **probe(evaluated)})
    return evaluated, record
