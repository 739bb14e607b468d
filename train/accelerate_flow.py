"""The flow-model parts of train.accelerate_tcd: diffusers SD3 (StableDiffusion3Pipeline) and FLUX.1-dev (FluxPipeline)
transformers.

Everything here is what differs from the SD1.x/SDXL UNet path; the loop, the data stream, the LoRA/EMA/optimizer,
checkpoints and resume are the CLI's own. The objective is the same tcd.losses objective on a rectified-flow path
(tcd.paths.FlowPath): x_sigma = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity v = eps - x0
(diffusers' flow matching, prediction_type "flow"). SD3's teacher is guided by classifier-free guidance against the
empty prompt's embeddings (what StableDiffusion3Pipeline does for guidance_scale > 1); FLUX.1-dev is guidance-distilled:
the guidance scale is a transformer input (`guidance`), so the objective runs with guidance="embedded" (one teacher
pass given the drawn w; teacher, target and student all receive the same w; no unconditional pass).

Conventions taken from diffusers (read in 0.42):
* time: FlowMatchEulerDiscreteScheduler keeps `timesteps = sigmas * num_train_timesteps` and the SD3 pipeline passes
  that `t` to the transformer, so the transformer is called with timestep = sigma * num_train_timesteps;
* the path: the scheduler's `shift` (SD3: 3.0) maps the uniform time t to sigma = shift t / (1 + (shift - 1) t); with
  `use_dynamic_shifting` (SD3.5-class configs, Flux) sigma = e^mu / (e^mu + 1/t - 1) with mu from the image's token
  count by the pipelines' `calculate_shift`;
* latents: (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor (diffusers' SD3 training scripts);
* conditioning: `encode_prompt` (CLIP-L + CLIP-G hidden states padded to the T5 width and concatenated with T5's,
  zeros when the pipeline has no T5) and the pooled CLIP projections.

FLUX.1 (read in diffusers 0.42's pipeline_flux.py and transformer_flux.py):
* latents stay [B, 16, H, W] for the objective (which takes x_t of any shape); FluxTransformerCall packs them into
  2x2 patch tokens [B, H W / 4, 64] around the transformer call and unpacks the velocity (FluxPipeline._pack_latents /
  _unpack_latents), with img_ids = (0, row, column) per token (_prepare_latent_image_ids at H/2 x W/2) and
  txt_ids = zeros (encode_prompt);
* time: FluxPipeline calls the transformer with `timestep / 1000` where timesteps = sigmas * 1000, and the
  transformer multiplies by 1000 again inside (FluxTransformer2DModel.forward), so the call takes timestep = sigma;
* guidance: FluxPipeline builds `torch.full([1], guidance_scale, dtype=torch.float32).expand(batch)` and passes it
  as-is (the transformer scales it by 1000 like the timestep); here it is the drawn w, a float32 [B] tensor;
* the path: FLUX.1-dev's scheduler uses dynamic shifting, mu = calculate_shift(image tokens) with tokens =
  (H / 16) (W / 16) after packing (the pipeline's `latents.shape[1]`);
* conditioning: encode_prompt's T5 hidden states (prompt_embeds, max_sequence_length 512 as the pipeline's
  default) and the CLIPTextModel's pooled output (pooled_prompt_embeds).

Validation images are sampled with the pack's own TCD sampler (tcd.sampling.sample_tcd, flow form, gamma as
--validation_gamma) on the same transformer call; diffusers' TCDScheduler is a VP scheduler. Flux samples at a fixed
guidance value (--validation_guidance).
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

FLOW_ARCHITECTURES = ("sd3", "flux")
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# Pipeline classes recognised but not trained, with the reason and what to do instead (none at present).
REFUSED_PIPELINES: dict = {}
# Components a folder must have, and optional ones the pipeline accepts as None (SD3 without T5, no IP-Adapter).
REQUIRED_COMPONENTS = {"sd3": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                               "tokenizer_2"),
                       "flux": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                "tokenizer_2")}
OPTIONAL_COMPONENTS = {"sd3": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
                       "flux": ("image_encoder", "feature_extractor")}
COMPONENTS_NEEDED = {"sd3": "the transformer, the VAE, both CLIP text encoders with their tokenizers and the "
                            "scheduler",
                     "flux": "the transformer, the VAE, the CLIP and T5 text encoders with their tokenizers and the "
                             "scheduler"}
# How each pipeline guides: SD3 by classifier-free guidance (a second, empty-prompt pass), FLUX.1-dev by its
# guidance embedding (tcd.losses guidance="embedded").
GUIDANCE = {"sd3": "cfg", "flux": "embedded"}
# calculate_shift's default max_shift where a dynamic-shifting scheduler config leaves it out (SD3 pipeline: 1.16,
# FluxPipeline: 1.15).
DEFAULT_MAX_SHIFT = {"sd3": 1.16, "flux": 1.15}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTION_TYPE = "flow"
VAE_SCALE = 8                         # the SD3 / Flux VAE downsamples by 8 (3 down blocks with a downsampler)
FLUX_PACK = 2                         # FluxPipeline packs 2x2 latent pixels into one token (_pack_latents)
FLUX_MAX_SEQUENCE_LENGTH = 512        # FluxPipeline.encode_prompt's default T5 length (FLUX.1-dev)


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
    """Check an SD3 / Flux diffusers folder before anything is loaded; returns {"arch", "scheduler": its config,
    "transformer": its config}. Raises ValueError naming what is missing or wrong and what to do."""
    index = _read_json(model / "model_index.json")
    missing = [n for n in REQUIRED_COMPONENTS[arch] if not _present(index, n) or not (model / n).is_dir()]
    if missing:
        raise ValueError(f"{str(model)!r} is a {PIPELINE_CLASS[arch]} folder without {', '.join(missing)} (listed "
                         f"in model_index.json and present as sub-folders); an {arch.upper()} TCD LoRA needs "
                         f"{COMPONENTS_NEEDED[arch]}. Download the whole pipeline folder.")
    t5 = [_present(index, n) and (model / n).is_dir() for n in ("text_encoder_3", "tokenizer_3")]
    if arch == "sd3" and t5[0] != t5[1]:
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
    flow_path(sched, 64, arch)     # shift / mu settings make a valid path (at any token count; 64 is arbitrary)
    transformer = _read_json(model / "transformer" / "config.json")
    if arch == "flux" and not transformer.get("guidance_embeds", False):
        raise ValueError(f"{str(model / 'transformer')!r} is a Flux transformer without a guidance embedding "
                         f"(guidance_embeds false: FLUX.1-schnell, already a few-step model, or an undistilled "
                         f"Flux); this trainer distils the guidance-distilled FLUX.1-dev class, whose guidance "
                         f"scale is a model input. Use a FLUX.1-dev (guidance_embeds true) folder.")
    return {"arch": arch, "scheduler": sched, "transformer": transformer}


def token_patch(arch: str, transformer_config: dict) -> int:
    """Latent pixels per token side: SD3's patch_size (its transformer patches), Flux's 2x2 packing (the pipeline
    packs, the transformer's patch_size is 1)."""
    return FLUX_PACK if arch == "flux" else int(transformer_config.get("patch_size", 2))


def resolution_step(folder_configs: dict) -> int:
    """Pixel sizes must be multiples of this: the VAE's 8 times the latent pixels per token side."""
    return VAE_SCALE * token_patch(folder_configs.get("arch", "sd3"), folder_configs["transformer"])


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift, linear in the image token count (diffusers' SD3 / Flux pipelines'
    `calculate_shift`: mu = base_shift at base_seq_len tokens, max_shift at max_seq_len)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_path(scheduler_config: dict, image_seq_len: int, arch: str = "sd3") -> FlowPath:
    """The path the model was trained on, from its FlowMatchEulerDiscreteScheduler config: the fixed `shift`
    (SD3 3.0), or with use_dynamic_shifting (SD3.5-class, FLUX.1) the exponential shift by mu at this many image
    tokens."""
    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting"):
        # The pipelines' defaults for absent keys (max_shift: SD3 1.16, Flux 1.15).
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", DEFAULT_MAX_SHIFT[arch]))
        return FlowPath.flux(mu)
    return FlowPath.shifted(float(cfg.get("shift", 1.0)))


def image_seq_len(resolution: int, patch_size: int) -> int:
    """Image tokens of a square resolution: (latent side / patch)^2, as the SD3 and Flux pipelines count them."""
    side = resolution // VAE_SCALE // patch_size
    return side * side


def load_pipeline(folder: str, arch: str, variant=None):
    """StableDiffusion3Pipeline / FluxPipeline (float32, CPU); components that model_index.json leaves empty (no T5,
    no image encoder) are passed as None, which the pipeline accepts (from_pretrained otherwise asks for them)."""
    import diffusers
    cls = getattr(diffusers, PIPELINE_CLASS[arch])
    index = _read_json(Path(folder) / "model_index.json")
    absent = {n: None for n in OPTIONAL_COMPONENTS[arch] if not _present(index, n)}
    return cls.from_pretrained(str(folder), dtype=torch.float32, variant=variant, **absent)


def arch_of(pipe) -> str:
    return "flux" if type(pipe).__name__ == PIPELINE_CLASS["flux"] else "sd3"


def denoiser_of(pipe):
    return pipe.transformer


def text_encoders_of(pipe) -> list:
    return [m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None))
            if m is not None]


def check_components(pipe) -> None:
    """Shapes the pipeline does not check by itself: 16-channel latents for the transformer, and a pooled width
    that matches the two CLIP projections (a swapped --vae_path or text encoder shows here, not as a shape error
    deep in a forward pass)."""
    if arch_of(pipe) == "flux":
        return _check_flux_components(pipe)
    transformer, vae = pipe.transformer, pipe.vae
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents but the transformer takes "
                         f"{transformer.config.in_channels}: use the model's own VAE (SD3: 16 channels)")
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    if pooled != transformer.config.pooled_projection_dim:
        raise ValueError(f"the text encoders pool {pooled} features but the transformer takes "
                         f"{transformer.config.pooled_projection_dim}: they come from different models")


def _check_flux_components(pipe) -> None:
    """Flux: 2x2 packed 16-channel latents (in_channels 64), the CLIP pooled width and the T5 width."""
    transformer, vae = pipe.transformer, pipe.vae
    packed = vae.config.latent_channels * FLUX_PACK * FLUX_PACK
    if packed != transformer.config.in_channels:
        raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents ({packed} per packed 2x2 "
                         f"token) but the transformer takes {transformer.config.in_channels}: use the model's own "
                         f"VAE (FLUX.1: 16 channels)")
    pooled = pipe.text_encoder.config.hidden_size
    if pooled != transformer.config.pooled_projection_dim:
        raise ValueError(f"the CLIP text encoder pools {pooled} features but the transformer takes "
                         f"{transformer.config.pooled_projection_dim}: they come from different models")
    width = pipe.text_encoder_2.config.d_model
    if width != transformer.config.joint_attention_dim:
        raise ValueError(f"the T5 text encoder gives {width} features but the transformer takes "
                         f"{transformer.config.joint_attention_dim}: they come from different models")
    if not transformer.config.guidance_embeds:
        raise ValueError("the Flux transformer has no guidance embedding (guidance_embeds false); this trainer "
                         "distils FLUX.1-dev-class guidance-distilled models")


def lora_target_names(transformer) -> list:
    """The exact module names the LoRA trains: every Linear of the transformer that tcd.lora_targets names (the one
    definition the ComfyUI node uses too). Exact names, so PEFT cannot match anything else by suffix."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and is_flow_lora_target(n)]
    if not names:
        raise ValueError("no LoRA target (tcd.lora_targets.is_flow_lora_target) among the transformer's Linear "
                         "layers; is this an SD3 / Flux transformer?")
    return names


def make_objective(args, folder_configs: dict, resolution: int, make):
    """`make(args, path, prediction_type, guidance)` -> the CLI's objective, on this model's flow path (at this
    resolution's token count), with this model's kind of guidance (GUIDANCE)."""
    arch = folder_configs.get("arch", "sd3")
    tokens = image_seq_len(resolution, token_patch(arch, folder_configs["transformer"]))
    return make(args, flow_path(folder_configs["scheduler"], tokens, arch), PREDICTION_TYPE, GUIDANCE[arch])


def folder_configs_of(pipe) -> dict:
    """check_folder's configs from a loaded pipeline."""
    return {"arch": arch_of(pipe), "scheduler": dict(pipe.scheduler.config),
            "transformer": dict(pipe.transformer.config)}


def make_call(pipe):
    """The transformer's call convention for this pipeline."""
    if arch_of(pipe) == "flux":
        return FluxTransformerCall()
    return TransformerCall(pipe.scheduler.config.get("num_train_timesteps", 1000))


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


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FluxPipeline._pack_latents (token = one 2x2 patch, channel-major)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_latents (FluxPipeline._unpack_latents at latent size h x w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] rotary positions (0, row, column) of the packed tokens (FluxPipeline._prepare_latent_image_ids
    at h/2 x w/2)."""
    rows = torch.arange(h // 2).view(-1, 1).expand(h // 2, w // 2)
    cols = torch.arange(w // 2).view(1, -1).expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxTransformerCall:
    """model(x_sigma, sigma, cond, w) -> velocity [B, 16, H, W] of a FluxTransformer2DModel, as (args, kwargs) of its
    forward plus `finish` (unpacking its token output), so the same call serves the module, its DDP wrapper and
    torch.func.functional_call. x stays unpacked for the objective; the tokens exist only inside the call."""

    def __call__(self, x, sigma, cond, w=None):
        if w is None:
            raise ValueError("a guidance-distilled Flux transformer needs its guidance input w (embedded guidance)")
        h, wd = x.shape[-2:]
        embeds = cond["embeds"]
        return (), {"hidden_states": pack_latents(x),
                    # FluxPipeline passes timestep / 1000 with timesteps = sigma * 1000: the transformer takes sigma.
                    "timestep": sigma.to(x.dtype).expand(x.shape[0]),
                    # FluxPipeline: torch.full([1], guidance_scale, dtype=float32).expand(batch); here one w per row.
                    "guidance": w.float().to(x.device).expand(x.shape[0]),
                    "pooled_projections": cond["pooled"], "encoder_hidden_states": embeds,
                    "txt_ids": torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                    "img_ids": latent_image_ids(h, wd, x.device, x.dtype), "return_dict": False}

    @staticmethod
    def finish(out, x):
        return unpack_latents(out, *x.shape[-2:])


class FluxConditioner:
    """Captions -> (cond, None) through FluxPipeline.encode_prompt, the inference path: T5 hidden states
    (prompt_embeds) and the CLIP pooled output; no uncond (FLUX.1-dev is guided by its guidance input)."""

    def __init__(self, pipe, device, max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH):
        self.pipe, self.device, self.max_sequence_length = pipe, device, max_sequence_length

    @torch.no_grad()
    def __call__(self, captions, original_sizes=None, crop_top_lefts=None) -> tuple[dict, None]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}, None


def make_conditioner(pipe, device):
    return FluxConditioner(pipe, device) if arch_of(pipe) == "flux" else SD3Conditioner(pipe, device)


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
                 device, guidance: float | None = None):
    """One validation image (PIL) of the pipeline's transformer (with its LoRA) by TCD's strategic stochastic
    sampling, decoded as the SD3 / Flux pipelines decode: z / scaling_factor + shift. SD3: guidance 0 (the prompt
    alone); Flux: the guidance input `guidance`."""
    transformer, vae = pipe.transformer, pipe.vae
    configs = folder_configs_of(pipe)
    arch = configs["arch"]
    path = flow_path(configs["scheduler"], image_seq_len(resolution, token_patch(arch, configs["transformer"])),
                     arch)
    call = make_call(pipe)
    cond, _ = make_conditioner(pipe, device)([prompt])
    side = resolution // VAE_SCALE
    generator = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn((1, vae.config.latent_channels, side, side), generator=generator).to(device)
    extra = () if arch != "flux" else (torch.full((1,), float(guidance), dtype=torch.float32, device=device),)

    def denoised(x_t, sigma, **_):
        args, kwargs = call(x_t, sigma, cond, *extra)
        out = transformer(*args, **kwargs)[0]
        v = (call.finish(out, x_t) if hasattr(call, "finish") else out).float()
        return x_t - sigma.reshape(-1, 1, 1, 1) * v                 # x0 = x - sigma v

    latents = sample_tcd(denoised, x, validation_sigmas(path, steps, original_steps).to(device),
                         extra_args={"seed": int(seed)}, disable=True, gamma=gamma, schedule=FlowSchedule(),
                         final_step="x0")
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
