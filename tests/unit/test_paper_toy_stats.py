"""The toy study's statistics and its mixture oracle, against textbook values and exact results."""
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from benchmarks.paper_toy import stats
from benchmarks.paper_toy.data import GaussianMixture2D
from benchmarks.paper_toy.metrics import sliced_wasserstein
from benchmarks.paper_toy.oracle import ExactDenoiser, ObjectiveOracle, objective_optimum, ode_states
from tcd.schedule import vp_alphas_cumprod

ABAR = vp_alphas_cumprod()


def test_holm_matches_the_step_down_definition():
    # Holm (1979): sorted p (0.01, 0.02, 0.04) times (3, 2, 1) -> 0.03, 0.04, 0.04 (monotone), input order kept
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) or stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert math.isnan(stats.holm([float("nan"), 0.01])[0]) and stats.holm([float("nan"), 0.01])[1] == 0.01


def test_t_interval_equals_scipy_one_sample_t_test():
    d = np.array([-0.3, -0.1, -0.25, 0.05, -0.2, -0.15])
    ci = stats.t_interval(d)
    ref = sps.ttest_1samp(d, 0.0)
    assert ci["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    low, high = ref.confidence_interval(0.95)
    assert (ci["low"], ci["high"]) == pytest.approx((low, high), rel=1e-9)
    assert stats.verdict(ci, "lower", 0.01) == "win" and stats.verdict(ci, "higher", 0.01) == "loss"
    assert stats.verdict(ci, "lower", 0.2) == "tie"


def test_exact_ode_with_the_exact_denoiser_carries_noise_to_the_data():
    """The PF-ODE preserves marginals: exact x_999 samples integrated to t = 0 are samples of x_0 (= the data,
    up to sigma_0 = 0.029 of noise); sliced W2 must sit within the metric's own floor (3 sd of exact vs exact)."""
    mix = GaussianMixture2D()
    g = torch.Generator().manual_seed(0)
    n = 4000
    a999 = float(ABAR[999])
    x999 = a999 ** 0.5 * mix.sample(n, g) + (1 - a999) ** 0.5 * torch.randn(n, 2, generator=g)
    x0 = ode_states(ExactDenoiser(mix, ABAR), x999, 999, [0], stride=8)[0].float()
    floors = [sliced_wasserstein(mix.sample(n, g), mix.sample(n, g)) for _ in range(6)]
    assert sliced_wasserstein(x0, mix.sample(n, g)) < np.mean(floors) + 3 * np.std(floors, ddof=1)


def test_lcm_oracle_reaches_the_data_in_one_step_and_tcd_rho0_oracle_does_not():
    """LCM's optimum is the exact ODE endpoint (one step suffices); the paper's TCD objective (rho = 0) averages
    x0 over every target time s, so its one-step optimum is a compromise, visibly off the data."""
    from benchmarks.paper_toy.samplers import sample_sss
    from tcd.schedule import DiscreteSchedule
    mix, g = GaussianMixture2D(), torch.Generator().manual_seed(1)
    den, sched, n = ExactDenoiser(mix, ABAR), DiscreteSchedule.from_alphas_cumprod(ABAR), 3000
    floors = [sliced_wasserstein(mix.sample(n, g), mix.sample(n, g)) for _ in range(6)]
    limit = np.mean(floors) + 3 * np.std(floors, ddof=1)
    lcm = ObjectiveOracle(den, "lcm")
    tcd = ObjectiveOracle(den, "tcd", rho=0.0, loss="l2")
    x_lcm = sample_sss(lambda x, t: lcm(x, t), sched, n, 2, 1, 0.0, seed=5)
    x_tcd = sample_sss(lambda x, t: tcd(x, t), sched, n, 2, 1, 0.0, seed=5)
    test = mix.sample(n, g)
    assert sliced_wasserstein(x_lcm, test) < limit
    assert sliced_wasserstein(x_tcd, test) > 3 * limit


def test_objective_optimum_is_the_weighted_mean_under_l2_and_near_the_weighted_median_under_huber():
    y = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64).reshape(3, 1, 1)
    c = torch.ones(3, dtype=torch.float64)
    p = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    assert float(objective_optimum(y, c, p, "l2")) == pytest.approx(0.3 * 0 + 0.4 * 1 + 0.3 * 10)
    # weights 0.3 / 0.4 / 0.3: the weighted median is 1; pseudo-Huber with c -> 0 is L1
    assert float(objective_optimum(y, c, p, "huber", huber_c=1e-4, iterations=400)) == pytest.approx(1.0, abs=1e-3)
