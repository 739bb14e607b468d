"""Write the example workflows: API format (workflows/api/*.json, the source of truth here) and, through ComfyUI's
real frontend in headless Chromium, the UI format users drag in (workflows/*.json) with Note nodes and a
same-name JPEG thumbnail for the template browser.

    source scripts/host/env.sh && $HOST_PY scripts/build_workflows.py [--only NAME ...] [--api-only]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import comfyhost  # noqa: E402

WORKFLOWS = REPO / "workflows"
SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
TCD_SD15 = "TCD-SD15-LoRA.safetensors"
TCD_SDXL = "TCD-SDXL-LoRA.safetensors"
HYPER_SD15 = "Hyper-SD15-1step-lora.safetensors"
SD3 = "sd3_medium_incl_clips_t5xxlfp16.safetensors"
HYPER_SD3 = "Hyper-SD3-8steps-CFG-lora.safetensors"
FLUX_DEV = "flux1-dev.safetensors"
FLUX_CLIP_L, FLUX_T5 = "clip_l.safetensors", "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
HYPER_FLUX = "Hyper-FLUX.1-dev-8steps-lora.safetensors"
AUTO = "auto (from the LoRA loader)"
NEGATIVE = ""


class Graph:
    """A tiny API-graph builder: add(class_type, **inputs) -> node id; out(id, slot) is a link."""

    def __init__(self):
        self.nodes = {}

    def add(self, class_type, title=None, **inputs):
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}
        return node_id

    @staticmethod
    def out(node_id, slot=0):
        return [node_id, slot]


def lora_loader(g, ckpt_node, lora, strength=1.0):
    return g.add("TCD_LoraLoader", model=g.out(ckpt_node, 0), clip=g.out(ckpt_node, 1), lora_name=lora,
                 strength_model=strength, strength_clip=strength, on_unmatched="error")


def encode(g, clip, positive, negative=NEGATIVE):
    return (g.add("CLIPTextEncode", title="Positive", text=positive, clip=clip),
            g.add("CLIPTextEncode", title="Negative (unused at cfg 1)", text=negative, clip=clip))


def custom_advanced(g, model, pos, neg, latent, seed, steps, gamma, denoise=1.0, cfg=1.0, title=None):
    sampler = g.add("TCD_Sampler", gamma=gamma, gamma_schedule="", final_step="diffusers", tcf_order=1)
    sigmas = g.add("TCD_Scheduler", model=model, steps=steps, denoise=denoise, original_steps=50,
                   denoise_mode="comfyui")
    noise = g.add("RandomNoise", noise_seed=seed)
    guider = g.add("CFGGuider", model=model, positive=g.out(pos), negative=g.out(neg), cfg=cfg)
    return g.add("SamplerCustomAdvanced", title=title, noise=g.out(noise), guider=g.out(guider),
                 sampler=g.out(sampler), sigmas=g.out(sigmas), latent_image=latent)


def decode_save(g, samples, vae, prefix):
    image = g.add("VAEDecode", samples=samples, vae=vae)
    g.add("SaveImage", filename_prefix=prefix, images=g.out(image))
    return image


def sd15_tcd_lora_txt2img():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = lora_loader(g, ckpt, TCD_SD15)
    pos, neg = encode(g, g.out(lora, 1), "a photo of a cat sitting on a windowsill, golden hour, highly detailed")
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    ks = g.add("KSampler", seed=0, steps=4, cfg=1.0, sampler_name="tcd", scheduler="tcd", denoise=1.0,
               model=g.out(lora, 0), positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent))
    decode_save(g, g.out(ks), g.out(ckpt, 2), "tcd_sd15")
    return g.nodes, [
        "SD1.5 + TCD LoRA, plain KSampler.\nsampler: tcd (gamma 0.3), scheduler: tcd (diffusers' TCD timesteps "
        "999/759/499/259 for 4 steps).\ncfg 1.0 = diffusers guidance_scale 0: TCD LoRAs run without CFG.",
        "TCD LoRA Loader applies every layer of the LoRA whatever its key format (diffusers, PEFT, kohya) and "
        "reports how many it patched. Put h1t/TCD-SD15-LoRA in models/loras.\nSteps: 4-8. For another gamma use "
        "the TCD Sampler node (see the SDXL workflow).",
    ]


def sdxl_tcd_custom_advanced():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    lora = lora_loader(g, ckpt, TCD_SDXL)
    pos, neg = encode(g, g.out(lora, 1), "a majestic lion in the savanna at sunset, cinematic, 8k")
    latent = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    sample = custom_advanced(g, g.out(lora, 0), pos, neg, g.out(latent), seed=0, steps=4, gamma=0.3)
    decode_save(g, g.out(sample), g.out(ckpt, 2), "tcd_sdxl")
    return g.nodes, [
        "SDXL + TCD LoRA with SamplerCustomAdvanced.\nTCD Sampler: gamma 0.3 (diffusers' eta). 0 = sharpest, "
        "deterministic; 1 = softer, LCM-like. More steps tolerate a higher gamma.\nOptional gamma_schedule gives "
        "one gamma per step, e.g. '0.5, 0.3, 0.2'.",
        "TCD Scheduler: diffusers' TCDScheduler timesteps from the model's own noise table. original_steps 50 is "
        "TCD's default grid; 1000 gives 999/749/499/249.\ncfg 1.0 in the guider (no CFG).",
    ]


def gamma_comparison():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = lora_loader(g, ckpt, TCD_SD15)
    pos, neg = encode(g, g.out(lora, 1), "portrait of an old fisherman, weathered skin, detailed, soft light")
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    # One noise, one schedule, one guider: only gamma differs between the four samples.
    sigmas = g.add("TCD_Scheduler", model=g.out(lora, 0), steps=4, denoise=1.0, original_steps=50,
                   denoise_mode="comfyui")
    noise = g.add("RandomNoise", noise_seed=42)
    guider = g.add("CFGGuider", model=g.out(lora, 0), positive=g.out(pos), negative=g.out(neg), cfg=1.0)
    images = []
    for gamma in (0.0, 0.3, 0.6, 1.0):
        sampler = g.add("TCD_Sampler", title=f"TCD Sampler (gamma {gamma})", gamma=gamma, gamma_schedule="",
                        final_step="diffusers", tcf_order=1)
        sample = g.add("SamplerCustomAdvanced", noise=g.out(noise), guider=g.out(guider), sampler=g.out(sampler),
                       sigmas=g.out(sigmas), latent_image=g.out(latent))
        images.append(g.add("VAEDecode", samples=g.out(sample), vae=g.out(ckpt, 2)))
    # ImageStitch (core since 0.3.4x, same inputs in 0.3.75 and 0.33) rather than ImageBatch, deprecated in newer
    # hosts: one picture, left to right, that the Save Image preview shows whole.
    batch = images[0]
    for image in images[1:]:
        batch = g.add("ImageStitch", image1=g.out(batch), direction="right", match_image_size=True,
                      spacing_width=8, spacing_color="white", image2=g.out(image))
    g.add("SaveImage", filename_prefix="tcd_gamma_0_03_06_10", images=g.out(batch))
    return g.nodes, [
        "Same seed, same 4 steps, gamma 0 / 0.3 / 0.6 / 1.0 side by side (stitched into one picture, left to right).\n"
        "gamma trades detail against stochasticity: low gamma keeps fine detail, high gamma is smoother "
        "(LCM-like).",
    ]


def img2img():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = lora_loader(g, ckpt, TCD_SD15)
    pos, neg = encode(g, g.out(lora, 1), "an oil painting of a mountain lake, impressionist")
    image = g.add("LoadImage", image="example.png")
    latent = g.add("VAEEncode", pixels=g.out(image), vae=g.out(ckpt, 2))
    sample = custom_advanced(g, g.out(lora, 0), pos, neg, g.out(latent), seed=7, steps=4, gamma=0.3, denoise=0.6)
    decode_save(g, g.out(sample), g.out(ckpt, 2), "tcd_img2img")
    return g.nodes, [
        "img2img with TCD. denoise 0.6 keeps the composition of the input image.\nTCD Scheduler's denoise_mode "
        "'comfyui' runs all 4 steps at the tail of a longer schedule (like KSampler); 'diffusers_pipeline' "
        "reproduces diffusers' img2img pipeline, which runs int(steps x denoise) steps.",
    ]


def inpainting():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = lora_loader(g, ckpt, TCD_SD15)
    pos, neg = encode(g, g.out(lora, 1), "a red vintage car")
    image = g.add("LoadImage", image="example.png")
    latent = g.add("VAEEncode", pixels=g.out(image), vae=g.out(ckpt, 2))
    masked = g.add("SetLatentNoiseMask", samples=g.out(latent), mask=g.out(image, 1))
    sample = custom_advanced(g, g.out(lora, 0), pos, neg, g.out(masked), seed=3, steps=8, gamma=0.3, denoise=1.0)
    decode_save(g, g.out(sample), g.out(ckpt, 2), "tcd_inpaint")
    return g.nodes, [
        "Inpainting: paint a mask on the input image (right-click > Open in MaskEditor); only the masked area is "
        "regenerated.\nThe TCD sampler pastes the unmasked latent back after the last step, as diffusers' inpaint "
        "pipeline does, so the kept area is unchanged. 8 steps, gamma 0.3.",
    ]


def hypersd_1step():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = lora_loader(g, ckpt, HYPER_SD15)
    pos, neg = encode(g, g.out(lora, 1), "a cute corgi puppy in a field of flowers")
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = custom_advanced(g, g.out(lora, 0), pos, neg, g.out(latent), seed=1, steps=1, gamma=1.0)
    decode_save(g, g.out(sample), g.out(ckpt, 2), "hypersd_1step")
    return g.nodes, [
        "Hyper-SD 1-step unified LoRA: 1 step with gamma 1.0 (its model card's eta=1.0).\nThe same LoRA works "
        "for 2-8 steps: raise steps and lower gamma for more detail (Hyper-SD recommends a lower eta as steps "
        "grow).",
    ]


def preset_sample(g, model, lora, guider, latent, seed):
    """Few-step Preset (family read by the loader) -> SamplerCustomAdvanced."""
    preset = g.add("TCD_FewStepPreset", model=model, preset=AUTO, steps=0, family=g.out(lora, 3))
    noise = g.add("RandomNoise", noise_seed=seed)
    return preset, g.add("SamplerCustomAdvanced", noise=g.out(noise), guider=g.out(guider(preset)),
                         sampler=g.out(preset, 0), sigmas=g.out(preset, 1), latent_image=latent)


def sd3_tcd_txt2img():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD3)
    lora = lora_loader(g, ckpt, HYPER_SD3, strength=0.125)
    pos = g.add("CLIPTextEncode", title="Positive", text="a red fox in fresh snow, morning light, detailed fur",
                clip=g.out(lora, 1))
    neg = g.add("CLIPTextEncode", title="Negative", text="blurry, low quality", clip=g.out(lora, 1))
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    _, sample = preset_sample(g, g.out(lora, 0), lora, lambda preset: g.add(
        "CFGGuider", model=g.out(lora, 0), positive=g.out(pos), negative=g.out(neg), cfg=g.out(preset, 2)),
        g.out(latent), seed=0)
    decode_save(g, g.out(sample), g.out(ckpt, 2), "tcd_sd3")
    return g.nodes, [
        "SD3 + Hyper-SD3 8-step CFG LoRA, sampled by the TCD sampler on SD3's flow schedule.\nThe TCD LoRA Loader "
        "applies every layer (diffusers/PEFT split q/k/v included) at strength 0.125, as the Hyper-SD card "
        "recommends, and reads the family from the file name.",
        "Few-step Preset (auto): the family's settings as SAMPLER + SIGMAS + cfg. Hyper-SD3 8-step: gamma 0 (the "
        "flow Euler sampler its authors use), 8 steps, cfg 5 (card: 3 / 5 / 7 at 4 / 8 / 16 steps).\nOn flow "
        "models gamma is applied in the model's own time: s = (1 - gamma) * sigma_next (docs/flow_models.md).",
    ]


def flux_tcd_txt2img():
    g = Graph()
    unet = g.add("UNETLoader", unet_name=FLUX_DEV, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux", device="default")
    vae = g.add("VAELoader", vae_name=FLUX_VAE)
    lora = g.add("TCD_LoraLoader", model=g.out(unet), clip=g.out(clip), lora_name=HYPER_FLUX, strength_model=0.125,
                 strength_clip=0.125, on_unmatched="error")
    shifted = g.add("ModelSamplingFlux", model=g.out(lora, 0), max_shift=1.15, base_shift=0.5, width=1024,
                    height=1024)
    pos = g.add("CLIPTextEncode", title="Positive", text="a lighthouse on a cliff at dusk, waves, cinematic",
                clip=g.out(lora, 1))
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)

    def guider(preset):
        guided = g.add("FluxGuidance", conditioning=g.out(pos), guidance=g.out(preset, 3))
        return g.add("BasicGuider", model=g.out(shifted), conditioning=g.out(guided))

    _, sample = preset_sample(g, g.out(shifted), lora, guider, g.out(latent), seed=0)
    decode_save(g, g.out(sample), g.out(vae), "tcd_flux")
    return g.nodes, [
        "FLUX.1-dev + Hyper-FLUX 8-step LoRA at strength 0.125 (the Hyper-SD card's value), sampled by the TCD "
        "sampler on Flux's flow schedule. ModelSamplingFlux sets the resolution-dependent shift; the TCD timesteps "
        "are read from the shifted schedule.",
        "Few-step Preset (auto): Hyper-FLUX = gamma 0 (flow Euler), 8 steps, no CFG (BasicGuider) and FluxGuidance "
        "3.5 from the preset's flux_guidance output.\nTry the TCD Sampler with gamma > 0 instead of the preset's "
        "sampler to re-noise part of each step (docs/flow_models.md).",
    ]


def distill(g, ckpt, steps=2000, lora_name="my_tcd_lora"):
    """TCD Distill LoRA on a folder of captioned images (every widget spelled out, as the frontend saves them)."""
    return g.add("TCD_DistillLoRA", model=g.out(ckpt, 0), vae=g.out(ckpt, 2), clip=g.out(ckpt, 1),
                 image_folder="tcd_train", resolution=512, steps=steps, batch_size=4, learning_rate=1e-4, rank=64,
                 alpha=64.0, w_min=3.0, w_max=15.0, original_steps=50, tcf_order=1, ema_decay=0.95, loss="huber",
                 seed=0, lora_name=lora_name, save_every=500, resume=True, objective="tcd", training_dtype="auto",
                 gradient_checkpointing=True, warmup_steps=100, max_grad_norm=1.0, validation_every=250,
                 validation_draws=4, validation_steps=4, validation_gamma=0.3, save_dtype="fp16",
                 recipe="recommended", rho=0.0)


def distill_tcd_lora():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    trainer = distill(g, ckpt)
    g.add("SaveImage", title="Loss curve", filename_prefix="tcd_train/loss", images=g.out(trainer, 2))
    g.add("SaveImage", title="Validation images", filename_prefix="tcd_train/validation", images=g.out(trainer, 3))
    return g.nodes, [
        "Distil a TCD LoRA from the loaded model (the teacher) on your images: put images with same-name .txt "
        "captions in ComfyUI/input/tcd_train.\nThe teacher is the model with the LoRA switched off: one model "
        "copy in memory. Progress shows on the node; Cancel keeps a resumable checkpoint (resume: on continues "
        "it).",
        "Saved every 500 steps (atomically) to models/loras/my_tcd_lora.safetensors: it appears in the LoRA "
        "loaders at once.\nw_min / w_max: the teacher's guidance range; tcf_order 2 uses the second-order TCF; "
        "ema_decay 0.95 is the target network's EMA. Validation every 250 steps: a loss on fixed draws (the loss "
        "curve) and TCD samples of your first caption.",
    ]


def distill_flow(g, model, clip, vae, lora_name, w_min, w_max):
    """TCD Distill LoRA on a flow model (SD3 / Flux): 1024 px images, gradient checkpointing, w in the model's
    own guidance units."""
    return g.add("TCD_DistillLoRA", model=model, vae=vae, clip=clip, image_folder="tcd_train", resolution=1024,
                 steps=2000, batch_size=1, learning_rate=1e-4, rank=32, alpha=32.0, w_min=w_min, w_max=w_max,
                 original_steps=50, tcf_order=1, ema_decay=0.95, loss="huber", seed=0, lora_name=lora_name,
                 save_every=250, resume=True, objective="tcd", training_dtype="auto", gradient_checkpointing=True,
                 warmup_steps=100, max_grad_norm=1.0, validation_every=250, validation_draws=4, validation_steps=4,
                 validation_gamma=0.3, save_dtype="bf16", recipe="recommended", rho=0.0)


def save_training_images(g, trainer):
    g.add("SaveImage", title="Loss curve", filename_prefix="tcd_train/loss", images=g.out(trainer, 2))
    g.add("SaveImage", title="Validation images", filename_prefix="tcd_train/validation", images=g.out(trainer, 3))


def sd3_distill_tcd_lora():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD3)
    trainer = distill_flow(g, g.out(ckpt, 0), g.out(ckpt, 1), g.out(ckpt, 2), "my_sd3_tcd_lora", 3.5, 6.0)
    save_training_images(g, trainer)
    return g.nodes, [
        "Distil a TCD LoRA from SD3 / SD3.5 (the teacher) on your images: put images with same-name .txt captions "
        "in ComfyUI/input/tcd_train (1024 px; sizes a multiple of 16).\nThe teacher is the model with the LoRA "
        "switched off: one model copy in memory. Cancel keeps a resumable checkpoint (resume: on continues it).",
        "SD3 is a CFG model: the teacher runs a conditional and an unconditional (empty prompt) pass, x = x_c + "
        "w (x_c - x_u) with w drawn in [w_min, w_max]; w 3.5-6 is SD3's usual cfg 4.5-7 (cfg = w + 1).\nThe "
        "trained layers are the DiT blocks' attention and MLP linears; the file (models/loras/my_sd3_tcd_lora) "
        "loads in full in core Load LoRA and the TCD LoRA Loader. Sample with the TCD sampler, 4-8 steps, cfg 1.",
    ]


def flux_distill_tcd_lora():
    g = Graph()
    unet = g.add("UNETLoader", unet_name=FLUX_DEV, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux", device="default")
    vae = g.add("VAELoader", vae_name=FLUX_VAE)
    # the training grid is the model's shifted schedule: Flux's shift at the training resolution
    shifted = g.add("ModelSamplingFlux", model=g.out(unet), max_shift=1.15, base_shift=0.5, width=1024,
                    height=1024)
    trainer = distill_flow(g, g.out(shifted), g.out(clip), g.out(vae), "my_flux_tcd_lora", 2.0, 5.0)
    save_training_images(g, trainer)
    return g.nodes, [
        "Distil a TCD LoRA from FLUX.1-dev on your images: put images with same-name .txt captions in "
        "ComfyUI/input/tcd_train (1024 px; sizes a multiple of 16). ModelSamplingFlux sets the shift of the "
        "training resolution: the skipping grid follows the schedule the LoRA will be sampled with.",
        "FLUX.1-dev is guidance-distilled: the guidance is a model input, not a second pass. w_min / w_max (2-5) "
        "are the guidance values fed to the model, drawn per sample for teacher, student and target alike; no "
        "negative (one would be refused).\nSample with the TCD sampler, 4-8 steps, and FluxGuidance in 2-5.",
    ]


def train_then_sample():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    trainer = distill(g, ckpt, steps=500, lora_name="my_tcd_lora_quick")
    pos, neg = encode(g, g.out(ckpt, 1), "a photo of a cat, detailed")
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    ks = g.add("KSampler", seed=0, steps=4, cfg=1.0, sampler_name="tcd", scheduler="tcd", denoise=1.0,
               model=g.out(trainer, 0), positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent))
    decode_save(g, g.out(ks), g.out(ckpt, 2), "tcd_trained_sample")
    g.add("SaveImage", title="Loss curve", filename_prefix="tcd_train/loss", images=g.out(trainer, 2))
    return g.nodes, [
        "Train, then sample with the result in the same run: the trainer's MODEL output already carries the new "
        "LoRA, so the KSampler (sampler tcd, scheduler tcd, 4 steps, cfg 1) shows what it learned.\nLater, load "
        "models/loras/my_tcd_lora_quick.safetensors with the TCD LoRA Loader instead of training again.",
    ]


BUILDERS = {f.__name__: f for f in (sd15_tcd_lora_txt2img, sdxl_tcd_custom_advanced, gamma_comparison, img2img,
                                     inpainting, hypersd_1step, distill_tcd_lora, train_then_sample,
                                     sd3_tcd_txt2img, flux_tcd_txt2img, sd3_distill_tcd_lora,
                                     flux_distill_tcd_lora)}


def write_api(name, api):
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    path = WORKFLOWS / "api" / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(api, indent=2) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--api-only", action="store_true")
    a = ap.parse_args()
    items = []
    for name, build in BUILDERS.items():
        if a.only and name not in a.only:
            continue
        api, notes = build()
        write_api(name, api)
        items.append({"name": name, "api": api, "notes": notes, "ui_out": str(WORKFLOWS / f"{name}.json"),
                      "thumb_out": str(WORKFLOWS / f"{name}.jpg")})
    if a.api_only:
        return
    node_modules = subprocess.run(["bash", str(REPO / "scripts/ui/setup.sh")], check=True, capture_output=True,
                                  text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        with comfyhost.ComfyServer(Path(tmp) / "base", Path(os.environ["COMFYUI_DIR"])) as server:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps({"url": server.url, "mode": "build", "items": items}))
            out = subprocess.run(["node", str(REPO / "scripts/ui/frontend.mjs"), str(job)], capture_output=True,
                                 text=True, env=dict(os.environ, NODE_PATH=node_modules), timeout=600)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            print(out.stdout.strip()[-3000:])


if __name__ == "__main__":
    main()
