"""Measured parity of the TCD sampler on flow-matching models with the exact references it must equal, on tiny but
real SD3-class (MMDiT, ModelSamplingDiscreteFlow shift 3) and Flux-class (ModelSamplingFlux) models built from
ComfyUI's own classes (scripts/make_tiny_flow.py). Every run goes through ComfyUI's real sampling path
(comfy.sample.sample_custom: CFGGuider, noise_scaling, KSamplerX0Inpaint), on the same sigmas and noise:

* gamma = 0  vs  core `euler`. With s = t_next the TCD step is x_next = (1 - s_n) D + s_n eps_hat, which is the
  Euler step x + (s_n - s) (x - D) / s of the flow ODE.
* gamma = 1  vs  core `lcm` on a CONST model. With s = 0 the jump lands on D and the forward kernel re-noises it
  to x_next = (1 - s_n) D + s_n z, which is `lcm`'s noise_scaling(s_n, z, D). Both draw the same step noise.
* 0 < gamma < 1  vs  core `euler_ancestral_RF`, step by step. Its downstep sigma_down = s_n (1 + (s_n / s - 1) eta)
  equals TCD's sigma_s = (1 - gamma) s_n when eta = gamma s / (s - s_n), a different eta on every step; its
  re-noise sqrt(s_n^2 - sigma_down^2 (1 - s_n)^2 / (1 - sigma_down)^2) is TCD's forward kernel.
* gamma = 0 / 1  vs  diffusers' FlowMatchEulerDiscreteScheduler (deterministic / stochastic_sampling=True) on its
  own sigmas, with a pipeline-style generator (one latent draw, then the step noise) against the pack's seeded
  noise stream.

The error is max|x_tcd - x_ref| / max|x_ref| of the final latent. The tests (tests/comfy/test_flow_sampling.py)
assert every case stays <= 1e-5 in float32.

    source scripts/host/env.sh && $HOST_PY benchmarks/flow_parity.py
Writes benchmarks/results/flow_parity.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "flow_parity.json"
KINDS = ("sd3", "flux")
STEPS = (1, 2, 4, 8)
MID_GAMMAS = (0.1, 0.3, 0.5, 0.7)
LATENT = (1, 16, 8, 8)
SEED = 5


# ------------------------------------------------------------------------------------------------ tiny models
def tiny_model(kind: str):
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_flow
    return make_tiny_flow.tiny_model_patcher(kind)


def conditioning(kind: str, seed: int = 1, tokens: int = 8):
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_flow
    return make_tiny_flow.conditioning(kind, seed, tokens)


def tcd_function():
    """The sampler function the pack registered in comfy.k_diffusion.sampling (`sample_tcd`, or `sample_tcd_suite`
    when another pack owns the name)."""
    import comfy.k_diffusion.sampling as kds
    return next(fn for fn in (getattr(kds, "sample_tcd", None), getattr(kds, "sample_tcd_suite", None))
                if getattr(fn, "tcd_suite", False))


def tcd_sampler(gamma, **extra):
    """The pack's SAMPLER as the TCD Sampler node builds it (KSAMPLER over the registered sampler function)."""
    import comfy.samplers
    return comfy.samplers.KSAMPLER(tcd_function(), extra_options={"gamma": gamma, **extra})


def run(patcher, sampler, sigmas, cond, seed=SEED):
    """comfy.sample.sample_custom from an empty latent: what SamplerCustomAdvanced runs (cfg 1, seeded noise)."""
    import comfy.sample
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=seed,
                                      disable_pbar=True)


def tcd_sigmas(patcher, steps, original_steps=50):
    """The TCD Scheduler's SIGMAS on the model's own (shifted) sigma table."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(patcher, steps, 1.0, original_steps,
                                                                   "comfyui")[0]


class ReplayNoise:
    """The same step noise for two samplers: `sampler()` returns a fresh noise_sampler replaying one stream."""

    def __init__(self, shape, seed, count=64):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g) for _ in range(count)]

    def sampler(self):
        it = iter(self.draws)
        return lambda sigma=None, sigma_next=None: next(it)


def probe(fn):
    """A SAMPLER that runs fn(model, x, sigmas, extra_args) inside ComfyUI's sampling: `model` is what every
    k-diffusion sampler receives there (KSamplerX0Inpaint over the guider over the real model)."""
    import comfy.samplers

    @torch.no_grad()
    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return fn(model, x, sigmas, extra_args or {})

    return comfy.samplers.KSAMPLER(sampler_function)


def rel(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------------------------ references
def vs_euler(patcher, cond, steps):
    import comfy.samplers
    sigmas = tcd_sigmas(patcher, steps)
    return rel(run(patcher, tcd_sampler(0.0), sigmas, cond), run(patcher, comfy.samplers.ksampler("euler"), sigmas,
                                                                     cond))


def vs_lcm(patcher, cond, steps):
    import comfy.samplers
    sigmas = tcd_sigmas(patcher, steps)
    noise = ReplayNoise(LATENT, seed=17)
    ours = run(patcher, tcd_sampler(1.0, noise_sampler=noise.sampler()), sigmas, cond)
    core = run(patcher, comfy.samplers.ksampler("lcm", {"noise_sampler": noise.sampler()}), sigmas, cond)
    return rel(ours, core)


def vs_euler_ancestral_rf(patcher, cond, steps, gamma):
    """TCD over all steps vs euler_ancestral_RF one step at a time with eta_i = gamma s_i / (s_i - s_{i+1})."""
    import comfy.k_diffusion.sampling as kds
    sigmas = tcd_sigmas(patcher, steps)
    noise = ReplayNoise(LATENT, seed=23)
    out = {}

    def both(model, x, sigmas, extra_args):
        out["tcd"] = tcd_function()(model, x.clone(), sigmas, extra_args=extra_args, disable=True, gamma=gamma,
                               noise_sampler=noise.sampler())
        y, replay = x.clone(), noise.sampler()
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            eta = gamma * s / (s - s_next) if s_next > 0 else 0.0
            y = kds.sample_euler_ancestral_RF(model, y, sigmas[i:i + 2], extra_args=extra_args, disable=True,
                                              eta=eta, noise_sampler=replay)
        out["core"] = y
        return y

    run(patcher, probe(both), sigmas, cond)
    return rel(out["tcd"], out["core"])


def diffusers_flow_match(kind, steps, stochastic):
    from diffusers import FlowMatchEulerDiscreteScheduler
    if kind == "sd3":     # SD3's scheduler config: static shift 3.0 (ComfyUI: ModelSamplingDiscreteFlow shift 3)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
        sched.set_timesteps(steps)
    else:                 # FLUX.1: dynamic shifting; mu = 1.15 is ComfyUI ModelSamplingFlux's default shift
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, stochastic_sampling=stochastic)
        sched.set_timesteps(steps, mu=1.15)
    return sched


def vs_diffusers(patcher, kind, cond, steps, gamma):
    """TCD through sample_custom on diffusers' sigmas vs diffusers' FlowMatchEulerDiscreteScheduler loop run on the
    same model (velocity = (x - D) / sigma of ComfyUI's CONST denoiser) with a pipeline generator."""
    sched = diffusers_flow_match(kind, steps, stochastic=gamma == 1.0)
    sigmas = sched.sigmas.clone().float()

    def diffusers_loop(model, x, sigmas_, extra_args):
        g = torch.Generator("cpu").manual_seed(SEED)
        torch.randn(x.shape, generator=g)           # the pipeline's initial latents come from the same generator
        s_in = x.new_ones([x.shape[0]])
        for i, t in enumerate(sched.timesteps):
            sigma = float(sched.sigmas[i])
            velocity = (x - model(x, sigma * s_in, **extra_args)) / sigma
            x = sched.step(velocity, t, x, generator=g).prev_sample
        return x

    ref = run(patcher, probe(diffusers_loop), sigmas, cond)
    ours = run(patcher, tcd_sampler(gamma), sigmas, cond)
    return rel(ours, ref)


def all_cases():
    table = {}
    for kind in KINDS:
        patcher, cond = tiny_model(kind), conditioning(kind)
        rows = {}
        for n in STEPS:
            rows[f"gamma=0 vs euler, steps={n}"] = vs_euler(patcher, cond, n)
            rows[f"gamma=1 vs lcm, steps={n}"] = vs_lcm(patcher, cond, n)
            for g in MID_GAMMAS:
                rows[f"gamma={g} vs euler_ancestral_RF (eta_i), steps={n}"] = vs_euler_ancestral_rf(patcher, cond, n,
                                                                                                     g)
            for g in (0.0, 1.0):
                rows[f"gamma={g:g} vs diffusers FlowMatchEuler{' stochastic' if g else ''}, steps={n}"] = \
                    vs_diffusers(patcher, kind, cond, n, g)
        table[kind] = rows
    return table


def main():
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO))
    import comfyhost
    comfyhost.comfy_in_process(Path(os.environ["COMFYUI_DIR"]))
    table = all_cases()
    summary = {kind: {"max": max(rows.values()), "cases": len(rows)} for kind, rows in table.items()}
    result = {"what": "max|tcd - reference| / max|reference| of the final latent, float32 CPU, tiny SD3-class and "
                      "Flux-class models (ComfyUI 0.3.75 classes), through comfy.sample.sample_custom",
              "goal": "<= 1e-5", "summary": summary, "cases": table}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
