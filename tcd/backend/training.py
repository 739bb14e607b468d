"""Training on a ComfyUI model: the clone to train on, weight wrappers, model calls, conditions and checkpointing."""
from __future__ import annotations

import contextlib

import torch

from .host import has_comfy


TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a training run. "auto": fp32 on CPU (bf16 autocast there is ~9x slower, measured with
    core's trainer), bf16 where ComfyUI's model management says the device supports it, else fp32."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise ValueError(f"training dtype {name!r} is not one of {TRAINING_DTYPES}")
    if device.type == "cpu":
        return torch.float32
    if has_comfy():
        import comfy.model_management as mm
        if mm.should_use_bf16(device, prioritize_performance=True):
            return torch.bfloat16
    return torch.float32


def create_lora_adapter(weight: torch.Tensor, rank: int, alpha: float) -> torch.nn.Module:
    """A trainable LoRA for one weight from ComfyUI's own weight adapters (comfy.weight_adapter LoRAAdapter:
    lora_up kaiming-uniform, lora_down zeros, so the patched weight starts equal to the base weight)."""
    from comfy.weight_adapter.lora import LoRAAdapter
    return LoRAAdapter.create_train(weight, rank=rank, alpha=alpha)


def load_for_training(patcher) -> None:
    """Load the patched model fully onto the compute device, freeing room first, as ComfyUI's TrainLoraNode does
    (its weight wrappers are attached to the modules by this load)."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)


def detach_weight_wrappers(patcher, wrappers) -> None:
    """Take training weight wrappers off the live modules and off the patcher, so the shared base model computes
    its plain weights again without waiting for the next load."""
    ids = {id(w) for w in wrappers}
    for module in patcher.model.modules():
        for attr in ("weight_function", "bias_function"):
            funcs = getattr(module, attr, None)
            if funcs:
                setattr(module, attr, [f for f in funcs if id(f) not in ids])
    for key in list(patcher.weight_wrapper_patches):
        kept = [f for f in patcher.weight_wrapper_patches[key] if id(f) not in ids]
        if kept:
            patcher.weight_wrapper_patches[key] = kept
        else:
            del patcher.weight_wrapper_patches[key]


def model_cond_item(patcher, conditioning, latent_shape, device) -> dict:
    """One CONDITIONING (a list of [embedding, options]) as the model's own condition objects for one sample,
    built the way ComfyUI's samplers build them (convert_cond + encode_model_conds with the model's extra_conds:
    cross-attention, SDXL pooled/size embeddings, ...). The first entry is used; see batch_model_conds."""
    import comfy.sampler_helpers
    import comfy.samplers
    conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
    noise = torch.zeros(tuple(latent_shape), dtype=torch.float32)
    conds = comfy.samplers.encode_model_conds(patcher.model.extra_conds, conds, noise, device, "positive",
                                              latent_image=noise)
    return {k: v.process_cond(batch_size=1, area=None) for k, v in conds[0]["model_conds"].items()}


def batch_model_conds(items: list) -> dict:
    """Concatenate per-sample condition objects into apply_model keyword tensors (comfy.samplers.cond_cat)."""
    import comfy.samplers
    return comfy.samplers.cond_cat(items)


def move_model_conds(conds: dict, device: torch.device) -> dict:
    """apply_model keyword tensors (batch_model_conds' output) moved to `device`; other values are kept."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in conds.items()}


# ----------------------------------------------------------------------------------------------- the model trained on
def training_clone(patcher):
    """The ModelPatcher a trainer attaches its LoRA wrappers to, sharing the graph's weights where it can.

    ComfyUI 0.3.x: a plain clone (same weights, own patch lists). Hosts with dynamic VRAM (ModelPatcherDynamic,
    ComfyUI 0.12+ on NVIDIA) stream weights through their own virtual memory and skip the weight wrappers a trainer
    relies on; there a non-dynamic clone is taken, as core's own trainer does (`clone(disable_dynamic=True)`, which
    costs a second copy of the weights in system memory)."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return patcher.clone(disable_dynamic=True)
    return patcher.clone()


@contextlib.contextmanager
def training_mode():
    """ComfyUI's in-training flag (comfy.model_management.in_training, newer hosts) set for the duration: some
    models pick differentiable code paths with it. A no-op on hosts without the flag."""
    if not has_comfy():
        yield
        return
    import comfy.model_management as mm
    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def diffusion_model_of(patcher) -> torch.nn.Module:
    """The denoising network (BaseModel.diffusion_model) a trainer wraps."""
    return patcher.model.diffusion_model


def set_compute_dtype(patcher, dtype: torch.dtype) -> None:
    patcher.set_model_compute_dtype(dtype)


def add_weight_wrapper(patcher, key: str, wrapper) -> None:
    """Wrap one parameter (`diffusion_model.<module>.weight`): ComfyUI calls wrapper(weight) on every forward."""
    patcher.add_weight_wrapper(key, wrapper)


def weight_wrappers(patcher) -> list:
    """Every weight wrapper attached to the patcher."""
    return [f for fs in patcher.weight_wrapper_patches.values() for f in fs]


def apply_model(patcher, x: torch.Tensor, sigma: torch.Tensor, transformer_options: dict, cond: dict):
    """BaseModel.apply_model: x in the model's sigma space -> the denoised x0 (eps, v and x0 models alike)."""
    return patcher.model.apply_model(x, sigma, transformer_options=transformer_options, **cond)


def takes_guidance_input(patcher) -> bool:
    """True for a guidance-distilled model that takes the guidance scale as an input (FLUX.1-dev: its transformer
    has a guidance embedding, `params.guidance_embed` / `guidance_in`); False for CFG models (SD1.x-SD3, Flux
    schnell)."""
    params = getattr(diffusion_model_of(patcher), "params", None)
    return bool(getattr(params, "guidance_embed", False))


def with_guidance(cond: dict, guidance: torch.Tensor) -> dict:
    """apply_model keyword tensors with the guidance input replaced by `guidance` [B] (one value per sample), the
    `guidance` keyword Flux's extra_conds builds from the conditioning's guidance (FluxGuidance, default 3.5)."""
    return dict(cond, guidance=guidance)


def latent_patch_size(patcher) -> int:
    """The side of the latent patches a DiT (SD3, Flux) cuts its input into (`patch_size`); 1 for UNets."""
    return int(getattr(diffusion_model_of(patcher), "patch_size", 1) or 1)


def transformer_options_of(patcher) -> dict:
    return dict(patcher.model_options.get("transformer_options", {}))


def process_latent_in(patcher, latent: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples in the model's own latent space (its latent format's scale / shift)."""
    return patcher.model.process_latent_in(latent)


def model_class_name(patcher) -> str:
    return type(patcher.model).__name__


def unet_state_dict(patcher) -> dict:
    return patcher.model.diffusion_model.state_dict()


def model_sampling_object(patcher):
    """The model's own model_sampling (BaseModel.model_sampling), before any object patch a load would apply;
    model_sampling_of asks the patcher instead, for sampling."""
    return patcher.model.model_sampling


def freeze_model(patcher) -> dict:
    """Turn requires_grad off on every weight of the (shared) model; returns the previous flags for thaw_model."""
    flags = {p: p.requires_grad for p in patcher.model.parameters()}
    patcher.model.requires_grad_(False)
    return flags


def thaw_model(flags: dict) -> None:
    """Give the shared model's weights back the requires_grad flags they had before freeze_model."""
    for p, flag in flags.items():
        if p.requires_grad == flag:
            continue
        # Weights loaded inside a prompt are inference tensors: their flag may only be raised in inference mode.
        with torch.inference_mode(p.is_inference()):
            p.requires_grad_(flag)


def copy_inference_parameters(patcher) -> list:
    """Swap every inference-tensor parameter of the denoising network that no ComfyUI weight wrapper reaches (plain
    torch modules inside the network: the q / k RMSNorm scales of SD3.5 and Flux) for an ordinary copy, and return
    what restore_inference_parameters needs to put the originals back.

    A checkpoint loaded inside a prompt holds inference tensors, which autograd may not save for the backward pass;
    ComfyUI's own ops (Linear, Conv, norms) copy their weight through the trainer's identity wrappers instead.
    Only parameters are copied (small: norm scales); buffers such as SD3's pos_embed are only added, which saves
    nothing for the backward pass. Call it after the model is loaded onto the training device."""
    swapped = []
    for module in diffusion_model_of(patcher).modules():
        if hasattr(module, "weight_function"):
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                swapped.append((module, name, param))
    return swapped


def restore_inference_parameters(swapped: list) -> None:
    """Put back the parameters copy_inference_parameters swapped out (moved to where the copy is now, should the
    model have been offloaded meanwhile)."""
    for module, name, original in swapped:
        current = module._parameters[name]
        if original.device != current.device:
            with torch.inference_mode(original.is_inference()):
                original.data = original.data.to(current.device)
        module._parameters[name] = original


def lora_adapter_weights(adapter) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(up, down) trainable weights of a comfy.weight_adapter LoRA adapter (create_lora_adapter)."""
    return adapter.lora_up.weight, adapter.lora_down.weight


def enable_gradient_checkpointing(patcher, copy_inputs: bool = False) -> list:
    """Recompute each top-level block of the denoising network in the backward pass (torch.utils.checkpoint,
    non-reentrant) instead of keeping its activations; passes without grad (teacher, target) run the plain
    forward. The blocks are the children of the network and the items of its ModuleLists (a UNet's
    input_blocks / middle_block / output_blocks, a DiT's joint / double / single blocks).

    copy_inputs: each recorded block runs on copies of its tensor inputs. Blocks that add to their input in place
    (ComfyUI 0.3.x Flux: `img += ...`, `x += ...`) would otherwise change the very tensors the backward pass
    recomputes them from, and the recomputed activations (and gradients) would be silently wrong."""
    import torch.utils.checkpoint as cp

    def copied(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    patched = []
    for child in diffusion_model_of(patcher).children():
        blocks = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        for block in blocks:
            original = block.forward

            def on_copies(*args, _original=original, **kwargs):
                return _original(*[copied(a) for a in args], **{k: copied(v) for k, v in kwargs.items()})

            def forward(*args, _original=original, _on_copies=on_copies, **kwargs):
                if torch.is_grad_enabled():
                    return cp.checkpoint(_on_copies if copy_inputs else _original, *args, use_reentrant=False,
                                         **kwargs)
                return _original(*args, **kwargs)

            had_instance_forward = "forward" in block.__dict__
            block.forward = forward
            patched.append((block, original if had_instance_forward else None))
    return patched


def copy_norm_inputs(patcher) -> list:
    """While gradients are recorded, hand every norm layer of the denoising network (LayerNorm, RMSNorm) a copy of
    its input; returns the hook handles (remove_hooks). ComfyUI 0.3.x's Flux blocks add to their residual stream in
    place (`img += ...` after `img_norm2(img)`, `x += ...` after `pre_norm(x)`), and the norm saved that stream for
    the backward pass, which autograd refuses ("modified by an inplace operation"). The copy is what the norm saves;
    values are unchanged, passes without grad (teacher, target) are untouched."""
    def copy_input(_module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return (args[0].clone(), *args[1:])
        return None

    return [module.register_forward_pre_hook(copy_input) for module in diffusion_model_of(patcher).modules()
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")]


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def disable_gradient_checkpointing(patched: list) -> None:
    for block, original in patched:
        if original is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = original


# ----------------------------------------------------------------------------------------------- dataset encoders
def vae_weights_module(vae):
    """The torch module holding a VAE's weights (comfy.sd.VAE.first_stage_model), or None."""
    return getattr(vae, "first_stage_model", None)


def clip_weights_module(clip):
    """The torch module holding a CLIP's text-encoder weights (comfy.sd.CLIP.cond_stage_model, its transformer
    where it has one), or None."""
    stage = getattr(clip, "cond_stage_model", None)
    return getattr(stage, "transformer", None) or stage
