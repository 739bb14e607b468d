"""Tiny but real diffusers pipelines and captioned image folders, built from configs (no download, no hub).

- `write_tokenizer`: a CLIPTokenizer from a handwritten vocab.json + merges.txt (single characters, no merges).
- `make_pipeline_folder(folder, arch)`: a diffusers pipeline folder (model_index.json + components) for
  "sd" (SD1.x layout, 2 UNet levels so down/upsamplers and conv_shortcut exist) or "sdxl" (text_time
  micro-conditioning, two text encoders, pooled embeddings), small enough to train on a CPU in seconds.
- `make_pipeline_folder(folder, "sd3")`: a StableDiffusion3Pipeline folder (MMDiT transformer, FlowMatchEuler
  scheduler with SD3's shift 3, two CLIP text encoders with projection, no T5: text_encoder_3 = tokenizer_3 = None,
  which the pipeline accepts by padding with zeros) whose transformer ComfyUI also loads: SD3_TRANSFORMER keeps
  ComfyUI's detection rule hidden = 64 x depth (scripts/make_tiny_flow.py).
- `make_pipeline_folder(folder, "flux")`: a FluxPipeline folder (FluxTransformer2DModel with a guidance embedding,
  as FLUX.1-dev; FLUX.1-dev's dynamically shifted FlowMatchEuler scheduler; a CLIPTextModel for the pooled vector,
  a T5EncoderModel with a T5 tokenizer built from a small Unigram vocab (`write_t5_tokenizer`), a 16-channel VAE).
- `write_comfy_sd15_config_folder(folder)`: the configs (no weights) that let diffusers' `from_single_file` read the
  tiny single-file SD1.5 checkpoint written by scripts/make_tiny_sd15.py with `--middle attn --vae kl` (320
  channels, one level, full-size CLIP-L and SD VAE): the layout that both ComfyUI and diffusers read.
- `make_caption_folder(folder, n, size)`: n random-pattern PNGs with `.txt` captions.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
                    "steps_offset": 1, "timestep_spacing": "leading"}


def write_tokenizer(folder: Path, max_length: int = 77):
    """A real CLIPTokenizer over single characters (CLIP's BPE with an empty merges list)."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?-'")
    vocab = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    return tok


def _tiny_text_encoder(tok, hidden: int, projection: int | None = None, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _tiny_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    # Four blocks: the usual 8x downscale, so resolution / 8 = latent size as in SD.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64).eval()


def make_pipeline_folder(folder: Path, arch: str = "sd", seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline ("sd"), StableDiffusionXLPipeline ("sdxl") or StableDiffusion3Pipeline
    ("sd3") as a diffusers folder."""
    import torch
    if arch == "sd3":
        return make_sd3_pipeline_folder(folder, seed)
    if arch == "flux":
        return make_flux_pipeline_folder(folder, seed)
    from diffusers import (DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    folder = Path(folder)
    tok = write_tokenizer(folder.parent / f"_{folder.name}_tokenizer_src")
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                  block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(seed)
    if arch == "sd":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **common)
        pipe = StableDiffusionPipeline(vae=_tiny_vae(seed), text_encoder=_tiny_text_encoder(tok, 32, seed=seed),
                                       tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif arch == "sdxl":
        te1 = _tiny_text_encoder(tok, 16, seed=seed)
        te2 = _tiny_text_encoder(tok, 16, projection=24, seed=seed + 1)
        # SDXL micro-conditioning: time ids (6 values) embedded with addition_time_embed_dim each, plus pooled.
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
                                    transformer_layers_per_block=(1, 1), use_linear_projection=True, **common)
        pipe = StableDiffusionXLPipeline(vae=_tiny_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    else:
        raise ValueError(f"arch {arch!r}: 'sd', 'sdxl', 'sd3' or 'flux'")
    pipe.save_pretrained(folder)
    return folder


# SD3 MMDiT at a size ComfyUI's detection reads back (comfy/model_detection.py: depth = hidden // 64 blocks with
# depth heads of 64): 2 blocks of 2 heads x 64 = hidden 128, RMS q/k norms and SD3.5's second self-attention in
# block 0 (attn2), so every target kind of tcd.lora_targets exists. The context width (64) takes the two CLIP
# encoders' 16 + 16 hidden features padded with zeros (encode_prompt pads CLIP to the T5 width, joint_attention_dim);
# pooled 32 = 16 + 16 projections. 64 px images -> 8x8 latents -> 4x4 patches.
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                       attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                       pooled_projection_dim=32, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
# SD3's VAE latent normalisation (its vae/config.json): latents = (z - shift_factor) * scaling_factor.
SD3_VAE_SCALING = dict(scaling_factor=1.5305, shift_factor=0.0609)


def make_sd3_pipeline_folder(folder: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusion3Pipeline (no T5) as a diffusers folder."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    folder = Path(folder)
    tok = write_tokenizer(folder.parent / f"_{folder.name}_tokenizer_src")
    te1 = _tiny_text_encoder(tok, 16, projection=16, seed=seed)
    te2 = _tiny_text_encoder(tok, 16, projection=16, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, **SD3_VAE_SCALING).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder: Path, max_length: int = 512):
    """A real T5 tokenizer (transformers' T5Tokenizer, a tokenizers-library Unigram model saved as tokenizer.json)
    over single characters with and without the word-start marker; T5's specials pad = 0, eos = 1, unk = 2."""
    from transformers import T5Tokenizer
    folder = Path(folder)
    chars = list(string.ascii_lowercase + string.digits + ".,!?-'")
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars])
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


# FLUX.1-dev's layout at a tiny size: a double-stream and a single-stream block of 2 heads x 16 (rotary axes
# 4 + 6 + 6 = 16), packed 2x2 latents of the 16-channel VAE (in_channels 64, patch_size 1: the pipeline packs),
# the guidance embedding (guidance_embeds, FLUX.1-dev), T5 width 32 (joint_attention_dim), CLIP pooled 32.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# FLUX.1-dev's scheduler_config.json and its VAE's latent normalisation.
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
FLUX_VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)


def make_flux_pipeline_folder(folder: Path, seed: int = 0) -> Path:
    """Save a tiny FluxPipeline (guidance-distilled, FLUX.1-dev style) as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    folder = Path(folder)
    tok = write_tokenizer(folder.parent / f"_{folder.name}_tokenizer_src")
    t5_tok = write_t5_tokenizer(folder.parent / f"_{folder.name}_t5_tokenizer_src")
    clip = _tiny_text_encoder(tok, 32, seed=seed)
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)).eval()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, **FLUX_VAE_SCALING).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


# SD1.5's component configs at the tiny single-file checkpoint's size (scripts/make_tiny_sd15.py, --middle attn
# --vae kl): UNet model_channels 320, channel_mult [1], 1 res block, transformer depth 1, 8 heads, conv proj_in,
# context 768; full-size CLIP-L (ComfyUI builds it from a fixed config) and the SD VAE.
COMFY_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
                       down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                       mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=768, attention_head_dim=8,
                       norm_num_groups=32, use_linear_projection=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def write_comfy_sd15_config_folder(folder: Path) -> Path:
    """model_index.json + component configs + tokenizer, no weights: `from_single_file(ckpt, config=folder)`."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig
    folder = Path(folder)
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
    # Configs only: diffusers fills every key left out with the class's __init__ default.
    (folder / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", **_as_config(COMFY_TINY_UNET)}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **_as_config(SD_VAE)}))
    DDPMScheduler(**SCHEDULER_CONFIG).save_config(folder / "scheduler")
    cfg = CLIPTextConfig(**CLIP_L)
    cfg.architectures = ["CLIPTextModel"]
    cfg.save_pretrained(folder / "text_encoder")
    tok = write_tokenizer(folder / "_tokenizer_src")
    tok.save_pretrained(folder / "tokenizer")
    return folder


def _as_config(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def make_caption_folder(folder: Path, n: int = 8, size: int = 64, seed: int = 0,
                        captions=("a red square", "a blue circle", "green stripes", "a yellow dot")) -> Path:
    """n PNG images (smooth random colour fields) with one `.txt` caption each."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        # Non-square originals so SDXL's original_size / crop micro-conditioning is exercised.
        img = Image.fromarray(low).resize((size + 8 * (i % 3), size), Image.BILINEAR)
        img.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(captions[i % len(captions)])
    return folder
