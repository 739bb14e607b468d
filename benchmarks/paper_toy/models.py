"""Small networks: the eps-prediction denoiser (teacher and students share it) and the digits feature classifier."""
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
    """eps_theta(x_t, t): a residual MLP with a sinusoidal timestep embedding (x_t in VP space, t an int64 [B])."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, temb_dim: int = 64):
        super().__init__()
        self.dim, self.width, self.depth, self.temb_dim = dim, width, depth, temb_dim
        self.temb = nn.Sequential(nn.Linear(temb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.temb_dim))
        h = self.inp(x) + temb
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


class DigitClassifier(nn.Module):
    """An MLP digit classifier; `features` (the penultimate layer) is the space the Frechet distance is taken in."""

    def __init__(self, dim: int = 64, width: int = 256, feature_dim: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, feature_dim),
                                  nn.ReLU())
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
