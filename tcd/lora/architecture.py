"""Which base model a LoRA was made for, read from shapes and layer names, never from file names.

The cross-attention key/value projections (attn2.to_k, attn2.to_v) take the text context: 768 wide for SD1.x
(CLIP-L), 1024 for SD2.x (OpenCLIP-H), 2048 for SDXL (CLIP-L + bigG). Text-encoder layers are 768 (CLIP-L), 1024
(OpenCLIP-H) or 1280 (bigG) wide. Flow transformers are told apart by their layer names (Flux: double/single
stream blocks, guidance embedding; SD3: joint blocks, patch-embedding convolution); layers both share
(`transformer_blocks.N.attn.to_q`) leave the model's names and shapes to decide.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .keys import DIT_ROOTS, NAMING_DIFFUSERS, NAMING_FLAT_DIFFUSERS, ParsedLora
from .messages import fail
from .names import (ARCH_FLUX, ARCH_SD2, ARCH_SD3, ARCH_SDXL, ARCH_UNKNOWN, ARCHITECTURES, CONTEXT_DIM, DOWN,
                    FLOW_ARCHITECTURES, TE2, TEXT_WIDTH, UNET, UNET_ARCHITECTURES)

# ldm (ComfyUI / BFL / SAI) names of flow transformer layers, '.' -> '_', and what each root tells: Flux's double /
# single stream blocks and embedders, SD3's joint blocks and embedders. `final_layer_` exists in both.
FLUX_LDM_ROOTS = ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_")
SD3_LDM_ROOTS = ("joint_blocks_", "x_embedder_", "t_embedder_", "y_embedder_", "context_embedder")
DIT_LDM_ROOTS = FLUX_LDM_ROOTS + SD3_LDM_ROOTS + ("final_layer_",)
# diffusers module names only one of the two has.
_FLUX_DIFFUSERS_ROOTS = tuple(r.replace(".", "_") for r in ("single_transformer_blocks",
                                                             "time_text_embed.guidance_embedder", "x_embedder"))
_SD3_DIFFUSERS_ROOTS = ("pos_embed",)
_SHARED_DIT = "dit"    # a transformer layer SD3 and Flux both have
_EVIDENCE = {ARCH_FLUX: "Flux transformer layers (double/single stream blocks, guidance embedding)",
             ARCH_SD3: "SD3 transformer layers (joint blocks, patch embedding)"}


class Verdict(enum.Enum):
    FOUND = "found"              # one architecture: Architecture.name
    UNDECIDED = "undecided"      # nothing to read a width or a family from: the model's names and shapes decide
    CONFLICTING = "conflicting"  # layers of several architectures in one file
    FOREIGN = "foreign"          # a width no supported architecture has


@dataclass
class Architecture:
    name: str           # one of ARCHITECTURES, or ARCH_UNKNOWN
    evidence: str       # what the name was read from, or why none could be
    verdict: Verdict = Verdict.FOUND


def in_features(t: torch.Tensor) -> int:
    return int(t.shape[1]) if t.ndim >= 2 else -1


def _dit_vote(naming: str, module: str):
    """ARCH_FLUX / ARCH_SD3 when a diffusion-model layer name belongs to one flow transformer only, _SHARED_DIT when
    it is a transformer layer both share, None for UNet names."""
    flat = module.replace(".", "_")
    if naming in (NAMING_DIFFUSERS, NAMING_FLAT_DIFFUSERS):
        dotted = module if naming == NAMING_DIFFUSERS else None
        if dotted is not None and dotted.split(".", 1)[0] not in DIT_ROOTS:
            return None
        if flat.startswith(_FLUX_DIFFUSERS_ROOTS):
            return ARCH_FLUX
        if flat.startswith(_SD3_DIFFUSERS_ROOTS):
            return ARCH_SD3
        return _SHARED_DIT if dotted is not None or flat.startswith(DIT_ROOTS) else None
    if flat.startswith(FLUX_LDM_ROOTS):
        return ARCH_FLUX
    if flat.startswith(SD3_LDM_ROOTS):
        return ARCH_SD3
    return _SHARED_DIT if flat.startswith(DIT_LDM_ROOTS) else None


def _layer_evidence(parsed: ParsedLora):
    """(votes: architecture -> reasons, cross-attention context widths, text-encoder widths, whether a flow
    transformer layer both SD3 and Flux have was seen) from the file's layer names and shapes."""
    votes: dict[str, list[str]] = {}
    contexts, widths = set(), set()
    shared_dit = False
    dual_clip = []
    for (comp, naming, module), parts in parsed.layers.items():
        down = parts.get(DOWN)
        if down is None:
            continue
        flat = module.replace(".", "_")
        if comp == UNET:
            dit = _dit_vote(naming, module)
            if dit == _SHARED_DIT:
                shared_dit = True
            elif dit is not None:
                votes.setdefault(dit, []).append(_EVIDENCE[dit])
            elif flat.endswith(("attn2_to_k", "attn2_to_v")):
                contexts.add(in_features(down))
            elif flat.startswith(("add_embedding", "label_emb")):
                votes.setdefault(ARCH_SDXL, []).append("added-conditioning embedding layers (SDXL only)")
        else:
            if comp == TE2:
                dual_clip.append("a second text encoder (lora_te2 / text_encoder_2)")
            if flat.endswith(("q_proj", "k_proj", "v_proj", "fc1")):
                widths.add(in_features(down))
    if dual_clip and not set(votes) & set(FLOW_ARCHITECTURES):     # SD3 has two CLIPs too
        votes.setdefault(ARCH_SDXL, []).extend(dual_clip)
    return votes, contexts, widths, shared_dit


def _foreign_width(contexts: set, widths: set) -> str | None:
    """Why the file is for none of the supported models, when a width says so."""
    for c in sorted(contexts):
        if c not in CONTEXT_DIM:
            return f"cross-attention context width {c} is not SD1.x (768), SD2.x (1024) or SDXL (2048)"
    for w in sorted(widths):
        if w not in TEXT_WIDTH:
            return f"text encoder width {w} is not CLIP-L/OpenCLIP-H/bigG"
    return None


def detect_architecture(parsed: ParsedLora) -> Architecture:
    """SD1.x / SD2.x / SDXL from shapes (cross-attention context width, text-encoder width) and SDXL-only names;
    SD3 / Flux from transformer layer names."""
    votes, contexts, widths, shared_dit = _layer_evidence(parsed)
    foreign = _foreign_width(contexts, widths)
    if foreign:
        return Architecture(ARCH_UNKNOWN, foreign, Verdict.FOREIGN)
    flow = bool(set(votes) & set(FLOW_ARCHITECTURES))
    for c in sorted(contexts):
        votes.setdefault(CONTEXT_DIM[c], []).append(f"cross-attention context {c}")
    if 1024 in widths:
        votes.setdefault(ARCH_SD2, []).append("text encoder width 1024 (OpenCLIP-H)")
    if 1280 in widths and not flow:     # SD3's CLIP-G is bigG too
        votes.setdefault(ARCH_SDXL, []).append("text encoder width 1280 (CLIP-bigG)")
    if shared_dit and (set(votes) & set(UNET_ARCHITECTURES)):
        votes.setdefault("SD3 or Flux", []).append("flow transformer layers (transformer_blocks)")
    if not votes:
        if shared_dit:
            why = "flow transformer layers that SD3 and Flux share (transformer_blocks); the model's layer names " \
                  "and shapes decide"
        elif 768 in widths:
            why = "only CLIP-L text-encoder layers (SD1.x or SDXL) and no cross-attention layers"
        else:
            why = "no cross-attention or text-encoder layers to read the width from"
        return Architecture(ARCH_UNKNOWN, why, Verdict.UNDECIDED)
    if len(votes) > 1:
        return Architecture(ARCH_UNKNOWN, "conflicting evidence: " + "; ".join(
            f"{a}: {', '.join(sorted(set(v)))}" for a, v in sorted(votes.items())), Verdict.CONFLICTING)
    (arch, why), = votes.items()
    return Architecture(arch, ", ".join(sorted(set(why))))


def check_architecture(lora_arch: Architecture, model_arch: str, lora_name: str = "this LoRA") -> None:
    """ValueError when the LoRA was made for another base model than the one it is applied to."""
    if model_arch not in ARCHITECTURES:
        raise fail(f"the model is {model_arch}", "The TCD LoRA loader handles SD1.x, SD2.x and SDXL UNet models "
                   "and the SD3 / Flux flow transformers", "Use ComfyUI's core LoraLoader for other model families")
    if lora_arch.verdict in (Verdict.CONFLICTING, Verdict.FOREIGN):
        raise fail(f"cannot tell which base model {lora_name} is for: {lora_arch.evidence}",
                   "A LoRA for SD1.x, SD2.x, SDXL, SD3 or Flux", "Check that the file is a LoRA for this model")
    if lora_arch.verdict is Verdict.UNDECIDED:
        return  # no width evidence: name and shape checks against the model still decide
    if lora_arch.name != model_arch:
        raise fail(f"{lora_name} is for {lora_arch.name} ({lora_arch.evidence}) but the model is {model_arch}",
                   f"A LoRA must be made for the model's architecture ({model_arch})",
                   f"Load an {lora_arch.name} checkpoint, or use an {model_arch} version of this LoRA")
