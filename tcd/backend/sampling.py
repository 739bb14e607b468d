"""ComfyUI's model sampling objects, its sampler and scheduler lists, and sampling a latent through its guider."""
from __future__ import annotations

import logging

import torch

from ..schedule import DiscreteSchedule, FlowSchedule

log = logging.getLogger(__name__)


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


def make_ksampler(sampler_function, options: dict):
    """A ComfyUI SAMPLER (comfy.samplers.KSAMPLER) running `sampler_function` with extra keyword options."""
    import comfy.samplers
    return comfy.samplers.KSAMPLER(sampler_function, extra_options=options)


def inpaint_latent_of(model):
    """The original latent behind an inpainting sample (the `latent_image` ComfyUI's KSamplerX0Inpaint wrapper
    carries), or None outside inpainting."""
    return getattr(model, "latent_image", None)


def lcm_ksampler():
    """Core's `lcm` sampler as a SAMPLER object."""
    import comfy.samplers
    return comfy.samplers.ksampler("lcm")


def registered_sampler(name: str):
    """The sampler function KSampler runs for `name` (comfy.k_diffusion.sampling.sample_<name>), or None."""
    import comfy.k_diffusion.sampling as kds
    return getattr(kds, f"sample_{name}", None)


def register_sampler_function(name: str, function) -> None:
    """Make `name` a KSampler sampler: KSampler resolves comfy.k_diffusion.sampling.sample_<name>, and
    KSampler.SAMPLERS is the list object its input menus read."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    setattr(kds, f"sample_{name}", function)
    if name not in comfy.samplers.KSampler.SAMPLERS:
        comfy.samplers.KSampler.SAMPLERS.append(name)


def registered_scheduler(name: str):
    """The handler function of scheduler `name` in comfy.samplers.SCHEDULER_HANDLERS, or None."""
    import comfy.samplers
    entry = comfy.samplers.SCHEDULER_HANDLERS.get(name)
    return None if entry is None else entry.handler


def register_scheduler_function(name: str, handler) -> None:
    """Make `name` a KSampler scheduler: handler(model_sampling, steps) -> sigmas (comfy.samplers.SchedulerHandler),
    listed in SCHEDULER_NAMES (KSampler.SCHEDULERS is that list)."""
    import comfy.samplers
    comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(handler)
    if name not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(name)


# ----------------------------------------------------------------------------------------------- flow models
# The flow model samplings the trainer distils on: SD3's (time_snr_shift) and Flux's (exp(mu) shift). Their
# percent_to_sigma(p) is the model's own shifted sigma at the unshifted time 1 - p.
FLOW_SAMPLING = ("ModelSamplingDiscreteFlow", "ModelSamplingFlux")


def is_flow_sampling(model_sampling) -> bool:
    """True for a rectified-flow model (ComfyUI's CONST prediction: x = (1 - sigma) x0 + sigma eps)."""
    return "CONST" in _mro_names(model_sampling)


def flow_sigma_of_time(model_sampling):
    """(sigma_of_time, name) of a flow model: sigma_of_time(t) = percent_to_sigma(1 - t), the model's shifted sigma
    at unshifted time t in [0, 1] (tcd.paths.FlowPath), and a name with the shift for the run's settings.

    Only SD3's ModelSamplingDiscreteFlow and Flux's ModelSamplingFlux (or core's ModelSamplingSD3 / ModelSamplingFlux
    nodes built on them) qualify: other CONST samplings (e.g. a ModelSamplingContinuousEDM node on a flow model) have
    no such time."""
    names = _mro_names(model_sampling)
    base = next((n for n in FLOW_SAMPLING if n in names), None)
    if "CONST" not in names or base is None:
        raise ValueError(f"the model's sampling is {type(model_sampling).__name__} "
                         f"({', '.join(sorted(n for n in names if n not in ('object', 'Module')))}); the TCD trainer "
                         f"distils flow models on SD3's ModelSamplingDiscreteFlow or Flux's ModelSamplingFlux "
                         f"(and discrete SD1.x / SD2.x / SDXL models). Remove the node that changed the model's "
                         f"sampling, or use ModelSamplingSD3 / ModelSamplingFlux to set the shift")
    shift = getattr(model_sampling, "shift", None)
    name = base if shift is None else f"{base} shift {float(shift):.6g}"
    return (lambda t: float(model_sampling.percent_to_sigma(1.0 - float(t)))), name
