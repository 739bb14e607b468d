"""File writes that never leave a partial file behind.

A LoRA or checkpoint is written to `<path>.tmp` in the destination folder, flushed and fsync'ed, then moved over
the destination with `os.replace` (atomic on POSIX and Windows when both paths are on one filesystem, which the
same folder guarantees). A reader, ComfyUI's file lists included, sees the old complete file or the new complete
file, never a half-written one; a crash mid-write leaves at most the `.tmp` file, which no loader lists as a LoRA.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the folder entry is on disk (POSIX); Windows cannot open folders.
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path) -> Path:
    """Write `data` to `path` atomically (`<path>.tmp` in the same folder, fsync, os.replace)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot save {path.name!r}: the folder {str(path.parent)!r} does not exist; "
                         f"create it or choose an existing folder")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Interrupted or failed (disk full, permissions): remove the temporary file, keep any old file.
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_safetensors_atomic(state_dict: dict, path, metadata: dict | None = None) -> Path:
    """Save a tensor dict as .safetensors atomically. Metadata keys and values must be strings (safetensors rule).

    Tensors are made contiguous and moved to the CPU first, as safetensors requires; shared storage is copied.
    """
    from safetensors.torch import save as st_save

    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"cannot save {Path(path).name!r}: every entry must be a str key with a torch.Tensor "
                         f"value; these are not: {bad[:10]}")
    if metadata is not None:
        bad_meta = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad_meta:
            raise ValueError(f"safetensors metadata must map str to str; these entries do not: {bad_meta[:10]} "
                             f"(convert the values with str() or json.dumps())")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return write_bytes_atomic(st_save(tensors, metadata=metadata), path)


def resolve_inside(folders, name, kind: str = "file", folder_label: str = "model") -> str:
    """The path `name` names inside one of `folders` (relative to it, or already absolute inside it); a clear
    ValueError when it would leave every folder ('../x', '/etc/x', 'C:\\x', a NUL byte).

    The check is lexical (os.path.normpath, no symlink resolution): a link the user puts inside the folder
    is allowed, a name that climbs out of it is not.
    """
    import os
    name = str(name)
    if not name or "\x00" in name:
        raise ValueError(f"invalid {kind} name {name!r}. Allowed: a file name from the {folder_label} folder. "
                         f"Pick a name from the list.")
    roots = [os.path.normpath(os.path.abspath(f)) for f in folders]
    parts = name.replace("\\", "/").split("/")
    for root in roots:
        candidate = os.path.normpath(name if os.path.isabs(name) else os.path.join(root, name))
        if os.path.isabs(name) and candidate.startswith(root + os.sep):
            return candidate
        if not os.path.isabs(name) and ".." not in parts and not re.match(r"^[A-Za-z]:", name) \
                and candidate.startswith(root + os.sep):
            return candidate
    raise ValueError(f"{kind} name {name!r} points outside the {folder_label} folders ({', '.join(roots)}). "
                     f"Allowed: a file inside them (sub-folders are fine, '..' and absolute paths elsewhere are "
                     f"not). Pick a name from the list.")
