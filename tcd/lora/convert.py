"""Rewriting parsed LoRA layers to the canonical form, the one form the pack's loader hands to ComfyUI and its
trainers save.

    lora_unet_<diffusers UNet module path, '.' -> '_'>.lora_down.weight   [rank, in]  or [rank, in, k, k]
    lora_unet_<...>.lora_up.weight                                         [out, rank] or [out, rank, 1, 1]
    lora_unet_<...>.alpha                                                  0-dim float32; scale = alpha / rank
    lora_te_<HF CLIP module path '_'-joined>.*    text encoder of SD1.x / SD2.x
    lora_te1_<...>.*, lora_te2_<...>.*            SDXL's CLIP-L / CLIP-bigG

This is kohya's layout with diffusers module names, the spelling of kohya sd-scripts' SD1.x LoRAs. ComfyUI maps it
for every UNet weight (model_lora_keys_unet builds `lora_unet_` + each name of comfy.utils.unet_to_diffusers) and
for every CLIP attention/MLP weight (model_lora_keys_clip); diffusers' load_lora_weights converts it through
lora_conversion_utils._convert_non_diffusers_lora_to_diffusers.

One exception, SDXL's added-conditioning MLP (diffusers `add_embedding.linear_1` / `linear_2`): it is written with
its ldm name, `lora_unet_label_emb_0_0` / `lora_unet_label_emb_0_2`. diffusers' kohya converter
(_convert_unet_lora_key) removes the last `.<digit>` of any name containing "emb", which turns
`add_embedding.linear_1` into a module that does not exist; it maps `label_emb.0.0` explicitly, and ComfyUI maps
both spellings.

Flow transformers (SD3's MMDiT, Flux). ComfyUI keeps q, k and v fused in one weight (`img_attn.qkv`, Flux single
blocks' `linear1` = [q; k; v; mlp]); diffusers and PEFT files split them (`attn.to_q`, `attn.add_k_proj`,
`proj_mlp`). ComfyUI's key map (model_lora_keys_unet with comfy.utils.flux_to_diffusers / mmdit_to_diffusers) sends
each split diffusers module to its slice of the fused weight, and `norm_out.linear` through a scale/shift swap, but
only under the `transformer.` prefix (and, for SD3, `base_model.model.`). So the canonical form of a flow LoRA keeps
every layer under a name that map resolves, one name per layer:

    transformer.<diffusers module>.lora_down.weight / .lora_up.weight / .alpha   diffusers-named layers, any prefix
                                                     (`transformer.`, `base_model.model.`, none, OneTrainer's
                                                     `lora_transformer_` flattened names)
    lora_unet_<ldm module, '.' -> '_'>.*             ldm-named layers: kohya (`lora_unet_double_blocks_0_img_attn_qkv`,
                                                     `lora_unet_joint_blocks_0_x_block_attn_qkv`) and ComfyUI-native
                                                     (`diffusion_model.single_blocks.0.linear1.lora_up.weight`)

Text-encoder layers (CLIP-L, SD3's CLIP-G) take the SD canonical form above; T5 layers are not handled (reported,
never silently dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architecture import DIT_LDM_ROOTS, in_features
from .keys import NATIVE_KEY, NAMING_DIFFUSERS, NAMING_FLAT_DIFFUSERS, NAMING_LDM, ParsedLora, parse_lora
from .messages import fail, short_list
from .names import ALPHA, ARCH_UNKNOWN, DOWN, DUAL_CLIP, FLOW_ARCHITECTURES, TE, TE1, TE2, UNET, UP

# SDXL's added-conditioning MLP: written with its ldm name (see the module docstring).
SDXL_ADD_EMBEDDING_LDM = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SDXL_ADD_EMBEDDING_FLAT = {d.replace(".", "_"): ldm.replace(".", "_") for d, ldm in SDXL_ADD_EMBEDDING_LDM.items()}
# Underscored ldm (openaimodel) roots: a kohya SDXL LoRA names its UNet layers this way.
_LDM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


@dataclass
class Conversion:
    state_dict: dict            # canonical keys -> tensors
    layer_sources: dict         # canonical base -> one original key
    unconverted: dict           # original key -> reason


def canonical_unet_base(diffusers_module: str) -> str:
    """`lora_unet_` key base of a diffusers UNet module (SDXL add_embedding under its ldm name, see docstring)."""
    module = SDXL_ADD_EMBEDDING_LDM.get(diffusers_module, diffusers_module)
    return "lora_unet_" + module.replace(".", "_")


def canonical_te_base(component: str, hf_module: str) -> str:
    return f"lora_{component}_" + hf_module.replace(".", "_")


def _te_component(component: str, down: torch.Tensor | None, architecture: str) -> str:
    """lora_te (one CLIP) or lora_te1 / lora_te2 (SDXL, SD3: CLIP-L / bigG, told apart by width when unprefixed)."""
    if architecture not in DUAL_CLIP:
        return TE if component in (TE, TE1) else component
    if component == TE:
        return TE2 if down is not None and in_features(down) == 1280 else TE1
    return component


def _dit_base(naming: str, module: str, dit_flat: dict) -> tuple[str | None, str | None]:
    """(canonical base, None) of a flow-transformer layer (see the module docstring), or (None, reason).

    dit_flat: flattened diffusers module name -> dotted name, for the model's transformer (OneTrainer's names and
    kohya files written with diffusers names are flattened, and '_' is ambiguous inside module names)."""
    if naming == NAMING_DIFFUSERS:
        return "transformer." + module, None
    if naming == NAMING_LDM:
        return "lora_unet_" + module.replace(".", "_"), None
    if naming == NAMING_FLAT_DIFFUSERS or not module.startswith(DIT_LDM_ROOTS):
        dotted = dit_flat.get(module)
        if dotted is None:
            return None, f"the model has no transformer module named {module!r}"
        return "transformer." + dotted, None
    return "lora_unet_" + module, None


def _unet_base(naming: str, module: str, architecture: str, ldm_flat: dict) -> tuple[str | None, str | None]:
    """(canonical base, None) of a UNet layer, or (None, reason)."""
    if naming == NAMING_FLAT_DIFFUSERS:
        return None, f"OneTrainer transformer layer {module!r}: the model is {architecture}, not SD3 / Flux"
    if naming == NAMING_DIFFUSERS:
        return canonical_unet_base(module), None
    if naming == NAMING_LDM or module.startswith(_LDM_ROOTS):
        flat = module.replace(".", "_")
        if not ldm_flat:
            return None, "ldm layer names need the model's ldm -> diffusers table"
        if flat not in ldm_flat:
            return None, f"the model has no UNet layer named {module!r}"
        return canonical_unet_base(ldm_flat[flat]), None
    # kohya with diffusers names; diffusers' own spelling of add_embedding gets the ldm name
    return "lora_unet_" + _SDXL_ADD_EMBEDDING_FLAT.get(module, module), None


def to_canonical(parsed: ParsedLora, architecture: str, ldm_to_diffusers: dict | None = None,
                 dit_modules=None) -> Conversion:
    """Rewrite parsed layers to the canonical form.

    A missing alpha becomes alpha = rank (scale 1.0: how diffusers and ComfyUI apply a LoRA without alpha).
    ldm names (ComfyUI-native `diffusion_model.*`, kohya SDXL `lora_unet_input_blocks_*`) need the model's
    ldm -> diffusers module table (tcd.backend.unet_ldm_to_diffusers). For SD3 / Flux, dit_modules lists the
    model's diffusers transformer module names (to read flattened ones back).
    """
    ldm_flat = {k.replace(".", "_"): v for k, v in (ldm_to_diffusers or {}).items()}
    dit_flat = {m.replace(".", "_"): m for m in (dit_modules or ())}
    flow = architecture in FLOW_ARCHITECTURES
    out, sources, unconverted = {}, {}, dict(parsed.unrecognised)
    for layer, parts in parsed.layers.items():
        component, naming, module = layer
        src = parsed.sources[layer]
        if UP not in parts or DOWN not in parts:
            unconverted[src] = f"layer {module!r} has no {'up' if UP not in parts else 'down'} weight"
            continue
        up, down = parts[UP], parts[DOWN]
        if component == UNET and flow:
            base, why = _dit_base(naming, module, dit_flat)
        elif component == UNET:
            base, why = _unet_base(naming, module, architecture, ldm_flat)
        else:
            base, why = canonical_te_base(_te_component(component, down, architecture), module), None
        if base is None:
            unconverted[src] = why
            continue
        if base in sources:
            unconverted[src] = f"layer {base!r} appears twice (also as {sources[base]!r})"
            continue
        rank = int(down.shape[0])
        alpha = parts.get(ALPHA)
        alpha = torch.tensor(float(rank) if alpha is None else float(alpha.float().reshape(-1)[0]),
                             dtype=torch.float32)
        out[base + ".lora_down.weight"] = down
        out[base + ".lora_up.weight"] = up
        out[base + ".alpha"] = alpha
        sources[base] = src
    return Conversion(out, sources, unconverted)


def comfy_native_to_canonical(native_sd: dict, ldm_to_diffusers: dict, weight_shapes: dict | None = None) -> dict:
    """ComfyUI-native LoRA (TrainLoraNode: `diffusion_model.<ldm module>.lora_up.weight|lora_down.weight|alpha`)
    -> the canonical form.

    ldm_to_diffusers: ldm module -> diffusers module (tcd.backend.unet_ldm_to_diffusers). weight_shapes: ldm
    module -> base weight shape (tcd.backend.unet_weight_shapes); with it a convolution's flattened down weight
    [rank, in*k*k] (how ComfyUI's trainer stores it) is reshaped to [rank, in, k, k] and its up to
    [out, rank, 1, 1], the shapes diffusers/PEFT need (ComfyUI accepts both). Any other key is a ValueError.
    """
    bad = [k for k in native_sd if not NATIVE_KEY.match(str(k))]
    if bad:
        raise fail(f"these keys are not ComfyUI-native LoRA weights: {short_list(bad)}",
                   "Allowed: diffusion_model.<module>.lora_up.weight / .lora_down.weight / .alpha (bias and "
                   "norm differences (.diff, .diff_b) have no place in the canonical LoRA form)",
                   "Train LoRA weights only, or drop those keys before converting")
    conv = to_canonical(parse_lora(native_sd), ARCH_UNKNOWN, ldm_to_diffusers)
    if conv.unconverted:
        raise fail("cannot convert these ComfyUI-native keys: " + short_list(
                   f"{k} ({why})" for k, why in conv.unconverted.items()),
                   "Every module must be a UNet layer of the model the LoRA was trained on",
                   "Pass the ldm -> diffusers table of that model (tcd.backend.unet_ldm_to_diffusers)")
    out = dict(conv.state_dict)
    if weight_shapes:
        diffusers_to_ldm = {canonical_unet_base(d): ldm for ldm, d in ldm_to_diffusers.items()}
        for base in conv.layer_sources:
            shape = weight_shapes.get(diffusers_to_ldm.get(base, ""))
            if shape is not None and len(shape) == 4:
                down, up = out[base + ".lora_down.weight"], out[base + ".lora_up.weight"]
                if down.ndim == 2 and down.shape[1] == math.prod(shape[1:]):
                    out[base + ".lora_down.weight"] = down.reshape(down.shape[0], *shape[1:])
                if up.ndim == 2:
                    out[base + ".lora_up.weight"] = up.reshape(*up.shape, 1, 1)
    return out
