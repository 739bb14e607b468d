"""Register the `tcd` sampler and scheduler into ComfyUI's plain KSampler lists.

KSampler, KSamplerSelect and BasicScheduler read the very list objects extended here (KSampler.SAMPLERS is
SAMPLER_NAMES, KSampler.SCHEDULERS is SCHEDULER_NAMES), and `ksampler(name)` resolves
`comfy.k_diffusion.sampling.sample_<name>`. On a name clash (another pack already owns `tcd`), that pack's entry is
kept untouched and ours is registered as `tcd_suite` instead, with a warning in the log naming both.
"""
from __future__ import annotations

import logging

from .sampling import sample_tcd_comfy, tcd_scheduler_handler

NAME = "tcd"
FALLBACK_NAME = "tcd_suite"
log = logging.getLogger(__name__)


# A marker rather than an identity check: a reloaded pack (new module objects) may replace its own entries.
sample_tcd_comfy.tcd_suite = True
tcd_scheduler_handler.tcd_suite = True


def _is_ours(obj) -> bool:
    return getattr(obj, "tcd_suite", False)


def register_sampler() -> str:
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    for name in (NAME, FALLBACK_NAME):
        existing = getattr(kds, f"sample_{name}", None)
        if existing is not None and not _is_ours(existing):
            log.warning("TCD: sampler name %r is already registered by %s; keeping it, trying the next name",
                        name, getattr(existing, "__module__", "?"))
            continue
        setattr(kds, f"sample_{name}", sample_tcd_comfy)
        if name not in comfy.samplers.KSampler.SAMPLERS:
            comfy.samplers.KSampler.SAMPLERS.append(name)
        return name
    raise RuntimeError(f"TCD: both sampler names {NAME!r} and {FALLBACK_NAME!r} are taken by other packs")


def register_scheduler() -> str:
    import comfy.samplers
    for name in (NAME, FALLBACK_NAME):
        existing = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if existing is not None and not _is_ours(existing.handler):
            log.warning("TCD: scheduler name %r is already registered by %s; keeping it, trying the next name",
                        name, getattr(existing.handler, "__module__", "?"))
            continue
        comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(tcd_scheduler_handler)
        if name not in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.append(name)
        return name
    raise RuntimeError(f"TCD: both scheduler names {NAME!r} and {FALLBACK_NAME!r} are taken by other packs")


def register() -> dict:
    return {"sampler": register_sampler(), "scheduler": register_scheduler()}
