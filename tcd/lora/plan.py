"""Everything between reading a LoRA file and handing it to ComfyUI: parse, fill alphas, check the architecture,
convert, validate; a ValueError for each problem, with what was given, what is allowed and what to do."""
from __future__ import annotations

from dataclasses import dataclass, field

from .architecture import Architecture, check_architecture, detect_architecture
from .convert import Conversion, to_canonical
from .keys import ParsedLora, parse_lora
from .messages import fail, short_list
from .metadata import apply_peft_metadata_alphas
from .names import ALPHA, ALPHA_FROM_ADAPTER_METADATA, ALPHA_FROM_KEYS, ALPHA_NONE, LORA_SUFFIXES
from .validate import Validation, validate

ON_UNMATCHED = ("error", "warn")


@dataclass
class LoraPlan:
    name: str
    format: str
    lora_arch: Architecture
    model_arch: str
    family: object              # tcd.presets.Detection: the few-step family the file names, if any
    state_dict: dict            # canonical, only the matched layers (what goes to ComfyUI)
    validation: Validation
    unet_layers: int            # matched diffusion-model layers (UNet or flow transformer)
    te_layers: int              # matched text-encoder layers
    te_skipped: int             # text-encoder layers in the file, not applied because no CLIP is connected
    alpha_source: str           # ALPHA_FROM_KEYS / ALPHA_FROM_ADAPTER_METADATA / ALPHA_NONE
    warnings: list = field(default_factory=list)    # problems that did not stop the load


def plan_lora(state_dict: dict, metadata: dict, name: str, model_arch: str, ldm_to_diffusers: dict,
              target_shapes: dict, has_clip: bool, on_unmatched: str = "error") -> LoraPlan:
    """The canonical, validated LoRA for a model, or a ValueError: not a LoRA, unusable adapter metadata, wrong
    architecture, unmatched layers (unless on_unmatched='warn': they are then left out)."""
    if on_unmatched not in ON_UNMATCHED:
        raise fail(f"on_unmatched={on_unmatched!r}", f"Allowed: {', '.join(ON_UNMATCHED)}", "Pick one of them")
    parsed = parse_lora(state_dict)
    if not parsed.layers:
        raise ValueError(not_a_lora_message(name, state_dict, parsed))
    from_metadata = apply_peft_metadata_alphas(parsed, metadata, repr(name))
    lora_arch = detect_architecture(parsed)
    check_architecture(lora_arch, model_arch, repr(name))
    dit_modules = [k[len("transformer."):] for k in target_shapes if k.startswith("transformer.")]
    conversion = to_canonical(parsed, model_arch, ldm_to_diffusers, dit_modules)
    te_skipped = 0 if has_clip else _drop_text_encoder_layers(conversion)
    validation = validate(conversion, target_shapes)
    if validation.unmatched and on_unmatched == "error":
        raise ValueError(unmatched_message(name, validation, model_arch))
    keep = {base + suffix: conversion.state_dict[base + suffix] for base in validation.matched
            for suffix in LORA_SUFFIXES}
    from ..presets import detect_family   # here, not at the top: tcd.presets imports this package's names
    return LoraPlan(name=name, format=parsed.format, lora_arch=lora_arch, model_arch=model_arch,
                    family=detect_family(metadata, name, model_arch), state_dict=keep, validation=validation,
                    unet_layers=len(validation.of("lora_unet_")) + len(validation.of("transformer.")),
                    te_layers=len(validation.of("lora_te")), te_skipped=te_skipped,
                    alpha_source=_alpha_source(parsed, from_metadata.filled),
                    warnings=[from_metadata.warning] if from_metadata.warning else [])


def _drop_text_encoder_layers(conversion: Conversion) -> int:
    """Without a CLIP the text-encoder layers cannot be matched: they are left out and counted, not errors."""
    te_bases = [b for b in conversion.layer_sources if b.startswith("lora_te")]
    for base in te_bases:
        for suffix in LORA_SUFFIXES:
            conversion.state_dict.pop(base + suffix)
        conversion.layer_sources.pop(base)
    return len(te_bases)


def _alpha_source(parsed: ParsedLora, filled_from_metadata: int) -> str:
    if filled_from_metadata:
        return ALPHA_FROM_ADAPTER_METADATA
    if any(parts.get(ALPHA) is not None for parts in parsed.layers.values()):
        return ALPHA_FROM_KEYS
    return ALPHA_NONE


def unmatched_message(lora_name: str, validation: Validation, model_arch: str) -> str:
    items = [f"{k} ({why})" for k, why in validation.unmatched.items()]
    return (f"{len(validation.unmatched)} of {validation.total} layers of {lora_name!r} do not match the "
            f"{model_arch} model: {short_list(items, 10)}. All LoRA layers must match a model weight by name and "
            f"shape. Check that the LoRA is for this model, or set on_unmatched to 'warn' to apply only the "
            f"matching layers")


def not_a_lora_message(lora_name: str, state_dict: dict, parsed: ParsedLora) -> str:
    keys = list(state_dict)
    hint = ""
    kinds = sorted(set(parsed.other_adapters.values()))
    if kinds:
        hint = (f" It holds {', '.join(kinds)} weights: this loader applies plain LoRA (up/down/alpha); load it with "
                f"ComfyUI's core LoraLoader instead.")
    elif any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        hint = " It looks like a full checkpoint: load it with a checkpoint loader."
    elif any(k.startswith(("down_blocks.", "encoder.", "decoder.")) and "lora" not in k for k in keys):
        hint = " It looks like a diffusers model or VAE, not a LoRA."
    return (f"{lora_name!r} is not a LoRA: none of its {len(keys)} keys is a LoRA weight "
            f"(e.g. {short_list(keys, 3) or 'no tensors at all'}).{hint} Allowed: kohya lora_unet_/lora_te_, "
            f"diffusers (.lora.up/.lora.down, processor.to_q_lora), PEFT (lora_A/lora_B), ComfyUI-native "
            f"diffusion_model.*.lora_up. Choose a LoRA file")
