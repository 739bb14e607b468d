"""Small networks: the eps-prediction denoiser (teacher and students share it), its rectified-flow (velocity) variant
and the digits classifiers."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps 0..999 as in the SD UNet (cos first: diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResidualBlock(nn.Module):
    """h + fc2(silu(fc1(silu(h)) + temb)): the timestep enters every block (cheaply, as a shared additive bias)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(h)) + temb))


class EpsMLP(nn.Module):
    """eps_theta(x_t, t, label): a residual MLP with a sinusoidal timestep embedding (x_t in VP space, t int64 [B]).

    classes > 0 makes it class-conditional: `cond` is an int64 [B] of labels, where the extra label `classes` is
    the null condition of classifier-free guidance (Ho & Salimans 2022), learnt by dropping labels in training.
    """

    def __init__(self, dim: int, width: int = 128, depth: int = 3, temb_dim: int = 64, classes: int = 0):
        super().__init__()
        self.dim, self.width, self.depth, self.temb_dim, self.classes = dim, width, depth, temb_dim, classes
        self.temb = nn.Sequential(nn.Linear(temb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(classes + 1, width) if classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def null_label(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.classes, dtype=torch.int64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.temb_dim))
        if self.label is not None:
            temb = temb + self.label(self.null_label(x.shape[0]) if cond is None else cond)
        h = self.inp(x) + temb
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


class VelocityMLP(EpsMLP):
    """v_theta(x_sigma, sigma, label) of a rectified-flow model: the same network, its output read as the velocity
    v = eps - x0 and its time input the float sigma in [0, 1] scaled by 1000 (SD3's timestep = 1000 sigma), so the
    sinusoidal embedding sees the same range as the VP teachers' integer timesteps."""

    time_scale = 1000.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return super().forward(x, t.float() * self.time_scale, cond)


class DigitCNN(nn.Module):
    """A small convolutional 8x8 digit classifier; `features` (the 128-d penultimate layer) is the space KID is taken
    in. Stronger than an MLP on pixels (translation-tolerant), trained with shifts and noise (metrics.py)."""

    def __init__(self, classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
