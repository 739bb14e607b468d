"""Measured parity of the pack's TCD sampler with diffusers' TCDScheduler, on ComfyUI's own model_sampling classes.

For each prediction type (epsilon / v_prediction / sample -> ComfyUI EPS / V_PREDICTION / X0), steps and gamma,
both sides run the same deterministic network on the same initial noise and the same step-noise stream:
diffusers with `generator=torch.Generator("cpu").manual_seed(seed)`, the pack through the sampler function it
registers in ComfyUI (`sample_tcd`), from ComfyUI's noise_scaling of the same draw. The error is
max|x_pack - x_diffusers| / max|x_diffusers| on diffusers' final latent. Writes benchmarks/results/parity.json.

The tests (tests/comfy/test_sampler_inproc.py) assert the same harness stays <= 1e-4.
"""
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "parity.json"
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEPS = (1, 2, 4, 8, 25)
GAMMAS = (0.0, 0.1, 0.3, 0.5, 1.0)
SHAPE = (2, 4, 8, 8)


def net(x_vp, t):
    """A deterministic, nonlinear, timestep-dependent stand-in for a UNet (the same function on both sides)."""
    t = float(t)
    return torch.tanh(x_vp * (0.5 + t / 1000.0)) * 0.8 + 0.05 * math.sin(t / 97.0)


def comfy_model_sampling(pred):
    import comfy.model_sampling as cms
    kind = {"epsilon": cms.EPS, "v_prediction": cms.V_PREDICTION, "sample": cms.X0}[pred]
    return type("ModelSampling", (cms.ModelSamplingDiscrete, kind), {})()


def comfy_denoiser(ms):
    """`net` as ComfyUI's BaseModel.apply_model would run it, in the object layout a sampler receives
    (KSamplerX0Inpaint -> CFGGuider -> BaseModel, each reachable as .inner_model; the guider's model_patcher
    answers get_model_object("model_sampling") as ComfyUI 0.12+'s samplers ask it)."""
    class BaseModel:
        model_sampling = ms

    class ModelPatcher:                     # newer samplers read model_sampling through the guider's patcher
        @staticmethod
        def get_model_object(name):
            return {"model_sampling": ms}[name]

    class Guider:
        inner_model = BaseModel
        model_patcher = ModelPatcher

    class Denoiser:
        inner_model = Guider

        def __call__(self, x, sigma, **_):
            t = ms.timestep(sigma)
            return ms.calculate_denoised(sigma, net(ms.calculate_input(sigma, x), int(t[0])), x)

    return Denoiser()


def diffusers_reference(pred, steps, gamma, seed):
    from diffusers import TCDScheduler
    sched = TCDScheduler(prediction_type=pred)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x, eta=gamma, generator=g).prev_sample
    return x


def pack_result(sample_fn, pred, steps, gamma, seed):
    from tcd.schedule import tcd_timesteps
    ms = comfy_model_sampling(pred)
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed))
    sigmas = torch.tensor([float(ms.sigmas[t]) for t in tcd_timesteps(steps)] + [0.0])
    start = ms.noise_scaling(sigmas[0], noise, torch.zeros(SHAPE), max_denoise=True)
    return sample_fn(comfy_denoiser(ms), start, sigmas, extra_args={"seed": seed}, gamma=gamma, disable=True)


def relative_error(pred, steps, gamma, sample_fn, seed=11):
    expected = diffusers_reference(pred, steps, gamma, seed)
    got = pack_result(sample_fn, pred, steps, gamma, seed)
    return float((got - expected).abs().max() / expected.abs().max())


def main():
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO))
    import comfyhost
    pack = comfyhost.comfy_in_process(Path(os.environ["COMFYUI_DIR"]))
    import comfy.k_diffusion.sampling as kds
    sample_fn = getattr(kds, "sample_" + pack.REGISTERED_NAMES["sampler"])
    table = {pred: {f"steps={n},gamma={g}": relative_error(pred, n, g, sample_fn) for n in STEPS for g in GAMMAS}
             for pred in PREDICTIONS}
    summary = {pred: {"max": max(v.values()), "median": sorted(v.values())[len(v) // 2]} for pred, v in table.items()}
    result = {"what": "max|pack - diffusers| / max|diffusers| of the final latent, float32 CPU, ComfyUI 0.3.75 "
                      "model_sampling classes vs diffusers TCDScheduler",
              "steps": STEPS, "gammas": GAMMAS, "summary": summary, "cases": table}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS)
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
