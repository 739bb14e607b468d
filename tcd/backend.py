"""The one place that talks to ComfyUI (comfy.model_management, comfy.utils, comfy.model_sampling).

Every import of `comfy` is lazy, inside a function, so `tcd` stays importable without ComfyUI; where ComfyUI is
absent the helpers fall back to plain torch (CPU or the first CUDA device, a tqdm-free no-op progress bar).
"""
from __future__ import annotations

import torch

from .schedule import DiscreteSchedule, FlowSchedule


def has_comfy() -> bool:
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- model sampling
def _mro_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def model_sampling_of(model):
    """The ComfyUI `model_sampling` behind a ModelPatcher (patches such as ModelSamplingDiscrete included), a
    sampler's model (KSamplerX0Inpaint -> CFGGuider -> BaseModel), or a BaseModel."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    for path in (("inner_model", "inner_model", "model_sampling"), ("model_sampling",)):
        obj = model
        try:
            for attr in path:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise TypeError(f"cannot find the model_sampling of {type(model).__name__}: TCD needs a ComfyUI model")


def _refuse_lcm(model_sampling) -> None:
    names = _mro_names(model_sampling)
    if "ModelSamplingDiscreteDistilled" in names or "LCM" in names:
        raise ValueError("this model's sampling is patched to LCM (ModelSamplingDiscrete 'lcm', 50-step distilled "
                         "grid with c_skip/c_out); TCD needs the model's base eps / v_prediction sampling: remove "
                         "that node or set it to 'eps' / 'v_prediction'")


def _table_or_none(model_sampling):
    table = getattr(model_sampling, "sigmas", None)
    return table if isinstance(table, torch.Tensor) and table.ndim == 1 and table.numel() >= 2 else None


def schedule_for(model_sampling):
    """The TCD schedule (tcd.schedule) matching a ComfyUI model_sampling object, or a clear error."""
    _refuse_lcm(model_sampling)
    if "CONST" in _mro_names(model_sampling):
        return FlowSchedule()
    table = _table_or_none(model_sampling)
    if table is None:
        raise ValueError(f"{type(model_sampling).__name__} has no discrete sigma table; TCD needs a discrete "
                         f"(SD1.x/SD2.x/SDXL) or flow (SD3/Flux) noise schedule")
    return DiscreteSchedule(table.detach().float().cpu())


# Continuous-time model sampling (core's ModelSamplingContinuousEDM and its subclass ModelSamplingContinuousV: EDM
# checkpoints such as Playground v2.5 or CosXL, or those nodes put in front of any model). Their `sigmas` buffer is a
# log-spaced lookup table kept "for compatibility with some schedulers", not the timesteps of a discrete training
# schedule, so TCD timesteps (indices of such a schedule) would silently pick arbitrary noise levels there.
CONTINUOUS_SAMPLING = ("ModelSamplingContinuousEDM",)


def _refuse_continuous(model_sampling) -> None:
    # Core's ModelSampling* nodes build a class named ModelSamplingAdvanced on top of the base: name the base.
    continuous = [c.__name__ for c in type(model_sampling).__mro__ if c.__name__ != "ModelSamplingAdvanced"
                  and any(b.__name__ in CONTINUOUS_SAMPLING for b in c.__mro__)]
    if continuous:
        lo, hi = (float(getattr(model_sampling, k)) for k in ("sigma_min", "sigma_max"))
        raise ValueError(f"the model's sampling is {continuous[0]} (continuous-time sigmas "
                         f"{lo:.4g}..{hi:.4g}, from an EDM checkpoint or a ModelSamplingContinuousEDM/V node): it has "
                         f"no discrete timesteps for TCD timesteps to pick. Allowed: a discrete schedule (SD1.x, "
                         f"SD2.x, SDXL; eps, v_prediction or x0) or a flow schedule (SD3, Flux). Remove that node, or "
                         f"make the SIGMAS with a core scheduler (karras, exponential) and sample them with the TCD "
                         f"Sampler")


def sigma_table(model_sampling) -> torch.Tensor:
    """The model's ascending sigma table (float32, CPU) that TCD timesteps index, or a clear error for LCM-patched
    and continuous-time sampling (the TCD Sampler itself still runs on a continuous model's core SIGMAS)."""
    table = _table_or_none(model_sampling)
    if table is None:
        raise ValueError(f"{type(model_sampling).__name__} has no discrete sigma table for TCD timesteps")
    _refuse_lcm(model_sampling)
    _refuse_continuous(model_sampling)
    return table.detach().float().cpu()


# ----------------------------------------------------------------------------------------------- devices, progress
def torch_device() -> torch.device:
    if has_comfy():
        import comfy.model_management as mm
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    if has_comfy():
        import comfy.model_management as mm
        return mm.intermediate_device()
    return torch.device("cpu")


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (no-op without ComfyUI)."""
    if has_comfy():
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """comfy.utils.ProgressBar when ComfyUI runs (UI progress; its hook also raises on Cancel), else nothing."""

    def __init__(self, total: int):
        self.total = total
        self._bar = None
        if has_comfy():
            import comfy.utils
            self._bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
        throw_if_interrupted()


# ----------------------------------------------------------------------------------------------- LoRA
def unet_ldm_to_diffusers(model_patcher) -> dict[str, str]:
    """ldm module name -> diffusers module name for a ComfyUI UNet model (ModelPatcher or BaseModel).

    Both sides are module paths without `.weight`/`.bias` and without the `diffusion_model.` prefix, e.g.
    `input_blocks.1.1.transformer_blocks.0.attn1.to_q` -> `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    Built from ComfyUI's own `comfy.utils.unet_to_diffusers(unet_config)` (the table its LoRA key map uses), so
    the names agree with ComfyUI's loader by construction. Empty for models without a UNet config (DiT models).
    """
    import comfy.utils
    base_model = getattr(model_patcher, "model", model_patcher)
    unet_config = base_model.model_config.unet_config
    mapping = {}
    if "num_res_blocks" not in unet_config:     # a transformer (SD3, Flux): no UNet table
        return mapping
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        for suffix in (".weight", ".bias"):
            if diffusers_key.endswith(suffix) and ldm_key.endswith(suffix):
                mapping[ldm_key[:-len(suffix)]] = diffusers_key[:-len(suffix)]
    return mapping


def unet_weight_shapes(model_patcher) -> dict[str, tuple]:
    """ldm module name -> weight shape for every >= 2-D UNet weight (the layers a LoRA can target)."""
    base_model = getattr(model_patcher, "model", model_patcher)
    prefix = "diffusion_model."
    return {k[len(prefix):-len(".weight")]: tuple(v.shape) for k, v in base_model.state_dict().items()
            if k.startswith(prefix) and k.endswith(".weight") and v.ndim >= 2}


# ComfyUI model classes (comfy.model_base) of the flow transformers the LoRA loader handles. Subclasses with other
# layers (Flux2, Chroma) are not included: their LoRA key maps differ.
FLOW_MODEL_CLASSES = {"SD3": "SD3", "Flux": "Flux"}


def model_architecture(model_patcher) -> str:
    """SD1.x / SD2.x / SDXL for a ComfyUI UNet model (from its class and cross-attention context width), SD3 / Flux
    for those flow transformers, else a description of what it is."""
    from .lora import CONTEXT_DIM, ARCH_SDXL
    base_model = getattr(model_patcher, "model", model_patcher)
    cls = type(base_model).__name__
    if cls in FLOW_MODEL_CLASSES:
        return FLOW_MODEL_CLASSES[cls]
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    context = unet_config.get("context_dim")
    if "num_res_blocks" not in unet_config:
        return f"{cls} (not a UNet model)"
    arch = CONTEXT_DIM.get(context)
    if arch == ARCH_SDXL and not cls.startswith("SDXL"):
        return f"{cls} (UNet with context {context}, not SDXL base)"
    if arch is None or (arch != ARCH_SDXL and cls not in ("BaseModel", "SD21UNCLIP", "SD15_instructpix2pix")):
        return f"{cls} (UNet with context {context})"
    return arch


def _target_shape(target, sd) -> tuple | None:
    """Shape of the weight (or weight slice) a LoRA key map entry patches: a key; (key, (dim, offset, size)) for a
    slice of a fused weight (ComfyUI's split diffusers q/k/v of SD3 / Flux); (key, None, function) for a weight
    patched through a function (Flux / SD3 norm_out's scale/shift swap)."""
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    weight = sd.get(key)
    if weight is None or weight.ndim < 2:
        return None
    shape = list(weight.shape)
    if offset is not None:
        dim, _, size = offset
        shape[dim] = size
    return tuple(shape)


def lora_target_shapes(model_patcher, clip=None) -> dict[str, tuple]:
    """`lora_*` key base -> weight shape for every weight ComfyUI's own LoRA key map can patch in this model (and
    CLIP); for SD3 / Flux also `transformer.<diffusers module>` -> the shape of the weight or slice it patches.
    Built with comfy.lora.model_lora_keys_unet / model_lora_keys_clip, the maps load_lora_for_models uses, so a
    layer found here is a layer ComfyUI applies."""
    import comfy.lora
    shapes = {}
    if model_patcher is not None:
        sd = model_patcher.model.state_dict()
        flow = type(model_patcher.model).__name__ in FLOW_MODEL_CLASSES
        for key, target in comfy.lora.model_lora_keys_unet(model_patcher.model, {}).items():
            if key.startswith("lora_unet_") and isinstance(target, str) and target in sd:
                shapes[key] = tuple(sd[target].shape)
            elif flow and key.startswith("transformer."):
                shape = _target_shape(target, sd)
                if shape is not None:
                    shapes[key] = shape
    if clip is not None:
        sd = clip.cond_stage_model.state_dict()
        for key, target in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items():
            if key.startswith("lora_te") and isinstance(target, str) and target in sd:
                shapes[key] = tuple(sd[target].shape)
    return shapes


def _patch_counts(patcher) -> dict:
    return {k: len(v) for k, v in getattr(patcher, "patches", {}).items()}


def patched_since(before: dict, patcher) -> int:
    """Number of patches added since the `before` snapshot (_patch_counts): one per LoRA layer, also where several
    layers patch slices of one weight (diffusers' split q/k/v on SD3's / Flux's fused qkv)."""
    after = _patch_counts(patcher)
    return sum(max(0, n - before.get(k, 0)) for k, n in after.items())


def apply_lora(model, clip, lora_sd: dict, strength_model: float, strength_clip: float):
    """comfy.sd.load_lora_for_models, plus how many model and CLIP patches (LoRA layers) it added.

    Returns (model, clip, n_model_patched, n_clip_patched). A strength of 0 leaves that part untouched (the same
    object comes back, so its output is the base output exactly), like core LoraLoader does for both at 0.
    """
    import comfy.sd
    use_model = model if strength_model != 0 else None
    use_clip = clip if clip is not None and strength_clip != 0 else None
    if use_model is None and use_clip is None:
        return model, clip, 0, 0
    before_m = _patch_counts(model) if use_model is not None else {}
    before_c = _patch_counts(use_clip.patcher) if use_clip is not None else {}
    new_model, new_clip = comfy.sd.load_lora_for_models(use_model, use_clip, lora_sd, strength_model, strength_clip)
    n_m = patched_since(before_m, new_model) if new_model is not None else 0
    n_c = patched_since(before_c, new_clip.patcher) if new_clip is not None else 0
    return (new_model if new_model is not None else model, new_clip if new_clip is not None else clip, n_m, n_c)


def lora_folders() -> list[str]:
    import folder_paths
    return list(folder_paths.get_folder_paths("loras"))


def lora_names() -> list[str]:
    import folder_paths
    return list(folder_paths.get_filename_list("loras"))


def lora_path(name: str) -> str:
    """Full path of a LoRA chosen by name, as folder_paths.get_full_path("loras", name) resolves it, refusing names
    that leave the loras folders (absolute paths, '..', drive letters). Symlinks placed inside a loras folder
    are the user's own choice and are followed."""
    import folder_paths
    from .files import resolve_inside
    folders = lora_folders()
    resolve_inside(folders, name, kind="LoRA", folder_label="loras")   # refuses escapes with a clear message
    full = folder_paths.get_full_path("loras", name)
    if full is None:
        raise ValueError(f"LoRA {name!r} is not in the loras folders ({', '.join(folders)}). Allowed: a file "
                         f"listed in models/loras. Put the file there and refresh, or pick another name.")
    return resolve_inside(folders, full, kind="LoRA", folder_label="loras")


# ----------------------------------------------------------------------------------------------- training
TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a training run. "auto": fp32 on CPU (bf16 autocast there is ~9x slower, measured with
    core's trainer), bf16 where ComfyUI's model management says the device supports it, else fp32."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise ValueError(f"training dtype {name!r} is not one of {TRAINING_DTYPES}")
    if device.type == "cpu":
        return torch.float32
    if has_comfy():
        import comfy.model_management as mm
        if mm.should_use_bf16(device, prioritize_performance=True):
            return torch.bfloat16
    return torch.float32


def create_lora_adapter(weight: torch.Tensor, rank: int, alpha: float) -> torch.nn.Module:
    """A trainable LoRA for one weight from ComfyUI's own weight adapters (comfy.weight_adapter LoRAAdapter:
    lora_up kaiming-uniform, lora_down zeros, so the patched weight starts equal to the base weight)."""
    from comfy.weight_adapter.lora import LoRAAdapter
    return LoRAAdapter.create_train(weight, rank=rank, alpha=alpha)


def load_for_training(patcher) -> None:
    """Load the patched model fully onto the compute device, freeing room first, as ComfyUI's TrainLoraNode does
    (its weight wrappers are attached to the modules by this load)."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)


def detach_weight_wrappers(patcher, wrappers) -> None:
    """Take training weight wrappers off the live modules and off the patcher, so the shared base model computes
    its plain weights again without waiting for the next load."""
    ids = {id(w) for w in wrappers}
    for module in patcher.model.modules():
        for attr in ("weight_function", "bias_function"):
            funcs = getattr(module, attr, None)
            if funcs:
                setattr(module, attr, [f for f in funcs if id(f) not in ids])
    for key in list(patcher.weight_wrapper_patches):
        kept = [f for f in patcher.weight_wrapper_patches[key] if id(f) not in ids]
        if kept:
            patcher.weight_wrapper_patches[key] = kept
        else:
            del patcher.weight_wrapper_patches[key]


def model_cond_item(patcher, conditioning, latent_shape, device) -> dict:
    """One CONDITIONING (a list of [embedding, options]) as the model's own condition objects for one sample,
    built the way ComfyUI's samplers build them (convert_cond + encode_model_conds with the model's extra_conds:
    cross-attention, SDXL pooled/size embeddings, ...). The first entry is used; see batch_model_conds."""
    import comfy.sampler_helpers
    import comfy.samplers
    conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
    noise = torch.zeros(tuple(latent_shape), dtype=torch.float32)
    conds = comfy.samplers.encode_model_conds(patcher.model.extra_conds, conds, noise, device, "positive",
                                              latent_image=noise)
    return {k: v.process_cond(batch_size=1, area=None) for k, v in conds[0]["model_conds"].items()}


def batch_model_conds(items: list) -> dict:
    """Concatenate per-sample condition objects into apply_model keyword tensors (comfy.samplers.cond_cat)."""
    import comfy.samplers
    return comfy.samplers.cond_cat(items)


def output_directory() -> str:
    import folder_paths
    return folder_paths.get_output_directory()


def input_directory() -> str:
    import folder_paths
    return folder_paths.get_input_directory()


def is_interrupt(exc: BaseException) -> bool:
    """True for ComfyUI's Cancel (InterruptProcessingException)."""
    if not has_comfy():
        return False
    import comfy.model_management as mm
    return isinstance(exc, mm.InterruptProcessingException)


def sample_latent(patcher, sampler, sigmas, positive, negative, cfg: float, latent: torch.Tensor,
                  seed: int) -> torch.Tensor:
    """Sample a latent with a ComfyUI SAMPLER object (e.g. the pack's TCD sampler) through CFGGuider, as
    SamplerCustomAdvanced does. Returns the un-processed latent (ready for VAE decode)."""
    import comfy.sample
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, sampler, sigmas, seed=seed, disable_pbar=True)
