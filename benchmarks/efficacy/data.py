"""scikit-learn's handwritten digits as the efficacy dataset: 8x8 images upsampled (bilinear) to 16x16 grey pixels
in [-1, 1], the same stratified train / held-out split as the toy benchmark (1198 / 599 images)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..paper_toy.data import digits as digits_8x8
from .model import PIXELS


@dataclass
class Digits:
    train: torch.Tensor          # [N, 16, 16] in [-1, 1]
    train_labels: torch.Tensor   # [N] int64
    test: torch.Tensor           # held out: every metric compares against it
    test_labels: torch.Tensor


def upsample(flat_8x8: torch.Tensor) -> torch.Tensor:
    images = flat_8x8.reshape(-1, 1, 8, 8)
    up = torch.nn.functional.interpolate(images, size=(PIXELS, PIXELS), mode="bilinear", align_corners=False)
    return up[:, 0].clamp(-1.0, 1.0)


def load() -> Digits:
    d = digits_8x8()
    return Digits(upsample(d.train), d.train_labels, upsample(d.test), d.test_labels)
