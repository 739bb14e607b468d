"""Few-step Preset node, and the recommendation text of every few-step LoRA family.

Thin adapter over tcd.presets (the data and its sources): it turns a family into the TCD Sampler's SAMPLER, the
TCD Scheduler's SIGMAS for the model, and the cfg / FluxGuidance / LoRA strength values to wire into the guider
and the loader.
"""
from __future__ import annotations

from ..tcd import backend
from ..tcd import presets as tp
from .sampling import TCDSampler, tcd_sigmas

FAMILY_TYPE = "FEW_STEP_FAMILY"     # what the TCD LoRA Loader's `family` output carries (family_output)
AUTO = "auto (from the LoRA loader)"
FLUX_GUIDANCE_DEFAULT = 3.5         # FLUX.1-dev's usual distilled guidance (core FluxGuidance's default)
GRID_TEXT = {50: "TCD/LCM 50-step skipping grid", 1000: "every timestep (DDIM/Euler 'trailing')"}


def family_output(plan, strength_model: float) -> dict:
    """The loader's FEW_STEP_FAMILY value: the family its file names, the step count in its name, the strength
    it was applied with."""
    return {"key": plan.family.key, "steps": plan.family.steps, "evidence": plan.family.evidence,
            "lora": plan.name, "strength_model": float(strength_model), "architecture": plan.model_arch,
            "shift": tp.shift_in_name(plan.name)}


def resolved_steps(p: tp.Preset, steps: int, named_steps: int | None) -> int:
    """The steps input when set (> 0), else the step count in the LoRA's name, else the family's default."""
    return int(steps) if steps and int(steps) > 0 else int(named_steps or p.steps)


def settings(p: tp.Preset, steps: int) -> dict:
    return {"steps": steps, "sampler": p.sampler, "gamma": p.gamma, "original_steps": p.original_steps,
            "final_step": p.final_step, "cfg": p.cfg_for(steps), "lora_strength": p.lora_strength,
            "flux_guidance": p.flux_guidance}


def recommendation(p: tp.Preset, steps: int | None = None) -> str:
    s = settings(p, steps or p.steps)
    lo, hi = p.steps_range
    parts = [f"{s['steps']} steps" + (f" ({lo}-{hi})" if lo != hi else ""),
             f"gamma {s['gamma']:g}" if s["sampler"] == "tcd" else "sampler lcm", f"cfg {s['cfg']:g}"]
    if s["flux_guidance"] is not None:
        parts.append(f"FluxGuidance {s['flux_guidance']:g}")
    parts += [f"LoRA strength {s['lora_strength']:g}", f"timesteps: {GRID_TEXT[s['original_steps']]}",
              f"final step {s['final_step']}"]
    return ", ".join(parts) + f" (as {p.original_sampler}; {p.equivalence})"


UNKNOWN_RECOMMENDATION = ("no preset: the file names no few-step family. Pick one in the Few-step Preset node; for "
                          "a TCD LoRA: 4-8 steps, gamma 0.3, cfg 1.0")


def info_lines(detection: tp.Detection, strength_model: float | None = None) -> list:
    """The loader's family / recommendation lines."""
    p = detection.preset
    if p is None:
        return [f"family: unknown ({detection.evidence})", f"recommended: {UNKNOWN_RECOMMENDATION}"]
    lines = [f"family: {p.name} ({detection.evidence})",
             f"recommended: {recommendation(p, detection.steps)}; Few-step Preset node: '{p.name}'"]
    if strength_model is not None and abs(float(strength_model) - p.lora_strength) > 1e-9:
        lines.append(f"note: strength_model {strength_model:g} differs from the family's {p.lora_strength:g}")
    return lines


class FewStepPreset:
    """SAMPLER + SIGMAS + cfg / FluxGuidance / LoRA strength of a few-step LoRA family, for SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to sample (its noise schedule gives the SIGMAS)."}),
                "preset": ([AUTO] + [p.name for p in tp.PRESETS], {"default": AUTO, "tooltip":
                           "The few-step LoRA family. auto: the family the TCD LoRA Loader read from the file "
                           "(connect its family output)."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                          "0 = the family's default, or the step count in the LoRA's file name (N-step LoRAs)."}),
            },
            "optional": {
                "family": (FAMILY_TYPE, {"tooltip": "The TCD LoRA Loader's family output (for preset 'auto')."}),
            },
        }

    RETURN_TYPES = ("SAMPLER", "SIGMAS", "FLOAT", "FLOAT", "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("sampler", "sigmas", "cfg", "flux_guidance", "lora_strength", "steps", "info")
    OUTPUT_TOOLTIPS = (
        "The TCD sampler with the family's gamma and final step.",
        "The family's timesteps on this model's noise schedule.",
        "CFG for the guider (1.0 = no CFG).",
        f"For FluxGuidance on Flux models ({FLUX_GUIDANCE_DEFAULT:g} when the family states none).",
        "The LoRA strength the family recommends (wire it to the loader's strength_model).",
        "The steps used.",
        "The settings, what they reproduce, and their sources.",
    )
    FUNCTION = "get_preset"
    CATEGORY = "sampling/custom_sampling"
    DESCRIPTION = ("Settings for a few-step LoRA family (TCD, Hyper-SD, PCM, TDD, LCM, DMD2, Lightning) as the TCD "
                   "Sampler's SAMPLER and the TCD Scheduler's SIGMAS, plus cfg / FluxGuidance / LoRA strength. Each "
                   "number comes from the family's model card (see docs/presets.md).")

    def get_preset(self, model, preset, steps, family=None):
        named_steps = None
        if preset == AUTO:
            if not family or not family.get("key"):
                what = (f"the LoRA loader could not tell the family of {family['lora']!r} ({family['evidence']})"
                        if family else "no family input is connected")
                raise ValueError(f"Few-step Preset is set to 'auto' but {what}. Allowed: 'auto' with the TCD LoRA "
                                 f"Loader's family output, or a family picked from the list. Pick the LoRA's family "
                                 f"by hand")
            p = tp.preset(family["key"])
            named_steps = family.get("steps")
        else:
            p = next((q for q in tp.PRESETS if q.name == preset), None)
            if p is None:
                raise ValueError(f"preset {preset!r} is not one of: {', '.join(q.name for q in tp.PRESETS)}")
            if family and family.get("key") == p.key:
                named_steps = family.get("steps")
        base = backend.model_architecture(model)
        n = resolved_steps(p, steps, named_steps)
        s = settings(p, n)
        sampler = self._sampler(s)
        sigmas = tcd_sigmas(backend.model_sampling_of(model), n, 1.0, s["original_steps"], "comfyui")
        info = [f"preset: {p.name}", f"model: {base}", f"settings: {recommendation(p, n)}"]
        if base not in p.bases:
            info.append(f"note: {p.name} LoRAs exist for {', '.join(p.bases)}, not for {base}")
        lo, hi = p.steps_range
        if not lo <= n <= hi:
            info.append(f"note: {n} steps is outside the family's {lo}-{hi}")
        if named_steps and n != named_steps:
            info.append(f"note: the LoRA's name says {named_steps} steps")
        shift = (family or {}).get("shift")
        if shift is not None and base in ("SD3", "Flux"):
            info.append(f"note: the LoRA's name says shift {shift:g}: set the model's sampling shift to it "
                        f"(ModelSamplingSD3 / ModelSamplingFlux) before this node")
        applied = (family or {}).get("strength_model")
        if applied is not None and abs(applied - p.lora_strength) > 1e-9:
            info.append(f"note: the loader applied strength {family['strength_model']:g}; the family's is "
                        f"{p.lora_strength:g}")
        info += [f"source ({k}): {v}" for k, v in p.sources.items()]
        guidance = s["flux_guidance"] if s["flux_guidance"] is not None else FLUX_GUIDANCE_DEFAULT
        return (sampler, sigmas, float(s["cfg"]), float(guidance), float(s["lora_strength"]), int(n), "\n".join(info))

    @staticmethod
    def _sampler(s: dict):
        if s["sampler"] == "lcm":     # LCM-sampled families: ComfyUI's own lcm (tcd.presets explains why)
            import comfy.samplers
            return comfy.samplers.ksampler("lcm")
        return TCDSampler().get_sampler(gamma=s["gamma"], gamma_schedule="", final_step=s["final_step"])[0]
