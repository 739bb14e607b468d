"""The loss curve as a ComfyUI IMAGE ([1, H, W, 3] float in [0, 1]), drawn with PIL."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 320, first_step: int = 1,
                     validation: list | None = None) -> torch.Tensor:
    """Raw loss (light blue) and its moving average (dark blue) against the step, plus the loss on the fixed
    validation draws (orange dots, [step, value] pairs); log-scaled when the values span more than a decade."""
    validation = [(int(a), float(b)) for a, b in (validation or []) if math.isfinite(float(b))]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    finite = [v for v in list(losses) + [b for _, b in validation] if math.isfinite(v) and v > 0]
    if len(finite) < 1:
        draw.text((left + 8, top + 8), "no loss values", fill=(0, 0, 0))
        return _to_tensor(img)
    lo, hi = min(finite), max(finite)
    use_log = hi / lo > 10
    f = (lambda v: math.log10(v)) if use_log else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    span = (fhi - flo) or 1.0

    def point(i, v):
        x = left + (right - left) * (i / max(len(losses) - 1, 1))
        y = bottom - (bottom - top) * ((f(max(v, lo)) - flo) / span)
        return x, y

    def polyline(values, colour, w):
        pts = [point(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=w)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)

    polyline(losses, (150, 180, 230), 1)
    polyline(moving_average(losses, max(1, len(losses) // 20)), (20, 60, 160), 2)
    for step, v in validation:
        x, y = point(step - first_step, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
    draw.text((4, top - 4), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"step {first_step}", fill=(0, 0, 0))
    draw.text((right - 80, bottom + 6), f"step {first_step + len(losses) - 1}", fill=(0, 0, 0))
    draw.text((left + 4, 4), "TCD distillation loss" + (" (log scale)" if use_log else "")
              + ("; dots: validation draws" if validation else ""), fill=(0, 0, 0))
    return _to_tensor(img)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
