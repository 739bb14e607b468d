"""The flow efficacy teacher's parts, built from ComfyUI's own classes (scripts/make_tiny_flow.py).

* Transformer: `comfy.supported_models.SD3` with a small MMDiT unet_config (TINY_SD3 at depth 3: hidden 192 =
  64 x depth, 3 heads of 64, RMS q/k norms, one x-block self-attention layer), wrapped by `SD3.get_model` in
  `comfy.model_base.SD3` (ModelType.FLOW: ModelSamplingDiscreteFlow, CONST, shift 3 as SD3 ships, SD3's latent
  format) and a `comfy.model_patcher.ModelPatcher`: the MODEL a graph passes around.
* Text conditioning: no text encoder. Each digit has a fixed random embedding of the widths the model reads (SD3's
  CLIP-L-only output: a 4096-wide context of TOKENS tokens, a 2048-wide pooled vector), plus one for the empty
  prompt (classifier-free guidance), as CONDITIONING [[context, {"pooled_output": pooled}]].
* "VAE": a fixed invertible map, 16x16 grey pixels <-> 16 x 4 x 4 latents (space-to-depth with 4x4 blocks,
  F.pixel_unshuffle): SD3's 16 channels, and a 4x4 latent the MMDiT's 2x2 patches cut into 4 tokens of 64 values.
  LATENT tensors hold what a VAE encode would (model space / scale + shift), so ComfyUI's process_latent_in /
  process_latent_out (SD3 latent format: (z - 0.0609) * 1.5305 and back) apply unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

DEPTH = 3                    # the benchmark's teacher; a smaller one (depth 2) is trained when a test needs one fast
TOKENS = 4                   # context tokens per prompt
BLOCK = 4                    # space-to-depth block: 16 x 16 pixels -> 16 x 4 x 4
CHANNELS = BLOCK * BLOCK     # = SD3's 16 latent channels
PIXELS = 16
LATENT_SCALE, LATENT_SHIFT = 1.5305, 0.0609    # comfy.latent_formats.SD3
EMBEDDING_SEED = 1234

# adaLN-Zero (DiT, Peebles & Xie 2023): the modulation layers and the final projection start at zero, so every block
# starts as the identity and the output at 0, which makes training from scratch stable.
ZERO_INIT_SUFFIXES = ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "final_layer.linear.weight",
                      "final_layer.linear.bias")


# ----------------------------------------------------------------------------------------------- pixels <-> latents
def encode_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] grey images in [-1, 1] -> LATENT samples [N, 16, 4, 4] (VAE space)."""
    z = torch.nn.functional.pixel_unshuffle(images[:, None].float(), BLOCK)
    return z / LATENT_SCALE + LATENT_SHIFT


def model_space(samples: torch.Tensor) -> torch.Tensor:
    """LATENT samples -> what the transformer sees (SD3's process_latent_in)."""
    return (samples.float() - LATENT_SHIFT) * LATENT_SCALE


def decode_latents(samples: torch.Tensor) -> torch.Tensor:
    """LATENT samples [N, 16, 4, 4] -> [N, 16, 16] grey images (the exact inverse of encode_pixels)."""
    return torch.nn.functional.pixel_shuffle(model_space(samples), BLOCK)[:, 0]


def empty_latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, CHANNELS, PIXELS // BLOCK, PIXELS // BLOCK)}


# ----------------------------------------------------------------------------------------------- conditioning
def embeddings(seed: int = EMBEDDING_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [11, TOKENS, 4096], pooled [11, 2048]): rows 0-9 the digits, row 10 the empty prompt. Unit-variance
    Gaussian entries, the input scale the model's context / pooled projections are initialised for."""
    import make_tiny_flow as mtf
    ctx, pooled = mtf.CONTEXT["sd3"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(11, TOKENS, ctx, generator=g), torch.randn(11, pooled, generator=g)


def conditionings() -> tuple[list, list]:
    """(one CONDITIONING per digit 0-9, the empty prompt's CONDITIONING), as a text encode node would make them."""
    context, pooled = embeddings()
    conds = [[[context[i:i + 1].clone(), {"pooled_output": pooled[i:i + 1].clone()}]] for i in range(11)]
    return conds[:10], conds[10]


# ----------------------------------------------------------------------------------------------- transformer
def overrides(depth: int = DEPTH) -> dict:
    """Overrides of make_tiny_flow.TINY_SD3: the depth, and the context embedder's output width, which must equal the
    hidden size (64 x depth)."""
    return {"depth": int(depth), "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * int(depth)}}}


def new_patcher(depth: int = DEPTH):
    """ModelPatcher around comfy.model_base.SD3 with this unet_config (make_tiny_flow's random weights)."""
    import make_tiny_flow as mtf
    return mtf.tiny_model_patcher("sd3", **overrides(depth))


def initial_weights(seed: int, depth: int = DEPTH) -> dict:
    """make_tiny_flow's weights (unit-variance linears, unit norms, zero biases), adaLN-Zero, and SD3's fixed 2-D
    sin-cos position table (the model registers pos_embed as a buffer: checkpoints carry it)."""
    import make_tiny_flow as mtf
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    sd = mtf.diffusion_state_dict("sd3", seed, torch.float32, **overrides(depth))
    for name in sd:
        if name.endswith(ZERO_INIT_SUFFIXES):
            sd[name] = torch.zeros_like(sd[name])
    side = mtf.TINY_SD3["pos_embed_max_size"]
    sd["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(64 * int(depth), side)).float()[None]
    return sd


def patcher_with(weights: dict, depth: int = DEPTH):
    patcher = new_patcher(depth)
    patcher.model.diffusion_model.load_state_dict(weights, strict=True)
    return patcher


def save_teacher(path: Path, weights: dict, depth: int, metadata: dict) -> None:
    """Transformer weights with the unet_config overrides in the safetensors metadata, atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().contiguous().clone() for k, v in weights.items()}
    meta = {"overrides": json.dumps(overrides(depth)), "tokens": str(TOKENS)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_teacher(path: Path):
    """(MODEL patcher, metadata) from a file written by save_teacher."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    depth = json.loads(meta["overrides"])["depth"]
    if json.loads(meta["overrides"]) != json.loads(json.dumps(overrides(depth))):
        raise ValueError(f"{path} was written for another MMDiT config; delete it to retrain")
    return patcher_with(weights, depth), meta
