"""TCD Distill LoRA: trajectory consistency distillation of a LoRA from the connected model, inside the graph.

Thin adapter: train.dataset builds the data, train.comfy_loop runs the loop and writes the files, the pack's
TCD sampler draws the validation images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..tcd import backend
from ..tcd.losses import LOSS_TYPES, RECIPES
from ..tcd.tcf import TCF_ORDERS
from ..train import comfy_loop, dataset, plot
from .sampling import TCDSampler, tcd_sigmas


RECIPE_CHOICES = [*RECIPES, "custom"]


def recipe_settings(recipe, tcf_order, loss, rho) -> dict:
    """rho / loss / tcf_order of a named recipe, or the node's own inputs for "custom".

    Graphs saved before the recipe input existed send no recipe: they keep meaning what they said (custom).
    """
    if recipe is None or recipe == "custom":
        return dict(tcf_order=int(tcf_order), loss=loss, rho=float(rho))
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is not one of {RECIPE_CHOICES}")
    return dict(RECIPES[recipe])


def _one(value, default=None):
    """INPUT_IS_LIST gives every input as a list; widgets and single sockets hold one value."""
    if value is None:
        return default
    if isinstance(value, list):
        return value[0] if value else default
    return value


class TCDDistillLoRA:
    """Distils a TCD LoRA from a teacher MODEL (TCD paper's objective) with progress, Cancel and exact resume."""

    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher: an SD1.x / SD2.x / SDXL model (eps or v-prediction), "
                                    "or a flow model: SD3 / SD3.5 or FLUX.1 (its sampling shift, e.g. from "
                                    "ModelSamplingSD3 / ModelSamplingFlux, sets the training grid). The LoRA is "
                                    "trained on it; one copy serves as teacher (LoRA bypassed), student and "
                                    "target."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip":
                          "Training steps (optimizer updates). On resume: the total to reach."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 1024, "tooltip":
                               "Samples per step (latents of the same size)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": False,
                                  "tooltip": "AdamW learning rate (1e-4: diffusers' LCM-LoRA SD1.5 recipe)."}),
                "rank": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip":
                         "LoRA rank (64 in the TCD / LCM-LoRA releases)."}),
                "alpha": ("FLOAT", {"default": 64.0, "min": 0.01, "max": 4096.0, "step": 0.01, "tooltip":
                          "LoRA alpha; the LoRA is scaled by alpha / rank (alpha = rank: scale 1)."}),
                "w_min": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 50.0, "step": 0.1, "tooltip":
                          "Lowest guidance scale w of the teacher, drawn per sample in [w_min, w_max]. CFG models "
                          "(SD1.x-SDXL, SD3): x = x_c + w (x_c - x_u), i.e. cfg = w + 1; the defaults 3-15 are "
                          "the LCM/TCD recipe for UNets (SD3's usual cfg 4.5-7 is w 3.5-6). Models that take "
                          "guidance as an input (FLUX.1-dev): w is the guidance value fed to the model, as "
                          "FluxGuidance sets it: use e.g. 2-5."}),
                "w_max": ("FLOAT", {"default": 15.0, "min": 0.0, "max": 50.0, "step": 0.1, "tooltip":
                          "Highest guidance scale w (see w_min). CFG models: w_min = w_max = 0 trains without "
                          "guidance. FLUX.1-dev: the highest guidance value, e.g. 5."}),
                "original_steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                                   "Skipping grid: the teacher jumps 1000 // original_steps timesteps (50 -> 20, the "
                                   "TCD paper's choice); also the grid the target time s is drawn on."}),
                "tcf_order": ("INT", {"default": 1, "min": min(TCF_ORDERS), "max": max(TCF_ORDERS), "tooltip":
                              "Used with recipe = custom. Trajectory consistency function order: 1 = DDIM form (one "
                              "model pass per TCF), 2 = DPM-Solver++(2S) midpoint (two passes)."}),
                "ema_decay": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 0.9999, "step": 0.0001, "tooltip":
                              "Target network = EMA of the LoRA with this decay; 0 = the online LoRA under no_grad "
                              "(diffusers' LCM-LoRA scripts)."}),
                "loss": (list(LOSS_TYPES), {"default": "huber", "tooltip":
                         "Used with recipe = custom. Distance between student and target: huber (elementwise "
                         "pseudo-Huber, c = 0.001), l2, or huber_sample (per-sample pseudo-Huber of iCT)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "Seeds the LoRA initialisation and every random draw (batches, timesteps, noise, w)."}),
                "lora_name": ("STRING", {"default": "tcd_lora", "tooltip":
                              "File name in models/loras ('.safetensors' is added). Written atomically, listed by "
                              "the LoRA loaders at once. Also names the resumable checkpoint."}),
                "save_every": ("INT", {"default": 500, "min": 0, "max": 1000000, "tooltip":
                               "Write the LoRA and the resumable checkpoint every N steps (0 = only at the end; a "
                               "checkpoint is also kept on Cancel or error)."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip":
                           "Continue from this LoRA name's checkpoint when one exists (same settings and data "
                           "required; steps may grow). Off: start over and replace it."}),
            },
            "optional": {
                "latents": ("LATENT", {"tooltip": "Training latents: a list (Make Training Dataset) or one batch."}),
                "conditioning": ("CONDITIONING", {"tooltip":
                                 "One conditioning per latent (a list, e.g. from Make Training Dataset), or one "
                                 "shared by all."}),
                "negative": ("CONDITIONING", {"tooltip":
                             "Unconditional prompt for the teacher's CFG guidance. Not connected: the empty prompt "
                             "with image_folder; no guidance with latents. Leave it unconnected for FLUX.1-dev (the "
                             "guidance is a model input there; a negative is refused)."}),
                "image_folder": ("STRING", {"default": "", "tooltip":
                                 "Instead of latents: a folder of images, each with a same-name .txt caption "
                                 "(absolute, or inside ComfyUI's input folder). Needs vae and clip; encodings are "
                                 "cached."}),
                "vae": ("VAE", {"tooltip": "Encodes the image_folder images; decodes the validation images."}),
                "clip": ("CLIP", {"tooltip": "Encodes the image_folder captions (and the empty prompt)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip":
                               "image_folder images are resized and centre-cropped to this square size (a "
                               "multiple of 16 for SD3 / Flux, whose latents are cut into 2x2 patches)."}),
                "recipe": (RECIPE_CHOICES, {"default": "recommended", "tooltip":
                           "recommended: the objective settings measured best against LCM (rho "
                           f"{RECIPES['recommended']['rho']}, {RECIPES['recommended']['loss']}, TCF order "
                           f"{RECIPES['recommended']['tcf_order']}; docs/recipe.md). paper: the TCD paper's (rho 0, "
                           "huber, order 1). custom: the tcf_order, loss and rho inputs."}),
                "rho": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                        "Used with recipe = custom. Probability that the target time s is 0; otherwise s is "
                        "uniform on the grid below t_n (0 = the paper)."}),
                "objective": (list(comfy_loop.OBJECTIVES), {"default": "tcd", "tooltip":
                              "tcd: trajectory consistency (random target time s <= t_n). lcm: the LCM baseline "
                              "(s = 0 with LCM's c_skip / c_out)."}),
                "training_dtype": (list(backend.TRAINING_DTYPES), {"default": "auto", "tooltip":
                                   "auto = fp32 on CPU (bf16 is ~9x slower there), bf16 on GPUs that support it."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                                           "Recompute UNet / transformer blocks in the backward pass: less "
                                           "memory, ~30% slower."}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                 "Linear learning-rate warmup steps (diffusers' recipe: 500)."}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                                  "Gradient clipping norm (0 = off)."}),
                "validation_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                     "Every N steps (and before and after training): the loss on fixed draws "
                                     "(plotted, comparable across steps) and, when a VAE is connected, an image "
                                     "sampled with the TCD sampler from the first prompt. 0 = off."}),
                "validation_draws": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip":
                                     "Batches in the fixed validation draws the validation loss is averaged over."}),
                "validation_steps": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip":
                                     "TCD sampling steps of the validation images."}),
                "validation_gamma": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                     "TCD gamma of the validation images."}),
                "save_dtype": (list(comfy_loop.SAVE_DTYPES), {"default": "fp16", "tooltip":
                               "Precision of the saved LoRA file (training itself keeps fp32 LoRA weights)."}),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("model", "lora_name", "loss_curve", "validation_images")
    OUTPUT_TOOLTIPS = ("The teacher with the trained LoRA applied.",
                       "The saved LoRA's name in models/loras.",
                       "The loss per step (and its moving average).",
                       "Validation images, one per validation point (a grey square when validation is off).")
    FUNCTION = "train"
    CATEGORY = "training"
    OUTPUT_NODE = True
    DESCRIPTION = ("Trajectory Consistency Distillation (TCD) of a LoRA from the connected model (SD1.x, SD2.x, "
                   "SDXL, SD3 / SD3.5, FLUX.1): the student learns to jump along the teacher's guided "
                   "probability-flow ODE to any earlier time. Shows progress, stops on Cancel keeping a checkpoint, "
                   "and resumes exactly. Sample the result with the TCD sampler at 4-8 steps, cfg 1 (FLUX.1-dev: "
                   "FluxGuidance in the trained w range).")

    def train(self, model, steps, batch_size, learning_rate, rank, alpha, w_min, w_max, original_steps, tcf_order,
              ema_decay, loss, seed, lora_name, save_every, resume, latents=None, conditioning=None, negative=None,
              image_folder=None, vae=None, clip=None, resolution=None, objective=None, training_dtype=None,
              gradient_checkpointing=None, warmup_steps=None, max_grad_norm=None, validation_every=None,
              validation_draws=None, validation_steps=None, validation_gamma=None, save_dtype=None, recipe=None,
              rho=None):
        model = _one(model)
        objective_settings = recipe_settings(_one(recipe), _one(tcf_order), _one(loss), _one(rho, 0.0))
        cfg = comfy_loop.DistillConfig(
            steps=_one(steps), batch_size=_one(batch_size), learning_rate=float(_one(learning_rate)),
            rank=_one(rank), alpha=float(_one(alpha)), w_min=float(_one(w_min)), w_max=float(_one(w_max)),
            original_steps=_one(original_steps), ema_decay=float(_one(ema_decay)), seed=_one(seed),
            **objective_settings, objective=_one(objective, "tcd"), dtype=_one(training_dtype, "auto"),
            gradient_checkpointing=bool(_one(gradient_checkpointing, False)), warmup_steps=_one(warmup_steps, 0),
            max_grad_norm=float(_one(max_grad_norm, 1.0)), save_every=_one(save_every, 0),
            validation_every=_one(validation_every, 0), validation_draws=_one(validation_draws, 4),
            save_dtype=_one(save_dtype, "fp16"))
        cfg.check()
        path, listed, state = comfy_loop.prepare_output_paths(_one(lora_name))
        vae, clip, folder = _one(vae), _one(clip), (_one(image_folder, "") or "").strip()
        uncond = _one(negative)
        # Before any encoding: the model is one the trainer distils, and a negative fits its guidance.
        model_path = comfy_loop.model_path_of(model)
        comfy_loop.check_guidance_inputs(model_path.guidance, uncond)
        if folder:
            if latents:
                raise ValueError("give either image_folder or latents + conditioning, not both")
            data = dataset.from_image_folder(folder, vae, clip, int(_one(resolution, 512)),
                                             Path(backend.output_directory()) / "tcd_train" / "cache",
                                             backend.input_directory(), uncond,
                                             empty_prompt_uncond=model_path.guidance == "cfg")
        else:
            data = dataset.from_latents_and_conditioning(latents, conditioning, uncond)
        validation = None
        if cfg.validation_every and vae is not None:
            n_steps = min(int(_one(validation_steps, 4)), cfg.original_steps)
            gamma = float(_one(validation_gamma, 0.3))
            validation = comfy_loop.Validation(
                sampler=TCDSampler().get_sampler(gamma)[0],
                sigmas_fn=lambda ms: tcd_sigmas(ms, n_steps, 1.0, cfg.original_steps),
                vae=vae, positive=data.conditionings[0], seed=cfg.seed)

        def on_save(native, step, losses, validation_losses):
            metadata = comfy_loop.metadata_for(cfg, losses, step, data, len(native) // 3, validation_losses)
            comfy_loop.write_lora_file(native, path, model, metadata)

        result = comfy_loop.train_lora(model, data, cfg, state,
                                       resume=bool(_one(resume, True)), validation=validation, on_save=on_save)
        trained = backend.apply_lora(model, None, _load_saved(path), 1.0, 0.0)[0]
        curve = plot.loss_curve_image(result.losses, validation=result.validation_losses)
        images = torch.cat(result.validation_images) if result.validation_images else \
            torch.full((1, 64, 64, 3), 0.5)
        return (trained, listed, curve, images)


def _load_saved(path):
    from safetensors.torch import load_file
    return load_file(str(path))
