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


# Flow transformers (SD3 MMDiT, Flux): the attention and MLP linears of the DiT blocks, in diffusers' module names
# (SD3Transformer2DModel, FluxTransformer2DModel). Image and text streams alike: attention q/k/v/out (to_*, add_*),
# SD3.5's second self-attention (attn2), both feed-forwards, and Flux's single blocks (proj_mlp, proj_out). Not
# trained: the adaLN modulation (norm*.linear), the embedders, the final norm and projection; these are the layers
# diffusers' SD3 / Flux DreamBooth-LoRA scripts leave out too.
FLOW_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
FLOW_LORA_TARGET_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k",
                            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2", "proj_mlp", "proj_out")


def is_flow_lora_target(diffusers_module: str) -> bool:
    """True for a diffusers SD3 / Flux transformer module the LoRA trains: inside a DiT block (so the model's final
    `proj_out` is not one) and equal to, or ending in '.' + one of FLOW_LORA_TARGET_MODULES."""
    if not diffusers_module.startswith(FLOW_BLOCK_PREFIXES):
        return False
    return any(diffusers_module.endswith("." + t) for t in FLOW_LORA_TARGET_MODULES)
