"""TCD Suite for ComfyUI: Trajectory Consistency Distillation sampler, scheduler, LoRA loader and trainer.

Entry point only: node mappings, the web folder, and the `tcd` names in KSampler's lists.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.register import register

REGISTERED_NAMES = register()
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
