"""The two datasets: a 2-D Gaussian mixture (exact samples, exact denoiser, so distances to it are exact up to
sampling) and scikit-learn's 8x8 handwritten digits with their labels (real data that ships with the package, no
download), used class-conditionally as the paper's guided setting.

Both are scaled to roughly unit range, like SD latents, so the SD noise schedule (abar_999 = 0.0047) fully
destroys them at t = 999.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ToyData:
    """A dataset as the benchmark uses it: a training split, a held-out split and how to draw more of the truth."""
    name: str
    train: torch.Tensor          # [N, D] float32, what the teacher and the students see
    test: torch.Tensor           # [M, D] float32, held out: every metric compares against it
    image_shape: tuple | None    # (8, 8) for digits, None for point data
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    mixture: "GaussianMixture2D | None" = None
    classes: int = 0             # > 0: class-conditional (labels 0..classes-1; `classes` is the null label)

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])


class GaussianMixture2D:
    """`modes` isotropic Gaussians of standard deviation `std`, evenly spaced on a circle of `radius`, equal weights."""

    def __init__(self, modes: int = 8, radius: float = 1.0, std: float = 0.08):
        angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        self.centers = (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()
        self.std = float(std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.centers.shape[0], (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=generator)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, self.centers).argmin(dim=1)


def mixture_2d(n_train: int = 20000, n_test: int = 50000, seed: int = 1234) -> ToyData:
    """The held-out set is large (sliced W2 is scored on >= 50k samples against >= 50k exact samples)."""
    mixture = GaussianMixture2D()
    g = torch.Generator().manual_seed(seed)
    return ToyData("mog2d", mixture.sample(n_train, g), mixture.sample(n_test, g), None, mixture=mixture)


def digits(test_fraction: float = 1 / 3, seed: int = 0) -> ToyData:
    """sklearn's 1797 8x8 digits, pixel values 0..16 mapped to [-1, 1], split stratified into train / held-out;
    class-conditional (10 classes + the null label for classifier-free guidance)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 8.0) - 1.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=test_fraction, random_state=seed,
                                              stratify=bunch.target)
    return ToyData("digits", torch.from_numpy(x_tr), torch.from_numpy(x_te), (8, 8),
                   torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long(), classes=10)


def load(name: str, **kwargs) -> ToyData:
    if name == "mog2d":
        return mixture_2d(**kwargs)
    if name == "digits":
        return digits(**kwargs)
    raise ValueError(f"dataset {name!r} is not one of 'mog2d', 'digits'")
