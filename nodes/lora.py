"""TCD LoRA Loader: any TCD / Hyper-SD LoRA key format, every layer applied or a clear reason why not.

Thin adapter: tcd.lora reads, converts and validates; tcd.backend applies through ComfyUI's own
comfy.sd.load_lora_for_models and counts the patched layers.
"""
from __future__ import annotations

import logging

from ..tcd import backend
from ..tcd import lora as tl

log = logging.getLogger(__name__)


class TCDLoraLoader:
    """MODEL (+ optional CLIP) with a LoRA applied; info STRING with format, architecture, coverage, presets."""

    _cache: tuple | None = None     # (path, mtime_ns, size) -> (tensors, metadata): the last file read

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x, SD2.x or SDXL model the LoRA is applied to."}),
                "lora_name": (backend.lora_names(), {"tooltip":
                              "A .safetensors LoRA from models/loras, in any key format: kohya, diffusers (old "
                              "and new), PEFT (with or without base_model.model.), ComfyUI-native."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip":
                                   "How strongly the LoRA changes the UNet. 1.0 for TCD / Hyper-SD LoRAs; 0 leaves "
                                   "the model unchanged."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional text encoder; the LoRA's text-encoder layers (if any) are "
                                  "applied to it."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip":
                                  "How strongly the LoRA changes the text encoder (when a CLIP is connected)."}),
                "on_unmatched": (list(tl.ON_UNMATCHED), {"default": "error", "tooltip":
                                 "LoRA layers that match no weight of the model: error stops with their list; "
                                 "warn applies the matching layers and lists the others in the info and the log."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "info")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "The CLIP with the LoRA's text-encoder layers applied "
                       "(the input CLIP, or None when none was connected).",
                       "Format, architecture, layers patched/total and the recommended steps/gamma/cfg.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a LoRA (TCD, Hyper-SD, or any SD1.x/SD2.x/SDXL LoRA) in any common key format and applies "
                   "every layer, or stops with the list of layers it could not apply. Core LoraLoader silently "
                   "drops the attention layers of diffusers/PEFT-format LoRAs; this node converts them first.")

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
            raise ValueError(f"ComfyUI applied {n_unet}/{expected_unet} UNet and {n_te}/{expected_te} text-encoder "
                             f"layers of {lora_name!r}, although all of them matched the model. This ComfyUI "
                             f"version maps LoRA keys differently; please report it with the info of this node")
        info = tl.info_text(plan, n_unet, n_te, strength_model, strength_clip)
        return (new_model, new_clip, info)
