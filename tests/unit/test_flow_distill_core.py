"""TCD on rectified-flow paths (tcd.paths.FlowPath): closed forms, the VP form where the two coincide, embedded
guidance and the flow LCM baseline.

References used below:
* Point-mass data (x0 = mu): the exact denoiser is the constant mu and every trajectory is the straight line
  x_sigma = (1 - sigma) mu + sigma eps, so the exact TCF is x_s = (1 - s) mu + s (x_t - (1 - t) mu) / t and a
  consistency loss with exact networks is 0.
* Gaussian data N(mu, c^2 I): the exact denoiser is linear and the PF-ODE keeps the standardised noise
  z = (x - a mu) / sqrt(a^2 c^2 + b^2) fixed, so x_s = a_s mu + sqrt(a_s^2 c^2 + b_s^2) z (a = 1 - sigma, b = sigma);
  an order-p exponential integrator has a local error O(h^(p+1)).
* Scale invariance: x_flow = c(t) x_vp with c = sqrt(a^2 + b^2), and the VP path with abar = a^2 / (a^2 + b^2) has
  the same lambda = log(a / b); the exponential integrator is equivariant under that rescaling, so
  f_flow(x, t, s) = c_s f_vp(x / c_t, t, s).
"""
from __future__ import annotations

import math

import pytest
import torch

from tcd.losses import LCMLoss, TCDLoss, make_objective
from tcd.paths import FlowPath, VPPath
from tcd.schedule import flux_time_shift, time_shift
from tcd.tcf import trajectory_consistency_function, x0_eps_from_output, x0_fn_from_model

MU = torch.tensor([0.7, -1.3, 0.2]).reshape(1, 3, 1, 1)


def gaussian_denoiser(c: float):
    """x0_hat(x, sigma) = E[x0 | x] for x0 ~ N(MU, c^2 I) on the flow path (a = 1 - sigma, b = sigma)."""
    def x0_fn(x, sigma):
        a, b = FlowPath.coefficients(sigma, x.ndim)
        a, b = a.double(), b.double()
        gain = a * c * c / (a * a * c * c + b * b)
        return (MU.double() + gain * (x.double() - a * MU.double())).to(x.dtype)
    return x0_fn


def exact_flow_map(x_t, t: float, s: float, c: float):
    a_t, b_t, a_s, b_s = 1 - t, t, 1 - s, s
    z = (x_t.double() - a_t * MU.double()) / math.sqrt(a_t ** 2 * c * c + b_t ** 2)
    return a_s * MU.double() + math.sqrt(a_s ** 2 * c * c + b_s ** 2) * z


def batch(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------------------------- the path
def test_flow_grid_is_the_models_shifted_time_with_exact_ends():
    for path, shift_fn in ((FlowPath.shifted(3.0), lambda t: time_shift(3.0, t)),
                           (FlowPath.flux(1.15), lambda t: flux_time_shift(1.15, t)),
                           (FlowPath(), lambda t: t)):
        g = path.grid(50)
        assert g.shape == (51,) and g[0] == 0.0 and g[-1] == 1.0
        assert torch.all(g[1:] > g[:-1])
        expected = torch.tensor([shift_fn(i / 50) for i in range(51)], dtype=torch.float32)
        assert torch.allclose(g, expected, atol=1e-7)
    # SD3's shift 3 puts the grid's middle point at sigma 0.75 (3 * 0.5 / (1 + 2 * 0.5))
    assert FlowPath.shifted(3.0).grid(2)[1] == pytest.approx(0.75)


def test_vp_grid_is_the_ddim_solver_grid():
    abar = torch.linspace(0.999, 0.01, 1000)
    g = VPPath(abar).grid(50)
    assert g[0] == 0 and g[1] == 19 and g[-1] == 999 and g.dtype == torch.int64


def test_flow_velocity_output_converts_to_x0_and_eps():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma = batch(0.3, 1.0)
    a, b = FlowPath.coefficients(sigma, 4)
    x = a * x0 + b * eps
    got_x0, got_eps = x0_eps_from_output(eps - x0, x, a, b, "flow")
    assert torch.allclose(got_x0, x0, atol=1e-6) and torch.allclose(got_eps, eps, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the TCF
@pytest.mark.parametrize("order", [1, 2])
def test_point_mass_tcf_is_exact_for_both_orders(order):
    path = FlowPath.shifted(3.0)
    x_t = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, s = batch(1.0, 0.8, 0.5, 0.2, dtype=torch.float64), batch(0.0, 0.3, 0.5, 0.05, dtype=torch.float64)
    got = trajectory_consistency_function(gaussian_denoiser(0.0), x_t, t, s, path, order)
    for i in range(4):
        want = exact_flow_map(x_t[i:i + 1], float(t[i]), float(s[i]), 0.0)
        assert torch.allclose(got[i:i + 1], want, atol=1e-12)


def test_flow_tcf_local_error_orders_on_gaussian_data():
    """Error of f^p against the exact ODE map at h -> h/2: ratio 2^(p+1) (2 for first order means O(h^2))."""
    x_t = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    denoiser, c, t = gaussian_denoiser(0.8), 0.8, 0.6
    lam_t = math.log((1 - t) / t)
    for order, expected in ((1, 2.0), (2, 3.0)):
        errors = []
        for h in (0.2, 0.1, 0.05):
            s = 1.0 / (1.0 + math.exp(lam_t + h))
            tt, ss = batch(t, dtype=torch.float64), batch(s, dtype=torch.float64)
            got = trajectory_consistency_function(denoiser, x_t, tt, ss, FlowPath(), order)
            errors.append(float((got - exact_flow_map(x_t, t, s, c)).abs().max()))
        slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(p - expected) < 0.25 for p in slopes), (order, slopes)


@pytest.mark.parametrize("order", [1, 2])
def test_flow_tcf_equals_the_rescaled_vp_tcf(order):
    """Same lambda, rescaled states: f_flow(x, t, s) = c_s f_vp(x / c_t, t, s), c = sqrt(a^2 + b^2). The VP table
    holds exactly s, the flow midpoint u and t, so VP's snapping lands on the same u."""
    sig_t, sig_s = 0.8, 0.3
    sig_u = float(FlowPath.midpoint(batch(sig_t), batch(sig_s))[0])
    sigmas = [sig_s, sig_u, sig_t]                                    # VP timesteps 0, 1, 2 (noise increasing)
    abar = torch.tensor([(1 - q) ** 2 / ((1 - q) ** 2 + q ** 2) for q in sigmas], dtype=torch.float64)
    scale = [math.sqrt((1 - q) ** 2 + q ** 2) for q in sigmas]
    net = gaussian_denoiser(0.9)

    def vp_x0_fn(x_vp, t_int):
        q = torch.tensor([sigmas[int(i)] for i in t_int], dtype=torch.float64)
        c = torch.tensor([scale[int(i)] for i in t_int], dtype=torch.float64).reshape(-1, 1, 1, 1)
        return net(x_vp * c, q)

    x = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flow = trajectory_consistency_function(net, x, batch(sig_t, dtype=torch.float64),
                                           batch(sig_s, dtype=torch.float64), FlowPath(), order)
    vp = trajectory_consistency_function(vp_x0_fn, x / scale[2], torch.tensor([2]), torch.tensor([0]),
                                         VPPath(abar.float()), order)
    # VPPath stores abar in float32 (as diffusers does): agreement to float32 precision
    assert torch.allclose(flow, scale[0] * vp.double(), atol=2e-6)


def test_second_order_flow_rows_without_a_midpoint_take_the_first_order_jump_with_finite_gradients():
    path = FlowPath()
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weight = torch.tensor(0.5, requires_grad=True)

    def x0_fn(x_in, sigma):
        return weight * x_in
    t, s = batch(1.0, 0.6, 0.6), batch(0.3, 0.0, 0.2)
    f2 = trajectory_consistency_function(x0_fn, x, t, s, path, order=2)
    f1 = trajectory_consistency_function(x0_fn, x, t, s, path, order=1)
    assert torch.equal(f2[:2], f1[:2])                       # sigma_t = 1 and sigma_s = 0: first order
    assert not torch.allclose(f2[2], f1[2])                  # an interior jump: the second-order formula
    f2.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad)


@pytest.mark.parametrize("order", [1, 2])
def test_a_jump_from_the_clean_end_returns_the_x0_prediction(order):
    """t = s = sigma 0 (t_n = g[0] on the skipping grid): b_t = 0, so eps is undefined; the TCF is x0_hat, finite."""
    x = torch.randn(2, 3, 2, 2)
    zero = batch(0.0, 0.0)
    got = trajectory_consistency_function(lambda x_in, sigma: 0.5 * x_in, x, zero, zero, FlowPath(), order)
    assert torch.equal(got, 0.5 * x)


# ----------------------------------------------------------------------------------------------- the objectives
def exact_point_mass_velocity(x, sigma, cond=None, w=None):
    """v = eps - x0 along the straight lines to MU: (x - MU) / sigma, with v(x, 0) taken as 0 (x = MU there)."""
    s = sigma.reshape(-1, 1, 1, 1).double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (x.double() - MU.double()) / safe, torch.zeros_like(x.double())).float()


@pytest.mark.parametrize("objective", ["tcd", "lcm"])
@pytest.mark.parametrize("order", [1, 2])
def test_exact_flow_networks_have_zero_consistency_loss(objective, order):
    """With point-mass data, exact teacher, student and target: the teacher's Euler step is exact, both TCFs land
    on the same straight line, so the loss is 0; a perturbed student is not."""
    loss = make_objective(objective, FlowPath.shifted(3.0), original_steps=50, w_min=0.0, w_max=0.0, loss="l2",
                          huber_c=0.001, prediction_type="flow", tcf_order=order, rho=0.5)
    x0 = MU.expand(8, 3, 2, 2).clone()
    value = loss(exact_point_mass_velocity, exact_point_mass_velocity, exact_point_mass_velocity, x0, None,
                 generator=torch.Generator().manual_seed(0))
    assert float(value) < 1e-10

    def perturbed(x, sigma, cond=None):
        return exact_point_mass_velocity(x, sigma) * 1.05
    worse = loss(perturbed, exact_point_mass_velocity, exact_point_mass_velocity, x0, None,
                 generator=torch.Generator().manual_seed(0))
    assert float(worse) > 1e-4


def test_flow_teacher_step_is_the_guided_euler_step():
    loss = TCDLoss(FlowPath.shifted(3.0), w_min=2.0, w_max=2.0, prediction_type="flow")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 2, generator=gen)
    v_c, v_u = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)

    def teacher(x_in, sigma, cond):
        return v_c if cond == "c" else v_u
    t, t_n, w = batch(0.9, 0.5), batch(0.7, 0.2), batch(2.0, 2.0)
    got = loss.teacher_step(teacher, x, t, t_n, "c", "u", w)
    v = v_c + 2.0 * (v_c - v_u)
    want = x + (t_n - t).reshape(-1, 1, 1, 1) * v
    assert torch.allclose(got, want, atol=1e-6)


def test_flow_lcm_is_the_jump_to_sigma_zero():
    loss = LCMLoss(FlowPath(), prediction_type="flow")
    x, v = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    sigma = batch(0.4, 1.0)
    got = loss.consistency_function(lambda *_: v, x, sigma, None)
    assert torch.allclose(got, x - sigma.reshape(-1, 1, 1, 1) * v)
    # boundary condition f(x, 0) = x
    assert torch.equal(loss.consistency_function(lambda *_: v, x, batch(0.0, 0.0), None), x)


def test_embedded_guidance_passes_the_drawn_scales_to_every_model_and_makes_one_teacher_pass():
    calls = []

    def model(name):
        def fn(x, sigma, cond, w):
            calls.append((name, w.clone()))
            return torch.zeros_like(x)
        return fn
    loss = make_objective("tcd", FlowPath.flux(0.5), original_steps=50, w_min=1.0, w_max=5.0, loss="huber",
                          huber_c=0.001, prediction_type="flow", tcf_order=1, rho=0.0, guidance="embedded")
    x0 = torch.randn(4, 3, 2, 2)
    loss(model("student"), model("target"), model("teacher"), x0, None, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in calls]
    assert names.count("teacher") == 1 and names.count("student") == 1 and names.count("target") == 1
    drawn = loss.last_stats["w"]
    assert torch.all((drawn >= 1.0) & (drawn <= 5.0)) and drawn.unique().numel() > 1
    for _, w in calls:
        assert torch.equal(w, drawn)
    with pytest.raises(ValueError, match="guidance-distilled teacher"):
        loss(model("student"), model("target"), model("teacher"), x0, None, uncond="negative",
             generator=torch.Generator().manual_seed(0))


def test_cfg_and_vp_draws_are_unchanged_by_the_path_interface():
    """A VP objective built from a VPPath and from the abar table draw and compute the same values."""
    abar = torch.linspace(0.999, 0.01, 1000)
    x0 = torch.randn(4, 3, 2, 2)

    def net(x, t, cond):
        return 0.1 * x
    a = TCDLoss(abar, rho=0.5)(net, net, net, x0, None, generator=torch.Generator().manual_seed(5))
    b = TCDLoss(VPPath(abar), rho=0.5)(net, net, net, x0, None, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(path=FlowPath(), prediction_type="epsilon"), "does not apply to a flow model"),
    (dict(path=FlowPath(), prediction_type="v_prediction"), "does not apply to a flow model"),
    (dict(path=torch.linspace(0.999, 0.01, 1000), prediction_type="flow"), "does not apply to a vp model"),
    (dict(path=FlowPath(), prediction_type="flow", guidance="two-pass"), "guidance='two-pass'"),
    (dict(path=FlowPath(), prediction_type="flow", original_steps=0), "original_steps=0"),
])
def test_bad_flow_settings_are_refused_with_clear_messages(kwargs, message):
    path = kwargs.pop("path")
    with pytest.raises(ValueError, match=message):
        TCDLoss(path, **kwargs)


def test_bad_shifts_are_refused():
    with pytest.raises(ValueError, match="shift"):
        FlowPath.shifted(0.0)
    with pytest.raises(ValueError, match="mu"):
        FlowPath.flux(float("nan"))
    with pytest.raises(ValueError, match="not increasing"):
        FlowPath(lambda t: 1 - t).grid(4)
