"""Flow-transformer (SD3 / Flux) LoRA files in every key format, built from the tiny models' real module names:
ComfyUI's own layer names (the tiny ComfyUI model's state dict) and diffusers' (a tiny diffusers
FluxTransformer2DModel / SD3Transformer2DModel of the same shape).

Every format of one set of random layers must patch the model exactly like the REFERENCE: the weight deltas
alpha / rank * up @ down placed by hand into ComfyUI's (ldm) weights and applied as plain `diff` patches. Where a
diffusers module is a slice of a fused ComfyUI weight (q / k / v of `qkv`, Flux single blocks' `linear1` =
[q; k; v; mlp]) or has its halves swapped (`norm_out.linear`: diffusers' AdaLayerNormContinuous emits (scale,
shift), the BFL / SAI final layers (shift, scale)), DIFFUSERS_TO_LDM below says so: it is written from those models'
layouts, independently of ComfyUI's key map, so the reference checks that map rather than repeating it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# (diffusers module regex, ldm module template, slice index in the fused weight or None, swap scale/shift halves).
# Slices are in units of the hidden size h, except Flux's proj_mlp (rows 3h .. 3h + mlp_ratio * h).
FLUX_TO_LDM = (
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{0}.img_attn.qkv", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{0}.txt_attn.qkv", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{0}.txt_attn.proj", None, False),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks.{0}.img_mod.lin", None, False),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks.{0}.txt_mod.lin", None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{0}.txt_mlp.0", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{0}.txt_mlp.2", None, False),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{0}.linear1", "qkv", False),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "single_blocks.{0}.linear1", "mlp", False),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.linear2", None, False),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks.{0}.modulation.lin", None, False),
    (r"x_embedder", "img_in", None, False),
    (r"context_embedder", "txt_in", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None, False),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None, False),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None, False),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None, False),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None, False),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, True),
    (r"proj_out", "final_layer.linear", None, False),
)
SD3_TO_LDM = (
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "joint_blocks.{0}.x_block.attn.qkv", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "joint_blocks.{0}.context_block.attn.qkv", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", "joint_blocks.{0}.x_block.attn2.qkv", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "joint_blocks.{0}.x_block.attn.proj", None, False),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", "joint_blocks.{0}.x_block.attn2.proj", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "joint_blocks.{0}.context_block.attn.proj", None, False),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "joint_blocks.{0}.x_block.adaLN_modulation.1", None, False),
    # the last joint block's context stream only conditions (pre-only): AdaLayerNormContinuous, (scale, shift)
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "joint_blocks.{0}.context_block.adaLN_modulation.1", None,
     "last"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "joint_blocks.{0}.x_block.mlp.fc1", None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "joint_blocks.{0}.x_block.mlp.fc2", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "joint_blocks.{0}.context_block.mlp.fc1", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "joint_blocks.{0}.context_block.mlp.fc2", None, False),
    (r"pos_embed\.proj", "x_embedder.proj", None, False),
    (r"context_embedder", "context_embedder", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", None, False),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", None, False),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", None, False),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, True),
    (r"proj_out", "final_layer.linear", None, False),
)

# format -> (carries alpha, naming). diffusers' own save_lora_weights writes PEFT keys (`lora_A` / `lora_B`) under
# `transformer.` without alpha; kohya sd-scripts' Flux / SD3 LoRAs use ldm names (`lora_unet_double_blocks_0_...`).
FORMATS = {
    "kohya": (True, "ldm"),
    "kohya no alpha": (False, "ldm"),
    "comfyui-native": (True, "ldm"),
    "peft transformer.": (False, "diffusers"),
    "peft transformer. + alpha": (True, "diffusers"),
    "diffusers transformer. .lora.up": (False, "diffusers"),
    "peft base_model.model.": (False, "diffusers"),
    "peft no prefix": (False, "diffusers"),
    "onetrainer": (True, "diffusers"),
}
# Formats core ComfyUI 0.3.75 loses layers of (its key map has no entry for the spelling), by architecture.
CORE_LOSES = {"Flux": {"peft base_model.model.", "peft no prefix"}, "SD3": {"peft no prefix"}}


@dataclass
class FlowLayer:
    diffusers: str | None       # diffusers module (diffusers-named layers)
    ldm: str                    # ComfyUI module it patches
    rows: tuple | None          # (offset, size) of the rows it patches in a fused weight, None for the whole weight
    swap: bool                  # its output halves are (scale, shift) where ComfyUI's are (shift, scale)
    shape: tuple                # shape of what it patches
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def diffusers_modules(kind: str) -> list:
    """(name, weight shape) of every Linear / Conv2d of a tiny diffusers transformer shaped like the tiny ComfyUI
    model (scripts/make_tiny_flow.py TINY_SD3 / TINY_FLUX)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    if kind == "flux":   # diffusers packs 2x2 patches into the channels: 16 * 4 = 64 inputs
        net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=768,
                                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    else:
        net = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                    num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128,
                                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=32,
                                    dual_attention_layers=(0,), qk_norm="rms_norm")
    return [(n, tuple(m.weight.shape)) for n, m in net.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def ldm_target(kind: str, module: str, hidden: int, depth: int, mlp_ratio: float = 4.0):
    """(ldm module, rows or None, swap) a diffusers module patches, from DIFFUSERS_TO_LDM."""
    for pattern, template, part, swap in (FLUX_TO_LDM if kind == "flux" else SD3_TO_LDM):
        m = re.fullmatch(pattern, module)
        if m is None:
            continue
        groups = m.groups()
        ldm = template.format(*groups)
        rows = None
        if part == "qkv":
            rows = ("qkv".index(groups[1]) * hidden, hidden)
        elif part == "mlp":
            rows = (3 * hidden, int(mlp_ratio * hidden))
        if swap == "last":
            swap = int(groups[0]) == depth - 1
        return ldm, rows, bool(swap)
    raise KeyError(f"no ComfyUI layer known for diffusers module {module!r}")


def _random_layer(shape, gen, rank, scale):
    out_dim, in_shape = shape[0], tuple(shape[1:])
    down = torch.randn((rank, *in_shape), generator=gen) / math.sqrt(math.prod(in_shape))
    up = torch.randn(out_dim, rank, generator=gen) * scale / math.sqrt(rank) / math.sqrt(math.prod(in_shape))
    if len(shape) == 4:
        up = up.reshape(out_dim, rank, 1, 1)
    return down, up


def make_layers(kind: str, model_patcher, naming: str, rank=4, alpha=2.0, seed=0, scale=0.5) -> list:
    """Random layers over every layer a `naming` ("ldm" or "diffusers") LoRA can target in the tiny model: each
    >= 2-D ComfyUI weight, or each diffusers Linear / Conv2d (checked to land on a ComfyUI weight of that shape)."""
    from tcd import backend
    gen = torch.Generator().manual_seed(seed)
    weights = backend.unet_weight_shapes(model_patcher)
    cfg = model_patcher.model.model_config.unet_config
    hidden = cfg.get("hidden_size") or 64 * cfg["depth"]
    layers = []
    if naming == "ldm":
        for ldm, shape in sorted(weights.items()):
            down, up = _random_layer(shape, gen, rank, scale)
            layers.append(FlowLayer(None, ldm, None, False, shape, down, up, alpha))
        return layers
    for module, shape in diffusers_modules(kind):
        ldm, rows, swap = ldm_target(kind, module, hidden, cfg["depth"], cfg.get("mlp_ratio", 4.0))
        target = weights[ldm]
        expected = target if rows is None else (rows[1], *target[1:])
        assert tuple(shape) == tuple(expected), (module, shape, ldm, target, rows)
        down, up = _random_layer(shape, gen, rank, scale)
        layers.append(FlowLayer(module, ldm, rows, swap, tuple(shape), down, up, alpha))
    return layers


def write_format(fmt: str, layers: list) -> dict:
    with_alpha, naming = FORMATS[fmt]
    sd = {}
    for ly in layers:
        up, down, alpha = ly.up.clone(), ly.down.clone(), torch.tensor(float(ly.alpha))
        if naming == "ldm":
            base = ("diffusion_model." + ly.ldm) if fmt == "comfyui-native" else "lora_unet_" + ly.ldm.replace(".", "_")
            if fmt == "comfyui-native":
                up, down = up.flatten(1), down.flatten(1)
            sd.update({base + ".lora_up.weight": up, base + ".lora_down.weight": down})
        elif fmt == "onetrainer":
            base = "lora_transformer_" + ly.diffusers.replace(".", "_")
            sd.update({base + ".lora_up.weight": up, base + ".lora_down.weight": down})
        else:
            prefix = {"peft base_model.model.": "base_model.model.", "peft no prefix": ""}.get(fmt, "transformer.")
            base = prefix + ly.diffusers
            if fmt.startswith("diffusers"):
                sd.update({base + ".lora.up.weight": up, base + ".lora.down.weight": down})
            else:
                sd.update({base + ".lora_B.weight": up, base + ".lora_A.weight": down})
        if with_alpha:
            sd[base + ".alpha"] = alpha
    return sd


def reference_patches(fmt: str, layers: list, weight_shapes: dict, strength: float = 1.0) -> dict:
    """`diffusion_model.<ldm>.weight` -> ("diff", (delta,)): the weight change every layer of `fmt` must make
    (alpha / rank * up @ down, or scale 1 without alpha, placed at its rows, halves swapped where needed).
    weight_shapes: ldm module -> full weight shape (tcd.backend.unet_weight_shapes)."""
    with_alpha, _ = FORMATS[fmt]
    deltas = {}
    for ly in layers:
        rank = ly.down.shape[0]
        scale = (ly.alpha / rank if with_alpha else 1.0) * strength
        delta = scale * (ly.up.flatten(1) @ ly.down.flatten(1)).reshape(ly.shape)
        if ly.swap:
            half = delta.shape[0] // 2
            delta = torch.cat([delta[half:], delta[:half]])
        key = "diffusion_model." + ly.ldm + ".weight"
        full = deltas.setdefault(key, torch.zeros(weight_shapes[ly.ldm]))
        offset, size = ly.rows if ly.rows is not None else (0, full.shape[0])
        full[offset:offset + size] += delta
    return {k: ("diff", (v,)) for k, v in deltas.items()}


def write_tiny_lora(kind: str, unet_file, path, naming: str = "ldm", seed: int = 0):
    """A LoRA for a tiny flow model written without ComfyUI (for the HTTP tests): kohya keys over every >= 2-D weight
    named in the model file's header (naming "ldm"), or PEFT `transformer.` keys over the same-shaped diffusers
    transformer's modules (naming "diffusers"). Returns the path."""
    from pathlib import Path
    from safetensors import safe_open
    from tcd.files import save_safetensors_atomic
    gen = torch.Generator().manual_seed(seed)
    if naming == "ldm":
        with safe_open(str(unet_file), framework="pt") as f:
            targets = [(k[:-len(".weight")], tuple(f.get_slice(k).get_shape())) for k in f.keys()
                       if k.endswith(".weight") and len(f.get_slice(k).get_shape()) >= 2]
        fmt = "kohya"
    else:
        targets, fmt = diffusers_modules(kind), "peft transformer."
    layers = []
    for name, shape in targets:
        down, up = _random_layer(shape, gen, 4, 0.3)
        layers.append(FlowLayer(name if naming != "ldm" else None, name, None, False, shape, down, up, 2.0))
    return save_safetensors_atomic(write_format(fmt, layers), Path(path))
