"""Resumable training state: LoRA, EMA, optimizer, step, RNG states and the loss history, in one file.

Written with torch.save to `<name>.tmp` and moved into place (tcd.files.write_bytes_atomic), read back with
`weights_only=True` (tensors, numbers, strings, lists, dicts only: no code runs on load).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ..tcd.files import write_bytes_atomic

FORMAT = "tcd-train-state/1"


def save_state(state: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    return write_bytes_atomic(buffer.getvalue(), path)


def load_state(path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, ...
        # torch's own text is left out on purpose: for a non-archive it advises weights_only=False, which would
        # run code from an untrusted file.
        raise ValueError(f"the training checkpoint {str(path)!r} cannot be read ({type(e).__name__}): it is not a "
                         f"complete checkpoint written by this trainer (truncated, or another kind of file). "
                         f"Delete it to start over, or turn resume off") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a training checkpoint of this trainer (format "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected "
                         f"{FORMAT!r}). Delete it to start over, or turn resume off")
    return state


def config_differences(saved: dict, current: dict, ignore=()) -> list[str]:
    """Settings that differ between a checkpoint and this run ("name: saved -> now"), ignoring `ignore` keys."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
