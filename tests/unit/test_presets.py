"""tcd.presets without ComfyUI: family detection from metadata / names / architecture, the data's sources, and the
"exact" equivalence claims checked against the diffusers schedulers each family's model card uses (DDIM trailing,
Euler trailing, LCM, LCM at DMD2's timesteps), on the same network and noise."""
import math
import sys
from pathlib import Path

import pytest
import torch

from tcd import lora as tl
from tcd import presets as tp
from tcd.sampling import sample_tcd
from tcd.schedule import DiscreteSchedule, tcd_timesteps, vp_alphas_cumprod

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from parity import net  # noqa: E402  the deterministic stand-in network of the TCD parity harness

SHAPE = (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("name,meta,arch,key,steps", [
    ("TCD-SD15-LoRA.safetensors", {}, tl.ARCH_SD1, "tcd", None),
    ("sd15_tcd.safetensors", {}, None, "tcd", None),
    ("Hyper-SD15-1step-lora.safetensors", {}, tl.ARCH_SD1, "hyper-sd-unified", 1),
    ("Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors", {}, None, "hyper-sd-unified", 1),
    ("Hyper-SD15-8steps-lora.safetensors", {}, tl.ARCH_SD1, "hyper-sd-nstep", 8),
    ("Hyper-SDXL-12steps-CFG-lora.safetensors", {}, tl.ARCH_SDXL, "hyper-sd-cfg", 12),
    ("Hyper-SD3-8steps-CFG-lora.safetensors", {}, tl.ARCH_SD3, "hyper-sd3", 8),
    ("Hyper-FLUX.1-dev-8steps-lora.safetensors", {}, tl.ARCH_FLUX, "hyper-flux", 8),
    ("pcm_sdxl_smallcfg_4step_converted.safetensors", {}, tl.ARCH_SDXL, "pcm-smallcfg", 4),
    ("pcm_sd15_normalcfg_8step_converted.safetensors", {}, tl.ARCH_SD1, "pcm-normalcfg", 8),
    ("pcm_deterministic_4step_shift3.safetensors", {}, tl.ARCH_SD3, "pcm-sd3", 4),
    ("sdxl_tdd_lora_weights.safetensors", {}, tl.ARCH_SDXL, "tdd", None),
    ("FLUX.1-dev_tdd_lora_weights.safetensors", {}, tl.ARCH_FLUX, "tdd-flux", None),
    ("lcm-lora-sdv1-5.safetensors", {}, tl.ARCH_SD1, "lcm", None),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", {}, tl.ARCH_SDXL, "dmd2", 4),
    ("sdxl_lightning_4step_lora.safetensors", {}, tl.ARCH_SDXL, "lightning", 4),
    ("pytorch_lora_weights.safetensors", {}, tl.ARCH_SDXL, None, None),
    ("stcdx.safetensors", {}, None, None, None),
    ("my_lora.safetensors", {"tcd.family": "TCD LoRA"}, tl.ARCH_SD1, "tcd", None),
    ("my_lora.safetensors", {"tcd.family": "LCM LoRA"}, tl.ARCH_SD1, "lcm", None),
    ("my_lora.safetensors", {"tcd.family": "TCD LoRA"}, tl.ARCH_SD3, "tcd-flow", None),
    ("my_lora.safetensors", {"tcd.family": "TCD LoRA"}, tl.ARCH_FLUX, "tcd-flow", None),
    ("my_lora.safetensors", {"tcd.family": "LCM LoRA"}, tl.ARCH_FLUX, "lcm-flow", None),
    ("flux_tcd_lora.safetensors", {}, tl.ARCH_FLUX, "tcd-flow", None),
    ("sd3_lcm_lora.safetensors", {}, tl.ARCH_SD3, "lcm-flow", None),
    ("my_lora.safetensors", {"ss_output_name": "tcd_sdxl_v1"}, tl.ARCH_SDXL, "tcd", None),
    ("my_lora.safetensors", {"modelspec.title": "Hyper-SD 2 steps"}, tl.ARCH_SDXL, "hyper-sd-nstep", 2),
])
def test_family_from_metadata_name_and_architecture(name, meta, arch, key, steps):
    found = tp.detect_family(meta, name, arch)
    assert (found.key, found.steps) == (key, steps), found.evidence


def test_a_family_without_a_version_for_the_architecture_is_not_guessed():
    found = tp.detect_family({}, "dmd2_sdxl_4step_lora.safetensors", tl.ARCH_SD1)
    assert found.key is None and "has no SD1.x LoRA" in found.evidence
    assert tp.shift_in_name("pcm_deterministic_4step_shift3.safetensors") == 3.0


# ------------------------------------------------------------------------------------------------ data
SETTINGS = ("steps", "gamma", "lora_strength")


@pytest.mark.parametrize("p", tp.PRESETS, ids=lambda p: p.key)
def test_every_setting_has_a_source_and_is_valid(p):
    for setting in SETTINGS + (("flux_guidance",) if p.flux_guidance is not None else ("cfg",)):
        assert p.sources.get(setting), f"{p.key}: no source for {setting}"
    assert 0.0 <= p.gamma <= 1.0 and p.original_steps in (50, 1000) and p.final_step in ("diffusers", "x0")
    lo, hi = p.steps_range
    assert lo <= p.steps <= hi and all(lo <= n <= hi for n, _ in p.cfg_by_steps)
    assert set(p.bases) <= set(tl.ARCHITECTURES) and p.lora_strength > 0
    assert tp.preset(p.key) is p


# ------------------------------------------------------------------------------------------------ equivalence
SCHEDULE = DiscreteSchedule.from_alphas_cumprod(vp_alphas_cumprod())


def eps_model(x, sigma, **_):
    """An epsilon network in ComfyUI's sigma (VE) space: x0 = x - sigma * eps(x_VP, t)."""
    s = float(sigma.flatten()[0])
    return x - s * net(x / math.sqrt(1 + s * s), SCHEDULE.timestep(s))


def tcd_run(timesteps, gamma, final_step, seed=3, start_scale=None):
    """The pack's sampler from seeded noise, scaled like ComfyUI's EPS noise_scaling at full denoise
    (sqrt(1 + sigma_max^2)) unless start_scale is given."""
    sigmas = SCHEDULE.sigmas_for(timesteps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    x = noise * (start_scale or math.sqrt(1 + float(sigmas[0]) ** 2))
    return sample_tcd(eps_model, x, sigmas, extra_args={"seed": seed}, gamma=gamma, schedule=SCHEDULE,
                      final_step=final_step)


def diffusers_run(scheduler, steps, seed=3, timesteps=None, **step_kwargs):
    """The pipeline loop: latents from the generator, then scheduler.step with the same generator."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), int(t))
        x = scheduler.step(out, t, x, generator=g, **step_kwargs).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# diffusers' SD1.5 / SDXL scheduler configs (beta schedule; clip_sample and set_alpha_to_one are False in both)
CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("steps", (1, 2, 4, 8))
@pytest.mark.parametrize("key", ("hyper-sd-nstep", "pcm-smallcfg"))
def test_ddim_trailing_families_equal_diffusers_ddim(key, steps):
    from diffusers import DDIMScheduler
    p = tp.preset(key)
    ref, ts = diffusers_run(DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=False,
                                          timestep_spacing="trailing"), steps, eta=0.0)
    assert ts == tcd_timesteps(steps, p.original_steps)
    assert rel(tcd_run(ts, p.gamma, p.final_step), ref) <= 1e-4


@pytest.mark.parametrize("steps", (2, 4, 8))
def test_lightning_equals_diffusers_euler_trailing(steps):
    """Same sampler from the same start. (diffusers' Euler with 'trailing' spacing starts from noise x sigma_max,
    not ComfyUI's noise x sqrt(1 + sigma_max^2): 0.23% apart at sigma_max 14.6, independent of the sampler.)"""
    from diffusers import EulerDiscreteScheduler
    p = tp.preset("lightning")
    sched = EulerDiscreteScheduler(**CONFIG, timestep_spacing="trailing")
    ref, ts = diffusers_run(sched, steps)
    assert ts == tcd_timesteps(steps, p.original_steps)
    assert rel(tcd_run(ts, p.gamma, p.final_step, start_scale=float(sched.init_noise_sigma)), ref) <= 1e-4


@pytest.mark.parametrize("steps", (1, 2, 4, 8))
def test_lcm_grids_are_diffusers_lcm_timesteps(steps):
    from diffusers import LCMScheduler
    sched = LCMScheduler(**CONFIG)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == tcd_timesteps(steps, tp.preset("lcm").original_steps)
    assert tcd_timesteps(4, tp.preset("dmd2").original_steps) == [999, 749, 499, 249]
    assert tp.preset("lcm").sampler == tp.preset("dmd2").sampler == "lcm"


def test_trailing_grid_is_off_by_at_most_one_for_other_step_counts():
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(**CONFIG, timestep_spacing="trailing")
    for steps in (3, 6, 12, 16):
        sched.set_timesteps(steps)
        diff = [abs(a - b) for a, b in zip(sched.timesteps.tolist(), tcd_timesteps(steps, 1000))]
        assert max(diff) <= 1 and len(diff) == steps
