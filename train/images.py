"""Captioned training images, one implementation for the TCD Distill LoRA node and the accelerate CLI.

A dataset is a folder (searched recursively) of images, each with a same-name UTF-8 `.txt` caption (an empty
caption trains that image unconditionally). An image is opened with its EXIF orientation applied, converted to RGB,
resized so its shorter side is the training resolution (Lanczos), and cropped to a square: centred (the node, and
the CLI by default) or at a seeded random offset (the CLI's --random_crop).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Part of the node's latent-cache key: bump it when the preprocessing below changes, so stale encodings are not
# reused.
PREPROCESSING_VERSION = "exif-lanczos-centre-1"


def list_captioned_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption text) pairs under `folder` (recursively), sorted by path; clear errors for an empty folder,
    images without a caption file and captions that are not UTF-8 text."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise ValueError(f"no images in {str(folder)!r} or its subfolders (looked for {', '.join(IMAGE_SUFFIXES)}; "
                         f"found {present or 'nothing'}). Put the training images there, each with a same-name "
                         f".txt caption")
    missing = [str(p.relative_to(folder)) for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(images)} image(s) in {str(folder)!r} have no caption file: "
                         f"{missing[:10]}. Each image needs a same-name .txt caption (e.g. "
                         f"{Path(missing[0]).with_suffix('.txt')}); an empty file trains that image unconditionally")
    pairs = []
    for p in images:
        caption_file = p.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption {str(caption_file.relative_to(folder))!r} in {str(folder)!r} is not UTF-8 "
                             f"text (byte {e.start}); save it as UTF-8") from None
        pairs.append((p, caption))
    return pairs


def open_rgb(path: Path):
    """A PIL image, EXIF orientation applied (phones store portraits as rotated landscapes), in RGB."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im.convert("RGB")
    except Exception as e:      # PIL raises many types for broken files: report every one the same way
        raise ValueError(f"cannot read training image {path.name!r} in {str(path.parent)!r} "
                         f"({type(e).__name__}: {e}). Replace or remove that file (and its caption)") from None


def resize_shorter_side(im, resolution: int):
    """Resize so the shorter side is `resolution` (the longer one rounded, at least `resolution`)."""
    from PIL import Image
    w, h = im.size
    scale = resolution / min(w, h)
    return im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.LANCZOS)


def centre_crop_origin(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the centred square crop."""
    return (height - resolution) // 2, (width - resolution) // 2


def random_crop_origin(width: int, height: int, resolution: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a square crop at a uniformly drawn offset."""
    return int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))


def crop_square(im, top: int, left: int, resolution: int):
    return im.crop((left, top, left + resolution, top + resolution))


def as_array(im) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]."""
    return np.asarray(im, dtype=np.float32) / 255.0


def load_square(path: Path, resolution: int) -> np.ndarray:
    """The node's preprocessing: opened, resized, centre-cropped; [R, R, 3] float32 in [0, 1]."""
    im = resize_shorter_side(open_rgb(path), resolution)
    top, left = centre_crop_origin(*im.size, resolution)
    return as_array(crop_square(im, top, left, resolution))
