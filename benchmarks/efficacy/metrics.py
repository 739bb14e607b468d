"""Scores of generated 16x16 digits against the held-out digits, in a digit classifier's feature space.

* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 between
  classifier features of the samples and of the held-out digits. Unbiased, so it is meaningful at a few hundred
  samples, where the Frechet distance (also reported) is biased upwards by the sample covariance.
* class accuracy: the fraction of samples the classifier reads as the digit their prompt asked for.
* intervals: 95% Student-t intervals over seeds, of a mean and of paired differences (method A - method B on the
  same seeds, i.e. the same initial noise), which cancel the seed-to-seed variation both share.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg, stats


class DigitNet(torch.nn.Module):
    """A small CNN digit classifier; `features` (its 64-wide penultimate layer) is the space KID is taken in."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),     # 8x8
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),    # 4x4
            torch.nn.Flatten(), torch.nn.Linear(32 * 16, feature_dim), torch.nn.ReLU())
        self.head = torch.nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.reshape(-1, 1, *images.shape[-2:]).clamp(-1.0, 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 800, seed: int = 0) -> DigitNet:
    """Cross-entropy on the training digits with light pixel noise and 1-pixel shifts, so that imperfect generated
    digits still land somewhere sensible in feature space."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = DigitNet()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (128,), generator=g)
            x = images[idx] + 0.15 * torch.randn(128, *images.shape[1:], generator=g)
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=shift, dims=(1, 2))
            loss = torch.nn.functional.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def kid(fx: torch.Tensor, fy: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (a.b / d + 1)^3 (KID), in float64."""
    fx, fy = fx.double(), fy.double()
    d = fx.shape[1]
    kxx, kyy, kxy = (fx @ fx.T / d + 1) ** 3, (fy @ fy.T / d + 1) ** 3, (fx @ fy.T / d + 1) ** 3
    n, m = fx.shape[0], fy.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def frechet_distance(fx: torch.Tensor, fy: torch.Tensor) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) between Gaussian fits of two feature sets (FID)."""
    x, y = fx.double().numpy(), fy.double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm((s_x + np.eye(len(mu_x)) * 1e-6) @ (s_y + np.eye(len(mu_y)) * 1e-6)).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(covmean))


def cached_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, cache=None) -> DigitNet:
    """train_classifier, cached in the folder `cache` (if given) by this module's code, the data and the seed."""
    if cache is None:
        return train_classifier(images, labels, seed=seed)
    import hashlib
    from pathlib import Path
    from .teacher import _code_without_docs
    h = hashlib.sha256(_code_without_docs(Path(__file__).read_text()).encode())
    h.update(images.float().contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    h.update(str(seed).encode())
    path = Path(cache) / f"digit-classifier-{h.hexdigest()[:12]}.pt"
    net = DigitNet()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval().requires_grad_(False)
    net = train_classifier(images, labels, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net


class Scorer:
    """KID / FD against the held-out digits and class accuracy, with the classifier trained on the training split
    (cached in `cache` when given)."""

    def __init__(self, train_images, train_labels, test_images, test_labels, seed: int = 0, cache=None):
        self.net = cached_classifier(train_images, train_labels, seed=seed, cache=cache)
        with torch.no_grad():
            self.test_features = self.net.features(test_images)
            self.test_accuracy = float((self.net(test_images).argmax(1) == test_labels).float().mean())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        features = self.net.features(images)
        predicted = self.net.head(features).argmax(1)
        return {"kid": kid(features, self.test_features), "fd": frechet_distance(features, self.test_features),
                "accuracy": float((predicted == labels).float().mean())}


# ----------------------------------------------------------------------------------------------- intervals
def t_interval(values) -> dict:
    """Mean and the half-width of its 95% Student-t interval (n - 1 degrees of freedom)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "half": half, "n": int(n), "values": [float(x) for x in v]}


def paired(a, b) -> dict:
    """95% t-interval of the per-seed differences a - b; `excludes_zero` says whether the difference is resolved."""
    out = t_interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    out["excludes_zero"] = bool(abs(out["mean"]) > out["half"])
    return out
