"""Temporary ComfyUI folders for in-process tests: an extra loras folder, or ComfyUI's output folder, registered
for the duration of a `with` block and put back as they were afterwards."""
import contextlib
from pathlib import Path


@contextlib.contextmanager
def loras_folder(path: Path, first: bool = False):
    """`path` as a loras folder; `first` puts it ahead of the host's own, so files the pack writes land there."""
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(path), is_default=first)
    try:
        yield Path(path)
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(path))


@contextlib.contextmanager
def output_folder(path: Path):
    """`path` as ComfyUI's output folder."""
    import folder_paths
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(path))
    try:
        yield Path(path)
    finally:
        folder_paths.set_output_directory(previous)
