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


def schedule_for(model_sampling):
    """The TCD schedule (tcd.schedule) matching a ComfyUI model_sampling object, or a clear error."""
    names = _mro_names(model_sampling)
    if "ModelSamplingDiscreteDistilled" in names or "LCM" in names:
        raise ValueError("this model's sampling is patched to LCM (ModelSamplingDiscrete 'lcm', 50-step distilled "
                         "grid with c_skip/c_out); TCD needs the model's base eps / v_prediction sampling: remove "
                         "that node or set it to 'eps' / 'v_prediction'")
    if "CONST" in names:
        return FlowSchedule()
    table = getattr(model_sampling, "sigmas", None)
    if not isinstance(table, torch.Tensor) or table.ndim != 1 or table.numel() < 2:
        raise ValueError(f"{type(model_sampling).__name__} has no discrete sigma table; TCD needs a discrete "
                         f"(SD1.x/SD2.x/SDXL) or flow (SD3/Flux) noise schedule")
    return DiscreteSchedule(table.detach().float().cpu())


def sigma_table(model_sampling) -> torch.Tensor:
    """The model's ascending sigma table (float32, CPU) that TCD timesteps index into."""
    table = getattr(model_sampling, "sigmas", None)
    if not isinstance(table, torch.Tensor) or table.ndim != 1 or table.numel() < 2:
        raise ValueError(f"{type(model_sampling).__name__} has no discrete sigma table for TCD timesteps")
    schedule_for(model_sampling)  # refuses LCM-patched sampling with its message
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
