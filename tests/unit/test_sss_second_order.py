"""Second-order SSS (sample_tcd(tcf_order=2)): convergence order against the exact PF-ODE of Gaussian data, model
call counts, reduction to first order where the ODE is trivial, the noise stream, and the midpoint helpers."""
import math

import pytest
import torch

from tcd.sampling import sample_tcd, seeded_noise_sampler, sss_model_calls
from tcd.schedule import DiscreteSchedule, FlowSchedule, tcd_timesteps, vp_alphas_cumprod
from tcd.tcf import midpoint_timesteps

SD = DiscreteSchedule.from_alphas_cumprod(vp_alphas_cumprod())
FLOW = FlowSchedule()

# x0 ~ N(MU, S^2) independently per dimension: every quantity of the PF-ODE has a closed form.
MU = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)


def gaussian_denoiser(schedule, calls=None):
    """The exact x0 prediction E[x0 | x] for x = a x0 + b eps: MU + a S^2 / (a^2 S^2 + b^2) (x - a MU)."""
    def model(x, sigma, **_):
        s = float(sigma[0])
        if calls is not None:
            calls.append(s)
        a, b = schedule.a(s), schedule.b(s)
        return MU + a * S ** 2 / (a * a * S ** 2 + b * b) * (x - a * MU)
    return model


def exact_ode_solution(schedule, x_t, sigma_t, sigma_s):
    """The PF-ODE of a Gaussian is the monotone affine map between its marginals N(a MU, a^2 S^2 + b^2)."""
    a_t, b_t, a_s, b_s = schedule.a(sigma_t), schedule.b(sigma_t), schedule.a(sigma_s), schedule.b(sigma_s)
    return a_s * MU + ((a_s ** 2 * S ** 2 + b_s ** 2) / (a_t ** 2 * S ** 2 + b_t ** 2)).sqrt() * (x_t - a_t * MU)


def half_log_snr(schedule, sigma):
    return math.log(schedule.a(sigma) / schedule.b(sigma))


def sigma_at_half_log_snr(schedule, lam):
    if schedule.kind == "flow":
        return 1.0 / (1.0 + math.exp(lam))                       # lambda = log((1 - sigma) / sigma)
    return float(SD.sigmas[torch.argmin((SD.log_sigmas.double() + lam).abs())])   # lambda = -log sigma, on the table


def one_jump_errors(schedule, sigma_t, order, hs=(0.4, 0.2, 0.1, 0.05)):
    """(h, |x_s - exact|) for one gamma-0 step t -> s with h = lambda_s - lambda_t near each of hs."""
    x_t = schedule.a(sigma_t) * MU + torch.tensor([1.3, -0.4, 2.5, 0.9], dtype=torch.float64)
    out = []
    for h in hs:
        sigma_s = sigma_at_half_log_snr(schedule, half_log_snr(schedule, sigma_t) + h)
        sigmas = torch.tensor([sigma_t, sigma_s], dtype=torch.float64)
        got = sample_tcd(gaussian_denoiser(schedule), x_t[None].clone(), sigmas, gamma=0.0, schedule=schedule,
                         tcf_order=order, disable=True)[0]
        true_h = half_log_snr(schedule, sigma_s) - half_log_snr(schedule, sigma_t)
        out.append((true_h, float((got - exact_ode_solution(schedule, x_t, sigma_t, sigma_s)).norm())))
    return out


@pytest.mark.parametrize("schedule, sigma_t", [(SD, float(SD.sigmas[600])), (FLOW, 0.6)], ids=["discrete", "flow"])
@pytest.mark.parametrize("order", [1, 2])
def test_one_jump_local_error_has_the_order_of_the_tcf(schedule, sigma_t, order):
    """A TCF of order p has local error O(h^(p+1)): halving h divides the error by 2^(p+1), 4 for the paper's
    first-order jump and 8 for the second-order one. The observed exponent must be within 0.5 of p + 1 (the
    tolerance separates the two orders; higher-order terms shrink with h)."""
    errors = one_jump_errors(schedule, sigma_t, order)
    for (h1, e1), (h2, e2) in zip(errors, errors[1:]):
        assert h2 < h1 and e2 < e1
    (h1, e1), (h2, e2) = errors[-2:]
    observed = math.log(e1 / e2) / math.log(h1 / h2)
    assert abs(observed - (order + 1)) < 0.5, (order, errors)


@pytest.mark.parametrize("schedule, sigmas, final_step, expected", [
    (SD, SD.sigmas_for(tcd_timesteps(4)), "diffusers", [2, 2, 2, 2]),
    (SD, SD.sigmas_for(tcd_timesteps(4)), "x0", [2, 2, 2, 1]),              # the last step returns D itself
    (FLOW, torch.tensor([0.9, 0.6, 0.3, 0.1, 0.0]), "diffusers", [2, 2, 2, 1]),   # b_s = 0 on the last step
    (FLOW, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), "diffusers", [1, 2, 2, 1]),  # a_t = 0 at sigma = 1
], ids=["discrete", "discrete-x0", "flow", "flow-from-pure-noise"])
def test_model_calls_per_step_and_the_nfe_helper(schedule, sigmas, final_step, expected):
    calls, seen = [], []
    model = gaussian_denoiser(schedule, calls)
    x = schedule.b(float(sigmas[0])) * torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample_tcd(model, x, sigmas, gamma=0.3, schedule=schedule, final_step=final_step, tcf_order=2,
               callback=lambda d: seen.append((len(calls), float(d["sigma"]))), disable=True)
    # the callback runs once per step, right after the step's first call, which is at sigma_t
    assert [sigma for _, sigma in seen] == pytest.approx(sigmas[:-1].tolist())
    boundaries = [n for n, _ in seen] + [len(calls) + 1]
    assert [b - a for a, b in zip(boundaries, boundaries[1:])] == expected
    assert [calls[n - 1] for n, _ in seen] == pytest.approx(sigmas[:-1].tolist())
    assert sss_model_calls(sigmas, 2, schedule.kind, 0.3, final_step) == sum(expected) == len(calls)
    assert sss_model_calls(sigmas, 1, schedule, 0.3, final_step) == len(sigmas) - 1


def test_nfe_helper_for_step_counts_and_gamma_one_flow():
    assert sss_model_calls(4, tcf_order=2) == 8 and sss_model_calls(4, tcf_order=1) == 4
    assert sss_model_calls(4, tcf_order=2, final_step="x0") == 7
    # gamma = 1 on a flow model jumps to sigma_s = 0 every step: h is infinite everywhere, so all first order
    assert sss_model_calls(torch.tensor([0.9, 0.6, 0.3, 0.0]), 2, "flow", gamma=1.0) == 3
    with pytest.raises(ValueError, match="pass the SIGMAS"):
        sss_model_calls(4, 2, "flow")
    with pytest.raises(ValueError, match="'discrete' or 'flow'"):
        sss_model_calls(4, 2, "edm")


def test_midpoints_stay_on_the_model_table_strictly_inside_the_jump():
    sigmas = SD.sigmas_for(tcd_timesteps(8))
    calls = []
    x = float(sigmas[0]) * torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sample_tcd(gaussian_denoiser(SD, calls), x, sigmas, gamma=0.3, schedule=SD, tcf_order=2, disable=True)
    table = set(SD.sigmas.tolist())
    assert all(s in table for s in calls)
    for i in range(8):
        sigma_t, sigma_u = calls[2 * i], calls[2 * i + 1]
        sigma_s = SD.sigma_s(float(sigmas[i + 1]), 0.3)
        assert sigma_t == pytest.approx(float(sigmas[i])) and sigma_s < sigma_u < sigma_t


@pytest.mark.parametrize("schedule, sigmas", [(SD, SD.sigmas_for(tcd_timesteps(4))),
                                              (FLOW, torch.tensor([0.9, 0.6, 0.3, 0.1, 0.0]))],
                         ids=["discrete", "flow"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_point_mass_data_reproduces_first_order_with_the_same_noise(schedule, sigmas, gamma):
    """For x0 = MU surely, D = MU everywhere and the first-order TCF already solves the ODE exactly: the second
    order must agree (up to float64 rounding) and draw exactly the same noise, in the same order."""
    def point_mass(x, sigma, **_):
        return MU.expand_as(x)

    x = float(sigmas[0]) * torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outputs, draws = {}, {}
    for order in (1, 2):
        seeded = seeded_noise_sampler(x, seed=11)
        draws[order] = []

        def recording(sigma, sigma_next, seeded=seeded, log=draws[order]):
            log.append((sigma, sigma_next))
            return seeded(sigma, sigma_next)
        outputs[order] = sample_tcd(point_mass, x.clone(), sigmas, gamma=gamma, schedule=schedule,
                                    noise_sampler=recording, tcf_order=order, disable=True)
    assert draws[1] == draws[2]
    assert len(draws[1]) == (len(sigmas) - 2 if gamma > 0 else 0)   # every step but the last re-noises iff gamma > 0
    assert torch.allclose(outputs[2], outputs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.3, 0.7])
def test_gamma_keeps_the_noise_stream_of_first_order(gamma):
    """Same seed, same gamma: both orders draw the same number of noises at the same (sigma, sigma_next), so order 2
    changes only the deterministic jumps. Gaussian data, where the two orders give different images."""
    sigmas = SD.sigmas_for(tcd_timesteps(4))
    x = float(sigmas[0]) * torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    draws, outputs = {}, {}
    for order in (1, 2):
        seeded = seeded_noise_sampler(x, seed=5)
        draws[order] = []

        def recording(sigma, sigma_next, seeded=seeded, log=draws[order]):
            noise = seeded(sigma, sigma_next)
            log.append((sigma, sigma_next, noise))
            return noise
        outputs[order] = sample_tcd(gaussian_denoiser(SD), x.clone(), sigmas, gamma=gamma, schedule=SD,
                                    noise_sampler=recording, tcf_order=order, disable=True)
    assert len(draws[1]) == len(draws[2]) == 3
    for (s1, n1, z1), (s2, n2, z2) in zip(draws[1], draws[2]):
        assert (s1, n1) == (s2, n2) and torch.equal(z1, z2)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-6)


@pytest.mark.parametrize("order", [0, 3, 1.5, "2", True])
def test_invalid_tcf_order_is_refused(order):
    with pytest.raises(ValueError, match=r"tcf_order=.* is not one of \(1, 2\)"):
        sample_tcd(gaussian_denoiser(FLOW), torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0.5, 0.0]),
                   schedule=FLOW, tcf_order=order)


def test_discrete_midpoint_is_the_trainers_midpoint_on_grid_points():
    """DiscreteSchedule.sigma_mid (sampler) and tcd.tcf.midpoint_timesteps (trainer's second-order TCF) pick the same
    u for every on-grid jump the TCD schedules make."""
    abar = vp_alphas_cumprod()
    pairs = set()
    for steps in range(1, 9):
        ts = tcd_timesteps(steps) + [0]
        for t, t_next in zip(ts, ts[1:]):
            for gamma in (0.0, 0.1, 0.3, 0.5, 0.9):
                pairs.add((t, int(math.floor((1 - gamma) * t_next))))
    pairs |= {(t, t - 1) for t in (1, 500, 999)} | {(t, t) for t in (0, 259)}
    t = torch.tensor([p[0] for p in pairs])
    s = torch.tensor([p[1] for p in pairs])
    u = midpoint_timesteps(abar, t, s)
    for (ti, si), ui in zip(pairs, u.tolist()):
        assert SD.sigma_mid(SD.sigma_at(ti), SD.sigma_at(si)) == SD.sigma_at(ui), (ti, si, ui)


def test_sigma_mid_is_the_half_log_snr_midpoint():
    sigma_u = FLOW.sigma_mid(0.8, 0.2)
    lam = FlowSchedule.half_log_snr
    assert lam(sigma_u) == pytest.approx((lam(0.8) + lam(0.2)) / 2, abs=1e-12)
    assert FLOW.sigma_mid(0.5, 0.5) == 0.5
    # discrete: lambda = -log sigma, so the unsnapped midpoint is the geometric mean; the snapped one is its
    # nearest table entry, and adjacent timesteps leave only u = s (r = 1)
    sigma_t, sigma_s = SD.sigma_at(700), SD.sigma_at(300)
    geometric = math.sqrt(sigma_t * sigma_s)
    nearest = float(SD.sigmas[torch.argmin((SD.sigmas.double().log() - math.log(geometric)).abs())])
    assert SD.sigma_mid(sigma_t, sigma_s) == nearest
    assert SD.sigma_mid(SD.sigma_at(400), SD.sigma_at(399)) == SD.sigma_at(399)
    for bad, match in [(lambda: FLOW.sigma_mid(1.0, 0.5), "pure noise"), (lambda: FLOW.sigma_mid(0.5, 0.0), "clean"),
                       (lambda: SD.sigma_mid(1.0, 0.0), "clean"), (lambda: SD.sigma_mid(1.0, 0.5, r=0.0), "r=0.0")]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_disable_turns_off_the_progress_bar(capsys):
    sigmas = torch.tensor([0.9, 0.5, 0.0])
    x = torch.zeros(1, 4, dtype=torch.float64)
    sample_tcd(gaussian_denoiser(FLOW), x, sigmas, schedule=FLOW, disable=True)
    assert capsys.readouterr().err == ""
    sample_tcd(gaussian_denoiser(FLOW), x, sigmas, schedule=FLOW, disable=False)
    assert "2/2" in capsys.readouterr().err
