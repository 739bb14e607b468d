"""Whether ComfyUI is importable, the devices it chooses, Cancel and progress, and its folders.

Without ComfyUI the helpers fall back to plain torch (CPU or the first CUDA device, a no-op progress bar), so `tcd`
stays usable by the accelerate CLI and the tests that need no host.
"""
from __future__ import annotations

import torch


def has_comfy() -> bool:
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:
        return False
    return True



def torch_device() -> torch.device:
    if has_comfy():
        import comfy.model_management as mm
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    if has_comfy():
        import comfy.model_management as mm
        return mm.intermediate_device()
    return torch.device("cpu")


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (no-op without ComfyUI)."""
    if has_comfy():
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """comfy.utils.ProgressBar when ComfyUI runs (UI progress; its hook also raises on Cancel), else nothing."""

    def __init__(self, total: int):
        self.total = total
        self._bar = None
        if has_comfy():
            import comfy.utils
            self._bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
        throw_if_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """True for ComfyUI's Cancel (InterruptProcessingException)."""
    if not has_comfy():
        return False
    import comfy.model_management as mm
    return isinstance(exc, mm.InterruptProcessingException)



def output_directory() -> str:
    import folder_paths
    return folder_paths.get_output_directory()


def input_directory() -> str:
    import folder_paths
    return folder_paths.get_input_directory()

