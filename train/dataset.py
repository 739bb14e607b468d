"""Training data for the distillation trainer: (latent, conditioning) pairs plus an unconditional conditioning.

Two sources:
* LATENT + CONDITIONING lists, as ComfyUI's dataset nodes (MakeTrainingDataset) produce them, or one latent batch
  with one conditioning shared by every sample;
* a folder of images, each with a same-name `.txt` caption, encoded with the given VAE and CLIP. Encodings are
  cached on disk (safetensors, keyed by image bytes, caption, resolution and a fingerprint of the VAE and CLIP
  weights), so a second run on the same folder does not encode again.

Latents are kept as ComfyUI LATENT samples (VAE space, not yet scaled by the model's latent format; the trainer
applies it through tcd.backend.process_latent_in), for 4-channel UNet and 16-channel SD3 / Flux latents alike.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tcd import backend
from .images import PREPROCESSING_VERSION, list_captioned_images, load_square



@dataclass
class TrainingData:
    latents: list                     # [C, H, W] tensors (VAE space)
    conditionings: list               # one CONDITIONING ([[embedding, options]]) per latent
    uncond: list | None = None        # CONDITIONING of the unconditional / negative prompt, or None
    source: str = ""
    captions: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.latents)

    def fingerprint(self) -> str:
        """A hash of every latent and embedding: a resumed run must see the same data."""
        h = hashlib.sha256()
        for t in self.latents:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        for c in list(self.conditionings) + ([self.uncond] if self.uncond is not None else []):
            for emb, opts in c:
                h.update(emb.detach().float().cpu().contiguous().numpy().tobytes())
                pooled = opts.get("pooled_output") if isinstance(opts, dict) else None
                if isinstance(pooled, torch.Tensor):
                    h.update(pooled.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def clone_conditioning(cond) -> list:
    """A deep copy of a CONDITIONING whose tensors are fresh (non-inference) tensors, safe for autograd."""
    out = []
    for entry in cond:
        emb, opts = entry[0], entry[1]
        opts = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in dict(opts).items()}
        out.append([emb.detach().clone() if isinstance(emb, torch.Tensor) else emb, opts])
    return out


def _check_conditioning(cond, what: str) -> list:
    ok = isinstance(cond, (list, tuple)) and len(cond) >= 1 and all(
        isinstance(e, (list, tuple)) and len(e) >= 2 and isinstance(e[0], torch.Tensor) for e in cond)
    if not ok:
        raise ValueError(f"{what} is not a CONDITIONING (a list of [embedding, options] pairs from CLIP Text "
                         f"Encode / Make Training Dataset); got {type(cond).__name__}")
    if len(cond) > 1:
        raise ValueError(f"{what} has {len(cond)} entries (combined or concatenated conditionings); the trainer "
                         f"needs one text embedding per training image. Encode one prompt per image")
    return clone_conditioning(cond)


def from_latents_and_conditioning(latents: list, conditionings: list, uncond=None) -> TrainingData:
    """Pairs from ComfyUI lists: latents = [LATENT, ...] (each a {"samples": [B, C, H, W]}; batches are split),
    conditionings = [CONDITIONING, ...] with one per latent sample, or a single one shared by all samples."""
    samples = []
    for i, latent in enumerate(latents or []):
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise ValueError(f"latent #{i + 1} is not a LATENT (a dict with a 'samples' tensor); got "
                             f"{type(latent).__name__}")
        batch = latent["samples"]
        if batch.ndim != 4:
            raise ValueError(f"latent #{i + 1} has shape {tuple(batch.shape)}; the trainer needs image latents "
                             f"[batch, channels, height, width] (video/audio latents are not supported)")
        samples.extend(batch[j].detach().float().clone() for j in range(batch.shape[0]))
    if not samples:
        raise ValueError("no training latents: connect LATENT + CONDITIONING (e.g. from Make Training Dataset) or "
                         "set image_folder to a folder of images with .txt captions")
    conds = [_check_conditioning(c, f"conditioning #{i + 1}") for i, c in enumerate(conditionings or [])]
    if not conds:
        raise ValueError("latents are connected but no conditioning: connect one CONDITIONING per latent (or one "
                         "shared by all)")
    if len(conds) == 1 and len(samples) > 1:
        conds = conds * len(samples)
    if len(conds) != len(samples):
        raise ValueError(f"{len(samples)} latent samples but {len(conds)} conditionings: give one conditioning "
                         f"per latent sample, or a single conditioning shared by all of them")
    for i, (x, c) in enumerate(zip(samples, conds)):
        if not torch.isfinite(x).all():
            raise ValueError(f"latent sample #{i + 1} contains NaN or infinite values; re-encode that image")
    unc = _check_conditioning(uncond, "the negative / unconditional conditioning") if uncond is not None else None
    return TrainingData(samples, conds, unc, source=f"{len(samples)} latents")


# ----------------------------------------------------------------------------------------------- image folders
def resolve_folder(folder: str, base_dir: str | None) -> Path:
    """An absolute folder, or one relative to ComfyUI's input directory; a clear error when it is not there."""
    text = (folder or "").strip()
    if not text:
        raise ValueError("image_folder is empty: give a folder of images with .txt captions (absolute, or "
                         "relative to ComfyUI's input folder), or connect latents + conditioning instead")
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir:
        path = Path(base_dir) / path
    if not path.is_dir():
        raise ValueError(f"image folder {text!r} does not exist (looked for {str(path)!r}). Give an absolute path "
                         f"or a folder inside ComfyUI's input folder ({base_dir})")
    return path


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image as a ComfyUI IMAGE [1, R, R, 3] in [0, 1] (train.images: EXIF-oriented, shorter side resized to R,
    centre-cropped square)."""
    return torch.from_numpy(load_square(path, resolution))[None]


def weights_fingerprint(module) -> str:
    """A cheap identity of a model's weights: shapes plus a sample of values of the first and last tensors."""
    h = hashlib.sha256()
    if module is None:
        return "none"
    tensors = list(module.state_dict().items())
    for name, t in tensors[:3] + tensors[-3:]:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _encode_caption(clip, caption: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(caption))


def from_image_folder(folder: str, vae, clip, resolution: int, cache_dir: Path | None, base_dir: str | None = None,
                      uncond=None, empty_prompt_uncond: bool = True) -> TrainingData:
    """Encode a folder of captioned images (cached); the empty prompt is the unconditional conditioning unless
    one is given, or unless empty_prompt_uncond is False (a guidance-distilled teacher such as FLUX.1-dev has no
    unconditional pass)."""
    if vae is None or clip is None:
        raise ValueError("image_folder needs a VAE and a CLIP to encode images and captions: connect both (e.g. "
                         "from the checkpoint loader)")
    if resolution % 8 != 0 or resolution < 64:
        raise ValueError(f"resolution={resolution} must be a multiple of 8 and at least 64")
    path = resolve_folder(folder, base_dir)
    pairs = list_captioned_images(path)
    vae_fp = weights_fingerprint(backend.vae_weights_module(vae))
    clip_fp = weights_fingerprint(backend.clip_weights_module(clip))
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    latents, conds, captions = [], [], []
    for image_path, caption in pairs:
        key = hashlib.sha256(image_path.read_bytes() + caption.encode() +
                             f"|{resolution}|{vae_fp}|{clip_fp}|{PREPROCESSING_VERSION}".encode()).hexdigest()[:32]
        cached = _read_cache(cache_dir / f"{key}.safetensors") if cache_dir is not None else None
        if cached is None:
            pixels = load_image(image_path, resolution)
            latent = vae.encode(pixels[:, :, :, :3]).detach().float().cpu()
            cond = _encode_caption(clip, caption)
            cached = {"latent": latent, "cond": cond[0][0].detach().float().cpu()}
            pooled = cond[0][1].get("pooled_output")
            if isinstance(pooled, torch.Tensor):
                cached["pooled_output"] = pooled.detach().float().cpu()
            if cache_dir is not None:
                _write_cache(cache_dir / f"{key}.safetensors", cached)
        latents.append(cached["latent"][0].clone())
        opts = {"pooled_output": cached["pooled_output"].clone()} if "pooled_output" in cached else {}
        conds.append([[cached["cond"].clone(), opts]])
        captions.append(caption)
    if uncond is not None:
        unc = _check_conditioning(uncond, "the negative / unconditional conditioning")
    else:
        unc = clone_conditioning(_encode_caption(clip, "")) if empty_prompt_uncond else None
    return TrainingData(latents, conds, unc, source=f"{len(latents)} images from {str(path)!r}", captions=captions)


def _read_cache(path: Path):
    if not path.is_file():
        return None
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception:
        return None    # a damaged cache entry is simply re-encoded


def _write_cache(path: Path, tensors: dict) -> None:
    from safetensors.torch import save
    from ..tcd.files import write_bytes_atomic
    write_bytes_atomic(save({k: v.contiguous() for k, v in tensors.items()}), path)
