"""Alphas from diffusers' `lora_adapter_metadata`: the peft LoraConfig that diffusers >= 0.35 saves next to a
PEFT-format LoRA whose layers carry no `.alpha` tensors.

diffusers writes it as one JSON object in the safetensors metadata, each LoraConfig field under the name of the
model it belongs to (diffusers.loaders.lora_base._pack_dict_with_prefix): `{"unet.lora_alpha": 8, "unet.r": 4,
"unet.alpha_pattern": {"attn2.to_k": 1}, "transformer.lora_alpha": ..., "text_encoder.lora_alpha": ...}`. A layer's
alpha is the alpha_pattern entry that names it, else lora_alpha; its scale is alpha / rank. Without the metadata a
PEFT LoRA has scale 1 (alpha = rank), as diffusers loads it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .keys import NAMING_DIFFUSERS, ParsedLora
from .messages import fail
from .names import ALPHA, TE, TE1, TE2, UNET

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# The model names diffusers packs LoraConfig fields under, per component (a LoRA has a UNet or a transformer).
CONFIG_PREFIXES = {UNET: ("unet", "transformer"), TE: ("text_encoder",), TE1: ("text_encoder",),
                   TE2: ("text_encoder_2",)}
_ALL_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2")
ALLOWED = ("Allowed: the JSON object diffusers saves, with a number for each '<model>.lora_alpha' and an object "
           "of module name -> number for '<model>.alpha_pattern' (<model>: " + ", ".join(_ALL_PREFIXES) + ")")


class BadAdapterMetadata(ValueError):
    """The metadata is not the object diffusers writes; the message says what was found."""


@dataclass
class AdapterAlphas:
    lora_alpha: dict        # model prefix -> alpha
    alpha_pattern: dict     # model prefix -> {module name or suffix: alpha}

    def alpha_for(self, component: str, module: str) -> float | None:
        for prefix in CONFIG_PREFIXES[component]:
            pattern = self.alpha_pattern.get(prefix, {})
            alpha = next((v for k, v in pattern.items() if module == k or module.endswith("." + k)), None)
            if alpha is None:
                alpha = self.lora_alpha.get(prefix)
            if alpha is not None:
                return alpha
        return None


@dataclass
class MetadataAlphas:
    filled: int             # layers whose alpha came from the metadata
    warning: str | None     # why the metadata was ignored, when it was unusable but not needed


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadAdapterMetadata(f"{where} is {json.dumps(value)[:60]}, not a finite number")
    return float(value)


def read_adapter_alphas(raw: str) -> AdapterAlphas:
    """The alphas in a `lora_adapter_metadata` string; BadAdapterMetadata naming the first thing that is wrong."""
    if not isinstance(raw, str):     # safetensors metadata is text; a caller may hand over a parsed object
        raise BadAdapterMetadata(f"it is a {type(raw).__name__}, not JSON text")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadAdapterMetadata(f"it is not valid JSON ({e}): {raw[:60]!r}") from None
    if not isinstance(config, dict):
        raise BadAdapterMetadata(f"it is a JSON {type(config).__name__} ({raw[:60]!r}), not an object")
    alphas = AdapterAlphas({}, {})
    for prefix in _ALL_PREFIXES:
        if f"{prefix}.lora_alpha" in config:
            alphas.lora_alpha[prefix] = _number(config[f"{prefix}.lora_alpha"], f"'{prefix}.lora_alpha'")
        pattern = config.get(f"{prefix}.alpha_pattern")
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise BadAdapterMetadata(f"'{prefix}.alpha_pattern' is {json.dumps(pattern)[:60]}, not an object")
        alphas.alpha_pattern[prefix] = {str(k): _number(v, f"'{prefix}.alpha_pattern'[{k!r}]")
                                        for k, v in pattern.items()}
    return alphas


def apply_peft_metadata_alphas(parsed: ParsedLora, metadata: dict | None, lora_name: str = "this LoRA"
                               ) -> MetadataAlphas:
    """Fill the missing alphas of diffusers-named layers from `lora_adapter_metadata`, when the file has it.

    Unusable metadata is a ValueError when some layer needs it (its scale would be a guess), and a warning when
    every layer carries its own alpha (the metadata changes nothing)."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return MetadataAlphas(0, None)
    needing = [layer for layer, parts in parsed.layers.items() if ALPHA not in parts and layer[1] == NAMING_DIFFUSERS]
    try:
        alphas = read_adapter_alphas(raw)
    except BadAdapterMetadata as e:
        if not needing:
            return MetadataAlphas(0, f"{ADAPTER_METADATA_KEY} ignored ({e}): every layer has its own alpha, so the "
                                     f"scale does not depend on it")
        raise fail(f"the {ADAPTER_METADATA_KEY} of {lora_name} cannot be used: {e}", ALLOWED,
                   f"{len(needing)} layers have no alpha of their own, so their scale (alpha / rank) comes from it. "
                   f"Get the file again, or fix or remove that metadata entry (without it those layers get "
                   f"alpha = rank, scale 1.0)") from None
    filled = 0
    for layer in needing:
        component, _, module = layer
        alpha = alphas.alpha_for(component, module)
        if alpha is not None:
            parsed.layers[layer][ALPHA] = torch.tensor(alpha, dtype=torch.float32)
            filled += 1
    return MetadataAlphas(filled, None)
