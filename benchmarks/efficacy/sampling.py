"""Sample the teacher and the students with the product's own nodes, called as the executor calls them (under
torch.inference_mode, one node function after another):

* teacher: core KSampler, `ddim` (scheduler `ddim_uniform`) and `dpmpp_2m` (scheduler `karras`, ComfyUI's usual
  SD1.5 choice), at its CFG; and `dpmpp_2m` with `sgm_uniform`, added after a scheduler sweep on a seed outside the
  evaluation (seed 99) showed Karras spacing is the worst choice at 4 steps on this teacher: the strongest few-step
  teacher must be in the table too;
* TCD LoRA: core KSampler with the pack's `tcd` sampler / `tcd` scheduler (gamma 0.3), and SamplerCustom with the
  pack's TCD Sampler (gamma per NFE, declared in GAMMA_BY_NFE) + TCD Scheduler; cfg 1;
* LCM LoRA: ComfyUI's LCM recipe, ModelSamplingDiscrete(sampling="lcm") + KSampler `lcm` / `sgm_uniform`; cfg 1.

The LoRAs are applied with core's LoraLoaderModelOnly from the files the trainer node saved. One call per prompt
("a handwritten digit d"), with `per_prompt` samples in the batch and seed 1000 * seed + d, so every method sees the
same initial noise for the same (seed, digit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import model as M

# Declared before any measurement: the TCD Sampler's gamma at each NFE (more steps tolerate more re-noising; 1 step
# has no re-noising). KSampler's `tcd` entry has no gamma input and uses the default 0.3 at every NFE.
GAMMA_BY_NFE = {1: 0.0, 2: 0.1, 4: 0.2, 8: 0.3}
TEACHER_SCHEDULERS = {"ddim": "ddim_uniform", "dpmpp_2m": "karras"}


@dataclass(frozen=True)
class Method:
    key: str                # e.g. "teacher_ddim"
    label: str              # e.g. "Teacher, DDIM (cfg 3)"
    model: str              # "teacher", "tcd" or "lcm": which MODEL it samples
    kind: str               # "ksampler" or "tcd_sampler"
    sampler: str = ""
    scheduler: str = ""
    cfg: float = 1.0
    reference: bool = True  # a teacher method also sampled at the reference step counts (25 / 50)
    gamma: float | None = None   # TCD Sampler: this gamma at every NFE instead of GAMMA_BY_NFE
    nfes: tuple = ()        # sampled at these NFE only (default: the run's NFE list)
    sweep: bool = False     # part of the gamma sweep (its own table), not of the main comparison


def methods(teacher_cfg: float) -> list[Method]:
    return [
        Method("teacher_ddim", f"Teacher, DDIM (cfg {teacher_cfg:g})", "teacher", "ksampler", "ddim",
               TEACHER_SCHEDULERS["ddim"], teacher_cfg),
        Method("teacher_dpmpp_2m", f"Teacher, DPM++ 2M Karras (cfg {teacher_cfg:g})", "teacher", "ksampler",
               "dpmpp_2m", TEACHER_SCHEDULERS["dpmpp_2m"], teacher_cfg),
        Method("teacher_dpmpp_2m_sgm", f"Teacher, DPM++ 2M sgm_uniform (cfg {teacher_cfg:g})", "teacher",
               "ksampler", "dpmpp_2m", "sgm_uniform", teacher_cfg, reference=False),
        Method("lcm", "LCM LoRA, lcm (cfg 1)", "lcm", "ksampler", "lcm", "sgm_uniform"),
        Method("tcd_ksampler", "TCD LoRA, KSampler tcd (γ 0.3, cfg 1)", "tcd", "ksampler", "tcd", "tcd"),
        Method("tcd_sampler", "TCD LoRA, TCD Sampler (γ per NFE, cfg 1)", "tcd", "tcd_sampler"),
    ]


def gamma_sweep(teacher_cfg: float) -> list[Method]:
    """How gamma moves the scores, for the TCD LoRA (cfg 1) and for the teacher itself under the same TCD Sampler
    (with its CFG): the explanation of where the declared gammas land. 0.3 is KSampler `tcd`'s row."""
    out = [Method(f"tcd_gamma_{g:g}", f"TCD LoRA, TCD Sampler γ {g:g} (cfg 1)", "tcd", "tcd_sampler", gamma=g,
                  nfes=(2, 4), sweep=True) for g in (0.0, 0.5, 1.0)]
    out += [Method(f"teacher_tcd_gamma_{g:g}", f"Teacher, TCD Sampler γ {g:g} (cfg {teacher_cfg:g})", "teacher",
                   "tcd_sampler", cfg=teacher_cfg, gamma=g, nfes=(4,), reference=False, sweep=True)
            for g in (0.0, 0.3, 1.0)]
    return out


def node(name: str):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def empty_latent(batch: int) -> dict:
    """What Empty Latent Image (64 x 64) makes: zeros of the model's latent shape (4 x 8 x 8 here)."""
    side = M.PIXELS // 2
    return {"samples": torch.zeros(batch, 4, side, side)}


def load_lora(teacher, lora_name: str):
    """Core LoraLoaderModelOnly on a LoRA file the trainer saved in models/loras. (The pack's TCD LoRA Loader refuses
    this teacher: its UNet, with a 64-wide context, is none of the SD1.x / SD2.x / SDXL shapes it checks LoRAs
    against, and it says to use core's loader. The trainer's files are in kohya form, which core maps fully.)"""
    with torch.inference_mode():
        model = node("LoraLoaderModelOnly")().load_lora_model_only(teacher, lora_name, 1.0)[0]
    return model


def lcm_sampling(model):
    """ComfyUI's LCM model patch (ModelSamplingDiscrete, sampling = lcm): LCM's c_skip / c_out and 50-step grid."""
    with torch.inference_mode():
        return node("ModelSamplingDiscrete")().patch(model, "lcm", False)[0]


def sample(method: Method, model, steps: int, seed: int, positive, negative, batch: int,
           empty=empty_latent) -> torch.Tensor:
    """One node call; returns the LATENT samples ([batch, 4, 8, 8] with this teacher's `empty_latent`)."""
    latent = empty(batch)
    with torch.inference_mode():
        if method.kind == "ksampler":
            out = node("KSampler")().sample(model, seed, steps, method.cfg, method.sampler, method.scheduler,
                                            positive, negative, latent, denoise=1.0)[0]
        else:
            gamma = GAMMA_BY_NFE[steps] if method.gamma is None else method.gamma
            sampler = node("TCD_Sampler")().get_sampler(gamma)[0]
            sigmas = node("TCD_Scheduler")().get_sigmas(model, steps, 1.0, 50, "comfyui")[0]
            result = node("SamplerCustom").execute(model, True, seed, method.cfg, positive, negative, sampler,
                                                   sigmas, latent)
            out = (result.result if hasattr(result, "result") else result)[0]
    return out["samples"].float().clone()


def sample_digits(method: Method, model, steps: int, seed: int, conds: list, uncond, per_prompt: int,
                  empty=empty_latent, decode=M.decode_latents):
    """per_prompt samples of each of the 10 prompts: (images [10 * per_prompt, 16, 16], labels). `empty` / `decode`:
    another teacher's latent shape and pixel map (the flow benchmark's)."""
    images, labels = [], []
    for digit, positive in enumerate(conds):
        latents = sample(method, model, steps, 1000 * seed + digit, positive, uncond, per_prompt, empty)
        images.append(decode(latents))
        labels.append(torch.full((per_prompt,), digit, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)
