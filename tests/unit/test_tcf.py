"""tcd.tcf: boundary condition, parity with diffusers' TCDScheduler, and convergence order on exact Gaussian data."""
import math

import pytest
import torch
from diffusers import TCDScheduler

from tcd.schedule import vp_alphas_cumprod
from tcd.tcf import (half_log_snr, midpoint_timesteps, tcf_first_order, trajectory_consistency_function,
                     vp_alpha_sigma, x0_eps_from_output, x0_fn_from_model)

ABAR = vp_alphas_cumprod()


def tcf_first_order_ei(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """Reference: the paper's exponential-integrator form of the first-order TCF,
    (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat, h = lambda_s - lambda_t."""
    h = half_log_snr(alpha_s, sigma_s) - half_log_snr(alpha_t, sigma_t)
    return (sigma_s / sigma_t) * x_t - alpha_s * torch.expm1(-h) * x0_hat


def net(x, t, cond=None):
    """A deterministic nonlinear timestep-dependent stand-in for a UNet (raw output, any prediction type)."""
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x * (0.5 + tt / 1000.0)) * 0.8 + 0.05 * torch.sin(tt / 97.0) + 0.1 * x.roll(1, -1)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_boundary_condition_f_x_t_t_is_x(order, pred):
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 19, 259, 500, 999])
    f = trajectory_consistency_function(x0_fn_from_model(net, None, ABAR, pred), x, t, t, ABAR, order)
    assert torch.allclose(f, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_first_order_equals_diffusers_pred_noised_sample(pred, gamma):
    sched = TCDScheduler(prediction_type=pred)
    sched.set_timesteps(8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    timesteps = sched.timesteps.tolist()
    for i, t in enumerate(timesteps):
        out = net(x, torch.tensor([t, t]))
        ref = sched.step(out, t, x, eta=gamma, generator=g)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        s = int(torch.floor((1 - gamma) * torch.tensor(t_prev)).long())
        tt, ss = torch.tensor([t, t]), torch.tensor([s, s])
        alpha_t, sigma_t = vp_alpha_sigma(sched.alphas_cumprod, tt)
        alpha_s, sigma_s = vp_alpha_sigma(sched.alphas_cumprod, ss)
        x0, eps = x0_eps_from_output(out, x, alpha_t, sigma_t, pred)
        mine = tcf_first_order(x0, eps, alpha_s, sigma_s)
        assert torch.allclose(mine, ref.pred_noised_sample, atol=1e-5, rtol=1e-5), (t, s)
        # and the paper's exponential-integrator form is the same function
        assert torch.allclose(tcf_first_order_ei(x, x0, alpha_t, sigma_t, alpha_s, sigma_s), mine, atol=1e-4)
        x = ref.prev_sample


# ----------------------------------------------------------------------------------------------- exact Gaussian
# Data x0 ~ N(MU, S0^2) per coordinate: x_t ~ N(alpha_t MU, alpha_t^2 S0^2 + sigma_t^2), the ideal denoiser is
# E[x0 | x_t] in closed form, and the PF-ODE is the affine map that keeps the standardised coordinate fixed.
MU, S0 = 0.3, 0.5
ABAR64 = ABAR.double()


def gaussian_x0(x, t):
    a, s = vp_alpha_sigma(ABAR64, t, x.ndim)
    return MU + a * S0 ** 2 / (a ** 2 * S0 ** 2 + s ** 2) * (x - a * MU)


def gaussian_std(t, ndim):
    a, s = vp_alpha_sigma(ABAR64, t, ndim)
    return (a ** 2 * S0 ** 2 + s ** 2).sqrt(), a


def exact_flow(x, t, s):
    sd_t, a_t = gaussian_std(t, x.ndim)
    sd_s, a_s = gaussian_std(s, x.ndim)
    return a_s * MU + sd_s / sd_t * (x - a_t * MU)


def tcf_error(t0, s0, order, n=2000):
    t, s = torch.full((n,), t0), torch.full((n,), s0)
    sd_t, a_t = gaussian_std(t, 2)
    x_t = a_t * MU + sd_t * torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = trajectory_consistency_function(gaussian_x0, x_t, t, s, ABAR64, order)
    return float((f - exact_flow(x_t, t, s)).abs().max())


@pytest.mark.parametrize("t0,s0", [(999, 979), (519, 499), (259, 239), (499, 419)])
def test_second_order_much_smaller_error_than_first(t0, s0):
    e1, e2 = tcf_error(t0, s0, 1), tcf_error(t0, s0, 2)
    print(f"t={t0} -> s={s0}: |f1 - exact| = {e1:.3e}, |f2 - exact| = {e2:.3e}")
    assert e1 > 1e-6           # the first-order jump is not exact on Gaussian data (a real test)
    assert e2 < 0.1 * e1


def test_local_error_falls_with_order():
    """Halving h: first order's local error falls ~4x (O(h^2)), second order's ~8x (O(h^3))."""
    t0 = 499
    jumps = [160, 80, 40]
    e1 = [tcf_error(t0, t0 - j, 1) for j in jumps]
    e2 = [tcf_error(t0, t0 - j, 2) for j in jumps]
    slope1 = [math.log2(a / b) for a, b in zip(e1, e1[1:])]
    slope2 = [math.log2(a / b) for a, b in zip(e2, e2[1:])]
    print("order 1 errors", e1, "log2 ratios", slope1)
    print("order 2 errors", e2, "log2 ratios", slope2)
    assert all(1.6 < r < 2.6 for r in slope1)
    assert all(2.6 < r < 3.6 for r in slope2)


def test_midpoint_timesteps_lie_between_s_and_t():
    t = torch.tensor([999, 499, 39, 20, 5, 300])
    s = torch.tensor([0, 459, 19, 19, 5, 0])
    u = midpoint_timesteps(ABAR, t, s)
    assert torch.all(u >= s) and torch.all(u <= t)
    assert torch.all((u < t) | (s == t))


def test_bad_arguments_are_refused_with_clear_messages():
    x = torch.zeros(1, 4, 8, 8)
    t = torch.tensor([10])
    with pytest.raises(ValueError, match="order"):
        trajectory_consistency_function(lambda x, t: x, x, t, t, ABAR, order=3)
    with pytest.raises(ValueError, match="prediction_type"):
        x0_fn_from_model(net, None, ABAR, "velocity")
    with pytest.raises(ValueError, match="does not apply to a vp model"):
        x0_fn_from_model(net, None, ABAR, "flow")
    with pytest.raises(ValueError, match="midpoint"):
        midpoint_timesteps(ABAR, t, t, r=0.0)
