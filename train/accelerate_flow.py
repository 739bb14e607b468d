"""The flow-model parts of train.accelerate_tcd: diffusers SD3 (StableDiffusion3Pipeline) transformers.

Everything here is what differs from the SD1.x/SDXL UNet path; the loop, the data stream, the LoRA/EMA/optimizer,
checkpoints and resume are the CLI's own. The objective is the same tcd.losses objective on a rectified-flow path
(tcd.paths.FlowPath): x_sigma = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity v = eps - x0
(diffusers' flow matching, prediction_type "flow"), and the teacher is guided by classifier-free guidance against the
empty prompt's embeddings (what StableDiffusion3Pipeline does for guidance_scale > 1).

Conventions taken from diffusers (read in 0.42):
* time: FlowMatchEulerDiscreteScheduler keeps `timesteps = sigmas * num_train_timesteps` and the SD3 pipeline passes
  that `t` to the transformer, so the transformer is called with timestep = sigma * num_train_timesteps;
* the path: the scheduler's `shift` (SD3: 3.0) maps the uniform time t to sigma = shift t / (1 + (shift - 1) t); with
  `use_dynamic_shifting` (SD3.5-class configs, Flux) sigma = e^mu / (e^mu + 1/t - 1) with mu from the image's token
  count by the pipelines' `calculate_shift`;
* latents: (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor (diffusers' SD3 training scripts);
* conditioning: `encode_prompt` (CLIP-L + CLIP-G hidden states padded to the T5 width and concatenated with T5's,
  zeros when the pipeline has no T5) and the pooled CLIP projections.

Validation images are sampled with the pack's own TCD sampler (tcd.sampling.sample_tcd, flow form, gamma as
--validation_gamma) on the same transformer call; diffusers' TCDScheduler is a VP scheduler.

Flux (FluxPipeline: packed 2x2 latents, image/text position ids, guidance as a model input) is not trained by this
CLI yet: `check_folder` refuses a Flux folder with that message.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

try:
    from ..tcd.lora_targets import is_flow_lora_target
    from ..tcd.paths import FlowPath
    from ..tcd.sampling import sample_tcd
    from ..tcd.schedule import FlowSchedule, tcd_timesteps
except ImportError:
    from tcd.lora_targets import is_flow_lora_target
    from tcd.paths import FlowPath
    from tcd.sampling import sample_tcd
    from tcd.schedule import FlowSchedule, tcd_timesteps

FLOW_ARCHITECTURES = ("sd3",)
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline"}
REFUSED_PIPELINES = {
    "FluxPipeline": "Flux (FluxPipeline) is not supported by this CLI yet (its packed latents, position ids and "
                    "embedded guidance are not implemented here); train a Flux TCD LoRA with the pack's in-graph "
                    "trainer in ComfyUI, or use an SD3 / SD1.x / SDXL diffusers folder.",
}
# Components a folder must have, and optional ones the pipeline accepts as None (SD3 without T5, no IP-Adapter).
REQUIRED_COMPONENTS = {"sd3": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                               "tokenizer_2")}
OPTIONAL_COMPONENTS = {"sd3": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTION_TYPE = "flow"
VAE_SCALE = 8                         # the SD3 VAE downsamples by 8 (3 down blocks with a downsampler)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None


def _present(index: dict, name: str) -> bool:
    """A model_index.json entry that names a library and class (["transformers", "T5EncoderModel"])."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def check_folder(model: Path, arch: str) -> dict:
    """Check an SD3 diffusers folder before anything is loaded; returns {"scheduler": its config, "transformer":
    its config}. Raises ValueError naming what is missing or wrong and what to do."""
    index = _read_json(model / "model_index.json")
    missing = [n for n in REQUIRED_COMPONENTS[arch] if not _present(index, n) or not (model / n).is_dir()]
    if missing:
        raise ValueError(f"{str(model)!r} is a {PIPELINE_CLASS[arch]} folder without {', '.join(missing)} (listed "
                         f"in model_index.json and present as sub-folders); an {arch.upper()} TCD LoRA needs the "
                         f"transformer, the VAE, both CLIP text encoders with their tokenizers and the scheduler. "
                         f"Download the whole pipeline folder.")
    t5 = [_present(index, n) and (model / n).is_dir() for n in ("text_encoder_3", "tokenizer_3")]
    if t5[0] != t5[1]:
        have, lack = ("text_encoder_3", "tokenizer_3") if t5[0] else ("tokenizer_3", "text_encoder_3")
        raise ValueError(f"{str(model)!r} has {have} but no {lack}: the T5 encoder needs both (or neither: "
                         f"StableDiffusion3Pipeline then pads the T5 part of the prompt with zeros).")
    sched = _read_json(model / "scheduler" / "scheduler_config.json")
    cls = sched.get("_class_name")
    if cls not in FLOW_SCHEDULERS:
        raise ValueError(f"{str(model / 'scheduler')!r} is a {cls} (prediction type "
                         f"{sched.get('prediction_type', 'epsilon')!r}); an {arch.upper()} transformer is a "
                         f"rectified-flow model that predicts the velocity, trained and sampled with "
                         f"{' / '.join(FLOW_SCHEDULERS)}. Restore the model's own scheduler folder.")
    if sched.get("use_dynamic_shifting") and sched.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"the scheduler uses time_shift_type={sched['time_shift_type']!r}; this trainer knows "
                         f"the exponential (Flux / SD3.5) resolution shift only.")
    flow_path(sched, 64)     # shift / mu settings make a valid path (at any token count; 64 is arbitrary)
    transformer = _read_json(model / "transformer" / "config.json")
    return {"scheduler": sched, "transformer": transformer}


def resolution_step(folder_configs: dict) -> int:
    """Pixel sizes must be multiples of this: the VAE's 8 times the transformer's patch size."""
    return VAE_SCALE * int(folder_configs["transformer"].get("patch_size", 2))


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift, linear in the image token count (diffusers' SD3 / Flux pipelines'
    `calculate_shift`: mu = base_shift at base_seq_len tokens, max_shift at max_seq_len)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_path(scheduler_config: dict, image_seq_len: int) -> FlowPath:
    """The path the model was trained on, from its FlowMatchEulerDiscreteScheduler config: the fixed `shift`
    (SD3 3.0), or with use_dynamic_shifting the exponential shift by mu at this many image tokens."""
    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting"):
        # The SD3 pipeline's defaults for absent keys (it reads max_shift with a default of 1.16).
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        return FlowPath.flux(mu)
    return FlowPath.shifted(float(cfg.get("shift", 1.0)))


def image_seq_len(resolution: int, patch_size: int) -> int:
    """Image tokens of a square resolution: (latent side / patch)^2, as the SD3 pipeline counts them."""
    side = resolution // VAE_SCALE // patch_size
    return side * side


def load_pipeline(folder: str, arch: str, variant=None):
    """StableDiffusion3Pipeline (float32, CPU); components that model_index.json leaves empty (no T5, no image
    encoder) are passed as None, which the pipeline accepts (from_pretrained otherwise asks for them)."""
    from diffusers import StableDiffusion3Pipeline
    index = _read_json(Path(folder) / "model_index.json")
    absent = {n: None for n in OPTIONAL_COMPONENTS[arch] if not _present(index, n)}
    return StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=torch.float32, variant=variant, **absent)


def denoiser_of(pipe):
    return pipe.transformer


def text_encoders_of(pipe) -> list:
    return [m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None))
            if m is not None]


def check_components(pipe) -> None:
    """Shapes the pipeline does not check by itself: 16-channel latents for the transformer, and a pooled width
    that matches the two CLIP projections (a swapped --vae_path or text encoder shows here, not as a shape error
    deep in a forward pass)."""
    transformer, vae = pipe.transformer, pipe.vae
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents but the transformer takes "
                         f"{transformer.config.in_channels}: use the model's own VAE (SD3: 16 channels)")
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    if pooled != transformer.config.pooled_projection_dim:
        raise ValueError(f"the text encoders pool {pooled} features but the transformer takes "
                         f"{transformer.config.pooled_projection_dim}: they come from different models")


def lora_target_names(transformer) -> list:
    """The exact module names the LoRA trains: every Linear of the transformer that tcd.lora_targets names (the one
    definition the ComfyUI node uses too). Exact names, so PEFT cannot match anything else by suffix."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and is_flow_lora_target(n)]
    if not names:
        raise ValueError("no LoRA target (tcd.lora_targets.is_flow_lora_target) among the transformer's Linear "
                         "layers; is this an SD3 transformer?")
    return names


def make_objective(args, scheduler_config: dict, resolution: int, patch_size: int, make):
    """`make(args, path, prediction_type, guidance)` -> the CLI's objective, on this model's flow path."""
    return make(args, flow_path(scheduler_config, image_seq_len(resolution, patch_size)), PREDICTION_TYPE, "cfg")


class TransformerCall:
    """model(x_sigma, sigma, cond) -> velocity, as (args, kwargs) of the transformer's forward, so the same call
    serves the module, its DDP wrapper and torch.func.functional_call (the EMA target)."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = float(num_train_timesteps)

    def __call__(self, x, sigma, cond):
        # FlowMatchEulerDiscreteScheduler: timesteps = sigmas * num_train_timesteps, passed as-is by the pipeline.
        timestep = sigma.float() * self.num_train_timesteps
        return (), {"hidden_states": x, "timestep": timestep, "encoder_hidden_states": cond["embeds"],
                    "pooled_projections": cond["pooled"], "return_dict": False}


class SD3Conditioner:
    """Captions -> (cond, uncond) through StableDiffusion3Pipeline.encode_prompt, the inference path: CLIP-L/G hidden
    states (+ T5, or zeros without it) and pooled projections; uncond = the empty prompt's, as the pipeline's
    classifier-free guidance uses (negative_prompt "")."""

    def __init__(self, pipe, device):
        self.pipe, self.device = pipe, device
        self._uncond = None

    def _encode(self, captions):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                                       device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"embeds": embeds, "pooled": pooled}

    @torch.no_grad()
    def __call__(self, captions, original_sizes=None, crop_top_lefts=None) -> tuple[dict, dict]:
        cond = self._encode(list(captions))
        if self._uncond is None:
            self._uncond = self._encode([""])
        n = len(captions)
        uncond = {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()}
        return cond, uncond


# ------------------------------------------------------------------------------------------------ validation
def validation_sigmas(path: FlowPath, steps: int, original_steps: int) -> torch.Tensor:
    """Descending sigmas of a few-step TCD run, then 0: TCD's timesteps on the original_steps grid (as diffusers'
    TCDScheduler picks them, tcd.schedule.tcd_timesteps: 999, 759, ... for 4 of 50) at the same grid points of the
    flow path the LoRA was trained on: VP timestep k i - 1 is grid point i, i.e. unshifted time (t + 1) / 1000."""
    times = tcd_timesteps(steps, original_steps)
    return torch.tensor([path.sigma_of_time((t + 1) / 1000.0) for t in times] + [0.0], dtype=torch.float32)


@torch.no_grad()
def sample_image(pipe, prompt: str, steps: int, gamma: float, original_steps: int, resolution: int, seed: int,
                 device):
    """One validation image (PIL) of the pipeline's transformer (with its LoRA) by TCD's strategic stochastic
    sampling, guidance 0 (the prompt alone), decoded as the SD3 pipeline decodes: z / scaling_factor + shift."""
    transformer, vae = pipe.transformer, pipe.vae
    cfg = dict(pipe.scheduler.config)
    patch = transformer.config.patch_size
    path = flow_path(cfg, image_seq_len(resolution, patch))
    call = TransformerCall(cfg.get("num_train_timesteps", 1000))
    cond, _ = SD3Conditioner(pipe, device)([prompt])
    side = resolution // VAE_SCALE
    generator = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn((1, transformer.config.in_channels, side, side), generator=generator).to(device)

    def denoised(x_t, sigma, **_):
        args, kwargs = call(x_t, sigma, cond)
        v = transformer(*args, **kwargs)[0].float()
        return x_t - sigma.reshape(-1, 1, 1, 1) * v                 # x0 = x - sigma v

    latents = sample_tcd(denoised, x, validation_sigmas(path, steps, original_steps).to(device),
                         extra_args={"seed": int(seed)}, disable=True, gamma=gamma, schedule=FlowSchedule(),
                         final_step="x0")
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
