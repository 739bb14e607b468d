"""LoRA state dicts in every key format, for real models (the tiny SD1.5 checkpoint, an in-process tiny SDXL).

One set of random LoRA layers (`make_layers`) is written in each format (`write_format`); the same layers in kohya
form with the alpha each format implies (`kohya_reference`) are the reference every format must reproduce.
Needs ComfyUI imported (the `pack` fixture) for the model helpers; the writers are plain torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (label, carries alpha, includes text-encoder layers)
FORMATS = {
    "kohya": (True, True),
    "kohya (ldm names)": (True, True),
    "comfyui-native": (True, False),
    "diffusers-old": (False, True),
    "diffusers": (False, True),
    "peft unet.": (False, True),
    "peft unet. + alpha": (True, True),
    "peft base_model.model.": (False, False),
    "peft no prefix": (False, False),
}
CLIP_MAP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
_OLD_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_OLD_TE = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


@dataclass
class Layer:
    component: str          # unet / te / te1 / te2
    module: str             # diffusers UNet path or HF CLIP path
    ldm: str | None         # ldm module path (UNet only)
    shape: tuple            # the base weight's shape
    down: torch.Tensor      # [rank, in] or [rank, in, k, k]
    up: torch.Tensor        # [out, rank] or [out, rank, 1, 1]
    alpha: float


def make_layers(unet_layers, te_layers=(), rank=4, alpha=2.0, seed=0, scale=0.5):
    """Random LoRA layers for (diffusers module, ldm module, shape) UNet targets and (component, HF module, shape)
    text-encoder targets. The delta of each layer has a size comparable to `scale` x the base weight's."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for comp, module, ldm, shape in ([("unet", d, l, s) for d, l, s in unet_layers]
                                     + [(c, m, None, s) for c, m, s in te_layers]):
        out_dim, in_shape = shape[0], tuple(shape[1:])
        down = torch.randn((rank, *in_shape), generator=g) / math.sqrt(math.prod(in_shape))
        up = torch.randn(out_dim, rank, generator=g) * scale / math.sqrt(rank) / math.sqrt(math.prod(in_shape))
        if len(shape) == 4:
            up = up.reshape(out_dim, rank, 1, 1)
        layers.append(Layer(comp, module, ldm, tuple(shape), down, up, alpha))
    return layers


def _flat(module):
    return module.replace(".", "_")


def kohya_base(layer, ldm_names=False):
    if layer.component == "unet":
        name = layer.ldm if ldm_names else {"add_embedding.linear_1": "label_emb.0.0",
                                            "add_embedding.linear_2": "label_emb.0.2"}.get(layer.module, layer.module)
        return "lora_unet_" + _flat(name)
    return f"lora_{layer.component}_" + _flat(layer.module)


def _te_prefix(component):
    return {"te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}[component]


def write_format(fmt, layers):
    """The layers as a state dict in format `fmt` (a key of FORMATS)."""
    with_alpha, with_te = FORMATS[fmt]
    sd = {}
    for ly in layers:
        if ly.component != "unet" and not with_te:
            continue
        up, down, alpha = ly.up.clone(), ly.down.clone(), torch.tensor(float(ly.alpha))
        if fmt in ("kohya", "kohya (ldm names)"):
            base = kohya_base(ly, ldm_names=fmt != "kohya" and ly.component == "unet")
            sd.update({base + ".lora_up.weight": up, base + ".lora_down.weight": down, base + ".alpha": alpha})
        elif fmt == "comfyui-native":  # TrainLoraNode: 2-D matrices, conv downs flattened
            base = "diffusion_model." + ly.ldm
            sd.update({base + ".lora_up.weight": up.flatten(1), base + ".lora_down.weight": down.flatten(1),
                       base + ".alpha": alpha})
        else:
            prefix = "unet." if ly.component == "unet" else _te_prefix(ly.component)
            if fmt == "peft base_model.model.":
                prefix = "base_model.model."
            elif fmt == "peft no prefix":
                prefix = ""
            path = ly.module
            if fmt == "diffusers-old":
                head, _, last = path.rpartition(".")
                if ly.component == "unet" and path.rsplit(".", 2)[-2:] == ["to_out", "0"]:
                    head, last = path[:-len(".to_out.0")], "to_out.0"
                if ly.component == "unet" and last in _OLD_ATTN:
                    key = f"{prefix}{head}.processor.{_OLD_ATTN[last]}_lora"
                    sd.update({key + ".up.weight": up, key + ".down.weight": down})
                elif ly.component != "unet" and last in _OLD_TE:
                    key = f"{prefix}{head}.{_OLD_TE[last]}_lora"
                    sd.update({key + ".up.weight": up, key + ".down.weight": down})
                elif ly.component != "unet":
                    key = f"{prefix}{path}.lora_linear_layer"
                    sd.update({key + ".up.weight": up, key + ".down.weight": down})
                else:  # non-attention UNet layers were LoRACompatible layers: `.lora.up`
                    sd.update({f"{prefix}{path}.lora.up.weight": up, f"{prefix}{path}.lora.down.weight": down})
            elif fmt == "diffusers":
                sd.update({f"{prefix}{path}.lora.up.weight": up, f"{prefix}{path}.lora.down.weight": down})
            else:
                sd.update({f"{prefix}{path}.lora_B.weight": up, f"{prefix}{path}.lora_A.weight": down})
                if with_alpha:
                    sd[f"{prefix}{path}.alpha"] = alpha
    return sd


def kohya_reference(fmt, layers):
    """The same layers as `write_format(fmt, ...)` in kohya form, with alpha = rank where `fmt` has no alpha."""
    with_alpha, with_te = FORMATS[fmt]
    sd = {}
    for ly in layers:
        if ly.component != "unet" and not with_te:
            continue
        alpha = ly.alpha if with_alpha else float(ly.down.shape[0])
        base = kohya_base(ly)
        sd.update({base + ".lora_up.weight": ly.up.clone(), base + ".lora_down.weight": ly.down.clone(),
                   base + ".alpha": torch.tensor(alpha)})
    return sd


def n_layers(fmt, layers, component=None):
    _, with_te = FORMATS[fmt]
    return sum(1 for ly in layers if (ly.component == "unet" or with_te)
               and (component is None or (ly.component == "unet") == (component == "unet")))


# ------------------------------------------------------------------------------------------------ models (ComfyUI)
def unet_targets(model_patcher):
    """(diffusers module, ldm module, shape) of every >= 2-D UNet weight of a ComfyUI model."""
    from tcd import backend
    names = backend.unet_ldm_to_diffusers(model_patcher)
    return [(names[ldm], ldm, shape) for ldm, shape in sorted(backend.unet_weight_shapes(model_patcher).items())]


def te_targets(clip, layers_limit=None):
    """(component, HF module, shape) of the CLIP attention/MLP weights ComfyUI's LoRA map knows."""
    sd = clip.cond_stage_model.state_dict()
    has_g = any(k.startswith("clip_g.") for k in sd)
    out = []
    for key, value in sd.items():
        for clip_name, comp in (("clip_l", "te1" if has_g else "te"), ("clip_g", "te2"), ("clip_h", "te")):
            prefix = f"{clip_name}.transformer."
            if key.startswith(prefix) and key.endswith(".weight") and value.ndim == 2:
                module = key[len(prefix):-len(".weight")]
                if any(module.endswith("." + c) for c in CLIP_MAP) and ".encoder.layers." in module:
                    layer_idx = int(module.split(".encoder.layers.")[1].split(".")[0])
                    if layers_limit is None or layer_idx < layers_limit:
                        out.append((comp, module, tuple(value.shape)))
    return sorted(out)


TINY_SDXL_UNET = {"model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
                  "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": -2, "channel_mult": [1, 2],
                  "num_res_blocks": [1, 1], "context_dim": 2048, "adm_in_channels": 2816,
                  "num_classes": "sequential", "in_channels": 4, "out_channels": 4, "num_head_channels": 32,
                  "use_temporal_attention": False, "use_temporal_resblock": False, "use_spatial_transformer": True,
                  "legacy": False, "image_size": 32, "use_checkpoint": False}


def tiny_sdxl_patcher(seed=0):
    """A real comfy.model_base.SDXL built from a tiny unet_config, randomly initialised, in a ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.SDXL(dict(TINY_SDXL_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.diffusion_model.named_parameters():
            p.copy_(torch.zeros_like(p) if n.endswith("bias") else torch.ones_like(p) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sdxl_cond(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def sample(patcher, cond, steps=1, seed=0, size=8):
    """ComfyUI's own sampling (comfy.sample.sample, euler, cfg 1) of a fixed latent: the model's output."""
    import comfy.sample
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "normal", cond, cond, latent,
                               disable_pbar=True)


# ------------------------------------------------------------------------------------------------ files without ComfyUI
# Some layers of the tiny SD1.5 UNet by diffusers name -> ldm name (to read their shapes from the checkpoint file).
TINY_SD15_UNET_LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0":
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "input_blocks.1.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": "output_blocks.0.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
}
TINY_SD15_TE_LAYER = "text_model.encoder.layers.0.self_attn.q_proj"


def tiny_sd15_shapes(ckpt):
    """({diffusers module: weight shape}, text-encoder q_proj shape) read from the checkpoint's header."""
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt") as f:
        unet = {d: tuple(f.get_slice(f"model.diffusion_model.{ldm}.weight").get_shape())
                for d, ldm in TINY_SD15_UNET_LAYERS.items()}
        te = tuple(f.get_slice(f"cond_stage_model.transformer.{TINY_SD15_TE_LAYER}.weight").get_shape())
    return unet, te


def tiny_sd15_diffusers_lora(shapes, rank=4, context=None, seed=0, scale=0.3):
    """New-diffusers keys (`unet.*.lora.down.weight`, `text_encoder.*`), the format core ComfyUI maps only partly.
    `context` replaces the cross-attention input width (2048 makes it an SDXL-shaped LoRA)."""
    unet, te = shapes
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, shape in unet.items():
        if context and module.endswith(("attn2.to_k", "attn2.to_v")):
            shape = (shape[0], context)
        down = torch.randn((rank, *shape[1:]), generator=g) * scale
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * scale
        sd[f"unet.{module}.lora.down.weight"], sd[f"unet.{module}.lora.up.weight"] = down, up
    sd[f"text_encoder.{TINY_SD15_TE_LAYER}.lora.down.weight"] = torch.randn(rank, te[1], generator=g) * scale
    sd[f"text_encoder.{TINY_SD15_TE_LAYER}.lora.up.weight"] = torch.randn(te[0], rank, generator=g) * scale
    return sd


def write_tiny_sd15_lora(path, ckpt=None):
    """Write a small diffusers-format LoRA for the tiny SD1.5 checkpoint (TINY_CKPT) to `path`; returns the path."""
    import os
    from pathlib import Path
    from tcd.files import save_safetensors_atomic
    ckpt = ckpt or os.environ.get("TINY_CKPT")
    if not ckpt or not Path(ckpt).is_file():
        raise FileNotFoundError(f"the tiny SD1.5 checkpoint is needed for its layer shapes (TINY_CKPT={ckpt!r})")
    return save_safetensors_atomic(tiny_sd15_diffusers_lora(tiny_sd15_shapes(ckpt)), Path(path))
