"""The efficacy teacher's parts, built from ComfyUI's own classes (no checkpoint detection involved).

* UNet: `comfy.supported_models.SD15` with a smaller UNet config (32 base channels, three levels, attention at
  the 4x4 and 2x2 levels only, a 64-wide cross-attention context), wrapped by `SD15.get_model` in
  `comfy.model_base.BaseModel` (eps-prediction, ModelSamplingDiscrete with SD1.5's scaled-linear schedule, SD1.5's
  latent format) and in a `comfy.model_patcher.ModelPatcher`: the MODEL a graph passes around.
* Text encoder: ComfyUI's SD1 CLIP (`comfy.sd.CLIP` around `sd1_clip.SD1ClipModel` and its tokenizer), shrunk to
  2 layers of width 64 through ComfyUI's own `clip_l_model_config` option. Its weights are random (seeded): the
  embeddings of "a handwritten digit 3" and "... 4" differ, and the UNet learns to follow them.
* "VAE": a fixed invertible map, 16x16 grey pixels <-> 4x8x8 latents (space-to-depth, F.pixel_unshuffle), so samples
  are scored in pixel space with no learned decoder in between. LATENT tensors hold the model-space latent divided by
  SD1.5's scale factor, as a VAE encode would, so ComfyUI's process_latent_in / process_latent_out apply unchanged.

Attention stays off the 8x8 level on purpose: ComfyUI's CPU attention (sub-quadratic) made 64-token self-attention
cost 5x the rest of the network (measured), and the digits need no long-range attention at full resolution.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

CONTEXT_DIM = 64
UNET_CONFIG = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
    transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
    context_dim=CONTEXT_DIM, use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, use_spatial_transformer=True, legacy=False, dropout=0.0, use_checkpoint=False)
# Overrides of sd1_clip_config.json (CLIP-L) through ComfyUI's "<model name>_model_config" model option.
CLIP_CONFIG = dict(hidden_size=CONTEXT_DIM, intermediate_size=4 * CONTEXT_DIM, num_attention_heads=2,
                   num_hidden_layers=2, projection_dim=CONTEXT_DIM)
PIXELS = 16                  # image side; the latent is 4 x PIXELS/2 x PIXELS/2
LATENT_SCALE = 0.18215       # SD1.5's latent_format.scale_factor (process_latent_in multiplies by it)

# Names of the layers the standard diffusion UNet initialises to zero (the residual branches' last layers and the
# output conv): each block starts as the identity, which makes training from scratch stable.
ZERO_INIT_SUFFIXES = ("out_layers.3.weight", "out_layers.3.bias", "proj_out.weight", "proj_out.bias",
                      "out.2.weight", "out.2.bias")


def prompt_for(digit: int) -> str:
    return f"a handwritten digit {int(digit)}"


# ----------------------------------------------------------------------------------------------- pixels <-> latents
def encode_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] grey images in [-1, 1] -> LATENT samples [N, 4, 8, 8] (VAE space: model space / scale)."""
    return torch.nn.functional.pixel_unshuffle(images[:, None].float(), 2) / LATENT_SCALE


def decode_latents(samples: torch.Tensor) -> torch.Tensor:
    """LATENT samples [N, 4, 8, 8] -> [N, 16, 16] grey images (the exact inverse of encode_pixels)."""
    return torch.nn.functional.pixel_shuffle(samples.float() * LATENT_SCALE, 2)[:, 0]


# ----------------------------------------------------------------------------------------------- UNet
def new_unet(unet_config: dict | None = None):
    """A BaseModel (SD15 family, eps) with the given UNet config, weights uninitialised (ComfyUI skips init)."""
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(dict(unet_config or UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({})


def init_unet_(model, seed: int) -> None:
    """Standard initialisation (torch's layer defaults, zero residual outputs), seeded, in place."""
    net = model.diffusion_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in net.modules():
            reset = _torch_reset(type(module))
            if reset is not None:
                reset(module)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(ZERO_INIT_SUFFIXES):
                p.zero_()


def _torch_reset(cls):
    """torch.nn's own reset_parameters of a layer class: ComfyUI's ops (disable_weight_init) override it with a
    no-op, since checkpoints overwrite the weights anyway."""
    for base in cls.__mro__:
        if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
            return base.__dict__["reset_parameters"]
    return None


def patcher_for(model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# ----------------------------------------------------------------------------------------------- CLIP
def new_clip(seed: int):
    """ComfyUI's SD1 CLIP text encoder at a tiny size with seeded random weights (a comfy.sd.CLIP object)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(CLIP_CONFIG),
                                                "dtype": torch.float32})
    generator = torch.Generator().manual_seed(seed)
    weights = {k: _clip_init(k, v, generator) for k, v in clip.cond_stage_model.state_dict().items()}
    load_clip_weights(clip, weights)
    return clip


def _clip_init(name: str, like: torch.Tensor, generator) -> torch.Tensor:
    if like.ndim == 0:
        return like.detach().clone()
    if name.endswith("bias"):
        return torch.zeros(like.shape)
    if like.ndim == 1:                              # layer norm scales
        return torch.ones(like.shape)
    if "embedding" in name:                         # token / position embeddings, as CLIP's initializer_range
        return torch.randn(like.shape, generator=generator) * 0.02
    return torch.randn(like.shape, generator=generator) / math.sqrt(like.shape[1])


def load_clip_weights(clip, weights: dict) -> None:
    missing, unexpected = clip.cond_stage_model.load_state_dict(weights, strict=False)
    # ComfyUI's ops leave unloaded weights as torch.empty garbage: every parameter must come from `weights`.
    own = {k for k, _ in clip.cond_stage_model.named_parameters()}
    if set(missing) & own or unexpected:
        raise RuntimeError(f"tiny CLIP weights do not match: missing {sorted(set(missing) & own)[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")


def encode_prompts(clip, prompts: list[str]) -> list:
    """One CONDITIONING per prompt, as the CLIP Text Encode node makes it."""
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p), show_pbar=False) for p in prompts]


# ----------------------------------------------------------------------------------------------- files
def save_teacher(path: Path, model, clip, metadata: dict) -> None:
    """UNet (diffusion_model.*) and CLIP (clip.*) weights with the configs in the safetensors metadata, atomically."""
    from safetensors.torch import save_file
    tensors = {f"diffusion_model.{k}": v.detach().float().contiguous().clone()
               for k, v in model.diffusion_model.state_dict().items()}
    tensors.update({f"clip.{k}": v.detach().float().contiguous().clone()
                    for k, v in clip.cond_stage_model.state_dict().items()})
    meta = {"unet_config": json.dumps(UNET_CONFIG), "clip_config": json.dumps(CLIP_CONFIG)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_teacher(path: Path):
    """(MODEL patcher, CLIP, metadata) from a file written by save_teacher."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if json.loads(meta["unet_config"]) != json.loads(json.dumps(UNET_CONFIG)) or \
            json.loads(meta["clip_config"]) != json.loads(json.dumps(CLIP_CONFIG)):
        raise ValueError(f"{path} was written for another UNet / CLIP config; delete it to retrain")
    model = new_unet()
    unet_sd = {k[len("diffusion_model."):]: v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    model.diffusion_model.load_state_dict(unet_sd, strict=True)
    clip = new_clip(seed=0)
    load_clip_weights(clip, {k[len("clip."):]: v for k, v in tensors.items() if k.startswith("clip.")})
    return patcher_for(model), clip, meta


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
