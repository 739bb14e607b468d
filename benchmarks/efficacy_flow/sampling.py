"""Sample the flow teacher and the students with the product's own nodes (benchmarks/efficacy/sampling.py's node
calls, on this teacher's 16 x 4 x 4 latents), under torch.inference_mode as the executor runs them:

* teacher, at its CFG: core KSampler `euler` / `simple` (flow Euler, ComfyUI's default for flow models), KSampler
  `dpmpp_2m` / `sgm_uniform` (ComfyUI's SD3 example workflow), and SamplerCustom with the pack's TCD Sampler
  (gamma 0.3) + TCD Scheduler: the LoRA's own sampler, on the teacher without the LoRA; and flow Euler after core
  ModelSamplingSD3 with shift 1, the strongest few-step Euler on this small latent we could name beforehand (shift 3
  spends half of 4 steps above sigma 0.75); and Euler and the TCD Sampler at CFG 1 and 1.5 (lower_cfg_teachers);
* TCD LoRA: SamplerCustom + TCD Sampler (gamma 0.3) + TCD Scheduler (50-step grid), cfg 1;
* LCM LoRA: KSampler `lcm` with the `tcd` scheduler (the same 50-step-grid timesteps the LoRA was trained on:
  diffusers' LCMScheduler picks the same ones), cfg 1. The flow LCM objective is the jump to sigma 0 with no
  boundary-condition scalings (tcd/losses.py), which is exactly what `lcm` does on a CONST model.

The LoRAs are applied with core's LoraLoaderModelOnly from the files the trainer node saved. One call per prompt,
`per_prompt` samples in the batch, seed 1000 * seed + digit: every method sees the same initial noise.
"""
from __future__ import annotations

import torch

from ..efficacy import sampling as S
from ..efficacy.sampling import Method, load_lora, node
from . import model as M

GAMMA = 0.3


def methods(teacher_cfg: float) -> list[Method]:
    cfg = f"cfg {teacher_cfg:g}"
    return [
        Method("teacher_euler", f"Teacher, Euler simple ({cfg})", "teacher", "ksampler", "euler", "simple",
               teacher_cfg),
        Method("teacher_dpmpp_2m_sgm", f"Teacher, DPM++ 2M sgm_uniform ({cfg})", "teacher", "ksampler", "dpmpp_2m",
               "sgm_uniform", teacher_cfg),
        Method("teacher_tcd", f"Teacher, TCD Sampler γ {GAMMA:g} ({cfg})", "teacher", "tcd_sampler",
               cfg=teacher_cfg, gamma=GAMMA),
        Method("teacher_euler_shift1", f"Teacher, Euler simple, shift 1 ({cfg})", "teacher_shift1", "ksampler",
               "euler", "simple", teacher_cfg, reference=False),
        Method("lcm", "LCM LoRA, lcm + tcd scheduler (cfg 1)", "lcm", "ksampler", "lcm", "tcd"),
        Method("tcd", f"TCD LoRA, TCD Sampler γ {GAMMA:g} (cfg 1)", "tcd", "tcd_sampler", gamma=GAMMA),
    ] + lower_cfg_teachers(teacher_cfg)


def lower_cfg_teachers(teacher_cfg: float) -> list[Method]:
    """The teacher at lower CFG than the one the LoRAs distil (Euler, and the TCD Sampler without the reference
    step count): on these digits a CFG of 2 over-guides the flow teacher (KID at 25 steps far above its cfg-1
    value), so the LoRA is compared with the teacher's better settings too, not only with the one it imitates."""
    out = []
    for cfg in (1.0, 1.5):
        if cfg >= teacher_cfg:
            continue
        out += [Method(f"teacher_euler_cfg{cfg:g}", f"Teacher, Euler simple (cfg {cfg:g})", "teacher", "ksampler",
                       "euler", "simple", cfg, sweep=True),
                Method(f"teacher_tcd_cfg{cfg:g}", f"Teacher, TCD Sampler γ {GAMMA:g} (cfg {cfg:g})", "teacher",
                       "tcd_sampler", cfg=cfg, gamma=GAMMA, reference=False, sweep=True)]
    return out


def shift(model, value: float):
    """Core ModelSamplingSD3: the same model with another shift."""
    with torch.inference_mode():
        return node("ModelSamplingSD3")().patch(model, float(value))[0]


def models_for(teacher, lora_names: dict) -> dict:
    """The MODEL each Method.model names: the teacher, the teacher at shift 1, the LoRAs on the teacher."""
    out = {"teacher": teacher, "teacher_shift1": shift(teacher, 1.0)}
    out.update({k: load_lora(teacher, name) for k, name in lora_names.items()})
    return out


def sample_digits(method: Method, model, steps: int, seed: int, conds: list, uncond, per_prompt: int):
    return S.sample_digits(method, model, steps, seed, conds, uncond, per_prompt, empty=M.empty_latent,
                           decode=M.decode_latents)
