"""Matching canonical LoRA layers to the weights of a model: each layer is validated against the exact target it
patches (a whole weight, or the rows of a fused weight that its slice covers), by name, shape, rank and
finiteness."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .convert import Conversion


@dataclass
class Validation:
    matched: list               # canonical bases that match a model weight in name and shape
    unmatched: dict             # canonical base or original key -> reason
    total: int                  # LoRA layers in the file (matched + unmatched)

    def of(self, prefix: str) -> list:
        return [b for b in self.matched if b.startswith(prefix)]


def layer_bases(canonical_sd: dict) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in canonical_sd})


def shape_problem(down: torch.Tensor, up: torch.Tensor, weight_shape: tuple) -> str | None:
    """Why up @ down cannot patch a weight of weight_shape, or None when it can."""
    rank = int(down.shape[0])
    out_dim, in_numel = int(weight_shape[0]), math.prod(weight_shape[1:])
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        return f"up {tuple(up.shape)} / down {tuple(down.shape)} are not LoRA matrices"
    if int(up.shape[1]) != rank:
        return f"up rank {int(up.shape[1])} != down rank {rank}"
    if int(up.shape[0]) != out_dim or down[0].numel() != in_numel:
        return (f"shape mismatch: LoRA up {tuple(up.shape)} x down {tuple(down.shape)} cannot patch the model's "
                f"weight {tuple(weight_shape)}")
    if down.ndim == 4 and len(weight_shape) == 4 and tuple(down.shape[2:]) != tuple(weight_shape[2:]):
        return f"kernel {tuple(down.shape[2:])} != the model's {tuple(weight_shape[2:])}"
    return None


def validate(conversion: Conversion, target_shapes: dict) -> Validation:
    """Match every canonical layer to a model weight (ComfyUI's key map -> weight shape), checking shapes, ranks
    and finiteness. Layers the conversion could not name are unmatched too."""
    sd = conversion.state_dict
    matched, unmatched = [], {}
    for base in layer_bases(sd):
        down, up = sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"]
        shape = target_shapes.get(base)
        if shape is None:
            unmatched[base] = "no such layer in this model"
            continue
        problem = shape_problem(down, up, tuple(shape))
        if problem is None and not (torch.isfinite(down).all() and torch.isfinite(up).all()
                                    and torch.isfinite(sd[base + ".alpha"])):
            problem = "NaN or infinite values"
        if problem:
            unmatched[base] = problem
        else:
            matched.append(base)
    for key, why in conversion.unconverted.items():
        unmatched[key] = why
    return Validation(matched, unmatched, len(matched) + len(unmatched))
