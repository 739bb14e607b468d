"""Sample-quality metrics against held-out data.

* 2-D: sliced Wasserstein-2 (exact 1-D W2 per projection from sorted samples) and MMD^2 with a sum of RBF kernels
  (unbiased estimator), plus a "mode spread" ratio (median distance to the nearest mode, samples / data: < 1 means
  samples collapse onto the mode centres, i.e. blur; > 1 means they scatter around them, i.e. noise).
* digits: Frechet distance in the feature space of a small classifier trained on the training split (an FID at
  8x8 scale), k-NN precision / recall (Kynkaanniemi et al. 2019), and a "detail" ratio (mean total variation of
  the samples / of the held-out images: < 1 is blurrier than the data, > 1 noisier).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from .models import DigitClassifier


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """sqrt(E_theta W2^2(theta.x, theta.y)) over fixed random unit directions; the 1-D W2 of two equal-size samples
    is exact from the sorted projections (the monotone coupling)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x.float() @ theta).sort(dim=0).values, (y.float() @ theta).sort(dim=0).values
    return float((px - py).double().pow(2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Unbiased MMD^2 with k = sum_h exp(-|a - b|^2 / (2 h^2)) (bandwidths: the mode std, between, the ring size)."""
    x, y = x.float(), y.float()

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(d2 * (-0.5 / (h * h))) for h in bandwidths).double()

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def mode_spread_ratio(x: torch.Tensor, centers: torch.Tensor, std: float) -> float:
    """Median distance of the samples to their nearest mode centre / the same for the true mixture.

    For an isotropic 2-D Gaussian the distance to the centre is Rayleigh distributed with median std * sqrt(2 ln 2);
    the median keeps the ratio about the modes' shape (between-mode stragglers are what SW / MMD count).
    """
    d = torch.cdist(x.double(), centers.double()).min(dim=1).values
    return float(d.median() / (std * np.sqrt(2.0 * np.log(2.0))))


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 600, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DigitClassifier(dim=x.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        # light input noise: the classifier also has to embed imperfect generated digits sensibly
        xb = x[idx] + 0.1 * torch.randn(256, x.shape[1], generator=g)
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def classifier_accuracy(net: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).float().mean())


def frechet_distance(fx: np.ndarray, fy: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) between Gaussian fits of two feature sets (FID)."""
    mu_x, mu_y = fx.mean(0), fy.mean(0)
    s_x, s_y = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    # Degenerate feature sets (e.g. pure noise switching ReLU features off) give singular covariances: fall back
    # to a regularised product as the reference FID code does, without the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_x @ s_y)
        if not np.isfinite(covmean).all():
            eye = np.eye(s_x.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s_x + eye) @ (s_y + eye))
    covmean = covmean.real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(covmean))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = real.double(), fake.double()

    def radii(a):
        d = torch.cdist(a, a)
        return d.kthvalue(k + 1, dim=1).values   # +1: the point itself is its own 0-th neighbour

    r_real, r_fake = radii(real), radii(fake)
    d_fr = torch.cdist(fake, real)
    precision = (d_fr <= r_real[None, :]).any(dim=1).double().mean()
    recall = (d_fr.T <= r_fake[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def total_variation(x: torch.Tensor, shape=(8, 8)) -> torch.Tensor:
    img = x.reshape(-1, *shape)
    return (img[:, 1:, :] - img[:, :-1, :]).abs().mean(dim=(1, 2)) + (img[:, :, 1:] - img[:, :, :-1]).abs().mean(
        dim=(1, 2))


class DigitsEvaluator:
    def __init__(self, train_x, train_y, test_x, test_y, seed: int = 0, classifier_steps: int = 600):
        self.net = train_classifier(train_x, train_y, steps=classifier_steps, seed=seed)
        self.accuracy = classifier_accuracy(self.net, test_x, test_y)
        with torch.no_grad():
            self.test_feats = self.net.features(test_x)
        self.test_tv = float(total_variation(test_x).mean())

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict:
        x = samples.clamp(-1.0, 1.0)   # images are stored in [-1, 1]; out-of-range pixels would be clipped anyway
        feats = self.net.features(x)
        precision, recall = precision_recall(self.test_feats, feats)
        return {"fd": frechet_distance(feats.numpy().astype(np.float64), self.test_feats.numpy().astype(np.float64)),
                "precision": precision, "recall": recall,
                "detail": float(total_variation(x).mean()) / self.test_tv}


class MixtureEvaluator:
    def __init__(self, test: torch.Tensor, centers: torch.Tensor, std: float, mmd_points: int = 1000):
        self.test, self.centers, self.std, self.mmd_points = test, centers, std, mmd_points

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict:
        k = self.mmd_points   # MMD is O(n^2): the first k samples of each set (both are i.i.d. draws)
        return {"sw": sliced_wasserstein(samples, self.test), "mmd": mmd_rbf(samples[:k], self.test[:k]),
                "spread": mode_spread_ratio(samples, self.centers, self.std)}
