"""Register the `tcd` sampler and scheduler into ComfyUI's plain KSampler lists.

KSampler, KSamplerSelect and BasicScheduler read the very list objects extended here (KSampler.SAMPLERS is
SAMPLER_NAMES, KSampler.SCHEDULERS is SCHEDULER_NAMES), and `ksampler(name)` resolves
`comfy.k_diffusion.sampling.sample_<name>`. On a name clash (another pack already owns `tcd`), that pack's entry is
kept untouched and ours is registered as `tcd_suite` instead, with an error in the log naming both and saying what
to pick; the Few-step Preset node repeats it in its settings text.
"""
from __future__ import annotations

import logging

from ..tcd import backend
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
    for name in (NAME, FALLBACK_NAME):
        existing = backend.registered_sampler(name)
        if existing is not None and not _is_ours(existing):
            _warn_taken("sampler", name, existing)
            continue
        backend.register_sampler_function(name, sample_tcd_comfy)
        return name
    raise RuntimeError(f"TCD: both sampler names {NAME!r} and {FALLBACK_NAME!r} are taken by other packs")


def register_scheduler() -> str:
    for name in (NAME, FALLBACK_NAME):
        existing = backend.registered_scheduler(name)
        if existing is not None and not _is_ours(existing):
            _warn_taken("scheduler", name, existing)
            continue
        backend.register_scheduler_function(name, tcd_scheduler_handler)
        return name
    raise RuntimeError(f"TCD: both scheduler names {NAME!r} and {FALLBACK_NAME!r} are taken by other packs")


def _warn_taken(kind: str, name: str, existing) -> None:
    # Loud on purpose: the shipped workflows pick `tcd` in KSampler, and would silently run the other pack's code.
    owner = getattr(existing, "__module__", "?")
    log.error("TCD: the KSampler %s name %r already belongs to %s. Workflows that pick %r in KSampler run THAT "
              "pack's %s, not this pack's; pick %r instead (this pack registers under that name), or use the TCD "
              "Sampler / TCD Scheduler nodes, which are always this pack's.", kind, name, owner, name, kind,
              FALLBACK_NAME)
    TAKEN_BY_OTHERS[f"{kind}:{name}"] = owner


TAKEN_BY_OTHERS: dict[str, str] = {}      # "sampler:tcd" -> the module that owns it, when another pack does


def register() -> dict:
    return {"sampler": register_sampler(), "scheduler": register_scheduler()}
