"""Could `make demo` ship a trained model that ComfyUI's own loaders open? Measured, not guessed.

ComfyUI's checkpoint detection recognises SD1.5 only with a 320-channel UNet and a 768-wide (CLIP-L) context, and a
real picture also needs a trained VAE in a layout its loaders read (TAESD). This measures, in the same process and
under the same load, the training cost per sample of (a) the efficacy teacher's UNet, (b) the smallest UNet that
detection accepts as SD1.5 (one level of 320 channels, one transformer block: what scripts/make_tiny_sd15.py
writes), and (c) TAESD's encoder + decoder on 64 x 64 images (the VAE at 8x downsampling for the same 8 x 8
latents); then extrapolates the teacher's measured training time to (b) + (c) at the same number of samples.
"""
from __future__ import annotations

import time

import torch

from . import model as M

SD15_SMALLEST = dict(model_channels=320, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                     transformer_depth_output=[1, 1], transformer_depth_middle=-1, context_dim=768)


def _seconds_per_sample(step, batch: int, repeats: int = 2) -> float:
    step()                                  # warm-up
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        step()
        best = min(best, time.process_time() - c0)
    return best / batch


def _unet_step(unet_config: dict, context_dim: int, batch: int):
    model = M.new_unet(dict(M.UNET_CONFIG, **unet_config))
    M.init_unet_(model, 0)
    net = model.diffusion_model.train().requires_grad_(True)
    x, t = torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,)).float()
    context = torch.randn(batch, 77, context_dim)

    def step():
        net.zero_grad(set_to_none=True)
        net(x, t, context=context).pow(2).mean().backward()
    return step, sum(p.numel() for p in net.parameters())


def _taesd_step(batch: int):
    from comfy.taesd.taesd import TAESD
    vae = TAESD()
    for module in vae.modules():
        reset = M._torch_reset(type(module))
        if reset is not None:
            reset(module)
    images = torch.randn(batch, 3, 64, 64)

    def step():
        vae.zero_grad(set_to_none=True)
        vae.taesd_decoder(vae.taesd_encoder(images)).pow(2).mean().backward()
    return step, sum(p.numel() for p in vae.parameters())


def loadable_model_cost(teacher_train_cpu_s: float, batch: int = 8) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours_step, ours_params = _unet_step({}, M.CONTEXT_DIM, batch)
        big_step, big_params = _unet_step(SD15_SMALLEST, 768, batch)
        vae_step, vae_params = _taesd_step(batch)
        ours = _seconds_per_sample(ours_step, batch)
        big = _seconds_per_sample(big_step, batch)
        vae = _seconds_per_sample(vae_step, batch)
    finally:
        torch.set_num_threads(previous)
    ratio = (big + vae) / ours
    return {"teacher_unet": {"params": ours_params, "train_cpu_s_per_sample": ours},
            "sd15_smallest_unet": {"params": big_params, "train_cpu_s_per_sample": big},
            "taesd_64px": {"params": vae_params, "train_cpu_s_per_sample": vae},
            "cost_ratio": ratio, "teacher_train_cpu_s": teacher_train_cpu_s,
            "extrapolated_cpu_s": teacher_train_cpu_s * ratio}
