"""Grouping a LoRA state dict into layers: every supported key spelling, with its format and its component.

Spellings:
  kohya               lora_unet_<module '_'-joined>.lora_up.weight / .lora_down.weight / .alpha, lora_te[12]_...
  comfyui-native      diffusion_model.<ldm module>.lora_up.weight / .lora_down.weight / .alpha
  diffusers-old       unet.<...>.processor.to_q_lora.up.weight, text_encoder.<...>.q_proj.lora_linear_layer.up...
  diffusers           unet.<module>.lora.up.weight / .lora.down.weight
  peft                <prefix><module>.lora_B.weight / .lora_A.weight (prefix unet., transformer., text_encoder.,
                      text_encoder_2., base_model.model. or none)
  onetrainer          lora_transformer_<diffusers transformer module '_'-joined>.lora_up.weight / ...
T5 layers (lora_te3_) and the weights of other adapter kinds (LoHa, LoKr, DoRA, OFT, weight differences) are
recognised and reported, never silently dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .names import (ALPHA, DOWN, FMT_DIFFUSERS, FMT_DIFFUSERS_OLD, FMT_KOHYA, FMT_NATIVE, FMT_ONETRAINER, FMT_PEFT,
                    TE, TE2, UNET, UP)

# First path segments of a diffusers UNet module / of an HF CLIP text model module.
UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding",
              "conv_norm_out", "class_embedding")
TE_ROOTS = ("text_model", "text_projection")
# First path segments of a diffusers SD3 / Flux transformer module.
DIT_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed",
             "norm_out", "proj_out", "pos_embed")

# Dotted formats: key suffix -> (part, format). Longest first so `.lora_B.default.weight` wins over shorter ones.
_DOTTED_SUFFIXES = (
    (".lora_linear_layer.up.weight", UP, FMT_DIFFUSERS_OLD),
    (".lora_linear_layer.down.weight", DOWN, FMT_DIFFUSERS_OLD),
    (".lora_B.default.weight", UP, FMT_PEFT),
    (".lora_A.default.weight", DOWN, FMT_PEFT),
    ("_lora.up.weight", UP, FMT_DIFFUSERS_OLD),
    ("_lora.down.weight", DOWN, FMT_DIFFUSERS_OLD),
    (".lora.up.weight", UP, FMT_DIFFUSERS),
    (".lora.down.weight", DOWN, FMT_DIFFUSERS),
    (".lora_B.weight", UP, FMT_PEFT),
    (".lora_A.weight", DOWN, FMT_PEFT),
    (".alpha", ALPHA, None),
)
_KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2|te)_(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
# OneTrainer's SD3 / Flux LoRAs: diffusers transformer names, flattened ('.' -> '_').
_ONETRAINER_KEY = re.compile(r"^lora_transformer_(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
NATIVE_KEY = re.compile(r"^diffusion_model\.(.+)\.(lora_up\.weight|lora_down\.weight|alpha)$")
_KOHYA_PART = {"lora_up.weight": UP, "lora_down.weight": DOWN, "alpha": ALPHA}
# Weights of other adapter kinds: named in the error so the user knows why they are not applied.
_OTHER_ADAPTERS = {
    ".lora_mid.weight": "LoCon Tucker (lora_mid)", ".dora_scale": "DoRA (dora_scale)", ".hada_": "LyCORIS LoHa",
    ".lokr_": "LyCORIS LoKr", ".oft_": "OFT", ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
}
_OTHER_SUFFIXES = {".diff": "full weight difference (.diff)", ".diff_b": "bias difference (.diff_b)",
                   ".set_weight": "weight replacement (.set_weight)", ".w_norm": "norm weight (.w_norm)",
                   ".b_norm": "norm bias (.b_norm)"}
# Old diffusers attention-processor names -> module names, in the UNet and in CLIP.
_OLD_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# How a layer's module path is written (the second element of a layer id).
NAMING_DIFFUSERS = "diffusers"            # dotted diffusers UNet / transformer or HF CLIP path
NAMING_KOHYA = "kohya"                    # '_'-joined, diffusers or ldm names
NAMING_LDM = "ldm"                        # dotted ldm path (ComfyUI-native)
NAMING_FLAT_DIFFUSERS = "flat-diffusers"  # '_'-joined diffusers transformer path (OneTrainer)


@dataclass
class ParsedLora:
    """A LoRA state dict grouped into layers, still in its own naming.

    layers: (component, naming, module) -> {"up", "down", "alpha"}; component is unet / te (unspecified text
    encoder) / te1 / te2; naming is one of the NAMING_* values.
    """
    layers: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)         # format label -> number of keys
    sources: dict = field(default_factory=dict)         # layer id -> one original key (for messages)
    unrecognised: dict = field(default_factory=dict)    # key -> reason
    other_adapters: dict = field(default_factory=dict)  # key -> adapter kind, for keys of non-LoRA adapters

    @property
    def format(self) -> str:
        return " + ".join(sorted(self.formats)) or "none"


def _component_of_dotted(path: str):
    """Strip PEFT/diffusers prefixes: (component, module path, prefix label) or None."""
    prefix = ""
    if path.startswith("base_model.model."):
        prefix, path = "base_model.model.", path[len("base_model.model."):]
    for p, comp in (("unet.", UNET), ("text_encoder_2.", TE2), ("text_encoder.", TE)):
        if path.startswith(p):
            return comp, path[len(p):], prefix + p
    if path.startswith("transformer."):
        return UNET, path[len("transformer."):], prefix + "transformer."
    root = path.split(".", 1)[0]
    if root in UNET_ROOTS or root in DIT_ROOTS:
        return UNET, path, prefix
    if root in TE_ROOTS:
        return TE, path, prefix
    return None


def _normalise_dotted_module(module: str, component: str) -> str:
    """Old diffusers attention-processor names -> module names (`attn1.processor.to_q` -> `attn1.to_q`)."""
    if module.endswith("_lora"):
        module = module[:-len("_lora")]
    if module.endswith(".lora"):
        module = module[:-len(".lora")]
    head, _, last = module.rpartition(".")
    if component == UNET and head.endswith(".processor") and last in _OLD_ATTN:
        return head[:-len(".processor")] + "." + _OLD_ATTN[last]
    if component != UNET and head.endswith("self_attn") and last in _OLD_TE_ATTN:
        return head + "." + _OLD_TE_ATTN[last]
    return module


def _other_adapter(key: str):
    for marker, what in _OTHER_ADAPTERS.items():
        if marker in key:
            return what
    for suffix, what in _OTHER_SUFFIXES.items():
        if key.endswith(suffix):
            return what
    return None


def parse_lora(state_dict: dict) -> ParsedLora:
    """Group a LoRA state dict into layers, recognising every supported key spelling (see the module docstring)."""
    parsed = ParsedLora()

    def add(fmt, component, naming, module, part, key):
        layer = (component, naming, module)
        parts = parsed.layers.setdefault(layer, {})
        if part in parts:
            parsed.unrecognised[key] = f"a second {part} weight for layer {module!r}"
            return
        parts[part] = state_dict[key]
        parsed.sources.setdefault(layer, key)
        if fmt is not None:
            parsed.formats[fmt] = parsed.formats.get(fmt, 0) + 1

    for key in state_dict:
        if not isinstance(key, str):
            parsed.unrecognised[str(key)] = "not a string key"
            continue
        m = _KOHYA_KEY.match(key)
        if m:
            comp, body, part = m.groups()
            add(FMT_KOHYA, comp, NAMING_KOHYA, body, _KOHYA_PART[part], key)
            continue
        m = NATIVE_KEY.match(key)
        if m:
            add(FMT_NATIVE, UNET, NAMING_LDM, m.group(1), _KOHYA_PART[m.group(2)], key)
            continue
        if key.startswith("lora_te3_"):
            parsed.unrecognised[key] = ("a T5-XXL text-encoder layer (lora_te3_): this loader applies transformer, "
                                        "UNet and CLIP layers only")
            continue
        m = _ONETRAINER_KEY.match(key)
        if m:
            add(FMT_ONETRAINER, UNET, NAMING_FLAT_DIFFUSERS, m.group(1), _KOHYA_PART[m.group(2)], key)
            continue
        other = _other_adapter(key)
        if other:
            parsed.other_adapters[key] = other
            parsed.unrecognised[key] = f"{other} weights are not plain LoRA"
            continue
        for suffix, part, fmt in _DOTTED_SUFFIXES:
            if key.endswith(suffix):
                where = _component_of_dotted(key[:-len(suffix)])
                if where is None:
                    parsed.unrecognised[key] = "unknown module prefix (expected unet., transformer., text_encoder., " \
                                               "text_encoder_2., base_model.model. or a diffusers module path)"
                    break
                comp, module, prefix = where
                module = _normalise_dotted_module(module, comp)
                label = None if fmt is None else (f"{fmt} (keys under {prefix!r})" if prefix.startswith("base_")
                                                  else fmt)
                add(label, comp, NAMING_DIFFUSERS, module, part, key)
                break
        else:
            parsed.unrecognised[key] = "not a LoRA weight name"
    return parsed
