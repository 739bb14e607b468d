"""Teacher training: plain DDPM eps-prediction on the SD noise schedule (scaled-linear betas, 1000 steps), optionally
class-conditional with label dropout for classifier-free guidance."""
from __future__ import annotations

import copy

import torch

from .models import EpsMLP


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), online.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def train_teacher(train: torch.Tensor, alphas_cumprod: torch.Tensor, *, width: int, depth: int, steps: int,
                  batch: int, lr: float, seed: int, labels: torch.Tensor | None = None, classes: int = 0,
                  label_dropout: float = 0.1, ema_decay: float = 0.999) -> tuple[EpsMLP, list[float]]:
    """Minimise E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y)||^2, t ~ U{0..999} (DDPM).

    With labels, each label is replaced by the null label with probability `label_dropout` (classifier-free
    guidance's joint training, Ho & Salimans 2022). Returns the EMA weights (what diffusion models are sampled with)
    and the loss curve (one value per 50 steps).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = EpsMLP(train.shape[1], width=width, depth=depth, classes=classes)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    abar = alphas_cumprod.float()
    curve, running = [], 0.0
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        x0 = train[idx]
        t = torch.randint(0, abar.numel(), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        y = None
        if classes:
            drop = torch.rand(batch, generator=g) < label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], classes), labels[idx])
        a = abar[t].unsqueeze(1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(net(x_t, t, y), eps)
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
