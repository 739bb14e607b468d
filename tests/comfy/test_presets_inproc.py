"""The Few-step Preset node inside a real ComfyUI 0.3.75: every family's SAMPLER / SIGMAS / cfg / strength on the
tiny SD1.5 checkpoint and the tiny flow models, 'auto' from the TCD LoRA Loader, and the LCM-sampled families
(LCM-LoRA, DMD2) equal to diffusers' LCMScheduler through ComfyUI's lcm sampler."""
import math
import sys
from pathlib import Path

import pytest
import torch

import make_tiny_flow as mtf
from support import lora_files as lf
from support.comfy_folders import loras_folder
from tcd import presets as tp
from tcd.files import save_safetensors_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import parity  # noqa: E402  the TCD parity harness (deterministic network on ComfyUI's EPS model_sampling)


@pytest.fixture(scope="module")
def node(pack):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["TCD_FewStepPreset"]()


@pytest.fixture(scope="module")
def sd15(pack, tiny_ckpt):
    import comfy.sd
    model, clip = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))[:2]
    return model, clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))


@pytest.fixture(scope="module")
def flux(pack):
    return mtf.tiny_model_patcher("flux"), mtf.conditioning("flux")


def run(model, cond, sampler, sigmas, latent, seed=1, cfg=1.0):
    import nodes

    def result(out):
        return out.result if hasattr(out, "result") else out

    m = nodes.NODE_CLASS_MAPPINGS
    noise = result(m["RandomNoise"].execute(seed))[0]
    guider = result(m["CFGGuider"].execute(model, cond, cond, cfg))[0]
    return result(m["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, {"samples": latent}))[0]["samples"]


@pytest.mark.parametrize("p", [p for p in tp.PRESETS if "SD1.x" in p.bases], ids=lambda p: p.key)
def test_every_sd_family_gives_its_timesteps_and_samples(node, sd15, p):
    model, cond = sd15
    sampler, sigmas, cfg, _, strength, steps, info = node.get_preset(model, p.name, 0)
    ms = model.get_model_object("model_sampling")
    from tcd.schedule import tcd_timesteps
    assert steps == p.steps and cfg == p.cfg_for(steps) and strength == p.lora_strength
    assert [int(ms.timestep(s.reshape(1))) for s in sigmas[:-1]] == tcd_timesteps(steps, p.original_steps)
    assert sampler.sampler_function.__name__ == ("sample_lcm" if p.sampler == "lcm" else "sample_tcd_comfy")
    assert all(f"source ({k})" in info for k in p.sources)
    out = run(model, cond, sampler, sigmas, torch.zeros(1, 4, 8, 8), cfg=cfg)
    assert torch.isfinite(out).all() and float(out.abs().max()) > 0


def test_hyper_flux_preset_on_a_flux_model(node, flux):
    model, cond = flux
    p = tp.preset("hyper-flux")
    sampler, sigmas, cfg, guidance, strength, steps, info = node.get_preset(model, p.name, 0)
    assert (steps, cfg, guidance, strength) == (8, 1.0, 3.5, 0.125)
    u = torch.tensor([1 - k / 8 for k in range(8)], dtype=torch.float64)     # trailing grid in unshifted time
    expected = math.exp(1.15) / (math.exp(1.15) + 1 / u - 1)                 # ModelSamplingFlux, shift 1.15
    assert sigmas[:-1].tolist() == pytest.approx(expected.tolist(), rel=1e-5) and float(sigmas[-1]) == 0
    out = run(model, cond, sampler, sigmas, torch.zeros(1, 16, 8, 8))
    assert torch.isfinite(out).all()
    assert "model: Flux" in info and "note:" not in info


def test_cfg_follows_the_step_count_where_the_card_gives_one(node, pack):
    sd3 = mtf.tiny_model_patcher("sd3")
    name = tp.preset("hyper-sd3").name
    assert [node.get_preset(sd3, name, n)[2] for n in (4, 8, 16, 6)] == [3.0, 5.0, 7.0, 5.0]
    pcm = {"key": "pcm-sd3", "steps": 2, "evidence": "file name", "lora": "pcm_deterministic_2step_shift1",
           "strength_model": 1.0, "architecture": "SD3", "shift": 1.0}
    out = node.get_preset(sd3, "auto (from the LoRA loader)", 0, pcm)
    assert out[5] == 2 and "shift 1: set the model's sampling shift" in out[6]


def test_auto_takes_family_and_steps_from_the_loader(node, sd15, pack, tmp_path_factory):
    import nodes
    model = sd15[0]
    with loras_folder(tmp_path_factory.mktemp("preset_loras")) as d:
        layers = lf.make_layers(lf.unet_targets(model))
        save_safetensors_atomic(lf.write_format("kohya", layers), d / "sdxl_lightning_2step_lora.safetensors")
        save_safetensors_atomic(lf.write_format("kohya", layers), d / "my_style.safetensors")
        loader = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()
        _, _, info, family = loader.load_lora(model, "sdxl_lightning_2step_lora.safetensors", 1.0)
        # Lightning has SDXL LoRAs only: on the SD1.5 model the name is not trusted
        assert family["key"] is None and "has no SD1.x LoRA" in info
        with pytest.raises(ValueError, match="could not tell the family.*Pick the LoRA's family by hand"):
            node.get_preset(model, "auto (from the LoRA loader)", 0, family)
        family = {**family, "key": "lightning"}
        assert node.get_preset(model, "auto (from the LoRA loader)", 0, family)[5] == 2      # steps from the name
        with pytest.raises(ValueError, match="no family input is connected"):
            node.get_preset(model, "auto (from the LoRA loader)", 0)
        family = loader.load_lora(model, "my_style.safetensors", 1.0)[3]
        assert family["key"] is None


@pytest.mark.parametrize("key,steps", [("lcm", 1), ("lcm", 2), ("lcm", 4), ("lcm", 8), ("dmd2", 4)])
def test_lcm_families_equal_diffusers_lcm_scheduler(pack, key, steps):
    """ComfyUI's lcm sampler on the preset's timesteps vs diffusers' LCMScheduler loop: same network, same noise
    (the pipeline generator's stream, after the initial latents)."""
    import comfy.k_diffusion.sampling as kds
    from diffusers import LCMScheduler
    from tcd.sampling import seeded_noise_sampler
    from tcd.schedule import tcd_timesteps
    p = tp.preset(key)
    ts = tcd_timesteps(steps, p.original_steps)
    sched = LCMScheduler()
    sched.set_timesteps(timesteps=ts) if p.original_steps == 1000 else sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == ts
    g = torch.Generator().manual_seed(11)
    x = torch.randn(parity.SHAPE, generator=g)
    for t in sched.timesteps:
        x = sched.step(parity.net(x, t), t, x, generator=g).prev_sample
    ms = parity.comfy_model_sampling("epsilon")
    sigmas = torch.tensor([float(ms.sigmas[t]) for t in ts] + [0.0])
    noise = torch.randn(parity.SHAPE, generator=torch.Generator().manual_seed(11))
    start = ms.noise_scaling(sigmas[0], noise, torch.zeros(parity.SHAPE), max_denoise=True)
    got = kds.sample_lcm(parity.comfy_denoiser(ms), start, sigmas, disable=True,
                         noise_sampler=seeded_noise_sampler(start, 11))
    assert float((got - x).abs().max() / x.abs().max()) <= 1e-4
