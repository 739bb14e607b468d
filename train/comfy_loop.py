"""TCD distillation of a LoRA inside ComfyUI, on the ModelPatcher a graph already loaded.

One model copy serves all three roles of the objective (tcd.losses):
* student  = base weights + LoRA (trainable), through ComfyUI's weight wrappers (comfy.weight_adapter LoRA adapters
  attached with ModelPatcher.add_weight_wrapper, as the core TrainLoraNode does);
* teacher  = the same weights with every LoRA wrapper bypassed (a switch the wrappers read);
* target   = the EMA of the LoRA (ema_decay > 0), or the online LoRA under no_grad (ema_decay = 0, as diffusers'
  LCM-LoRA scripts do).

The model is called through ComfyUI's own `BaseModel.apply_model`, so eps / v-prediction models, SDXL's extra
conditioning and the model's patches behave as in sampling. The loss sees x0 predictions (prediction_type
"sample") on the model's own path (tcd.paths):
* discrete VP models (SD1.x / SD2.x / SDXL): VPPath with abar_t = 1 / (1 + sigma_t^2) from the model's sigma table;
* flow models (SD3: ModelSamplingDiscreteFlow, Flux: ModelSamplingFlux; ComfyUI's CONST prediction): FlowPath with
  sigma(t) = percent_to_sigma(1 - t), the model's own shifted time; x = (1 - sigma) x0 + sigma eps is already
  ComfyUI's sampling space, so the model is called at sigma itself. A model that takes the guidance scale as an
  input (FLUX.1-dev) is distilled with embedded guidance: the drawn w is its `guidance` input for teacher, student
  and target alike, and there is no unconditional pass (docs/flow_distillation.md).

Prompts run under torch.inference_mode(); training leaves it explicitly and clones every input tensor. Progress goes
to ComfyUI's progress bar, whose hook also raises on Cancel; on Cancel or an error a resumable checkpoint of the
last completed step is written (LoRA, EMA, optimizer, step, RNG states, loss history), and resuming from it
replays exactly the draws an uninterrupted run makes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..tcd import backend
from ..tcd.lora_targets import is_flow_lora_target, is_lora_target
from ..tcd.paths import FlowPath, VPPath
from ..tcd.schedule import alphas_cumprod_from_sigmas, vp_to_ve_scale
from ..tcd.losses import OBJECTIVES, RECIPES, ema_update_
from ..tcd.losses import make_objective as tcd_make_objective
from .checkpoint import config_differences, load_state, save_state
from .dataset import TrainingData

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 1_000_003      # validation draws: a generator of their own, seeded from the run's seed
VALIDATION_MIN_SAMPLES = 8              # samples per validation draw (at least), in batches of the training size
GLOBAL_STREAM_OFFSET = 2_000_003        # torch's global CPU stream inside a run (forked: the server's is untouched)
SEED_SPACE = 2 ** 64                    # torch.Generator.manual_seed takes seeds in [0, 2^64)
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STUDENT, TARGET, TEACHER = "student", "target", "teacher"
EMBEDDED_GUIDANCE_USUAL_MAX = 10.0     # above this, an embedded-guidance w_max is most likely a CFG-style setting
# Settings a resumed run may change without changing the numbers it computes.
RESUME_MAY_CHANGE = ("steps", "save_every", "validation_every", "validation_draws", "gradient_checkpointing",
                     "save_dtype")


@dataclass
class DistillConfig:
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    rank: int = 64
    alpha: float = 64.0
    w_min: float = 3.0
    w_max: float = 15.0
    original_steps: int = 50
    tcf_order: int = RECIPES["recommended"]["tcf_order"]
    ema_decay: float = 0.95
    loss: str = RECIPES["recommended"]["loss"]
    rho: float = RECIPES["recommended"]["rho"]
    huber_c: float = 0.001
    objective: str = "tcd"
    seed: int = 0
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    save_every: int = 0
    validation_every: int = 0
    validation_draws: int = 4
    save_dtype: str = "fp16"

    def check(self) -> None:
        def need(ok, text):
            if not ok:
                raise ValueError(text)
        need(isinstance(self.steps, int) and self.steps >= 1,
             f"steps={self.steps!r}: the number of training steps must be an integer >= 1")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate={self.learning_rate} must be > 0 (1e-4 is the LCM-LoRA recipe's)")
        need(self.rank >= 1, f"rank={self.rank} must be >= 1")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha={self.alpha} must be > 0 (alpha = rank: scale 1)")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay} must be in [0, 1): 0 = the online LoRA is "
                                          f"the target, 0.95 = the LCM/TCD full-model scripts' EMA")
        need(self.objective in OBJECTIVES, f"objective={self.objective!r} is not one of {OBJECTIVES}")
        need(self.save_dtype in SAVE_DTYPES, f"save_dtype={self.save_dtype!r} is not one of {tuple(SAVE_DTYPES)}")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)")
        need(self.save_every >= 0 and self.validation_every >= 0, "save_every / validation_every must be >= 0")


@dataclass
class Validation:
    """Validation images every cfg.validation_every steps: a ComfyUI SAMPLER (the pack's TCD sampler), a SIGMAS
    builder (model_sampling -> sigmas), the VAE to decode, the prompt's CONDITIONING and a fixed seed."""
    sampler: object
    sigmas_fn: Callable
    vae: object
    positive: list
    seed: int = 0


@dataclass
class TrainResult:
    native_lora: dict                      # diffusion_model.<ldm module>.lora_up.weight / lora_down.weight / alpha
    losses: list                           # one per step, from step 1 (the full history on resume)
    steps_done: int
    resumed_from: int
    checkpoint: Path
    validation_images: list = field(default_factory=list)   # IMAGE tensors [1, H, W, 3]
    validation_steps: list = field(default_factory=list)     # steps of the images
    validation_losses: list = field(default_factory=list)    # [step, loss on the fixed validation draws]
    seconds: float = 0.0
    layers: int = 0


class NonFiniteLoss(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- LoRA wrappers
class LoRASwitch:
    """Which weights the wrapped layers compute: student (LoRA), target (EMA LoRA) or teacher (base)."""

    def __init__(self):
        self.mode = STUDENT


class SwitchableLoRA(torch.nn.Module):
    """A comfy.weight_adapter LoRA on one weight (created with `rank` and `alpha`), with a teacher bypass and an
    EMA copy read in target mode."""

    def __init__(self, adapter: torch.nn.Module, switch: LoRASwitch, keep_ema: bool, rank: int, alpha: float):
        super().__init__()
        self.adapter = adapter
        self.switch = switch
        self.up, self.down = backend.lora_adapter_weights(adapter)
        self.alpha, self.scale = float(alpha), float(alpha) / rank
        if keep_ema:
            self.register_buffer("ema_up", self.up.detach().clone())
            self.register_buffer("ema_down", self.down.detach().clone())
        else:
            self.ema_up = self.ema_down = None

    def trainable(self) -> list[torch.nn.Parameter]:
        return [self.up, self.down]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        mode = self.switch.mode
        if mode == TEACHER:
            return w
        if mode == TARGET and self.ema_up is not None:
            diff = (self.ema_up @ self.ema_down).reshape(w.shape)
            return (w + self.scale * diff).to(w.dtype)
        return self.adapter(w)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.ema_up is not None:
            ema_update_(self.ema_up, self.up, decay)
            ema_update_(self.ema_down, self.down, decay)

    def passive_memory_usage(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))

    def move_to(self, device) -> int:
        self.to(device)
        return self.passive_memory_usage()


class PassThrough(torch.nn.Module):
    """Identity weight wrapper. A wrapped weight is copied by ComfyUI's cast before use, which turns a weight
    created under inference_mode (every checkpoint loaded in a prompt) into an ordinary tensor that autograd may
    save for the backward pass."""

    def __call__(self, w):
        return w

    def passive_memory_usage(self) -> int:
        return 0

    def move_to(self, device) -> int:
        return 0


def lora_target_names(patcher) -> set[str]:
    """ldm module names of the layers the LoRA trains: those whose diffusers name (ComfyUI's own table) is a target
    of tcd.lora_targets, the definition the accelerate CLI uses too. UNets: is_lora_target. SD3 / Flux: a layer is
    trained when every diffusers module it holds is_flow_lora_target (a fused qkv holds to_q, to_k and to_v; a Flux
    single block's linear1 holds those and proj_mlp)."""
    flow = backend.flow_ldm_to_diffusers(patcher)
    if flow:
        return {ldm for ldm, parts in flow.items() if all(is_flow_lora_target(p) for p in parts)}
    return {ldm for ldm, diffusers in backend.unet_ldm_to_diffusers(patcher).items() if is_lora_target(diffusers)}


def attach_lora(patcher, rank: int, alpha: float, seed: int, keep_ema: bool, switch: LoRASwitch) -> dict:
    """Add a SwitchableLoRA to every target weight of the UNet (and identity wrappers to the other inference-mode
    weights). LoRA initialisation is seeded and drawn on the CPU, so it is the same on every device."""
    diffusion_model = backend.diffusion_model_of(patcher)
    targets = lora_target_names(patcher)
    loras, passthrough = {}, PassThrough()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % SEED_SPACE)
        for name, module in diffusion_model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            weight = getattr(module, "weight", None)
            key = f"diffusion_model.{name}"
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and name in targets:
                shape_only = torch.empty((), dtype=torch.float32).expand(weight.shape)
                wrapper = SwitchableLoRA(backend.create_lora_adapter(shape_only, rank, float(alpha)), switch,
                                         keep_ema, rank, alpha)
                backend.add_weight_wrapper(patcher, f"{key}.weight", wrapper)
                loras[name] = wrapper
            elif isinstance(weight, torch.Tensor) and weight.is_inference():
                backend.add_weight_wrapper(patcher, f"{key}.weight", passthrough)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.is_inference():
                backend.add_weight_wrapper(patcher, f"{key}.bias", passthrough)
    if not loras:
        raise ValueError(f"this model ({backend.model_architecture(patcher)}) has no layers the LoRA can train (no "
                         f"ComfyUI name table maps its weights to diffusers' target layers); the trainer supports "
                         f"UNet models (SD1.x / SD2.x / SDXL) and the flow transformers SD3 / SD3.5 and FLUX.1")
    return loras


def native_lora_dict(loras: dict, dtype: torch.dtype) -> dict:
    """ComfyUI-native LoRA keys (TrainLoraNode's): diffusion_model.<module>.lora_up.weight / lora_down.weight /
    alpha; conv down weights stay flattened [rank, in*k*k] (tcd.lora.comfy_native_to_canonical reshapes them)."""
    out = {}
    for name, w in loras.items():
        out[f"diffusion_model.{name}.lora_up.weight"] = w.up.detach().to("cpu", dtype).clone()
        out[f"diffusion_model.{name}.lora_down.weight"] = w.down.detach().to("cpu", dtype).clone()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------- model calls
class ComfyModelFn:
    """model(x_t, t, cond[, w]) -> x0 through BaseModel.apply_model, for latents x_t on the model's path.

    VP (flow=False): integer timesteps t. ComfyUI models live in sigma (VE) space: x_VE = x_VP * sqrt(1 + sigma^2)
    and apply_model divides it back (calculate_input), finds the integer timestep of sigma in the same table
    (timestep(sigma)) and returns the denoised x0 for eps, v and x0 models alike (calculate_denoised).
    Flow (flow=True): t is sigma itself (float [B]); x = (1 - sigma) x0 + sigma eps is ComfyUI's CONST sampling
    space (calculate_input is the identity), and apply_model returns x0 = x - sigma v.
    w: the guidance scales [B] of a model that takes guidance as an input (embedded guidance), passed as its
    guidance for every sample."""

    def __init__(self, patcher, switch: LoRASwitch, mode: str, dtype: torch.dtype, device: torch.device,
                 flow: bool = False):
        self.patcher = patcher
        self.switch, self.mode = switch, mode
        self.flow = flow
        self.sigmas = None if flow else backend.sigma_table(backend.model_sampling_object(patcher)).to(device)
        self.transformer_options = backend.transformer_options_of(patcher)
        self.autocast = dtype != torch.float32
        self.dtype, self.device = dtype, device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict, w: Optional[torch.Tensor] = None):
        self.switch.mode = self.mode
        if self.flow:
            sigma, x_ve = t.float(), x
        else:
            sigma = self.sigmas[t.long()]
            x_ve = x * vp_to_ve_scale(sigma).reshape(-1, *([1] * (x.ndim - 1)))
        if w is not None:
            cond = backend.with_guidance(cond, w.float())
        options = dict(self.transformer_options, sigmas=sigma, cond_or_uncond=[0])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = backend.apply_model(self.patcher, x_ve, sigma, options, cond)
        return out.float()


@dataclass
class ModelPath:
    """What the objective needs to know of a model: its path (VP: VPPath of the model's abar table; flow: a FlowPath
    on the model's own shifted time), its guidance mode and the settings that name the path."""
    path: object
    flow: bool
    guidance: str = "cfg"
    settings: dict = field(default_factory=dict)


def model_path_of(patcher) -> ModelPath:
    """The model's path (VP models exactly as before: alphas_cumprod_of) and guidance mode: "embedded" for a model
    with a guidance input (FLUX.1-dev), else "cfg". Refuses flow models other than SD3 / Flux, and samplings that
    are neither (LCM-patched, continuous EDM, ...) with the reason."""
    ms = backend.model_sampling_object(patcher)
    if not backend.is_flow_sampling(ms):
        return ModelPath(VPPath(alphas_cumprod_of(patcher)), flow=False)
    arch = backend.model_architecture(patcher)
    if arch not in backend.FLOW_MODEL_CLASSES.values():
        raise ValueError(f"this flow model is {arch}; the TCD trainer distils the flow transformers SD3 / SD3.5 and "
                         f"FLUX.1 (their LoRA layers are named through ComfyUI's own tables), and discrete "
                         f"SD1.x / SD2.x / SDXL models")
    # The patcher's model_sampling (a ModelSamplingSD3 / ModelSamplingFlux node's shift included): the schedule the
    # model is sampled with, so the skipping grid is the one the distilled sampler walks.
    sigma_of_time, name = backend.flow_sigma_of_time(backend.model_sampling_of(patcher))
    guidance = guidance_mode(patcher)
    return ModelPath(FlowPath(sigma_of_time, name), flow=True, guidance=guidance,
                     settings={"path": name, "guidance": guidance})


def alphas_cumprod_of(patcher) -> torch.Tensor:
    """abar_t = 1 / (1 + sigma_t^2) from the model's own sigma table (float64 in ComfyUI, as its sampling), for a
    model that is not a flow model (model_path_of sends those to FlowPath). schedule_for refuses the samplings that
    have no discrete table (LCM-patched, continuous EDM) with the reason."""
    ms = backend.model_sampling_object(patcher)
    backend.schedule_for(ms)
    return alphas_cumprod_from_sigmas(backend.sigma_table(ms).double()).float()


def model_fingerprint(patcher) -> str:
    """Identity of the teacher: the model class, weight names/shapes and a sample of values of some tensors."""
    h = hashlib.sha256(backend.model_class_name(patcher).encode())
    sd = backend.unet_state_dict(patcher)
    keys = list(sd)
    for k in keys[:2] + keys[len(keys) // 2:len(keys) // 2 + 1] + keys[-2:]:
        h.update(k.encode())
        h.update(str(tuple(sd[k].shape)).encode())
        h.update(sd[k].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    h.update(str(len(keys)).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- batches
class Batches:
    """Random batches drawn from the training generator: a first sample uniformly, the rest uniformly among the
    samples with the same latent size (a batch must be one tensor).

    The whole dataset stays in system memory; only the drawn batch is moved to the compute device, so the
    dataset's size does not count against VRAM."""

    def __init__(self, data: TrainingData, patcher, device: torch.device):
        self.device = device
        cpu = torch.device("cpu")
        self.x0 = [backend.process_latent_in(patcher, x[None].to(cpu)).float()[0].clone() for x in data.latents]
        self.buckets: dict[tuple, list[int]] = {}
        for i, x in enumerate(self.x0):
            self.buckets.setdefault(tuple(x.shape), []).append(i)
        self.conds = [backend.model_cond_item(patcher, c, (1, *data.latents[i].shape), cpu)
                      for i, c in enumerate(data.conditionings)]
        self.uncond_items = {}
        patch = backend.latent_patch_size(patcher)
        odd = [(i, tuple(x.shape[-2:])) for i, x in enumerate(self.x0) if x.shape[-1] % patch or x.shape[-2] % patch]
        if odd:
            i, hw = odd[0]
            raise ValueError(f"latent sample #{i + 1} is {hw[0]}x{hw[1]} ({len(odd)} of {len(self.x0)} samples have "
                             f"such sizes); this model ({backend.model_architecture(patcher)}) cuts latents into "
                             f"{patch}x{patch} patches, so latent height and width must be multiples of {patch}. "
                             f"Use image sizes that are multiples of {8 * patch} (resolution, or crop the images)")
        if data.uncond is not None:
            for shape in self.buckets:
                idx = self.buckets[shape][0]
                self.uncond_items[shape] = backend.model_cond_item(patcher, data.uncond,
                                                                   (1, *data.latents[idx].shape), cpu)

    def draw(self, batch_size: int, generator: torch.Generator):
        first = int(torch.randint(0, len(self.x0), (1,), generator=generator))
        shape = tuple(self.x0[first].shape)
        pool = self.buckets[shape]
        rest = torch.randint(0, len(pool), (batch_size - 1,), generator=generator).tolist()   # CPU: no sync
        idx = [first] + [pool[j] for j in rest]
        x0 = torch.stack([self.x0[i] for i in idx]).to(self.device, non_blocking=True)
        cond = backend.move_model_conds(backend.batch_model_conds([self.conds[i] for i in idx]), self.device)
        uncond = None
        if shape in self.uncond_items:
            uncond = backend.move_model_conds(backend.batch_model_conds([self.uncond_items[shape]] * batch_size),
                                              self.device)
        return idx, x0, cond, uncond


# ----------------------------------------------------------------------------------------------- the loop
def make_objective(cfg: DistillConfig, path, guidance: str = "cfg"):
    """tcd.losses.make_objective on x0 predictions (ComfyModelFn returns the denoised x0) on `path` (tcd.paths:
    VPPath or an abar table for VP models, FlowPath for flow models)."""
    return tcd_make_objective(cfg.objective, path, original_steps=cfg.original_steps, w_min=cfg.w_min,
                              w_max=cfg.w_max, loss=cfg.loss, huber_c=cfg.huber_c, prediction_type="sample",
                              tcf_order=cfg.tcf_order, rho=cfg.rho, guidance=guidance)


def numeric_config(cfg: DistillConfig, data_fp: str, model_fp: str, path_settings: Optional[dict] = None) -> dict:
    """The settings a resumed run must share with its checkpoint. Flow models add their path (sampling and shift)
    and guidance mode; VP runs keep the keys they always had, so their checkpoints resume as before."""
    d = dataclasses.asdict(cfg)
    d.update(data=data_fp, model=model_fp, **(path_settings or {}))
    return d


def guidance_mode(model_patcher) -> str:
    """"embedded" for a model that takes the guidance scale as an input (FLUX.1-dev), else "cfg"."""
    return "embedded" if backend.takes_guidance_input(model_patcher) else "cfg"


def check_guidance_inputs(guidance: str, uncond) -> None:
    """A guidance-distilled teacher (embedded guidance) has no unconditional pass: a negative is an error."""
    if guidance == "embedded" and uncond is not None:
        raise ValueError("a negative / unconditional conditioning was given, but this model takes the guidance scale "
                         "as an input (FLUX.1-dev: guidance-distilled, no classifier-free guidance pass): the teacher "
                         "is called once with the drawn guidance w in [w_min, w_max] and a negative has no meaning. "
                         "Disconnect the negative; set w_min / w_max to the guidance values to distil (e.g. 2-5)")


def train_lora(model_patcher, data: TrainingData, cfg: DistillConfig, checkpoint_path: Path, resume: bool = True,
               validation: Optional[Validation] = None, on_save: Optional[Callable] = None,
               progress_factory: Callable[[int], object] = backend.Progress) -> TrainResult:
    """Distil a TCD (or LCM) LoRA from `model_patcher` on `data`; see the module docstring.

    on_save(native_lora, step, losses, validation_losses) is called every cfg.save_every steps and at the end (the
    caller writes the LoRA file). Every cfg.validation_every steps (and at 0 and the end) the objective is measured
    on fixed draws (result.validation_losses) and, with `validation`, an image is sampled. The resumable state goes
    to checkpoint_path with every save, and on Cancel / error.
    """
    cfg.check()
    if len(data) == 0:
        raise ValueError("the training data is empty")
    t_start = time.perf_counter()
    device = backend.torch_device()
    # fork_rng: the server's global RNG is the same after training as before (the run's own stream, restored on
    # resume, lives inside); training_mode: the host's in-training flag where it has one.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=rng_devices), \
            backend.training_mode():
        # Anything in training that draws from torch's global CPU stream draws the run's own, seeded stream.
        torch.random.default_generator.manual_seed((int(cfg.seed) + GLOBAL_STREAM_OFFSET) % SEED_SPACE)
        run = DistillRun(model_patcher, data, cfg, checkpoint_path, device, validation, on_save)
        try:
            run.start(resume)
            run.train(progress_factory(cfg.steps))
        finally:
            run.close()
        result = run.result
        result.native_lora = native_lora_dict(run.loras, SAVE_DTYPES[cfg.save_dtype])
        result.steps_done = run.done
        result.seconds = time.perf_counter() - t_start
        return result


# Where a run is inside a step, which decides what a Cancel or an error keeps (DistillRun.keep_state).
BETWEEN_STEPS, COMPUTING, APPLYING = "between steps", "computing", "applying"


class DistillRun:
    """One distillation run on a clone of the graph's model: set up, start (fresh or resumed), step, save,
    validate, keep a resumable state on failure, close (give the shared model back as it was)."""

    def __init__(self, model_patcher, data: TrainingData, cfg: DistillConfig, checkpoint_path: Path,
                 device: torch.device, validation: Optional[Validation], on_save: Optional[Callable]):
        self.cfg, self.data, self.checkpoint_path = cfg, data, checkpoint_path
        self.device, self.validation, self.on_save = device, validation, on_save
        self.dtype = backend.training_dtype(cfg.dtype, device)
        self.loras, self.params, self.checkpointed, self.frozen, self.copied, self.hooks = {}, [], [], {}, [], []
        self.patcher = backend.training_clone(model_patcher)
        if self.dtype != torch.float32:
            backend.set_compute_dtype(self.patcher, self.dtype)
        self.model_path = model_path_of(self.patcher)         # also refuses LCM / continuous / unknown samplings
        check_guidance_inputs(self.model_path.guidance, data.uncond)
        if self.model_path.guidance == "embedded" and cfg.w_max > EMBEDDED_GUIDANCE_USUAL_MAX:
            log.warning("TCD trainer: w_max=%g is fed to this guidance-distilled model as its guidance value; "
                        "FLUX.1-dev is used at 2-5 (the node's defaults 3-15 are CFG scales for UNets)", cfg.w_max)
        self.objective = make_objective(cfg, self.model_path.path, self.model_path.guidance)
        self.config = numeric_config(cfg, data.fingerprint(), model_fingerprint(self.patcher),
                                     self.model_path.settings)
        self.switch = LoRASwitch()
        self.loras = attach_lora(self.patcher, cfg.rank, cfg.alpha, cfg.seed, cfg.ema_decay > 0, self.switch)
        self.params = [p for w in self.loras.values() for p in w.trainable()]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=cfg.weight_decay)
        self.generator = torch.Generator("cpu").manual_seed(int(cfg.seed) % SEED_SPACE)
        self.losses: list[float] = []
        self.done, self.phase, self.snapshot = 0, BETWEEN_STEPS, None
        self.result = TrainResult({}, self.losses, 0, 0, checkpoint_path, layers=len(self.loras))

    # ------------------------------------------------------------------------------------------- set up
    def start(self, resume: bool) -> None:
        """Restore a checkpoint when asked and present, then put the model on the device for training."""
        cfg, path = self.cfg, self.checkpoint_path
        if resume and path.is_file():
            self.done, losses, validation_losses = _restore(load_state(path), self.config, self.loras,
                                                            self.optimizer, self.generator, path)
            self.losses[:] = losses
            self.result.validation_losses = validation_losses
            self.result.resumed_from = self.result.steps_done = self.done
            log.info("TCD trainer: resuming %s at step %d of %d", path.name, self.done, cfg.steps)
        if self.done > cfg.steps:
            raise ValueError(f"the checkpoint {path.name!r} is at step {self.done}, beyond steps={cfg.steps}; "
                             f"raise steps, or turn resume off to start over")
        self.frozen = backend.freeze_model(self.patcher)      # given back in close(): the model is shared
        backend.load_for_training(self.patcher)
        self.copied = backend.copy_inference_parameters(self.patcher)      # none in SD1.x / SDXL UNets
        flow = self.model_path.flow
        if flow:       # DiT blocks that add to their residual stream in place (Flux on ComfyUI 0.3.x)
            self.hooks = backend.copy_norm_inputs(self.patcher)
        if cfg.gradient_checkpointing:
            self.checkpointed = backend.enable_gradient_checkpointing(self.patcher, copy_inputs=flow)
        self.student, self.target, self.teacher = (ComfyModelFn(self.patcher, self.switch, mode, self.dtype,
                                                                self.device, self.model_path.flow)
                                                   for mode in (STUDENT, TARGET, TEACHER))
        self.scaler = torch.amp.GradScaler(self.device.type) \
            if self.dtype == torch.float16 and self.device.type == "cuda" else None
        self.batches = Batches(self.data, self.patcher, self.device)

    # ------------------------------------------------------------------------------------------- the loop
    def train(self, progress) -> None:
        cfg = self.cfg
        if self.done:
            progress.update(self.done)
        try:
            # Validation of the starting point (step 0, or a resumed step on the validation grid whose validation
            # a Cancel cut short), so a resumed run reports the same points as an uninterrupted one.
            if cfg.validation_every and self.done % cfg.validation_every == 0 and \
                    all(step != self.done for step, _ in self.result.validation_losses):
                self.validate(self.done)
            while self.done < cfg.steps:
                self.step()
                if cfg.save_every and self.done % cfg.save_every == 0 and self.done < cfg.steps:
                    self.save(self.done)
                if cfg.validation_every and (self.done % cfg.validation_every == 0 or self.done == cfg.steps):
                    self.validate(self.done)
                progress.update(1)
            self.save(self.done)
        except BaseException as exc:
            self.keep_state()
            if isinstance(exc, NonFiniteLoss):
                raise NonFiniteLoss(
                    f"{exc}; training stopped. The last good state (step {self.done}) is kept in "
                    f"{str(self.checkpoint_path)!r}. Lower the learning rate (now {cfg.learning_rate}), raise "
                    f"warmup_steps or use loss 'huber'; resuming with the same settings would repeat this") from None
            if backend.is_interrupt(exc):
                log.info("TCD trainer: cancelled after step %d; state kept in %s (turn resume on to continue)",
                         self.done, self.checkpoint_path)
            raise

    def learning_rate(self, step: int) -> float:
        """Constant learning rate after a linear warmup (diffusers' constant_with_warmup)."""
        cfg = self.cfg
        return cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.learning_rate

    def step(self) -> None:
        """One optimizer step. Until the optimizer applies it (phase COMPUTING) a failure undoes its draws; while it
        is applied (APPLYING) the state is half-updated and only the last save is valid."""
        cfg, step = self.cfg, self.done
        self.snapshot, self.phase = self.generator.get_state(), COMPUTING
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        _, x0, cond, uncond = self.batches.draw(cfg.batch_size, self.generator)
        loss = self.objective(self.student, self.target, self.teacher, x0, cond, uncond, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.switch.mode = STUDENT                     # recomputed (checkpointed) blocks must see the student
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                              else float("inf"))
        # One device sync per step, for the loss curve and to refuse a non-finite step before the optimizer
        # applies it (with fp16's GradScaler an inf gradient is the scaler's to skip).
        value, norm_value = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the loss became {value} at step {step + 1}")
        if self.scaler is None and not math.isfinite(norm_value):
            raise NonFiniteLoss(f"the gradient became {norm_value} at step {step + 1}")
        self.phase = APPLYING
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for w in self.loras.values():
            w.update_ema(cfg.ema_decay)
        self.losses.append(value)
        self.done, self.phase = step + 1, BETWEEN_STEPS

    # ------------------------------------------------------------------------------------------- state
    def state(self, step: int) -> dict:
        loras = self.loras
        return {"config": self.config, "step": step, "losses": list(self.losses[:step]),
                "validation_losses": [v for v in self.result.validation_losses if v[0] <= step],
                "lora": {n: {"up": w.up.detach().cpu().clone(), "down": w.down.detach().cpu().clone()}
                         for n, w in loras.items()},
                "ema": {n: {"up": w.ema_up.detach().cpu().clone(), "down": w.ema_down.detach().cpu().clone()}
                        for n, w in loras.items() if w.ema_up is not None},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state()}

    def save(self, step: int) -> None:
        self.switch.mode = STUDENT
        save_state(self.state(step), self.checkpoint_path)
        if self.on_save is not None:
            self.on_save(native_lora_dict(self.loras, SAVE_DTYPES[self.cfg.save_dtype]), step,
                         list(self.losses[:step]), [v for v in self.result.validation_losses if v[0] <= step])

    def keep_state(self) -> None:
        """After a Cancel or an error: the state of the last completed step, for an exact resume."""
        if self.phase == APPLYING:
            return                                     # half-updated: the last regular save stays the valid one
        if self.phase == COMPUTING:
            self.generator.set_state(self.snapshot)    # undo this step's draws: resume replays them
        try:
            save_state(self.state(self.done), self.checkpoint_path)
        except Exception as save_exc:                  # never hide the original error behind a save error
            log.error("TCD trainer: could not write the checkpoint: %s", save_exc)

    # ------------------------------------------------------------------------------------------- validation
    def validate(self, step: int) -> None:
        """The objective on fixed draws (its own generator, so the training stream is untouched), with the online
        LoRA as student and target: comparable from step to step, unlike the per-step loss whose scale swings with
        the drawn t, s and w. Batches of the training size (no memory beyond training's), enough of them for
        VALIDATION_MIN_SAMPLES samples per draw."""
        cfg = self.cfg
        val_gen = torch.Generator("cpu").manual_seed((int(cfg.seed) + VALIDATION_SEED_OFFSET) % SEED_SPACE)
        per_draw = -(-VALIDATION_MIN_SAMPLES // cfg.batch_size)
        with torch.no_grad():
            values = []
            for _ in range(cfg.validation_draws):
                parts = [self.objective(self.student, self.student, self.teacher,
                                        *self.batches.draw(cfg.batch_size, val_gen)[1:], val_gen)
                         for _ in range(per_draw)]
                values.append(float(torch.stack(parts).mean()))
            self.result.validation_losses.append([step, sum(values) / len(values)])
            if self.validation is not None:
                self.switch.mode = STUDENT
                self.result.validation_images.append(_validation_image(self.patcher, self.validation, self.data))
                self.result.validation_steps.append(step)

    # ------------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Give the shared model back as it was: no wrappers, no checkpointing, the same requires_grad flags."""
        self.switch.mode = STUDENT
        backend.restore_inference_parameters(self.copied)
        backend.remove_hooks(self.hooks)
        backend.disable_gradient_checkpointing(self.checkpointed)
        for p in self.params:
            p.requires_grad_(False)
        backend.thaw_model(self.frozen)
        backend.detach_weight_wrappers(self.patcher, list(self.loras.values()) + [
            f for f in backend.weight_wrappers(self.patcher) if isinstance(f, PassThrough)])


def _restore(saved: dict, config: dict, loras: dict, optimizer, generator, path: Path):
    diffs = config_differences(saved.get("config", {}), config, ignore=RESUME_MAY_CHANGE)
    if diffs:
        raise ValueError(f"the checkpoint {path.name!r} was made with other settings or data: {'; '.join(diffs)}. "
                         f"Use the same settings to resume, another LoRA name for a new run, or turn resume off "
                         f"to start over")
    if set(saved["lora"]) != set(loras):
        raise ValueError(f"the checkpoint {path.name!r} holds LoRA layers that do not match this model; turn "
                         f"resume off to start over")
    with torch.no_grad():
        for name, w in loras.items():
            w.up.copy_(saved["lora"][name]["up"])
            w.down.copy_(saved["lora"][name]["down"])
            if w.ema_up is not None:
                w.ema_up.copy_(saved["ema"][name]["up"])
                w.ema_down.copy_(saved["ema"][name]["down"])
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return (int(saved["step"]), [float(v) for v in saved["losses"]],
            [[int(a), float(b)] for a, b in saved.get("validation_losses", [])])


def _validation_image(patcher, validation: Validation, data: TrainingData) -> torch.Tensor:
    shape = (1, *data.latents[0].shape)
    latent = torch.zeros(shape, dtype=torch.float32)
    ms = backend.model_sampling_object(patcher)
    # flow models: the patcher's sampling (a shift node included), the schedule training used
    sigmas = validation.sigmas_fn(backend.model_sampling_of(patcher) if backend.is_flow_sampling(ms) else ms)
    samples = backend.sample_latent(patcher, validation.sampler, sigmas, validation.positive, None, 1.0, latent,
                                    validation.seed)
    return _decode(validation.vae, samples)


def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    images = vae.decode(samples).float().cpu()
    if images.ndim == 5:                                  # video VAEs: [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images[..., :3]


def metadata_for(cfg: DistillConfig, result_losses: list, steps: int, data: TrainingData, layers: int,
                 validation_losses: list = ()) -> dict:
    """safetensors metadata of a saved LoRA: the family key the pack's loader reads, the settings and the loss
    curve (JSON strings; safetensors metadata values must be strings)."""
    from ..tcd.lora import METADATA_FAMILY_KEY, TCD_FAMILY
    return {
        METADATA_FAMILY_KEY: TCD_FAMILY if cfg.objective == "tcd" else "LCM LoRA",
        "tcd.trainer": "TCD Distill LoRA",
        "tcd.steps": str(steps),
        "tcd.layers": str(layers),
        "tcd.config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "tcd.data": data.source,
        "tcd.losses": json.dumps([float(v) for v in result_losses]),
        "tcd.validation_losses": json.dumps([[int(a), float(b)] for a, b in validation_losses]),
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
    }


# ----------------------------------------------------------------------------------------------- LoRA files
def lora_file_for(name: str) -> tuple[Path, str]:
    """(full path, name as the loaders list it) for a LoRA name typed by the user, inside the first loras folder.
    '.safetensors' is added when missing; names that leave the folder are refused."""
    from ..tcd.files import resolve_inside
    text = (name or "").strip().replace("\\", "/")
    if not text:
        raise ValueError("lora_name is empty: give a file name for the trained LoRA, e.g. 'my_tcd_lora'")
    if not text.lower().endswith(".safetensors"):
        text += ".safetensors"
    import os
    folder = os.path.normpath(os.path.abspath(backend.lora_folders()[0]))
    full = resolve_inside([folder], text, kind="LoRA", folder_label="loras")
    return Path(full), os.path.relpath(full, folder).replace(os.sep, "/")


def checkpoint_file_for(listed_name: str) -> Path:
    """Where the resumable training state of a LoRA lives: <output>/tcd_train/<lora name>.state.pt (outside the
    loras folder, so loaders never list it)."""
    stem = listed_name[:-len(".safetensors")] if listed_name.endswith(".safetensors") else listed_name
    return Path(backend.output_directory()) / "tcd_train" / f"{stem}.state.pt"


def prepare_output_paths(lora_name: str) -> tuple[Path, str, Path]:
    """(LoRA path, listed name, checkpoint path), with both destination folders created and probed for writing
    before any training starts, so a blocked destination is a clear error now instead of an OSError at the end."""
    import tempfile
    path, listed = lora_file_for(lora_name)
    state = checkpoint_file_for(listed)
    for folder, what, fix in (
            (path.parent, f"the LoRA {listed!r} (lora_name) in the loras folder",
             "choose another lora_name, or remove the file that is in the way"),
            (state.parent, "the training checkpoints and dataset cache (ComfyUI's output folder / tcd_train)",
             "remove the file that is in the way, or make the output folder writable")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".tcd_write_probe_"):
                pass
        except OSError as e:
            raise ValueError(f"cannot write {what}: the folder {str(folder)!r} cannot be created or written "
                             f"({e.strerror or e}). Allowed: a writable folder; {fix}") from None
    return path, listed, state


def write_lora_file(native: dict, path: Path, model_patcher, metadata: dict) -> Path:
    """The trained LoRA, written atomically. UNets: the pack's canonical form (kohya keys with diffusers module
    names, which core LoraLoader, the pack's loader and diffusers all read). SD3 / Flux: ComfyUI-native keys
    (diffusion_model.<ldm module>.lora_up / lora_down / alpha), one layer per trained ldm weight, fused qkv and
    Flux's linear1 whole, which core LoraLoader and the pack's loader both apply in full (a diffusers name for a
    fused weight would be one of its slices only)."""
    from ..tcd.files import save_safetensors_atomic
    from ..tcd.lora import comfy_native_to_canonical
    if backend.flow_ldm_to_diffusers(model_patcher):
        tensors = native
    else:
        tensors = comfy_native_to_canonical(native, backend.unet_ldm_to_diffusers(model_patcher),
                                            backend.unet_weight_shapes(model_patcher))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors_atomic(tensors, path, metadata)
