"""A loader node for the efficacy benchmark's server run (not part of the pack).

The efficacy teacher is an SD1.5-family model with a smaller UNet than any checkpoint ComfyUI's loaders detect (they
recognise SD1.5 by its 320-channel UNet and 768-wide CLIP), so the server gets it through this node, which rebuilds it
from ComfyUI's own classes exactly as the in-process benchmark does. Everything else in the server graph is core
ComfyUI or the pack.
"""
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[3])
if _REPO not in sys.path:
    sys.path.append(_REPO)


class EfficacyTeacherLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "The cached teacher .safetensors file."})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "benchmarks"

    def load(self, path):
        from benchmarks.efficacy.model import load_teacher
        model, clip, _ = load_teacher(Path(path))
        return (model, clip)


NODE_CLASS_MAPPINGS = {"EfficacyTeacherLoader": EfficacyTeacherLoader}
