"""Sample-quality metrics against held-out data, each with a noise floor measured the same way.

* 2-D mixture: sliced Wasserstein-2 (exact 1-D W2 per projection from sorted samples) on >= 50k samples against
  >= 50k held-out exact samples, MMD^2 with a sum of RBF kernels (unbiased), and a "mode spread" ratio (median
  distance to the nearest mode, samples / data: < 1 means samples collapse onto the mode centres, i.e. blur; > 1
  means they scatter around them, i.e. noise). Floor: the same metrics between two independent exact samples.
* digits: KID (Binkowski et al. 2018: unbiased MMD^2 with the cubic polynomial kernel) in the 128-d features of
  small CNN classifiers trained on the training split, averaged over several classifier seeds, with a bootstrap
  interval; class accuracy of conditional samples (does the requested digit come out, by the same classifiers);
  k-NN precision / recall (Kynkaanniemi et al. 2019) at equal sample counts; a detail ratio (mean total
  variation, samples / held-out images); and a memorisation check (nearest training digit). Nothing is clamped
  before scoring. Floor: the training split against the held-out split.
"""
from __future__ import annotations

import numpy as np
import torch

from .models import DigitCNN


# ------------------------------------------------------------------------------------------------ 2-D mixture
def projection_directions(dim: int, projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Fixed random unit directions [dim, projections] (the same for every evaluation; 64 cover the half-circle of
    2-D directions every ~3 degrees)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, projections, generator=g)
    return theta / theta.norm(dim=0, keepdim=True)


def sorted_projections(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (x.float() @ theta).sort(dim=0).values


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 64, seed: int = 0,
                       y_sorted: torch.Tensor | None = None) -> float:
    """sqrt(E_theta W2^2(theta.x, theta.y)) over `projection_directions`; the 1-D W2 of two equal-size samples is
    exact from the sorted projections (the monotone coupling). y_sorted: y's sorted projections, if already known."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    theta = projection_directions(x.shape[1], projections, seed)
    py = sorted_projections(y, theta) if y_sorted is None else y_sorted
    return float((sorted_projections(x, theta) - py).double().pow(2).mean().sqrt())


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

    For an isotropic 2-D Gaussian the distance to the centre is Rayleigh distributed with median std * sqrt(2 ln 2).
    """
    d = torch.cdist(x.double(), centers.double()).min(dim=1).values
    return float(d.median() / (std * np.sqrt(2.0 * np.log(2.0))))


class MixtureEvaluator:
    def __init__(self, test: torch.Tensor, centers: torch.Tensor, std: float, mmd_points: int = 1000):
        self.test, self.centers, self.std, self.mmd_points = test, centers, std, mmd_points
        self._sorted: dict[int, torch.Tensor] = {}     # the held-out set's sorted projections, per sample count

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels=None, light: bool = False) -> dict:
        """light: the primary metric and the spread only (selection and convergence probes)."""
        n = samples.shape[0]
        if n not in self._sorted:
            self._sorted[n] = sorted_projections(self.test[:n], projection_directions(self.test.shape[1]))
        out = {"sw": sliced_wasserstein(samples, self.test[:n], y_sorted=self._sorted[n]),
               "spread": mode_spread_ratio(samples, self.centers, self.std)}
        if not light:
            k = min(self.mmd_points, n)   # MMD is O(n^2): the first k samples of each set (both are i.i.d. draws)
            out["mmd"] = mmd_rbf(samples[:k], self.test[:k])
        return out


# ------------------------------------------------------------------------------------------------ digits
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (edge-padded) and light noise: the classifier has to embed imperfect
    generated digits sensibly."""
    img = x.reshape(-1, 1, 8, 8)
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1), mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
    out = padded[:, :, dy:dy + 8, dx:dx + 8].reshape(x.shape)
    return out + 0.1 * torch.randn(x.shape, generator=g)


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 1500, seed: int = 0) -> DigitCNN:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DigitCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(_augment(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def kid(fx: torch.Tensor, fy: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (KID, Binkowski et al. 2018), on all pairs."""
    fx, fy = fx.double(), fy.double()
    d = fx.shape[1]
    kxx, kyy, kxy = (fx @ fx.T / d + 1) ** 3, (fy @ fy.T / d + 1) ** 3, (fx @ fy.T / d + 1) ** 3
    n, m = fx.shape[0], fy.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) /
                 (m * (m - 1)) - 2 * kxy.mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = real.double(), fake.double()

    def radii(a):
        return torch.cdist(a, a).kthvalue(k + 1, dim=1).values   # +1: the point itself is its own 0-th neighbour

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
    """KID and class accuracy over `classifier_seeds` CNNs; precision/recall, detail and memorisation in pixels."""

    def __init__(self, train_x, train_y, test_x, test_y, classifier_seeds=(0, 1, 2), classifier_steps: int = 1500,
                 nets=None):
        self.nets = nets or [train_classifier(train_x, train_y, steps=classifier_steps, seed=s)
                             for s in classifier_seeds]
        self.train_x, self.test_x = train_x, test_x
        with torch.no_grad():
            self.accuracy = [float((n(test_x).argmax(1) == test_y).float().mean()) for n in self.nets]
            self.test_feats = [n.features(test_x) for n in self.nets]
            self.test_feats_pr = self.test_feats[0]
            # memorisation reference: how close held-out digits come to the training set
            self.test_nn = torch.cdist(test_x.double(), train_x.double()).min(dim=1).values
        self.nn_threshold = float(torch.quantile(self.test_nn, 0.01))
        self.test_tv = float(total_variation(test_x).mean())

    def state(self) -> dict:
        return {"nets": [n.state_dict() for n in self.nets]}

    @classmethod
    def from_state(cls, state: dict, ds) -> "DigitsEvaluator":
        nets = []
        for sd in state["nets"]:
            net = DigitCNN()
            net.load_state_dict(sd)
            nets.append(net.eval())
        return cls(ds.train, ds.train_labels, ds.test, ds.test_labels, nets=nets)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None, light: bool = False) -> dict:
        """light: KID and class accuracy only (selection and convergence probes)."""
        x = samples.float()
        feats = [n.features(x) for n in self.nets]
        out = {"kid": float(np.mean([kid(f, t) for f, t in zip(feats, self.test_feats)]))}
        if labels is not None:
            out["accuracy"] = float(np.mean([float((n.head(f).argmax(1) == labels).float().mean())
                                             for n, f in zip(self.nets, feats)]))
        if light:
            return out
        m = self.test_x.shape[0]                     # precision / recall at equal sample counts
        precision, recall = precision_recall(self.test_feats_pr, feats[0][:m])
        out.update(precision=precision, recall=recall, detail=float(total_variation(x).mean()) / self.test_tv)
        nn = torch.cdist(x.double(), self.train_x.double()).min(dim=1).values
        out["memorised"] = float((nn < self.nn_threshold).double().mean())   # ~0.01 for fresh digits
        return out
