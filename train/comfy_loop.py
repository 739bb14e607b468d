"""TCD distillation of a LoRA inside ComfyUI, on the ModelPatcher a graph already loaded.

One model copy serves all three roles of the objective (tcd.losses):
* student  = base weights + LoRA (trainable), through ComfyUI's weight wrappers (comfy.weight_adapter LoRA adapters
  attached with ModelPatcher.add_weight_wrapper, as the core TrainLoraNode does);
* teacher  = the same weights with every LoRA wrapper bypassed (a switch the wrappers read);
* target   = the EMA of the LoRA (ema_decay > 0), or the online LoRA under no_grad (ema_decay = 0, as diffusers'
  LCM-LoRA scripts do).

The model is called through ComfyUI's own `BaseModel.apply_model`, so eps / v-prediction models, SDXL's extra
conditioning and the model's patches behave as in sampling. The loss sees x0 predictions (prediction_type
"sample") in VP space with abar_t = 1 / (1 + sigma_t^2) from the model's own sigma table.

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
from ..tcd.losses import RECIPES, LCMLoss, TCDLoss
from .checkpoint import config_differences, load_state, save_state
from .dataset import TrainingData

log = logging.getLogger(__name__)

OBJECTIVES = ("tcd", "lcm")
VALIDATION_SEED_OFFSET = 1_000_003      # validation draws: a generator of their own, seeded from the run's seed
VALIDATION_MIN_BATCH = 8                # samples per validation draw (at least): a model pass costs about the same
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STUDENT, TARGET, TEACHER = "student", "target", "teacher"
# Settings a resumed run may change without changing the numbers it computes.
RESUME_MAY_CHANGE = ("steps", "save_every", "validation_every", "validation_draws", "gradient_checkpointing",
                     "save_dtype")
# Layers the LoRA trains: every >= 2-D UNet weight except conv_in / conv_out / the time (and SDXL label)
# embedding, i.e. the target modules of diffusers' LCM-LoRA recipe (attention q/k/v/out, proj_in/out, ff,
# resnet conv1/conv2/conv_shortcut/time_emb_proj, down/upsamplers).
EXCLUDED_LDM_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.0.0", "out.")


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
    """A comfy.weight_adapter LoRA on one weight, with a teacher bypass and an EMA copy read in target mode."""

    def __init__(self, adapter: torch.nn.Module, switch: LoRASwitch, keep_ema: bool):
        super().__init__()
        self.adapter = adapter
        self.switch = switch
        if keep_ema:
            self.register_buffer("ema_up", adapter.lora_up.weight.detach().clone())
            self.register_buffer("ema_down", adapter.lora_down.weight.detach().clone())
        else:
            self.ema_up = self.ema_down = None

    def trainable(self) -> list[torch.nn.Parameter]:
        return [self.adapter.lora_up.weight, self.adapter.lora_down.weight]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        mode = self.switch.mode
        if mode == TEACHER:
            return w
        if mode == TARGET and self.ema_up is not None:
            diff = (self.ema_up @ self.ema_down).reshape(w.shape)
            scale = float(self.adapter.alpha) / self.adapter.rank
            return (w + scale * diff).to(w.dtype)
        return self.adapter(w)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.ema_up is not None:
            self.ema_up.lerp_(self.adapter.lora_up.weight, 1.0 - decay)
            self.ema_down.lerp_(self.adapter.lora_down.weight, 1.0 - decay)

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


def is_lora_target(ldm_name: str) -> bool:
    return not ldm_name.startswith(EXCLUDED_LDM_PREFIXES)


def attach_lora(patcher, rank: int, alpha: float, seed: int, keep_ema: bool, switch: LoRASwitch) -> dict:
    """Add a SwitchableLoRA to every target weight of the UNet (and identity wrappers to the other inference-mode
    weights). LoRA initialisation is seeded and drawn on the CPU, so it is the same on every device."""
    diffusion_model = patcher.model.diffusion_model
    loras, passthrough = {}, PassThrough()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in diffusion_model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            weight = getattr(module, "weight", None)
            key = f"diffusion_model.{name}"
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and is_lora_target(name):
                shape_only = torch.empty((), dtype=torch.float32).expand(weight.shape)
                wrapper = SwitchableLoRA(backend.create_lora_adapter(shape_only, rank, float(alpha)), switch,
                                         keep_ema)
                patcher.add_weight_wrapper(f"{key}.weight", wrapper)
                loras[name] = wrapper
            elif isinstance(weight, torch.Tensor) and weight.is_inference():
                patcher.add_weight_wrapper(f"{key}.weight", passthrough)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.is_inference():
                patcher.add_weight_wrapper(f"{key}.bias", passthrough)
    if not loras:
        raise ValueError("this model has no UNet layers the LoRA can train (no >= 2-D weights under "
                         "diffusion_model); the trainer supports UNet models (SD1.x / SD2.x / SDXL)")
    return loras


def native_lora_dict(loras: dict, dtype: torch.dtype) -> dict:
    """ComfyUI-native LoRA keys (TrainLoraNode's): diffusion_model.<module>.lora_up.weight / lora_down.weight /
    alpha; conv down weights stay flattened [rank, in*k*k] (tcd.lora.comfy_native_to_canonical reshapes them)."""
    out = {}
    for name, w in loras.items():
        out[f"diffusion_model.{name}.lora_up.weight"] = w.adapter.lora_up.weight.detach().to("cpu", dtype).clone()
        out[f"diffusion_model.{name}.lora_down.weight"] = w.adapter.lora_down.weight.detach().to("cpu",
                                                                                                  dtype).clone()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(w.adapter.alpha), dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------- gradient checkpointing
def enable_gradient_checkpointing(diffusion_model: torch.nn.Module) -> list:
    """Recompute each UNet block in the backward pass (torch.utils.checkpoint, non-reentrant) instead of keeping
    its activations; passes without grad (teacher, target) run the plain forward."""
    import torch.utils.checkpoint as cp
    patched = []
    for child in diffusion_model.children():
        blocks = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        for block in blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return cp.checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            had_instance_forward = "forward" in block.__dict__
            block.forward = forward
            patched.append((block, original if had_instance_forward else None))
    return patched


def disable_gradient_checkpointing(patched: list) -> None:
    for block, original in patched:
        if original is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = original


# ----------------------------------------------------------------------------------------------- model calls
class ComfyModelFn:
    """model(x_t, t, cond) -> x0 for VP latents x_t and integer timesteps t, through BaseModel.apply_model.

    ComfyUI models live in sigma (VE) space: x_VE = x_VP * sqrt(1 + sigma^2) and apply_model divides it back
    (calculate_input), finds the integer timestep of sigma in the same table (timestep(sigma)) and returns the
    denoised x0 for eps, v and x0 models alike (calculate_denoised)."""

    def __init__(self, patcher, switch: LoRASwitch, mode: str, dtype: torch.dtype, device: torch.device):
        self.base = patcher.model
        self.switch, self.mode = switch, mode
        self.sigmas = backend.sigma_table(self.base.model_sampling).to(device)
        self.transformer_options = dict(patcher.model_options.get("transformer_options", {}))
        self.autocast = dtype != torch.float32
        self.dtype, self.device = dtype, device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        self.switch.mode = self.mode
        sigma = self.sigmas[t.long()]
        x_ve = x * (1 + sigma ** 2).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        options = dict(self.transformer_options, sigmas=sigma, cond_or_uncond=[0])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.base.apply_model(x_ve, sigma, transformer_options=options, **cond)
        return out.float()


def alphas_cumprod_of(patcher) -> torch.Tensor:
    """abar_t = 1 / (1 + sigma_t^2) from the model's own sigma table (float64 in ComfyUI, as its sampling)."""
    ms = patcher.model.model_sampling
    if backend.schedule_for(ms).kind != "discrete":
        raise ValueError(f"this model uses {type(ms).__name__} (flow matching: SD3 / Flux style); the TCD "
                         f"trainer distils discrete VP models (SD1.x, SD2.x, SDXL, eps or v-prediction)")
    sigmas = backend.sigma_table(ms).double()
    return (1.0 / (1.0 + sigmas ** 2)).float()


def model_fingerprint(patcher) -> str:
    """Identity of the teacher: the model class, weight names/shapes and a sample of values of some tensors."""
    h = hashlib.sha256(type(patcher.model).__name__.encode())
    sd = patcher.model.diffusion_model.state_dict()
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
    samples with the same latent size (a batch must be one tensor)."""

    def __init__(self, data: TrainingData, patcher, device: torch.device):
        base = patcher.model
        self.device = device
        self.x0 = [base.process_latent_in(x[None].to(device)).float()[0].clone() for x in data.latents]
        self.buckets: dict[tuple, list[int]] = {}
        for i, x in enumerate(self.x0):
            self.buckets.setdefault(tuple(x.shape), []).append(i)
        self.conds = [backend.model_cond_item(patcher, c, (1, *data.latents[i].shape), device)
                      for i, c in enumerate(data.conditionings)]
        self.uncond_items = {}
        if data.uncond is not None:
            for shape in self.buckets:
                idx = self.buckets[shape][0]
                self.uncond_items[shape] = backend.model_cond_item(patcher, data.uncond,
                                                                   (1, *data.latents[idx].shape), device)

    def draw(self, batch_size: int, generator: torch.Generator):
        first = int(torch.randint(0, len(self.x0), (1,), generator=generator))
        shape = tuple(self.x0[first].shape)
        pool = self.buckets[shape]
        rest = torch.randint(0, len(pool), (batch_size - 1,), generator=generator).tolist()
        idx = [first] + [pool[j] for j in rest]
        x0 = torch.stack([self.x0[i] for i in idx])
        cond = backend.batch_model_conds([self.conds[i] for i in idx])
        uncond = None
        if shape in self.uncond_items:
            uncond = backend.batch_model_conds([self.uncond_items[shape]] * batch_size)
        return idx, x0, cond, uncond


# ----------------------------------------------------------------------------------------------- the loop
def make_objective(cfg: DistillConfig, alphas_cumprod: torch.Tensor):
    common = dict(original_steps=cfg.original_steps, w_min=cfg.w_min, w_max=cfg.w_max, loss=cfg.loss,
                  huber_c=cfg.huber_c, prediction_type="sample")
    if cfg.objective == "lcm":
        return LCMLoss(alphas_cumprod, **common)
    return TCDLoss(alphas_cumprod, tcf_order=cfg.tcf_order, rho=cfg.rho, **common)


def numeric_config(cfg: DistillConfig, data_fp: str, model_fp: str) -> dict:
    d = dataclasses.asdict(cfg)
    d.update(data=data_fp, model=model_fp)
    return d


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
    dtype = backend.training_dtype(cfg.dtype, device)
    with torch.inference_mode(False), torch.enable_grad():
        patcher = model_patcher.clone()
        if dtype != torch.float32:
            patcher.set_model_compute_dtype(dtype)
        abar = alphas_cumprod_of(patcher)             # also refuses LCM-patched / flow sampling
        objective = make_objective(cfg, abar)
        config = numeric_config(cfg, data.fingerprint(), model_fingerprint(patcher))
        switch = LoRASwitch()
        loras = attach_lora(patcher, cfg.rank, cfg.alpha, cfg.seed, cfg.ema_decay > 0, switch)
        params = [p for w in loras.values() for p in w.trainable()]
        checkpointed = []
        try:
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=cfg.weight_decay)
            generator = torch.Generator("cpu").manual_seed(int(cfg.seed))
            losses: list[float] = []
            start, validation_losses = 0, []
            if resume and checkpoint_path.is_file():
                start, losses, validation_losses = _restore(load_state(checkpoint_path), config, loras, optimizer,
                                                            generator, checkpoint_path)
                log.info("TCD trainer: resuming %s at step %d of %d", checkpoint_path.name, start, cfg.steps)
            if start > cfg.steps:
                raise ValueError(f"the checkpoint {checkpoint_path.name!r} is at step {start}, beyond "
                                 f"steps={cfg.steps}; raise steps, or turn resume off to start over")
            patcher.model.requires_grad_(False)
            backend.load_for_training(patcher)
            if cfg.gradient_checkpointing:
                checkpointed = enable_gradient_checkpointing(patcher.model.diffusion_model)
            student = ComfyModelFn(patcher, switch, STUDENT, dtype, device)
            target = ComfyModelFn(patcher, switch, TARGET, dtype, device)
            teacher = ComfyModelFn(patcher, switch, TEACHER, dtype, device)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == "cuda" else None
            batches = Batches(data, patcher, device)
            result = TrainResult({}, losses, start, start, checkpoint_path, layers=len(loras),
                                 validation_losses=validation_losses)

            def state(step: int) -> dict:
                return {"config": config, "step": step, "losses": list(losses[:step]),
                        "validation_losses": [v for v in result.validation_losses if v[0] <= step],
                        "lora": {n: {"up": w.adapter.lora_up.weight.detach().cpu().clone(),
                                     "down": w.adapter.lora_down.weight.detach().cpu().clone()}
                                 for n, w in loras.items()},
                        "ema": {n: {"up": w.ema_up.detach().cpu().clone(), "down": w.ema_down.detach().cpu().clone()}
                                for n, w in loras.items() if w.ema_up is not None},
                        "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state()}

            def save(step: int) -> None:
                switch.mode = STUDENT
                save_state(state(step), checkpoint_path)
                if on_save is not None:
                    on_save(native_lora_dict(loras, SAVE_DTYPES[cfg.save_dtype]), step, list(losses[:step]),
                            [v for v in result.validation_losses if v[0] <= step])

            def validate(step: int) -> None:
                # The objective on fixed draws (its own generator, so the training stream is untouched), with the
                # online LoRA as student and target: comparable from step to step, unlike the per-step loss whose
                # scale swings with the drawn t, s and w.
                val_gen = torch.Generator("cpu").manual_seed(int(cfg.seed) + VALIDATION_SEED_OFFSET)
                with torch.no_grad():
                    values = []
                    for _ in range(cfg.validation_draws):
                        _, x0, cond, uncond = batches.draw(max(cfg.batch_size, VALIDATION_MIN_BATCH), val_gen)
                        values.append(float(objective(student, student, teacher, x0, cond, uncond, val_gen)))
                    result.validation_losses.append([step, sum(values) / len(values)])
                    if validation is not None:
                        switch.mode = STUDENT
                        result.validation_images.append(_validation_image(patcher, validation, data))
                        result.validation_steps.append(step)

            progress = progress_factory(cfg.steps)
            if start:
                progress.update(start)
            done, in_step, committing, snapshot = start, False, False, None
            try:
                # Validation of the starting point (step 0, or a resumed step on the validation grid whose
                # validation a Cancel cut short), so a resumed run reports the same points as an uninterrupted one.
                if cfg.validation_every and start % cfg.validation_every == 0 and \
                        all(step != start for step, _ in result.validation_losses):
                    validate(start)
                for step in range(start, cfg.steps):
                    snapshot, in_step = generator.get_state(), True
                    # Constant learning rate after a linear warmup (diffusers' constant_with_warmup).
                    lr = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps \
                        else cfg.learning_rate
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    _, x0, cond, uncond = batches.draw(cfg.batch_size, generator)
                    loss = objective(student, target, teacher, x0, cond, uncond, generator)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise NonFiniteLoss(f"the loss became {value} at step {step + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    switch.mode = STUDENT                  # recomputed (checkpointed) blocks must see the student
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                          else float("inf"))
                    if scaler is None and not math.isfinite(float(norm)):
                        raise NonFiniteLoss(f"the gradient became {float(norm)} at step {step + 1}")
                    committing = True
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    for w in loras.values():
                        w.update_ema(cfg.ema_decay)
                    losses.append(value)
                    done, in_step, committing = step + 1, False, False
                    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                        save(done)
                    if cfg.validation_every and (done % cfg.validation_every == 0 or done == cfg.steps):
                        validate(done)
                    progress.update(1)
                save(done)
            except BaseException as exc:
                if in_step and not committing:
                    generator.set_state(snapshot)       # undo this step's draws: resume replays them
                if not committing:                      # else the state is half-updated: keep the last save
                    try:
                        save_state(state(done), checkpoint_path)
                    except Exception as save_exc:       # never hide the original error behind a save error
                        log.error("TCD trainer: could not write the checkpoint: %s", save_exc)
                if isinstance(exc, NonFiniteLoss):
                    raise NonFiniteLoss(
                        f"{exc}; training stopped. The last good state (step {done}) is kept in "
                        f"{str(checkpoint_path)!r}. Lower the learning rate (now {cfg.learning_rate}), raise "
                        f"warmup_steps or use loss 'huber'; resuming with the same settings would repeat this"
                    ) from None
                if backend.is_interrupt(exc):
                    log.info("TCD trainer: cancelled after step %d; state kept in %s (turn resume on to continue)",
                             done, checkpoint_path)
                raise
        finally:
            switch.mode = STUDENT
            disable_gradient_checkpointing(checkpointed)
            for p in params:
                p.requires_grad_(False)
            backend.detach_weight_wrappers(patcher, list(loras.values()) + [
                f for fs in patcher.weight_wrapper_patches.values() for f in fs if isinstance(f, PassThrough)])
        result.native_lora = native_lora_dict(loras, SAVE_DTYPES[cfg.save_dtype])
        result.steps_done = done
        result.seconds = time.perf_counter() - t_start
        return result


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
            w.adapter.lora_up.weight.copy_(saved["lora"][name]["up"])
            w.adapter.lora_down.weight.copy_(saved["lora"][name]["down"])
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
    sigmas = validation.sigmas_fn(patcher.model.model_sampling)
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
    """The trained LoRA in the pack's canonical form (kohya keys with diffusers module names, which core
    LoraLoader, the pack's loader and diffusers all read), written atomically."""
    from ..tcd.files import save_safetensors_atomic
    from ..tcd.lora import comfy_native_to_canonical
    canonical = comfy_native_to_canonical(native, backend.unet_ldm_to_diffusers(model_patcher),
                                          backend.unet_weight_shapes(model_patcher))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors_atomic(canonical, path, metadata)
