"""tcd.losses: TCD / LCM objectives on data whose exact denoiser is known in closed form, and their mechanics."""
import pytest
import torch

from tcd.losses import LCMLoss, TCDLoss, distance
from tcd.schedule import vp_alphas_cumprod
from tcd.tcf import vp_alpha_sigma

ABAR = vp_alphas_cumprod()
MU, S0 = 0.3, 0.5


def gaussian_model(std=S0, shift=0.0, wiggle=0.0, pred="epsilon"):
    """Raw output of the ideal denoiser of x0 ~ N(MU, std^2), optionally perturbed (constant or t-dependent)."""
    def model(x, t, cond):
        a, s = vp_alpha_sigma(ABAR, t, x.ndim)
        x0 = MU + a * std ** 2 / (a ** 2 * std ** 2 + s ** 2) * (x - a * MU)
        x0 = x0 + shift + wiggle * torch.sin(t.float() / 50).reshape(-1, *([1] * (x.ndim - 1)))
        if pred == "sample":
            return x0
        eps = (x - a * x0) / s
        return eps if pred == "epsilon" else a * eps - s * x0
    return model


def gaussian_batch(std=S0, n=64):
    return MU + std * torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def run(loss, student, teacher, x0, seed=1, uncond=None, cond=None):
    return float(loss(student, student, teacher, x0, cond, uncond, torch.Generator().manual_seed(seed)))


LOSSES = {
    "tcd1": lambda **kw: TCDLoss(ABAR, loss="l2", **kw),
    "tcd2": lambda **kw: TCDLoss(ABAR, loss="l2", tcf_order=2, **kw),
    "tcd1_huber": lambda **kw: TCDLoss(ABAR, **kw),
    "lcm": lambda **kw: LCMLoss(ABAR, loss="l2", **kw),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_point_mass_exact_tcf_has_zero_loss_and_a_perturbed_model_does_not(name, pred):
    """Data concentrated at one point: the ideal denoiser makes every TCF exact, so the loss is ~0."""
    loss = LOSSES[name](prediction_type=pred)
    x0 = torch.full((16, 4, 8, 8), MU)
    teacher = gaussian_model(std=0.0, pred=pred)
    exact = run(loss, teacher, teacher, x0)
    perturbed = run(loss, gaussian_model(std=0.0, wiggle=0.05, pred=pred), teacher, x0)
    print(f"{name}/{pred}: exact {exact:.3e}, perturbed {perturbed:.3e}")
    assert exact < 1e-9
    assert perturbed > 1e3 * max(exact, 1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gaussian_exact_denoiser_is_near_minimal_and_perturbations_cost(name):
    """x0 ~ N(0.3, 0.5^2): with the ideal denoiser the loss is only the teacher's one-step and the TCF's
    truncation error (small); perturbing the student (teacher kept exact) costs more in every direction."""
    loss = LOSSES[name]()
    x0 = gaussian_batch()
    teacher = gaussian_model()
    exact = run(loss, teacher, teacher, x0)
    perturbed = {f"{kind}{e:+}": run(loss, gaussian_model(**{kind: e}), teacher, x0)
                 for kind in ("shift", "wiggle") for e in (-0.05, 0.05)}
    print(name, f"exact {exact:.3e}", {k: f"{v:.3e}" for k, v in perturbed.items()})
    assert exact < (3e-3 if name.endswith("huber") else 2e-4)
    assert all(v > 1.3 * exact for v in perturbed.values())


def test_second_order_tcf_is_more_consistent_on_gaussian_data():
    x0, teacher = gaussian_batch(), gaussian_model()
    first = run(LOSSES["tcd1"](), teacher, teacher, x0)
    second = run(LOSSES["tcd2"](), teacher, teacher, x0)
    assert second < 0.5 * first


def test_draws_are_on_the_skip_grid_with_s_at_most_t_n_and_reproducible():
    loss = TCDLoss(ABAR)
    x0 = gaussian_batch(n=256)
    m = gaussian_model()
    a = run(loss, m, m, x0, seed=5)
    stats = loss.last_stats
    assert a == run(loss, m, m, x0, seed=5)
    assert a != run(loss, m, m, x0, seed=6)
    t, t_n, s = (stats[k] for k in ("t", "t_n", "s"))
    assert torch.all((t + 1) % 20 == 0) and t.min() >= 19 and t.max() <= 999
    assert torch.all(t_n == (t - 20).clamp(min=0))
    assert torch.all(s <= t_n) and torch.all(s >= 0) and torch.all((s == 0) | ((s + 1) % 20 == 0))
    assert len(set(s.tolist())) > 10                     # s really varies
    w = stats["w"]
    assert w.min() >= 3.0 and w.max() <= 15.0


def test_gradients_flow_only_through_the_student_and_cfg_uses_the_uncond_pass():
    calls = {"student": 0, "target": 0, "teacher": [], "grad": []}
    weight = torch.nn.Parameter(torch.tensor(1.0))
    base = gaussian_model()

    def student(x, t, cond):
        calls["student"] += 1
        calls["grad"].append(torch.is_grad_enabled())
        return base(x, t, cond) * weight

    def target(x, t, cond):
        calls["target"] += 1
        assert not torch.is_grad_enabled()
        return base(x, t, cond)

    def teacher(x, t, cond):
        calls["teacher"].append(cond)
        assert not torch.is_grad_enabled()
        return base(x, t, cond) + (0.1 if cond == "u" else 0.0)

    x0 = gaussian_batch(n=4)
    value = TCDLoss(ABAR)(student, target, teacher, x0, "c", "u", torch.Generator().manual_seed(0))
    value.backward()
    assert weight.grad is not None and float(weight.grad) != 0
    assert calls["teacher"] == ["c", "u"] and calls["target"] == 1 and calls["student"] == 1
    assert calls["grad"] == [True]
    # w range [0, 0] or no uncond: a single conditional teacher pass, and the same value either way
    calls["teacher"].clear()
    no_cfg = TCDLoss(ABAR, w_min=0.0, w_max=0.0)(base, base, teacher, x0, "c", "u",
                                                  torch.Generator().manual_seed(0))
    assert calls["teacher"] == ["c"]
    calls["teacher"].clear()
    no_uncond = TCDLoss(ABAR)(base, base, teacher, x0, "c", None, torch.Generator().manual_seed(0))
    assert calls["teacher"] == ["c"]
    assert float(no_cfg) == pytest.approx(float(no_uncond), rel=1e-6)


def test_cfg_changes_the_teacher_target():
    x0, m = gaussian_batch(n=8), gaussian_model()

    def teacher(x, t, cond):
        return m(x, t, cond) + (0.2 if cond == "u" else 0.0)
    with_cfg = run(TCDLoss(ABAR, loss="l2"), m, teacher, x0, cond="c", uncond="u")
    without = run(TCDLoss(ABAR, loss="l2"), m, teacher, x0, cond="c", uncond=None)
    assert with_cfg > 10 * without


def test_lcm_boundary_scalings_match_diffusers_formula():
    loss = LCMLoss(ABAR)
    c_skip, c_out = loss.boundary_scalings(torch.tensor([0, 19, 999]), 2)
    t = torch.tensor([0.0, 19.0, 999.0]) * 10
    assert torch.allclose(c_skip.flatten(), 0.25 / (t ** 2 + 0.25))
    assert torch.allclose(c_out.flatten(), t / (t ** 2 + 0.25).sqrt())
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0     # f(x, 0) = x


def test_distance_l2_and_pseudo_huber():
    a, b = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0])
    assert float(distance(a, b, "l2")) == pytest.approx(4.5)
    assert float(distance(a, b, "huber", 1.0)) == pytest.approx(((10 ** 0.5) - 1) / 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "l1"}, "loss"), ({"w_min": 5.0, "w_max": 1.0}, "w_min"), ({"original_steps": 0}, "original_steps"),
    ({"prediction_type": "flow"}, "prediction_type"), ({"tcf_order": 3}, "tcf_order"), ({"huber_c": 0.0}, "huber_c"),
])
def test_bad_constructor_arguments_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TCDLoss(ABAR, **kwargs)


# ------------------------------------------------------------------------------------------------ recipe options
def draws(loss, n=4000, seed=3, per_sample=False):
    x0 = torch.zeros(n, 2)
    if per_sample:
        return loss.draw(x0, [torch.Generator().manual_seed(seed * 100000 + i) for i in range(n)])
    return loss.draw(x0, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5, 1.0])
def test_target_time_is_zero_with_probability_rho_plus_the_uniform_share(rho):
    """s ~ rho delta_0 + (1 - rho) U{grid points <= t_n}: P(s = 0) = rho + (1 - rho) E[1 / (j + 1)], j ~ U{0..49}."""
    index, end_index, _, _ = draws(TCDLoss(ABAR, rho=rho), n=20000)
    expected = rho + (1 - rho) * sum(1 / (j + 1) for j in range(50)) / 50
    observed = float((end_index == 0).double().mean())
    se = (expected * (1 - expected) / 20000) ** 0.5
    assert abs(observed - expected) < 4 * se + 1e-12
    # the rest stays uniform on 1..j: given s != 0, end_index / j has mean (j + 1) / (2 j) on average
    if rho < 1:
        nz = end_index > 0
        assert torch.all(end_index[nz] <= index[nz])


def test_lcm_and_tcd_at_any_rho_consume_the_generator_identically():
    """Paired comparisons need the same t, noise and w for every objective trained with one seed."""
    ref = draws(LCMLoss(ABAR))
    for loss in (TCDLoss(ABAR), TCDLoss(ABAR, rho=0.5), TCDLoss(ABAR, rho=1.0, tcf_order=2)):
        got = draws(loss)
        for k in (0, 2, 3):                        # grid index, noise, w
            assert torch.equal(got[k], ref[k])


def test_per_sample_generators_give_the_same_draws_however_the_batch_is_split():
    loss = TCDLoss(ABAR, rho=0.5)
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]   # noqa: E731
    x0 = torch.zeros(6, 4, 2, 2)
    whole = loss.draw(x0, gens(range(6)))
    parts = [loss.draw(x0[:1], gens([0])), loss.draw(x0[1:4], gens([1, 2, 3])), loss.draw(x0[4:], gens([4, 5]))]
    for w, *p in zip(whole, *parts):
        assert torch.equal(w, torch.cat(p))
    with pytest.raises(ValueError, match="one per sample"):
        loss.draw(x0, gens(range(5)))


def test_per_sample_pseudo_huber_is_ict_formula():
    """iCT: d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample, c = 0.00054 sqrt(d), averaged over the batch."""
    a = torch.zeros(2, 4, 5, 5)
    b = torch.zeros(2, 4, 5, 5)
    b[0, 0, 0, 0], b[1] = 3.0, 0.1
    c = 0.00054 * 100 ** 0.5
    per_sample = [(9 + c * c) ** 0.5 - c, (100 * 0.01 + c * c) ** 0.5 - c]
    assert float(distance(a, b, "huber_sample")) == pytest.approx(sum(per_sample) / 2, rel=1e-6)


@pytest.mark.parametrize("rho", [-0.1, 1.5, "0.5", float("nan")])
def test_bad_rho_says_what_is_allowed(rho):
    with pytest.raises(ValueError, match="rho"):
        TCDLoss(ABAR, rho=rho)


def test_recipes_are_valid_objectives():
    from tcd.losses import RECIPES
    assert set(RECIPES) >= {"paper", "recommended"}
    assert RECIPES["paper"] == {"rho": 0.0, "loss": "huber", "tcf_order": 1}
    for recipe in RECIPES.values():
        TCDLoss(ABAR, **recipe)


def test_make_objective_builds_what_both_trainers_train():
    from tcd.losses import LCMLoss, TCDLoss, make_objective
    from tcd.schedule import vp_alphas_cumprod
    kw = dict(original_steps=50, w_min=3.0, w_max=15.0, loss="huber", huber_c=0.001, prediction_type="epsilon",
              tcf_order=2, rho=0.5)
    tcd = make_objective("tcd", vp_alphas_cumprod(), **kw)
    assert isinstance(tcd, TCDLoss) and tcd.tcf_order == 2 and tcd.rho == 0.5
    assert isinstance(make_objective("lcm", vp_alphas_cumprod(), **kw), LCMLoss)
    with pytest.raises(ValueError, match=r"objective='sds' is not one of \('tcd', 'lcm'\)"):
        make_objective("sds", vp_alphas_cumprod(), **kw)


def test_ema_update_is_the_lcm_scripts_formula():
    """theta^- <- decay theta^- + (1 - decay) theta (diffusers' update_ema), up to float rounding."""
    from tcd.losses import ema_update_
    g = torch.Generator().manual_seed(0)
    shadow, online = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    expected = 0.95 * shadow + 0.05 * online
    ema_update_(shadow, online, 0.95)
    torch.testing.assert_close(shadow, expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 4)
    ema_update_(shadow, online, 0.0)                  # decay 0: the target is the online weights
    assert torch.equal(shadow, online)
