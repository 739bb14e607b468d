"""Trajectory consistency function (TCF, TCD paper arXiv 2402.19159 §3) on any path x_t = alpha_t x0 + sigma_t eps.

Notation (the TCD paper §3, DPM-Solver's lambda): a diffusion x_t = alpha_t * x0 + sigma_t * eps, either VP with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), or a rectified flow with alpha = 1 - sigma_flow, sigma = sigma_flow
(tcd.paths: the a(t), b(t) of a path); lambda_t = log(alpha_t / sigma_t) (half log-SNR, decreasing in t); for a jump t -> s
(s <= t) h = lambda_s - lambda_t >= 0. The network gives x0_hat(x_t, t) (from its epsilon / v / sample output),
and the TCF f(x_t, t, s) approximates x_s, the PF-ODE solution at s started from x_t, through the exponential
integrator

    x_s = (sigma_s / sigma_t) * x_t + sigma_s * integral_{lambda_t}^{lambda_s} e^lambda * x0_hat(x_lambda) dlambda

expanded in lambda to first order (x0_hat constant: DDIM, diffusers' `pred_noised_sample`) or second order
(DPM-Solver++(2S) midpoint). f(x, t, t) = x holds by construction: h = 0 zeroes the integral.

Every function here is pure torch; coefficients are tensors broadcastable against x (shape [B, 1, ..., 1]).
`trajectory_consistency_function` takes a path (tcd.paths.VPPath / FlowPath) or, as a VP shorthand, an abar table.
"""
from __future__ import annotations

from typing import Callable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# Which raw outputs each path can convert: v-prediction's formula needs alpha^2 + sigma^2 = 1 (VP), the velocity
# v = eps - x0 = dx/dsigma needs alpha + sigma = 1 (flow).
PATH_PREDICTION_TYPES = {"vp": ("epsilon", "v_prediction", "sample"), "flow": ("flow", "sample")}
TCF_ORDERS = (1, 2)


# ----------------------------------------------------------------------------------------------- VP coefficients
def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample coefficient broadcasts against an ndim-D batch."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def vp_alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) at integer timesteps t ([B] int64), shaped [B, 1, ...]."""
    abar = alphas_cumprod.to(t.device)[t.long()]
    return _per_sample(abar.sqrt(), ndim), _per_sample((1 - abar).sqrt(), ndim)


def half_log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma), the time variable of the exponential integrator (DPM-Solver's lambda)."""
    return torch.log(alpha) - torch.log(sigma)


# ----------------------------------------------------------------------------------------------- model outputs
def x0_eps_from_output(model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a raw model output, one branch per prediction type as diffusers' TCDScheduler.step."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma_t * eps) / alpha_t
    elif prediction_type == "v_prediction":
        # v = alpha * eps - sigma * x0  (Salimans & Ho), with alpha^2 + sigma^2 = 1
        x0 = alpha_t * x_t - sigma_t * model_output
        eps = alpha_t * model_output + sigma_t * x_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha_t * x0) / sigma_t
    elif prediction_type == "flow":
        # rectified-flow velocity v = eps - x0 (SD3 / Flux, diffusers' "flow_prediction"), alpha + sigma = 1
        x0 = x_t - sigma_t * model_output
        eps = x_t + alpha_t * model_output
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    return x0, eps


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """eps_hat implied by x0_hat at (x_t, t): the noise that makes x_t = alpha_t x0 + sigma_t eps.

    At sigma_t = 0 (a flow path's clean end, which the skipping grid reaches as t_n = g[0]) x_t holds no noise and
    eps is undefined: it is 0 there, so the jump from t = 0 (to s = 0, the only s <= t) is x0_hat instead of
    0 * inf = NaN. A VP table never has sigma_t = 0."""
    clean = sigma_t == 0
    eps = (x_t - alpha_t * x0) / torch.where(clean, torch.ones_like(sigma_t), sigma_t)
    return torch.where(clean, torch.zeros_like(eps), eps)


# ----------------------------------------------------------------------------------------------- TCF, first order
def tcf_first_order(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_s: torch.Tensor,
                    sigma_s: torch.Tensor) -> torch.Tensor:
    """f^1(x_t, t, s) = alpha_s * x0_hat + sigma_s * eps_hat: the DDIM (eta = 0) jump to s.

    Identical to the paper's exponential-integrator form (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat
    (substitute eps_hat = (x_t - alpha_t x0_hat) / sigma_t and e^{-h} = alpha_t sigma_s / (sigma_t alpha_s)), and to
    diffusers' `TCDScheduler.step(...).pred_noised_sample`.
    """
    return alpha_s * x0_hat + sigma_s * eps_hat


# ----------------------------------------------------------------------------------------------- TCF, second order
def tcf_second_order(x_t: torch.Tensor, x0_t: torch.Tensor, x0_u: torch.Tensor,
                     alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_u: torch.Tensor, sigma_u: torch.Tensor,
                     alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """f^2(x_t, t, s), DPM-Solver++(2S)-style (Lu et al. 2022, Algorithm 1 with r = 1/2), given x0_hat at t and at the intermediate point u.

        r   = (lambda_u - lambda_t) / h                     (the spec's lambda_u = lambda_t + r h)
        D   = (1 - 1/(2r)) x0_hat(x_t, t) + 1/(2r) x0_hat(u_x, u)
        f^2 = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D

    r is recomputed from the actual (alpha_u, sigma_u), so u may be snapped to an integer timestep; rows with h = 0
    (s = t) return x_t exactly, whatever r.
    """
    lam_t = half_log_snr(alpha_t, sigma_t)
    h = half_log_snr(alpha_s, sigma_s) - lam_t
    r = (half_log_snr(alpha_u, sigma_u) - lam_t) / torch.where(h > 0, h, torch.ones_like(h))
    r = torch.where(h > 0, r, torch.ones_like(r))
    half_inv_r = 0.5 / r
    d = (1 - half_inv_r) * x0_t + half_inv_r * x0_u
    return (sigma_s / sigma_t) * x_t - alpha_s * torch.expm1(-h) * d


def midpoint_timesteps(alphas_cumprod: torch.Tensor, t: torch.Tensor, s: torch.Tensor, r: float = 0.5) -> torch.Tensor:
    """Integer timesteps u between s and t nearest (in lambda) to lambda_t + r (lambda_s - lambda_t).

    Snapping keeps u on the model's own timestep grid (a discrete model saw only integer t in training);
    tcf_second_order uses the snapped point's true r. Where s < t, u is kept strictly below t (u = t would make
    r = 0); where s = t, u = t.
    """
    if not 0.0 < r <= 1.0:
        raise ValueError(f"midpoint ratio r={r} must be in (0, 1]; 0.5 is DPM-Solver++(2S)'s midpoint")
    abar = alphas_cumprod.double().to(t.device)
    lam_table = 0.5 * (torch.log(abar) - torch.log1p(-abar))          # [T], decreasing in t
    lam_t, lam_s = lam_table[t.long()], lam_table[s.long()]
    lam_u = lam_t + r * (lam_s - lam_t)
    u = torch.argmin((lam_table[None, :] - lam_u[:, None]).abs(), dim=1)
    u = torch.minimum(torch.maximum(u, s.long()), t.long())
    return torch.where((u == t.long()) & (s.long() < t.long()), t.long() - 1, u)


# ----------------------------------------------------------------------------------------------- the TCF of a model
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Stand-in coefficients for rows whose second-order step does not exist (flow rows at pure noise or landing on the
# clean end): they keep that branch finite, so torch.where's discarded branch cannot turn gradients into NaN.
_SAFE_T, _SAFE_U, _SAFE_S = (0.6, 0.8), (0.7, 0.714), (0.8, 0.6)


def trajectory_consistency_function(x0_fn: X0Fn, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                                    path, order: int = 1, r: float = 0.5) -> torch.Tensor:
    """f_theta(x_t, t, s) for a model given as x0_fn(x, times [B]) -> x0_hat, on `path` (tcd.paths.VPPath /
    FlowPath, or an abar table for VP). Times are the model's own: integer timesteps (VP) or sigmas (flow).

    order 1: one model evaluation; order 2: two (at t and at the midpoint u), DPM-Solver++(2S). Rows whose jump has
    no finite midpoint (a flow row from sigma 1 or to sigma 0) take the first-order jump, as the sampler does.
    """
    from .paths import as_path
    if order not in TCF_ORDERS:
        raise ValueError(f"TCF order {order!r} is not supported; use one of {TCF_ORDERS} (1 = DDIM form, "
                         f"2 = DPM-Solver++(2S) midpoint)")
    path = as_path(path)
    ndim = x_t.ndim
    alpha_t, sigma_t = path.coefficients(t, ndim)
    alpha_s, sigma_s = path.coefficients(s, ndim)
    x0_t = x0_fn(x_t, t)
    eps_t = eps_from_x0(x_t, x0_t, alpha_t, sigma_t)
    first = tcf_first_order(x0_t, eps_t, alpha_s, sigma_s)
    if order == 1:
        return first
    u, second_ok = path.midpoint(t, s, r)
    alpha_u, sigma_u = path.coefficients(u, ndim)
    u_x = tcf_first_order(x0_t, eps_t, alpha_u, sigma_u)
    x0_u = x0_fn(u_x, u)
    ok = second_ok.to(x_t.device).reshape(-1, *([1] * (ndim - 1)))

    def safe(value, fallback):
        return torch.where(ok, value, torch.full_like(value, fallback))
    second = tcf_second_order(x_t, x0_t, x0_u, safe(alpha_t, _SAFE_T[0]), safe(sigma_t, _SAFE_T[1]),
                              safe(alpha_u, _SAFE_U[0]), safe(sigma_u, _SAFE_U[1]),
                              safe(alpha_s, _SAFE_S[0]), safe(sigma_s, _SAFE_S[1]))
    return torch.where(ok, second, first)


def x0_fn_from_model(model: Callable, cond, path, prediction_type: str = "epsilon", guidance=None) -> X0Fn:
    """Adapt a raw model(x_t, t, cond) -> output (per prediction_type) to x0_fn(x_t, t) -> x0_hat on `path` (or an
    abar table). With `guidance` (a [B] tensor) the model is called model(x_t, t, cond, guidance): a
    guidance-distilled model (Flux-dev class) takes the guidance scale as an input."""
    from .paths import as_path
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    path = as_path(path)
    if prediction_type not in PATH_PREDICTION_TYPES[path.kind]:
        raise ValueError(f"prediction_type={prediction_type!r} does not apply to a {path.kind} model; use one of "
                         f"{PATH_PREDICTION_TYPES[path.kind]}")

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = path.coefficients(t, x.ndim)
        out = model(x, t, cond) if guidance is None else model(x, t, cond, guidance)
        return x0_eps_from_output(out, x, alpha.to(x.dtype), sigma.to(x.dtype), prediction_type)[0]
    return x0_fn
