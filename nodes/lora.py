"""TCD LoRA Loader: any few-step LoRA (TCD, Hyper-SD, PCM, TDD, LCM, DMD2, Lightning ...) for SD1.x / SD2.x /
SDXL / SD3 / Flux in any common key format, every layer applied or a clear reason why not.

Thin adapter: tcd.lora reads, converts and validates; tcd.backend applies through ComfyUI's own
comfy.sd.load_lora_for_models and counts the patched layers; the info text is built here.
"""
from __future__ import annotations

import logging

from ..tcd import backend
from ..tcd import lora as tl
from .presets import FAMILY_TYPE, family_output, info_lines

log = logging.getLogger(__name__)


class TCDLoraLoader:
    """MODEL (+ optional CLIP) with a LoRA applied; info STRING with format, architecture, coverage, presets."""

    _cache: tuple | None = None     # (path, mtime_ns, size) -> (tensors, metadata): the last file read

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x, SD2.x, SDXL, SD3 or Flux model the LoRA is applied "
                                              "to."}),
                "lora_name": (backend.lora_names(), {"tooltip":
                              "A .safetensors LoRA from models/loras, in any key format: kohya, diffusers (old "
                              "and new), PEFT (transformer., base_model.model. or no prefix), OneTrainer, "
                              "ComfyUI-native."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.001, "tooltip":
                                   "How strongly the LoRA changes the UNet / transformer. 1.0 for TCD / Hyper-SD "
                                   "SD1.5/SDXL LoRAs, 0.125 for Hyper-SD3 / Hyper-FLUX (the info output names the "
                                   "family's value); 0 leaves the model unchanged."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional text encoder; the LoRA's text-encoder layers (if any) are "
                                  "applied to it."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.001, "tooltip":
                                  "How strongly the LoRA changes the text encoder (when a CLIP is connected)."}),
                "on_unmatched": (list(tl.ON_UNMATCHED), {"default": "error", "tooltip":
                                 "LoRA layers that match no weight of the model: error stops with their list; "
                                 "warn applies the matching layers and lists the others in the info and the log."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", FAMILY_TYPE)
    RETURN_NAMES = ("model", "clip", "info", "family")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "The CLIP with the LoRA's text-encoder layers applied "
                       "(the input CLIP, or None when none was connected).",
                       "Format, architecture, layers patched/total and the recommended steps/gamma/cfg.",
                       "The few-step family the file names (for the Few-step Preset node's 'auto').")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a LoRA (TCD, Hyper-SD, or any SD1.x/SD2.x/SDXL/SD3/Flux LoRA) in any common key format and "
                   "applies every layer, or stops with the list of layers it could not apply. Core LoraLoader "
                   "silently drops the attention layers of diffusers/PEFT-format SD LoRAs and every layer of "
                   "unprefixed PEFT flow LoRAs; this node converts them first. Names the few-step family it finds.")

    def _read(self, path: str):
        import os
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        cache = TCDLoraLoader._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        data = tl.read_lora_file(path)
        TCDLoraLoader._cache = (key, data)
        return data

    def load_lora(self, model, lora_name, strength_model, clip=None, strength_clip=1.0, on_unmatched="error"):
        path = backend.lora_path(lora_name)
        tensors, metadata = self._read(path)
        plan = tl.plan_lora(tensors, metadata, lora_name, backend.model_architecture(model),
                            backend.unet_ldm_to_diffusers(model), backend.lora_target_shapes(model, clip),
                            has_clip=clip is not None, on_unmatched=on_unmatched)
        if plan.validation.unmatched:
            log.warning("TCD LoRA Loader: %d layers of %s not applied: %s", len(plan.validation.unmatched),
                        lora_name, ", ".join(plan.validation.unmatched))
        new_model, new_clip, n_unet, n_te = backend.apply_lora(model, clip, plan.state_dict, strength_model,
                                                               strength_clip)
        expected_unet = plan.unet_layers if strength_model != 0 else 0
        expected_te = plan.te_layers if (clip is not None and strength_clip != 0) else 0
        if (n_unet, n_te) != (expected_unet, expected_te):
            raise ValueError(f"ComfyUI applied {n_unet}/{expected_unet} diffusion-model and {n_te}/{expected_te} "
                             f"text-encoder layers of {lora_name!r}, although all of them matched the model. This "
                             f"ComfyUI version maps LoRA keys differently; please report it with the info of this "
                             f"node")
        info = info_text(plan, n_unet, n_te, strength_model, strength_clip)
        return (new_model, new_clip, info, family_output(plan, strength_model))


def info_text(plan: tl.LoraPlan, patched_unet: int, patched_te: int, strength_model: float,
              strength_clip: float) -> str:
    """The loader's info output: what was found, what was applied, and the family's preset."""
    v = plan.validation
    part = "transformer" if plan.model_arch in tl.FLOW_ARCHITECTURES else "UNet"
    lines = [
        f"LoRA: {plan.name}",
        f"format: {plan.format}; alpha: {plan.alpha_source}",
        f"architecture: {plan.lora_arch.name} ({plan.lora_arch.evidence}); model: {plan.model_arch}",
        f"{part} layers patched: {patched_unet}/{plan.unet_layers}" + (
            " (strength_model 0: model unchanged)" if strength_model == 0 else f" at strength {strength_model:g}"),
    ]
    if plan.te_layers:
        lines.append(f"text encoder layers patched: {patched_te}/{plan.te_layers}" + (
            " (strength_clip 0: CLIP unchanged)" if strength_clip == 0 else f" at strength {strength_clip:g}"))
    if plan.te_skipped:
        lines.append(f"text encoder layers not applied: {plan.te_skipped} (no CLIP connected)")
    lines.append(f"layers matched: {len(v.matched)}/{v.total}")
    if v.unmatched:
        shown = [f"{k} ({why})" for k, why in list(v.unmatched.items())[:12]]
        more = f", ... ({len(v.unmatched) - 12} more)" if len(v.unmatched) > 12 else ""
        lines.append(f"NOT applied ({len(v.unmatched)}): " + ", ".join(shown) + more)
    lines += info_lines(plan.family, strength_model)
    return "\n".join(lines)
