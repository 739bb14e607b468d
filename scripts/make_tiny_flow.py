#!/usr/bin/env python3
"""Tiny, randomly initialised but *real* flow-matching models built from ComfyUI's own classes: an SD3-class
MMDiT (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT, comfy.supported_models.SD3) and a Flux-class transformer
(comfy.ldm.flux.model.Flux, comfy.supported_models.Flux). Used by the tests, the flow benchmark and the example
workflows' headless runs.

What ComfyUI 0.3.75's detection accepts (comfy/model_detection.py, detect_unet_config):
* SD3 / MMDiT: yes, at any size where hidden = 64 x depth (detection reads depth = hidden // 64 and uses
  depth heads of 64). TINY_SD3 (depth 2, hidden 128) loads through CheckpointLoaderSimple
  (comfy.sd.load_checkpoint_guess_config) and UNETLoader (comfy.sd.load_diffusion_model).
* Flux: no. Detection fixes num_heads = 24 and axes_dim = [16, 56, 56] (head width 128), so only hidden = 3072
  builds: a hidden-64 file fails with "Hidden size 64 must be divisible by num_heads 24". TINY_FLUX is built
  in-process from its unet_config instead (tiny_model_patcher), and written with that config in the file's
  metadata (FLUX_CONFIG_KEY) for the test-only loader the headless workflow runs use.

Files (--out-dir DIR, ComfyUI models/ layout):
  checkpoints/tiny_sd3.safetensors       MMDiT + CLIP-L (text_encoders.clip_l.*) + 16-channel TAESD VAE
  diffusion_models/tiny_sd3.safetensors  the MMDiT alone (UNETLoader)
  diffusion_models/tiny_flux.safetensors the Flux transformer alone + its unet_config in the metadata
  text_encoders/tiny_clip_l.safetensors  full-size CLIP-L (ComfyUI builds CLIP-L from a fixed config)
  vae/tiny_taesd16.safetensors           16-channel TAESD (SD3 / Flux latents)

    python scripts/make_tiny_flow.py --comfyui /path/to/ComfyUI --out-dir /path/to/models
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# SD3-class MMDiT as ComfyUI's detection reads it back from the file (model_detection.detect_unet_config). Context
# and pooled widths are those of SD3's CLIP-L-only text encoder (sd3_clip pads the context to 4096 and the pooled
# output to 768 + 1280); one x-block self-attention layer (attn2) and RMS q/k norms as in SD3.5 Medium.
TINY_SD3 = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_max_size": 32, "num_patches": 32 * 32, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "qk_norm": "rms", "x_block_self_attn_layers": [0],
}
# Flux-class transformer (FLUX.1-dev layout: guidance embedding, double then single stream blocks), hidden 64 with
# 2 heads of 32 (rotary axes 8 + 12 + 12); text context and pooled vector from CLIP-L (768), as T5-XXL cannot be
# built small.
TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 64,
    "num_heads": 2, "axes_dim": [8, 12, 12], "theta": 10000, "mlp_ratio": 4.0, "depth": 2,
    "depth_single_blocks": 2, "context_in_dim": 768, "vec_in_dim": 768, "qkv_bias": True, "guidance_embed": True,
}
FLUX_CONFIG_KEY = "tcd_test.flux_unet_config"
TAESD16_SCALE = (1.5305, 0.0609)        # scale / shift ComfyUI's VAELoader gives the SD3 TAESD ("taesd3")


def init_tensor(name, shape, gen, dtype):
    """Random weights a forward pass can use: ~unit-variance activations, unit norms, zero biases."""
    import torch
    if len(shape) == 0:
        return torch.ones((), dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    if name.endswith("pos_embed"):
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return (torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))).to(dtype)


def model_config(kind: str, **overrides):
    """ComfyUI's supported-model config (comfy.supported_models.SD3 / Flux) for a tiny unet_config (entries of
    `overrides` replace TINY_SD3 / TINY_FLUX ones, e.g. a larger model for a benchmark)."""
    import comfy.supported_models as sm
    if kind == "sd3":
        return sm.SD3({**TINY_SD3, **overrides})
    if kind == "flux":
        return sm.Flux({**TINY_FLUX, **overrides})
    raise ValueError(f"kind {kind!r} is not 'sd3' or 'flux'")


def diffusion_state_dict(kind: str, seed: int = 0, dtype=None, **overrides) -> dict:
    """The transformer's state dict in ComfyUI's own (ldm) key layout, randomly initialised (no prefix)."""
    import torch
    import comfy.ops
    cfg = model_config(kind, **overrides)
    if kind == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        params = {k: v for k, v in cfg.unet_config.items() if k != "image_model"}
        net = MMDiT(**params, device="meta", operations=comfy.ops.disable_weight_init)
    else:
        from comfy.ldm.flux.model import Flux
        net = Flux(**cfg.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return {k: init_tensor(k, tuple(v.shape), gen, dtype) for k, v in net.state_dict().items()}


def tiny_model_patcher(kind: str, seed: int = 0, **overrides):
    """A tiny SD3 / Flux comfy.model_base model in a ModelPatcher, built in-process from its unet_config (the
    way ComfyUI builds a detected checkpoint: supported-model config -> get_model -> load_model_weights)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    cfg = model_config(kind, **overrides)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device="cpu")
    weights = diffusion_state_dict(kind, seed, **overrides)
    model.load_model_weights({"diffusion_model." + k: v for k, v in weights.items()}, "diffusion_model.")
    model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# (text context width, pooled width) each tiny model reads: SD3's CLIP-L-only encoder output, CLIP-L for Flux.
CONTEXT = {"sd3": (4096, 2048), "flux": (768, 768)}


def conditioning(kind: str, seed: int = 1, tokens: int = 8):
    """A random CONDITIONING of the widths the tiny model reads (cross-attention context + pooled vector)."""
    import torch
    ctx, pooled = CONTEXT[kind]
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, ctx, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]


def clip_l_state_dict(comfyui: str, seed: int, dtype) -> dict:
    """Full-size CLIP-L text model (ComfyUI's CLIPTextModel from its fixed sd1_clip_config.json)."""
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    cfg = json.load(open(os.path.join(comfyui, "comfy", "sd1_clip_config.json")))
    clip = CLIPTextModel(cfg, dtype, "meta", comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    return {k: init_tensor(k, tuple(v.shape), gen, dtype) for k, v in clip.state_dict().items()
            if not k.startswith("text_projection")}


def taesd16_state_dict(seed: int, dtype) -> dict:
    import torch
    from comfy.taesd.taesd import TAESD
    vae = TAESD(latent_channels=16)
    gen = torch.Generator().manual_seed(seed)
    sd = {k: init_tensor(k, tuple(v.shape), gen, dtype) for k, v in vae.state_dict().items()}
    sd["vae_scale"] = torch.tensor(TAESD16_SCALE[0], dtype=dtype)
    sd["vae_shift"] = torch.tensor(TAESD16_SCALE[1], dtype=dtype)
    return sd


def _save(sd: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path + ".tmp", metadata=metadata or {"format": "pt"})
    os.replace(path + ".tmp", path)   # atomic: a reader never sees a half-written file


def write_files(comfyui: str, out_dir: str, seed: int = 0) -> dict:
    import torch
    dtype = torch.float16
    clip_l = clip_l_state_dict(comfyui, seed + 1, dtype)
    vae = taesd16_state_dict(seed + 2, dtype)
    sd3 = diffusion_state_dict("sd3", seed, torch.float32)
    flux = diffusion_state_dict("flux", seed, torch.float32)
    paths = {k: os.path.join(out_dir, v) for k, v in {
        "sd3_checkpoint": "checkpoints/tiny_sd3.safetensors", "sd3_unet": "diffusion_models/tiny_sd3.safetensors",
        "flux_unet": "diffusion_models/tiny_flux.safetensors", "clip_l": "text_encoders/tiny_clip_l.safetensors",
        "vae": "vae/tiny_taesd16.safetensors"}.items()}
    ckpt = {"model.diffusion_model." + k: v for k, v in sd3.items()}
    ckpt.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip_l.items()})
    ckpt.update({"first_stage_model." + k: v for k, v in vae.items()})
    _save(ckpt, paths["sd3_checkpoint"])
    _save(sd3, paths["sd3_unet"])
    _save(flux, paths["flux_unet"], {"format": "pt", FLUX_CONFIG_KEY: json.dumps(TINY_FLUX)})
    _save(clip_l, paths["clip_l"])
    _save(vae, paths["vae"])
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True, help="ComfyUI root (folder with comfy/)")
    ap.add_argument("--out-dir", required=True, help="a models/ folder: files go to its checkpoints/, "
                                                     "diffusion_models/, text_encoders/ and vae/ subfolders")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    sys.path.insert(0, os.path.abspath(a.comfyui))
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True  # before the first import of comfy.model_management (CPU-only torch)
    paths = write_files(os.path.abspath(a.comfyui), a.out_dir, a.seed)
    print(json.dumps({"files": paths, "seconds": round(time.time() - t0, 2)}))


if __name__ == "__main__":
    main()
