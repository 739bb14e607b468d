#!/usr/bin/env python3
"""Write a tiny, randomly initialised but *real* SD1.5-shaped checkpoint (.safetensors)
that ComfyUI's CheckpointLoaderSimple detects as SD15 (comfy/supported_models.py:SD15).

Layout of the file (single-file "ldm" checkpoint, like v1-5-pruned.safetensors):
  model.diffusion_model.*          UNet (model_channels=320, context_dim=768, conv proj_in
                                   => SD15; levels / res blocks / transformer depth shrunk)
  cond_stage_model.transformer.text_model.*   full-size CLIP-L text encoder (123M params;
                                   ComfyUI builds CLIP-L from a fixed json config, so it
                                   cannot be smaller; missing keys would stay torch.empty)
  first_stage_model.taesd_*        TAESD tiny VAE (comfy/sd.py VAE: key 'taesd_decoder.1.weight')
                                   or --vae kl for the full 83M-param SD VAE

Usage:
  python scripts/make_tiny_sd15.py --comfyui /path/to/ComfyUI --out models/checkpoints/tiny_sd15.safetensors
Options: --levels 1 (channel_mult [1]; 2 => [1,2]) --res-blocks 1 --depth 1
         --middle {attn,res,none} --vae {taesd,kl} --dtype {fp16,fp32} --seed 0
"""
import argparse
import json
import math
import os
import sys
import time


def init_tensor(name, shape, gen, dtype):
    import torch
    if len(shape) == 0:
        return torch.ones((), dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm weights / scales
        return torch.ones(shape, dtype=dtype)
    if "embedding" in name:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True, help="ComfyUI root (folder with comfy/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--levels", type=int, default=1)
    ap.add_argument("--res-blocks", type=int, default=1)
    ap.add_argument("--depth", type=int, default=1, help="transformer depth per res block")
    ap.add_argument("--middle", choices=["attn", "res", "none"], default="res")
    ap.add_argument("--vae", choices=["taesd", "kl"], default="taesd")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-dir", default=None,
                    help="ALSO write the parts for UNETLoader/CLIPLoader/VAELoader: "
                         "<dir>/diffusion_models/tiny_unet.safetensors, <dir>/text_encoders/tiny_clip_l.safetensors, "
                         "<dir>/vae/tiny_taesd.safetensors (pass the models/ folder)")
    a = ap.parse_args()

    t0 = time.time()
    sys.path.insert(0, os.path.abspath(a.comfyui))
    import torch
    from safetensors.torch import save_file
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True  # must precede the first import of comfy.model_management (CPU-only torch)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.clip_model import CLIPTextModel
    from comfy.taesd.taesd import TAESD

    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    gen = torch.Generator().manual_seed(a.seed)
    ops = comfy.ops.disable_weight_init
    channel_mult = [1, 2, 4, 4][: a.levels] if a.levels <= 4 else [1] * a.levels
    nrb = [a.res_blocks] * len(channel_mult)
    # transformer_depth: one entry per input res block; transformer_depth_output: nrb+1 per level
    td = [a.depth] * sum(nrb)
    tdo = [a.depth] * sum(n + 1 for n in nrb)
    tdm = {"attn": a.depth, "res": -1, "none": -2}[a.middle]
    unet_cfg = dict(use_checkpoint=False, use_spatial_transformer=True, legacy=False,
                    image_size=32, in_channels=4, out_channels=4, model_channels=320,
                    num_res_blocks=nrb, channel_mult=channel_mult, dropout=0.0,
                    num_heads=8, num_head_channels=-1, transformer_depth=td,
                    transformer_depth_output=tdo, transformer_depth_middle=tdm,
                    context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
                    use_temporal_attention=False, use_temporal_resblock=False,
                    device="meta", operations=ops)
    unet = UNetModel(**unet_cfg)
    sd = {}
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = init_tensor(k, tuple(v.shape), gen, dtype)
    n_unet = sum(v.numel() for v in sd.values())

    clip_cfg = json.load(open(os.path.join(a.comfyui, "comfy", "sd1_clip_config.json")))
    clip = CLIPTextModel(clip_cfg, dtype, "meta", ops)
    n_before = len(sd)
    for k, v in clip.state_dict().items():
        if k.startswith("text_projection"):
            continue
        sd["cond_stage_model.transformer." + k] = init_tensor(k, tuple(v.shape), gen, dtype)
    n_clip = sum(v.numel() for k, v in sd.items() if k.startswith("cond_stage_model."))

    if a.vae == "taesd":
        vae = TAESD()
        for k, v in vae.state_dict().items():
            sd["first_stage_model." + k] = init_tensor(k, tuple(v.shape), gen, dtype)
        sd["first_stage_model.vae_scale"] = torch.tensor(0.18215, dtype=dtype)  # as nodes.VAELoader does for taesd
        sd["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=dtype)
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        ddconfig = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                    'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
        with torch.device("meta"):
            vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        for k, v in vae.state_dict().items():
            sd["first_stage_model." + k] = init_tensor(k, tuple(v.shape), gen, dtype)
    n_vae = sum(v.numel() for k, v in sd.items() if k.startswith("first_stage_model."))

    if a.split_dir:
        parts = {"diffusion_models/tiny_unet.safetensors": "model.diffusion_model.",
                 "text_encoders/tiny_clip_l.safetensors": "cond_stage_model.transformer.",
                 "vae/tiny_vae.safetensors": "first_stage_model."}
        for rel, prefix in parts.items():
            part = {k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}
            dst = os.path.join(a.split_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            save_file(part, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    tmp = a.out + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt", "tiny_sd15": "random"})
    os.replace(tmp, a.out)  # atomic: a reader never sees a half-written checkpoint
    print(json.dumps({"out": a.out, "bytes": os.path.getsize(a.out), "seconds": round(time.time() - t0, 2),
                      "params": {"unet": n_unet, "clip_l": n_clip, "vae": n_vae},
                      "unet": {k: unet_cfg[k] for k in ("channel_mult", "num_res_blocks", "transformer_depth",
                                                         "transformer_depth_middle")}}))


if __name__ == "__main__":
    main()
