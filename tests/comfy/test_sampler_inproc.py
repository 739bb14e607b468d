"""The TCD sampler and scheduler inside a real ComfyUI 0.3.75 (imported in-process), on the tiny SD1.5 checkpoint
and ComfyUI's own model_sampling classes. Flow models (SD3, Flux): test_flow_sampling.py."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import parity  # noqa: E402  the parity harness shared with the benchmark


@pytest.fixture(scope="module")
def sd15(pack, tiny_ckpt):
    import comfy.sd
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))[:3]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, cond, uncond


def ksample(model, cond, uncond, sampler="tcd", scheduler="tcd", steps=4, seed=1, denoise=1.0, latent=None,
            noise_mask=None, cfg=1.0):
    import comfy.sample
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, cond, uncond, latent,
                               denoise=denoise, noise_mask=noise_mask, seed=seed, disable_pbar=True)


def test_names_are_registered_in_core_lists(pack):
    import comfy.samplers
    import nodes
    assert pack.REGISTERED_NAMES == {"sampler": "tcd", "scheduler": "tcd"}
    assert "tcd" in comfy.samplers.KSampler.SAMPLERS and "tcd" in comfy.samplers.SAMPLER_NAMES
    assert "tcd" in comfy.samplers.KSampler.SCHEDULERS
    ks = nodes.NODE_CLASS_MAPPINGS["KSampler"].INPUT_TYPES()["required"]
    assert "tcd" in ks["sampler_name"][0] and "tcd" in ks["scheduler"][0]
    assert {"TCD_Sampler", "TCD_Scheduler"} <= set(nodes.NODE_CLASS_MAPPINGS)


def test_ksampler_tcd_runs_and_is_seed_deterministic(sd15):
    model, cond, uncond = sd15
    a = ksample(model, cond, uncond, seed=3)
    b = ksample(model, cond, uncond, seed=3)
    c = ksample(model, cond, uncond, seed=4)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ksampler_tcd_scheduler_gives_diffusers_timesteps(pack, sd15):
    import comfy.samplers
    model = sd15[0]
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "tcd", 4)
    assert [int(ms.timestep(s.reshape(1))) for s in sigmas[:-1]] == [999, 759, 499, 259]
    assert sigmas.tolist() == pytest.approx([14.614641, 4.260557, 1.612886, 0.719380, 0.0], rel=1e-5)


def test_custom_sampler_nodes_match_ksampler_path(pack, sd15):
    """SamplerCustom with the TCD Sampler (gamma 0.3) + TCD Scheduler equals KSampler tcd/tcd."""
    import nodes
    model, cond, uncond = sd15
    sampler = nodes.NODE_CLASS_MAPPINGS["TCD_Sampler"]().get_sampler(0.3)[0]
    sigmas = nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(model, 4, 1.0, 50, "comfyui")[0]
    custom = nodes.NODE_CLASS_MAPPINGS["SamplerCustom"]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = custom.execute(model, True, 5, 1.0, cond, uncond, sampler, sigmas, latent)
    out = out[0] if isinstance(out, tuple) else out.result[0]
    expected = ksample(model, cond, uncond, seed=5)
    assert torch.allclose(out["samples"], expected, atol=1e-6)


def node_result(out):
    """First output of a V1 node (a tuple) or of a V3 node (a NodeOutput)."""
    return out[0] if isinstance(out, tuple) else out.result[0]


def counting_unet_calls(model):
    """A clone of the model whose UNet calls (the sigma each one sees) are recorded; at cfg 1.0 ComfyUI makes one
    UNet call per model evaluation (no uncond batch)."""
    calls = []
    counted = model.clone()

    def wrapper(apply_model, args):
        calls.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


@pytest.mark.parametrize("node", ["SamplerCustom", "SamplerCustomAdvanced"])
def test_tcd_sampler_node_second_order_costs_two_model_calls_per_step(pack, sd15, node):
    """tcf_order 2 on the tiny SD1.5: 2 UNet calls per step, every one at a noise level of the model's own table
    (the midpoints are snapped to it), and a different image than the paper's first-order sampler."""
    import nodes
    from tcd.sampling import sss_model_calls
    model, cond, uncond = sd15
    steps = 4
    sigmas = nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(model, steps, 1.0, 50, "comfyui")[0]
    table = set(model.get_model_object("model_sampling").sigmas.float().tolist())
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    samples = {}
    for order in (1, 2):
        sampler = nodes.NODE_CLASS_MAPPINGS["TCD_Sampler"]().get_sampler(0.3, "", "diffusers", order)[0]
        counted, calls = counting_unet_calls(model)
        if node == "SamplerCustom":
            out = nodes.NODE_CLASS_MAPPINGS["SamplerCustom"].execute(counted, True, 5, 1.0, cond, uncond, sampler,
                                                                     sigmas, latent)
        else:
            noise = node_result(nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(5))
            guider = node_result(nodes.NODE_CLASS_MAPPINGS["CFGGuider"].execute(counted, cond, uncond, 1.0))
            out = nodes.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, latent)
        samples[order] = node_result(out)["samples"]
        assert len(calls) == steps * order == sss_model_calls(sigmas, order, "discrete")
        assert all(sigma in table for sigma in calls), calls
        assert torch.isfinite(samples[order]).all()
    assert not torch.allclose(samples[1], samples[2], atol=1e-3)


def test_tcf_order_is_checked_when_the_sampler_is_made(pack):
    import nodes
    with pytest.raises(ValueError, match=r"tcf_order=3 is not one of \(1, 2\)"):
        nodes.NODE_CLASS_MAPPINGS["TCD_Sampler"]().get_sampler(0.3, "", "diffusers", 3)


def test_img2img_and_inpainting_run(sd15):
    model, cond, uncond = sd15
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ksample(model, cond, uncond, latent=init, denoise=0.5, seed=2)
    assert torch.isfinite(out).all() and not torch.allclose(out, init)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0   # repaint the right half only
    inpainted = ksample(model, cond, uncond, latent=init, denoise=1.0, noise_mask=mask, seed=2)
    assert torch.isfinite(inpainted).all()
    assert torch.allclose(inpainted[..., :4], init[..., :4], atol=1e-5)   # kept half untouched
    assert not torch.allclose(inpainted[..., 4:], init[..., 4:], atol=1e-2)


@pytest.mark.parametrize("pred", parity.PREDICTIONS)
@pytest.mark.parametrize("steps", parity.STEPS)
@pytest.mark.parametrize("gamma", parity.GAMMAS)
def test_parity_with_diffusers_using_comfy_model_sampling(pack, pred, steps, gamma):
    """The pack's sampler on ComfyUI's real EPS / V_PREDICTION / X0 model_sampling vs diffusers' TCDScheduler
    (harness: benchmarks/parity.py, which also records the measured errors)."""
    rel = parity.relative_error(pred, steps, gamma, comfy_sampler_fn(pack))
    assert rel <= 1e-4, rel


def comfy_sampler_fn(pack):
    import comfy.k_diffusion.sampling as kds
    return getattr(kds, "sample_" + pack.REGISTERED_NAMES["sampler"])


def test_lcm_patched_model_gets_a_clear_error(pack, sd15):
    import nodes
    model = sd15[0]
    patched = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, "lcm", False)[0]
    with pytest.raises(ValueError, match="patched to LCM"):
        nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(patched, 4, 1.0, 50, "comfyui")
