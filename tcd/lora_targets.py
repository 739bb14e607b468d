"""The layers a trained TCD LoRA covers: one definition for the in-graph trainer and the accelerate CLI.

The target modules of diffusers' LCM-LoRA training script (train_lcm_distill_lora_sd*.py): attention q/k/v/out,
transformer proj_in/out and feed-forward, resnet conv1/conv2/conv_shortcut/time_emb_proj, and the down/upsampler
convolutions. Not trained: conv_in, conv_out, the time (and SDXL added-condition) embeddings, norms. Names are
diffusers UNet module names, matched as PEFT matches `target_modules` (the name itself or a ".<target>" suffix);
the in-graph trainer translates ComfyUI's ldm names with ComfyUI's own table (tcd.backend.unet_ldm_to_diffusers).
"""
from __future__ import annotations

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                       "time_emb_proj")


def is_lora_target(diffusers_module: str) -> bool:
    """True for a diffusers UNet module the LoRA trains (PEFT's rule: equal to a target or ending in '.target')."""
    return any(diffusers_module == t or diffusers_module.endswith("." + t) for t in LORA_TARGET_MODULES)
