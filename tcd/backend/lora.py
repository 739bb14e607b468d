"""LoRA support from ComfyUI: its UNet name table, its LoRA key maps (the layers it can patch), applying a LoRA
through comfy.sd.load_lora_for_models, and the loras folders."""
from __future__ import annotations

import torch


def unet_ldm_to_diffusers(model_patcher) -> dict[str, str]:
    """ldm module name -> diffusers module name for a ComfyUI UNet model (ModelPatcher or BaseModel).

    Both sides are module paths without `.weight`/`.bias` and without the `diffusion_model.` prefix, e.g.
    `input_blocks.1.1.transformer_blocks.0.attn1.to_q` -> `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    Built from ComfyUI's own `comfy.utils.unet_to_diffusers(unet_config)` (the table its LoRA key map uses), so
    the names agree with ComfyUI's loader by construction. Empty for models without a UNet config (DiT models).
    """
    import comfy.utils
    base_model = getattr(model_patcher, "model", model_patcher)
    unet_config = base_model.model_config.unet_config
    mapping = {}
    if "num_res_blocks" not in unet_config:     # a transformer (SD3, Flux): no UNet table
        return mapping
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        for suffix in (".weight", ".bias"):
            if diffusers_key.endswith(suffix) and ldm_key.endswith(suffix):
                mapping[ldm_key[:-len(suffix)]] = diffusers_key[:-len(suffix)]
    return mapping


def flow_ldm_to_diffusers(model_patcher) -> dict[str, tuple[str, ...]]:
    """ldm module -> the diffusers module names it holds, for SD3 / Flux (ModelPatcher or BaseModel); {} otherwise.

    Built from ComfyUI's own tables (comfy.utils.mmdit_to_diffusers for SD3, flux_to_diffusers for Flux, with the
    model's unet_config: the tables its LoRA key map uses). A fused ldm weight holds several diffusers modules:
    SD3's and Flux's `qkv` (to_q, to_k, to_v as slices) and Flux's single-block `linear1` ([q; k; v; proj_mlp]).
    Only >= 2-D weights the model has are listed (SD3's last context block, pre-only, has no proj / mlp).
    Newer tables also name some weights a second time for other trainers' layouts (ComfyUI 0.12+: LyCORIS LoKr's
    `ff.linear_in` for `img_mlp.0`, Flux 2's whole-weight `attn.to_qkv_mlp_proj` for `linear1`); such aliases are not
    parts: a fused weight keeps its slices, a whole weight the first (diffusers') name of the table.
    """
    import comfy.utils
    base_model = getattr(model_patcher, "model", model_patcher)
    arch = FLOW_MODEL_CLASSES.get(type(base_model).__name__)
    if arch is None:
        return {}
    unet_config = base_model.model_config.unet_config
    table = (comfy.utils.mmdit_to_diffusers if arch == "SD3" else comfy.utils.flux_to_diffusers)(unet_config)
    shapes = unet_weight_shapes(base_model)
    sliced: dict[str, dict] = {}
    whole: dict[str, str] = {}
    for diffusers_key, target in table.items():
        ldm_key = target if isinstance(target, str) else target[0]
        if not (diffusers_key.endswith(".weight") and ldm_key.endswith(".weight")):
            continue
        ldm, name = ldm_key[:-len(".weight")], diffusers_key[:-len(".weight")]
        if ldm not in shapes:
            continue
        region = None if isinstance(target, str) or len(target) < 2 or target[1] is None else tuple(target[1])
        if region is None:
            whole.setdefault(ldm, name)
        else:
            sliced.setdefault(ldm, {}).setdefault(region, name)
    return {ldm: tuple(sorted(sliced[ldm].values())) if ldm in sliced else (whole[ldm],)
            for ldm in {**whole, **sliced}}


def unet_weight_shapes(model_patcher) -> dict[str, tuple]:
    """ldm module name -> weight shape for every >= 2-D UNet weight (the layers a LoRA can target)."""
    base_model = getattr(model_patcher, "model", model_patcher)
    prefix = "diffusion_model."
    return {k[len(prefix):-len(".weight")]: tuple(v.shape) for k, v in base_model.state_dict().items()
            if k.startswith(prefix) and k.endswith(".weight") and v.ndim >= 2}


# ComfyUI model classes (comfy.model_base) of the flow transformers the LoRA loader handles. Subclasses with other
# layers (Flux2, Chroma) are not included: their LoRA key maps differ.
FLOW_MODEL_CLASSES = {"SD3": "SD3", "Flux": "Flux"}


def model_architecture(model_patcher) -> str:
    """SD1.x / SD2.x / SDXL for a ComfyUI UNet model (from its class and cross-attention context width), SD3 / Flux
    for those flow transformers, else a description of what it is."""
    from ..lora import CONTEXT_DIM, ARCH_SDXL
    base_model = getattr(model_patcher, "model", model_patcher)
    cls = type(base_model).__name__
    if cls in FLOW_MODEL_CLASSES:
        return FLOW_MODEL_CLASSES[cls]
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    context = unet_config.get("context_dim")
    if "num_res_blocks" not in unet_config:
        return f"{cls} (not a UNet model)"
    arch = CONTEXT_DIM.get(context)
    if arch == ARCH_SDXL and not cls.startswith("SDXL"):
        return f"{cls} (UNet with context {context}, not SDXL base)"
    if arch is None or (arch != ARCH_SDXL and cls not in ("BaseModel", "SD21UNCLIP", "SD15_instructpix2pix")):
        return f"{cls} (UNet with context {context})"
    return arch


def _target_shape(target, sd) -> tuple | None:
    """Shape of the weight (or weight slice) a LoRA key map entry patches: a key; (key, (dim, offset, size)) for a
    slice of a fused weight (ComfyUI's split diffusers q/k/v of SD3 / Flux); (key, None, function) for a weight
    patched through a function (Flux / SD3 norm_out's scale/shift swap)."""
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    weight = sd.get(key)
    if weight is None or weight.ndim < 2:
        return None
    shape = list(weight.shape)
    if offset is not None:
        dim, _, size = offset
        shape[dim] = size
    return tuple(shape)


def lora_target_shapes(model_patcher, clip=None) -> dict[str, tuple]:
    """`lora_*` key base -> weight shape for every weight ComfyUI's own LoRA key map can patch in this model (and
    CLIP); for SD3 / Flux also `transformer.<diffusers module>` -> the shape of the weight or slice it patches.
    Built with comfy.lora.model_lora_keys_unet / model_lora_keys_clip, the maps load_lora_for_models uses, so a
    layer found here is a layer ComfyUI applies."""
    import comfy.lora
    shapes = {}
    if model_patcher is not None:
        sd = model_patcher.model.state_dict()
        flow = type(model_patcher.model).__name__ in FLOW_MODEL_CLASSES
        for key, target in comfy.lora.model_lora_keys_unet(model_patcher.model, {}).items():
            if key.startswith("lora_unet_") and isinstance(target, str) and target in sd:
                shapes[key] = tuple(sd[target].shape)
            elif flow and key.startswith("transformer."):
                shape = _target_shape(target, sd)
                if shape is not None:
                    shapes[key] = shape
    if clip is not None:
        sd = clip.cond_stage_model.state_dict()
        for key, target in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items():
            if key.startswith("lora_te") and isinstance(target, str) and target in sd:
                shapes[key] = tuple(sd[target].shape)
    return shapes


def _patch_counts(patcher) -> dict:
    return {k: len(v) for k, v in getattr(patcher, "patches", {}).items()}


def patched_since(before: dict, patcher) -> int:
    """Number of patches added since the `before` snapshot (_patch_counts): one per LoRA layer, also where several
    layers patch slices of one weight (diffusers' split q/k/v on SD3's / Flux's fused qkv)."""
    after = _patch_counts(patcher)
    return sum(max(0, n - before.get(k, 0)) for k, n in after.items())


def apply_lora(model, clip, lora_sd: dict, strength_model: float, strength_clip: float):
    """comfy.sd.load_lora_for_models, plus how many model and CLIP patches (LoRA layers) it added.

    Returns (model, clip, n_model_patched, n_clip_patched). A strength of 0 leaves that part untouched (the same
    object comes back, so its output is the base output exactly), like core LoraLoader does for both at 0.
    """
    import comfy.sd
    use_model = model if strength_model != 0 else None
    use_clip = clip if clip is not None and strength_clip != 0 else None
    if use_model is None and use_clip is None:
        return model, clip, 0, 0
    before_m = _patch_counts(model) if use_model is not None else {}
    before_c = _patch_counts(use_clip.patcher) if use_clip is not None else {}
    new_model, new_clip = comfy.sd.load_lora_for_models(use_model, use_clip, lora_sd, strength_model, strength_clip)
    n_m = patched_since(before_m, new_model) if new_model is not None else 0
    n_c = patched_since(before_c, new_clip.patcher) if new_clip is not None else 0
    return (new_model if new_model is not None else model, new_clip if new_clip is not None else clip, n_m, n_c)


def lora_folders() -> list[str]:
    import folder_paths
    return list(folder_paths.get_folder_paths("loras"))


def lora_names() -> list[str]:
    import folder_paths
    return list(folder_paths.get_filename_list("loras"))


def lora_path(name: str) -> str:
    """Full path of a LoRA chosen by name, as folder_paths.get_full_path("loras", name) resolves it, refusing names
    that leave the loras folders (absolute paths, '..', drive letters). Symlinks placed inside a loras folder
    are the user's own choice and are followed."""
    import folder_paths
    from ..files import resolve_inside
    folders = lora_folders()
    resolve_inside(folders, name, kind="LoRA", folder_label="loras")   # refuses escapes with a clear message
    full = folder_paths.get_full_path("loras", name)
    if full is None:
        raise ValueError(f"LoRA {name!r} is not in the loras folders ({', '.join(folders)}). Allowed: a file "
                         f"listed in models/loras. Put the file there and refresh, or pick another name.")
    return resolve_inside(folders, full, kind="LoRA", folder_label="loras")
