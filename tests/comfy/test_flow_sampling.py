"""TCD on flow-matching models inside a real ComfyUI 0.3.75: tiny SD3-class (MMDiT, ModelSamplingDiscreteFlow
shift 3) and Flux-class (ModelSamplingFlux) models built from ComfyUI's own classes (scripts/make_tiny_flow.py).

* what ComfyUI's checkpoint detection accepts at tiny sizes;
* KSampler (sampler + scheduler `tcd`) and SamplerCustomAdvanced (TCD Sampler + TCD Scheduler nodes) on both;
* exact references (harness benchmarks/flow_parity.py): gamma 0 = core euler, gamma 1 = core lcm, 0 < gamma < 1 =
  core euler_ancestral_RF with eta_i = gamma s_i / (s_i - s_{i+1}), gamma 0 / 1 = diffusers' FlowMatchEuler
  (deterministic / stochastic), each to <= 1e-5 relative in float32;
* a distributional check on Gaussian data whose denoiser returns a sample of the exact posterior p(x0 | x_sigma):
  every intermediate marginal matches its closed form within 3 standard errors, and a 2% error in the re-noising
  kernel (or a posterior-mean denoiser) fails the same check.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import flow_parity as fp  # noqa: E402  the harness shared with the benchmark
import make_tiny_flow as mtf  # noqa: E402  (scripts/ is on sys.path, tests/conftest.py)

KINDS = ("sd3", "flux")


@pytest.fixture(scope="module")
def models(pack):
    return {kind: (mtf.tiny_model_patcher(kind), fp.conditioning(kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def tiny_files(pack, tiny_flow_models):
    return {k: str(v) for k, v in tiny_flow_models.items()}


# ------------------------------------------------------------------------------------------------ detection
def test_tiny_sd3_files_are_detected_by_comfyui(tiny_files):
    """CheckpointLoaderSimple's and UNETLoader's loaders accept the tiny MMDiT (hidden = 64 x depth) as SD3."""
    import comfy.model_sampling as cms
    import comfy.sd
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(tiny_files["sd3_checkpoint"])[:3]
    assert type(model.model).__name__ == "SD3"
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, cms.ModelSamplingDiscreteFlow) and isinstance(ms, cms.CONST) and ms.shift == 3.0
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    assert cond[0][0].shape == (1, 77, 4096) and cond[0][1]["pooled_output"].shape == (1, 2048)
    assert vae.latent_channels == 16
    unet = comfy.sd.load_diffusion_model(tiny_files["sd3_unet"])
    assert type(unet.model).__name__ == "SD3"


def test_tiny_flux_file_is_refused_by_detection(tiny_files):
    """ComfyUI 0.3.75 detects a Flux file with fixed num_heads 24 and rotary axes [16, 56, 56]: only hidden 3072
    builds, so the tiny Flux (hidden 64) cannot be loaded from a file; the tests build it from its unet_config."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils
    import comfyui_version
    sd = comfy.utils.load_torch_file(tiny_files["flux_unet"])
    detected = comfy.model_detection.detect_unet_config(sd, "")
    assert detected["hidden_size"] == 64 and detected["image_model"] == "flux"
    if comfyui_version.__version__ != "0.3.75":
        pytest.skip("the refusal is specific to ComfyUI 0.3.75's detection table")
    assert (detected["num_heads"], detected["axes_dim"]) == (24, [16, 56, 56])
    with pytest.raises(ValueError, match="divisible by num_heads 24"):
        comfy.sd.load_diffusion_model(tiny_files["flux_unet"])


# ------------------------------------------------------------------------------------------------ running
def ksample(patcher, cond, seed, steps=4, sampler="tcd", scheduler="tcd"):
    import comfy.sample
    latent = torch.zeros(fp.LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, 1.0, sampler, scheduler, cond, cond, latent, seed=seed,
                               disable_pbar=True)


def custom_advanced(patcher, cond, seed, gamma=0.3, steps=4):
    """The SamplerCustomAdvanced graph: RandomNoise + CFGGuider + TCD Sampler + TCD Scheduler."""
    import nodes

    def result(out):
        return out.result if hasattr(out, "result") else out

    m = nodes.NODE_CLASS_MAPPINGS
    noise = result(m["RandomNoise"].execute(seed))[0]
    guider = result(m["CFGGuider"].execute(patcher, cond, cond, 1.0))[0]
    sampler = m["TCD_Sampler"]().get_sampler(gamma)[0]
    sigmas = m["TCD_Scheduler"]().get_sigmas(patcher, steps, 1.0, 50, "comfyui")[0]
    return result(m["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas,
                                                     {"samples": torch.zeros(fp.LATENT)}))[0]["samples"]


@pytest.mark.parametrize("kind", KINDS)
def test_ksampler_and_custom_advanced_run_tcd_on_flow_models(models, kind):
    patcher, cond = models[kind]
    a, b, c = ksample(patcher, cond, 3), ksample(patcher, cond, 3), ksample(patcher, cond, 4)
    assert a.shape == fp.LATENT and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert float((a - ksample(patcher, cond, 3, sampler="euler")).abs().max()) > 1e-3   # gamma 0.3 re-noises
    assert torch.allclose(custom_advanced(patcher, cond, 3), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,table_size", [("sd3", 1000), ("flux", 10000)])
def test_tcd_scheduler_picks_the_skipping_grid_on_the_shifted_table(models, kind, table_size):
    """TCD timesteps index the model's own shifted sigma table, whose entry t sits at unshifted time
    u = (t + 1) / size: 4 steps -> u = 1, 0.76, 0.5, 0.26, then the model's shift (closed forms below)."""
    import comfy.samplers
    patcher = models[kind][0]
    ms = patcher.get_model_object("model_sampling")
    assert ms.sigmas.numel() == table_size
    u = torch.tensor([1.0, 0.76, 0.5, 0.26], dtype=torch.float64)
    if kind == "sd3":       # SD3: sigma = shift u / (1 + (shift - 1) u), shift 3 (time_snr_shift)
        expected = 3.0 * u / (1 + 2.0 * u)
    else:                   # Flux: sigma = e^mu / (e^mu + 1/u - 1), mu = 1.15 (flux_time_shift)
        expected = math.exp(1.15) / (math.exp(1.15) + 1 / u - 1)
    for sigmas in (fp.tcd_sigmas(patcher, 4), comfy.samplers.calculate_sigmas(ms, "tcd", 4)):
        assert sigmas[-1] == 0 and sigmas[:-1].tolist() == pytest.approx(expected.tolist(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ exact references
LIMIT = 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", fp.STEPS)
def test_gamma_0_is_core_euler(models, kind, steps):
    assert fp.vs_euler(*models[kind], steps) <= LIMIT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", fp.STEPS)
def test_gamma_1_is_core_lcm(models, kind, steps):
    assert fp.vs_lcm(*models[kind], steps) <= LIMIT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", fp.MID_GAMMAS)
@pytest.mark.parametrize("steps", (2, 4, 8))
def test_gamma_between_is_euler_ancestral_rf_with_mapped_eta(models, kind, gamma, steps):
    assert fp.vs_euler_ancestral_rf(*models[kind], steps, gamma) <= LIMIT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", (0.0, 1.0))
@pytest.mark.parametrize("steps", (1, 4, 8))
def test_gamma_0_and_1_are_diffusers_flow_match_euler(models, kind, gamma, steps):
    patcher, cond = models[kind]
    assert fp.vs_diffusers(patcher, kind, cond, steps, gamma) <= LIMIT


def test_references_tell_samplers_apart(models):
    """The harness can fail: gamma 0.3 is neither euler nor lcm, and a wrong eta mapping is not TCD."""
    import comfy.samplers
    patcher, cond = models["sd3"]
    sigmas = fp.tcd_sigmas(patcher, 4)
    noise = fp.ReplayNoise(fp.LATENT, 17)
    tcd = fp.run(patcher, fp.tcd_sampler(0.3, noise_sampler=noise.sampler()), sigmas, cond)
    for core in (comfy.samplers.ksampler("euler"), comfy.samplers.ksampler("lcm", {"noise_sampler": noise.sampler()}),
                 comfy.samplers.ksampler("euler_ancestral_RF", {"eta": 0.3, "noise_sampler": noise.sampler()})):
        assert fp.rel(tcd, fp.run(patcher, core, sigmas, cond)) > 1e-3


# ------------------------------------------------------------------------------------------------ distribution
N = 1_000_000
MU, S = 0.5, 0.8          # data x0 ~ N(MU, S^2)


def posterior_sampler(mu, s, seed, mean_only=False):
    """Denoiser of x_sigma = (1 - sigma) x0 + sigma eps, x0 ~ N(mu, s^2): a SAMPLE of the exact Gaussian posterior
    p(x0 | x_sigma) (precision 1/s^2 + (1 - sigma)^2 / sigma^2), or its mean when mean_only."""
    gen = torch.Generator().manual_seed(seed)

    def model(x, sigma, **_):
        sig = float(sigma.flatten()[0])
        a = 1.0 - sig
        var = 1.0 / (1.0 / s ** 2 + a * a / sig ** 2)
        mean = var * (mu / s ** 2 + a * x / sig ** 2)
        return mean if mean_only else mean + math.sqrt(var) * torch.randn(x.shape, generator=gen)

    return model


def marginal_z_scores(model, sigmas, schedule, gamma, noise_scale=1.0, seed=0, mu=MU, s=S):
    """Run sample_tcd on N scalars from x = eps at sigmas[0] = 1 and return the largest |z| of the sample mean and
    variance against the exact marginal N((1 - sigma) mu, (1 - sigma)^2 s^2 + sigma^2) at every later sigma."""
    from tcd.sampling import sample_tcd
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seen = []

    def noise(sigma=None, sigma_next=None):
        return noise_scale * torch.randn(1, N, generator=g, dtype=torch.float64)

    out = sample_tcd(model, x, sigmas.double(), gamma=gamma, schedule=schedule, noise_sampler=noise,
                     callback=lambda d: seen.append((float(d["sigma"]), d["x"].clone())))
    checks = seen[1:] + [(float(sigmas[-1]), out)]
    worst = 0.0
    for sigma, xs in checks:
        m, v = (1 - sigma) * mu, (1 - sigma) ** 2 * s ** 2 + sigma ** 2
        z_mean = (float(xs.mean()) - m) / math.sqrt(v / N)
        z_var = (float(xs.var()) - v) / (v * math.sqrt(2.0 / (N - 1)))
        worst = max(worst, abs(z_mean), abs(z_var))
    return worst


@pytest.fixture(scope="module")
def flow_schedules(models):
    from tcd import backend
    return {kind: (backend.schedule_for(models[kind][0].get_model_object("model_sampling")), models[kind][0])
            for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", (0.0, 0.3, 1.0))
@pytest.mark.parametrize("steps", (2, 4))
def test_marginals_are_exact_with_a_posterior_sampling_denoiser(flow_schedules, kind, gamma, steps):
    schedule, patcher = flow_schedules[kind]
    sigmas = fp.tcd_sigmas(patcher, steps)
    assert float(sigmas[0]) == pytest.approx(1.0, abs=1e-6)
    assert marginal_z_scores(posterior_sampler(MU, S, seed=7), sigmas, schedule, gamma) <= 3.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", (0.3, 1.0))
def test_a_perturbed_renoising_kernel_fails_the_check(flow_schedules, kind, gamma):
    schedule, patcher = flow_schedules[kind]
    sigmas = fp.tcd_sigmas(patcher, 4)
    assert marginal_z_scores(posterior_sampler(MU, S, seed=7), sigmas, schedule, gamma, noise_scale=1.02) > 3.0


def test_a_posterior_mean_denoiser_fails_the_check(flow_schedules):
    schedule, patcher = flow_schedules["sd3"]
    sigmas = fp.tcd_sigmas(patcher, 4)
    assert marginal_z_scores(posterior_sampler(MU, S, seed=7, mean_only=True), sigmas, schedule, 0.3) > 3.0


def test_one_step_from_1_to_half_keeps_variance_only_with_a_posterior_sample(flow_schedules):
    """Data N(0, 1), one step sigma 1 -> 0.5 at gamma 0.3: the marginal variance must be 0.5^2 + 0.5^2 = 0.5; a
    posterior-mean denoiser (D = 0 at sigma 1) gives 0.25, the variance of the forward kernel from s alone."""
    from tcd.sampling import sample_tcd
    schedule = flow_schedules["sd3"][0]
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = torch.randn(1, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)

    def noise(sigma=None, sigma_next=None):
        return torch.randn(1, N, generator=g, dtype=torch.float64)

    se = 0.5 * math.sqrt(2.0 / (N - 1))
    sampled = sample_tcd(posterior_sampler(0.0, 1.0, seed=5), x, sigmas, gamma=0.3, schedule=schedule,
                         noise_sampler=noise)
    assert abs(float(sampled.var()) - 0.5) <= 3 * se
    mean_only = sample_tcd(posterior_sampler(0.0, 1.0, seed=5, mean_only=True), x, sigmas, gamma=0.3,
                           schedule=schedule, noise_sampler=noise)
    assert float(mean_only.var()) == pytest.approx(0.25, abs=3 * 0.25 * math.sqrt(2.0 / (N - 1)))
