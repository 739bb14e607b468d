"""Teacher training, optionally class-conditional with label dropout for classifier-free guidance:
* VP (the default): plain DDPM eps-prediction on the SD noise schedule (scaled-linear betas, 1000 steps);
* rectified flow (`flow=dict(shift=..., time_sampling=...)`): velocity prediction on x_sigma = (1 - sigma) x0 +
  sigma eps, the SD3 / Flux training objective."""
from __future__ import annotations

import copy

import torch

from tcd.schedule import time_shift

from .models import EpsMLP, VelocityMLP

TIME_SAMPLING = ("uniform", "logit_normal")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), online.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def vp_training_pair(x0: torch.Tensor, abar: torch.Tensor, g: torch.Generator):
    """DDPM: t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the regression target is eps."""
    t = torch.randint(0, abar.numel(), (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].unsqueeze(1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def flow_training_pair(x0: torch.Tensor, shift: float, time_sampling: str, g: torch.Generator):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024 §2-3): x_sigma = (1 - sigma) x0 + sigma eps, target
    v = eps - x0 (what `prediction_type="flow"` reads). The unshifted time u is uniform on [0, 1) or logit-normal
    (SD3's default weighting, u = sigmoid(n), n ~ N(0, 1)); sigma = time_shift(shift, u), SD3's shift."""
    if time_sampling not in TIME_SAMPLING:
        raise ValueError(f"time_sampling={time_sampling!r} is not one of {TIME_SAMPLING}")
    n = x0.shape[0]
    u = torch.rand(n, generator=g) if time_sampling == "uniform" else torch.sigmoid(torch.randn(n, generator=g))
    sigma = time_shift(float(shift), u)
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.unsqueeze(1)
    return (1 - s) * x0 + s * eps, sigma, eps - x0


def train_teacher(train: torch.Tensor, alphas_cumprod: torch.Tensor, *, width: int, depth: int, steps: int,
                  batch: int, lr: float, seed: int, labels: torch.Tensor | None = None, classes: int = 0,
                  label_dropout: float = 0.1, ema_decay: float = 0.999, flow: dict | None = None
                  ) -> tuple[EpsMLP, list[float]]:
    """Minimise E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y)||^2, t ~ U{0..999} (DDPM), or with
    `flow` (dict(shift=, time_sampling=)) E ||(eps - x0) - v_theta(x_sigma, sigma, y)||^2 (`flow_training_pair`).

    With labels, each label is replaced by the null label with probability `label_dropout` (classifier-free
    guidance's joint training, Ho & Salimans 2022). Returns the EMA weights (what diffusion models are sampled with)
    and the loss curve (one value per 50 steps).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = (EpsMLP if flow is None else VelocityMLP)(train.shape[1], width=width, depth=depth, classes=classes)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    abar = alphas_cumprod.float()
    curve, running = [], 0.0
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        x0 = train[idx]
        if flow is None:
            x_t, t, target = vp_training_pair(x0, abar, g)
        else:
            x_t, t, target = flow_training_pair(x0, flow["shift"], flow["time_sampling"], g)
        y = None
        if classes:
            drop = torch.rand(batch, generator=g) < label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], classes), labels[idx])
        loss = torch.nn.functional.mse_loss(net(x_t, t, y), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, net, ema_decay if step > steps // 10 else 0.0)
        running += float(loss.detach())
        if (step + 1) % 50 == 0:
            curve.append(running / 50)
            running = 0.0
    return ema.eval(), curve
