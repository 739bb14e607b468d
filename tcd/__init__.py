"""Trajectory Consistency Distillation (TCD, arXiv 2402.19159): the pure-torch core of the pack.

Importable with no ComfyUI on the path; `backend.py` is the only module that talks to ComfyUI (lazily).
"""
from .schedule import DiscreteSchedule, FlowSchedule, tcd_timesteps, tcd_timesteps_denoised  # noqa: F401
from .sampling import sample_tcd, expand_gamma, parse_gamma_schedule, seeded_noise_sampler  # noqa: F401
