"""LoRA state dicts for SD1.x / SD2.x / SDXL and the flow-matching transformers SD3 / Flux: read safely, detect the
key format and the base architecture, convert to one canonical form, and validate it against the layers a model has.

Why this exists: ComfyUI 0.3.75's own key map (comfy.lora.model_lora_keys_unet) knows attention layers of a
diffusers-named LoRA only in the old `attn1.processor.to_q_lora` spelling, so new diffusers (`to_q.lora.down`) and
PEFT (`to_q.lora_A`) LoRAs lose every attention layer without a word, and `base_model.model.`-prefixed PEFT files
lose everything. TCD LoRAs are exported by diffusers. Here every known spelling is rewritten to one form that
ComfyUI maps completely, and every layer is either matched to a model weight (name and shape) or reported.

    names         architectures, key formats, layer components, alpha sources, the family metadata key
    messages      how a refusal is worded: what was given, what is allowed, what to do
    io            read_lora_file: safetensors only, a clear error for each kind of bad file; RecentFile
    keys          parse_lora: every key spelling -> layers (component, naming, module) -> up / down / alpha
    metadata      alphas from diffusers' lora_adapter_metadata
    architecture  detect_architecture / check_architecture: the base model, from shapes and layer names
    convert       to_canonical, comfy_native_to_canonical: the canonical form (described there)
    validate      every canonical layer matched to a model weight, or the reason it is not
    plan          plan_lora: all of the above for the loader

Pure torch + safetensors: no ComfyUI import here (tcd/backend.py supplies the model's names and shapes).
"""
from .architecture import Architecture, Verdict, check_architecture, detect_architecture
from .convert import Conversion, canonical_te_base, canonical_unet_base, comfy_native_to_canonical, to_canonical
from .io import RecentFile, read_lora_file
from .keys import ParsedLora, parse_lora
from .metadata import ADAPTER_METADATA_KEY, apply_peft_metadata_alphas
from .names import (ALPHA_FROM_ADAPTER_METADATA, ALPHA_FROM_KEYS, ALPHA_NONE, ARCH_FLUX, ARCH_SD1, ARCH_SD2,
                    ARCH_SD3, ARCH_SDXL, ARCH_UNKNOWN, ARCHITECTURES, CONTEXT_DIM, FLOW_ARCHITECTURES,
                    METADATA_FAMILY_KEY, TCD_FAMILY, UNET_ARCHITECTURES)
from .plan import ON_UNMATCHED, LoraPlan, plan_lora
from .validate import Validation, layer_bases, validate

__all__ = [
    "ADAPTER_METADATA_KEY", "ALPHA_FROM_ADAPTER_METADATA", "ALPHA_FROM_KEYS", "ALPHA_NONE", "ARCH_FLUX", "ARCH_SD1",
    "ARCH_SD2", "ARCH_SD3", "ARCH_SDXL", "ARCH_UNKNOWN", "ARCHITECTURES", "Architecture", "CONTEXT_DIM",
    "Conversion", "FLOW_ARCHITECTURES", "LoraPlan", "METADATA_FAMILY_KEY", "ON_UNMATCHED", "ParsedLora",
    "RecentFile", "TCD_FAMILY", "UNET_ARCHITECTURES", "Validation", "Verdict", "apply_peft_metadata_alphas",
    "canonical_te_base", "canonical_unet_base", "check_architecture", "comfy_native_to_canonical",
    "detect_architecture", "layer_bases", "parse_lora", "plan_lora", "read_lora_file", "to_canonical", "validate",
]
