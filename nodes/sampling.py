"""TCD Sampler / TCD Scheduler nodes and the sampler function registered into KSampler's list.

Thin adapters: they read the model's sampling object through tcd.backend and call tcd.sampling / tcd.schedule.
"""
from __future__ import annotations

import torch

from ..tcd import backend
from ..tcd.sampling import FINAL_STEP_MODES, check_tcf_order, expand_gamma, parse_gamma_schedule, sample_tcd
from ..tcd.schedule import DENOISE_MODES, sigmas_at_timesteps, tcd_timesteps, tcd_timesteps_denoised

GAMMA_TOOLTIP = ("TCD's gamma (diffusers calls it eta): the fraction of each step that is re-noised. "
                 "0 = deterministic, DDIM-like; 1 = LCM-like. 0.3 is the TCD default; more steps tolerate more gamma. "
                 "Not the 'eta' of ComfyUI's ancestral samplers.")
TCF_ORDER_TOOLTIP = ("Order of each step's jump along the ODE trajectory (the paper's trajectory consistency function). "
                     "1 = the paper's sampler, exactly diffusers' TCDScheduler (1 model call per step). "
                     "2 = second-order jumps (DPM-Solver++(2S) midpoint): 2 model calls per step, so 4 steps cost "
                     "like 8; gamma means the same.")


def sample_tcd_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.3,
                     final_step="diffusers", noise_sampler=None, tcf_order=1):
    """sample_tcd on a ComfyUI model: the schedule comes from the model's own model_sampling."""
    schedule = backend.schedule_for(backend.model_sampling_of(model))
    x = sample_tcd(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, gamma=gamma,
                   noise_sampler=noise_sampler, schedule=schedule, final_step=final_step, tcf_order=tcf_order)
    mask = (extra_args or {}).get("denoise_mask")
    latent = getattr(model, "latent_image", None)
    if mask is not None and latent is not None and float(sigmas[-1]) == 0:
        # Inpainting: ComfyUI blends the kept region into every x0 prediction, but the "diffusers" final step
        # leaves 3% predicted noise there. diffusers' inpaint pipeline pastes the original latent back after the
        # last step; do the same, so unmasked pixels come out unchanged.
        x = x * mask + latent.to(x) * (1.0 - mask)
    return x


KSAMPLER_GRID = 50      # the `tcd` entry of KSampler's scheduler list uses diffusers' default original_steps


def tcd_sigmas(model_sampling, steps, denoise=1.0, original_steps=50, denoise_mode="comfyui") -> torch.Tensor:
    """SIGMAS at diffusers' TCD timesteps, looked up in the model's own sigma table (so ComfyUI's timestep(sigma)
    recovers each integer timestep exactly)."""
    table = backend.sigma_table(model_sampling)
    return sigmas_at_timesteps(table, tcd_timesteps_denoised(steps, denoise, denoise_mode, original_steps,
                                                             table.numel()))


def tcd_scheduler_handler(model_sampling, steps):
    """`tcd` in KSampler's scheduler list: diffusers' default TCD schedule (50-step grid).

    KSampler implements denoise itself by asking for int(steps / denoise) steps and keeping the tail.
    """
    table = backend.sigma_table(model_sampling)
    if int(steps) > KSAMPLER_GRID:
        # KSampler has no original_steps input: say what it can do instead of tcd_timesteps' generic advice.
        raise ValueError(f"the 'tcd' scheduler was asked for {int(steps)} steps, but it picks its timesteps from "
                         f"TCD's {KSAMPLER_GRID}-step grid, so it runs 1..{KSAMPLER_GRID} steps (with denoise < 1 "
                         f"KSampler asks for int(steps / denoise) steps). Use 4-8 steps for TCD LoRAs or raise "
                         f"denoise; for more steps use the TCD Scheduler node with original_steps=1000")
    return sigmas_at_timesteps(table, tcd_timesteps(int(steps), KSAMPLER_GRID, 1.0, table.numel()))


class TCDSampler:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: TCD's strategic stochastic sampling with gamma."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "gamma": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": GAMMA_TOOLTIP}),
            },
            "optional": {
                "gamma_schedule": ("STRING", {"default": "", "multiline": False, "tooltip":
                                   "Optional per-step gamma, comma-separated (e.g. '0.5, 0.3, 0.2'); the last value "
                                   "repeats for the remaining steps. Empty = the constant gamma above."}),
                "final_step": (list(FINAL_STEP_MODES), {"default": "diffusers", "tooltip":
                               "What the last step returns. diffusers: the same latent diffusers' TCDScheduler returns "
                               "(x at t=0 with 3% of the predicted noise left, for exact parity). x0: the clean "
                               "prediction."}),
                "tcf_order": ("INT", {"default": 1, "min": 1, "max": 2, "tooltip": TCF_ORDER_TOOLTIP}),
            },
        }

    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The TCD sampler, for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"
    DESCRIPTION = ("Trajectory Consistency Distillation sampler (strategic stochastic sampling, paper Algorithm 4), "
                   "numerically equal to diffusers' TCDScheduler with eta = gamma (tcf_order 1; tcf_order 2 takes "
                   "second-order jumps at 2 model calls per step). Use with a TCD or Hyper-SD LoRA, cfg 1.0 "
                   "(= diffusers guidance_scale 0), 4-8 steps.")

    def get_sampler(self, gamma, gamma_schedule="", final_step="diffusers", tcf_order=1):
        import comfy.samplers
        values = parse_gamma_schedule(gamma_schedule or "")
        gamma_spec = values if values else float(gamma)
        expand_gamma(gamma_spec, max(len(values), 1))  # reject out-of-range values now, not mid-sampling
        options = {"gamma": gamma_spec, "final_step": final_step, "tcf_order": check_tcf_order(tcf_order)}
        return (comfy.samplers.KSAMPLER(sample_tcd_comfy, extra_options=options),)


class TCDScheduler:
    """SIGMAS at exactly diffusers' TCDScheduler timesteps, for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose noise schedule the sigmas are taken from."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip":
                          "Sampling steps. TCD LoRAs: 4-8 (1 for Hyper-SD 1-step). At most original_steps."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                            "1 for text-to-image; lower keeps more of the input latent (img2img / inpainting)."}),
                "original_steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                                   "The skipping grid timesteps are picked from: 50 is TCD's (and diffusers') "
                                   "default, 4 steps -> 999/759/499/259; 1000 gives 999/749/499/249."}),
                "denoise_mode": (list(DENOISE_MODES), {"default": "comfyui", "tooltip":
                                 "How denoise < 1 cuts the schedule. comfyui: like KSampler, `steps` steps at the "
                                 "tail of a longer schedule. diffusers_strength: TCDScheduler(strength=denoise). "
                                 "diffusers_pipeline: diffusers img2img pipelines, which run int(steps*denoise) "
                                 "steps."}),
            },
        }

    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("Noise levels at diffusers' TCD timesteps, ending at 0.",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"
    DESCRIPTION = "Timesteps of diffusers' TCDScheduler.set_timesteps, as ComfyUI SIGMAS from the model's own table."

    def get_sigmas(self, model, steps, denoise, original_steps=50, denoise_mode="comfyui"):
        ms = backend.model_sampling_of(model)
        return (tcd_sigmas(ms, steps, denoise, original_steps, denoise_mode),)
