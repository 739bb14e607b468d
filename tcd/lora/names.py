"""Names the LoRA modules share: base architectures, key formats, layer components and parts, the family key."""
from __future__ import annotations

# Key formats, as the loader's info output names them.
FMT_KOHYA = "kohya"
FMT_NATIVE = "comfyui-native"
FMT_DIFFUSERS_OLD = "diffusers-old"
FMT_DIFFUSERS = "diffusers"
FMT_PEFT = "peft"
FMT_ONETRAINER = "onetrainer"

ARCH_SD1, ARCH_SD2, ARCH_SDXL, ARCH_UNKNOWN = "SD1.x", "SD2.x", "SDXL", "unknown"
ARCH_SD3, ARCH_FLUX = "SD3", "Flux"
UNET_ARCHITECTURES = (ARCH_SD1, ARCH_SD2, ARCH_SDXL)
FLOW_ARCHITECTURES = (ARCH_SD3, ARCH_FLUX)
ARCHITECTURES = UNET_ARCHITECTURES + FLOW_ARCHITECTURES
# Models with two CLIP text encoders (lora_te1 = CLIP-L, lora_te2 = the wider one).
DUAL_CLIP = (ARCH_SDXL, ARCH_SD3)
# Width of the text context that cross-attention reads (= unet_config["context_dim"] in ComfyUI).
CONTEXT_DIM = {768: ARCH_SD1, 1024: ARCH_SD2, 2048: ARCH_SDXL}
# Hidden width of a text-encoder LoRA layer -> which CLIP it belongs to.
TEXT_WIDTH = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "CLIP-bigG"}

# The parts of one LoRA layer, and the components a layer belongs to: the diffusion model (UNet or flow
# transformer), one text encoder (lora_te), or SDXL's / SD3's first and second CLIP (lora_te1 / lora_te2).
UP, DOWN, ALPHA = "up", "down", "alpha"
UNET, TE, TE1, TE2 = "unet", "te", "te1", "te2"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# Where the alphas of a plan come from (the loader's info names them).
ALPHA_FROM_KEYS = "keys"                    # the file's own `.alpha` tensors
ALPHA_FROM_ADAPTER_METADATA = "metadata"    # diffusers' lora_adapter_metadata (the saved peft LoraConfig)
ALPHA_NONE = "none"                         # no alpha anywhere: alpha = rank, scale 1.0

# The pack's trainers write this metadata key (TCD_FAMILY or "LCM LoRA"); tcd.presets reads it back.
METADATA_FAMILY_KEY = "tcd.family"
TCD_FAMILY = "TCD LoRA"
