"""Reading a LoRA file: safetensors only, with an error that names what the file is when it is not one, and one
that says what happened when reading fails for another reason (memory, the operating system).

The safetensors layout checked here: an 8-byte little-endian header length, a JSON object (which begins with
'{'), then the tensor bytes that the header's `data_offsets` point into.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import struct
import weakref
from pathlib import Path

import torch

from .messages import fail

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# What a file that is not safetensors usually turns out to be (by its first bytes), named in the error so the user
# knows what they downloaded: an image, an archive, a saved web page, a Git LFS pointer of an un-pulled clone.
FILE_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                   (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"),
                   (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded: "
                                                "run `git lfs pull` or download the file itself)"),
                   (b"<", "an HTML/XML page (a login or error page saved in place of the file)"))
GET_AGAIN = "The download or copy did not finish: get the file again"


def read_lora_file(path, keys=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA; with `keys`, only those tensors.

    A ValueError for every kind of bad file; a MemoryError naming the file's size when memory runs out; an
    OSError naming the path and the system's reason when the file cannot be opened or read. Only safetensors is
    parsed: pickle-based files (.ckpt/.pt/.bin) can run arbitrary code when loaded, so they are refused by name
    and by content (a zip or pickle header inside a file named .safetensors).
    """
    path = Path(path)
    _refuse_by_name(path)
    try:
        size = _regular_file_size(path)
        _check_layout(path, size)
        return _read_tensors(path, keys)
    except MemoryError as e:
        raise MemoryError(_out_of_memory_message(path, e)) from e
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise MemoryError(_out_of_memory_message(path, e)) from e
        error = OSError(_os_error_message(path, e))
        error.errno = e.errno       # for callers that test it; the message already names it
        raise error from e


def _refuse_by_name(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise fail(f"{path.name!r} is a pickle-based file ({path.suffix})",
                   "Only .safetensors LoRA files are loaded: pickle files can run arbitrary code when opened",
                   "Convert it to .safetensors with a tool you trust, or download the .safetensors release")
    if path.suffix.lower() != ".safetensors":
        raise fail(f"{path.name!r} is not a .safetensors file", "The loader reads .safetensors LoRA files only",
                   "Choose a .safetensors file from the loras folder")


def _regular_file_size(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail(f"LoRA file {path.name!r} does not exist (no file at {str(path)!r})",
                   "The name must be a file in a loras folder",
                   "Refresh the list or put the file into models/loras") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail(f"{path.name!r} is a folder ({str(path)!r})", "A LoRA is a .safetensors file",
                   "Choose a file inside that folder instead")
    if not stat.S_ISREG(st.st_mode):
        raise fail(f"{path.name!r} is not a regular file ({str(path)!r})", "A LoRA is a .safetensors file on disk",
                   "Choose a file from the loras folder")
    if st.st_size == 0:
        raise fail(f"{path.name!r} is empty (0 bytes)", "A LoRA file holds a safetensors header and tensors",
                   GET_AGAIN)
    return st.st_size


def _check_layout(path: Path, size: int) -> None:
    """ValueError when the bytes are not a complete safetensors file, naming what they are where that is known."""
    with open(path, "rb") as f:
        head = f.read(32)
    header_len = _header_length(path.name, head, size)
    _check_header(path, header_len, size)


def _header_length(name: str, head: bytes, size: int) -> int:
    """The header length of a file that starts like safetensors; a ValueError naming what else it is."""
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    looks_safetensors = header_len is not None and header_len <= size - 8 and head[8:9] == b"{"
    # Zip (torch.save since 1.6) starts with PK\x03\x04, a raw pickle with \x80 and the protocol (2..5). Checked
    # only when the bytes are not a plausible safetensors header: its length field may start with those bytes too.
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_safetensors and (is_zip or is_pickle):
        raise fail(f"{name!r} is a pickle/zip (PyTorch .pt) file with a .safetensors name",
                   "Only real safetensors content is loaded: pickle can run arbitrary code",
                   "Convert it to safetensors with a tool you trust, or get the real .safetensors file")
    if header_len is None:
        raise fail(f"{name!r} is truncated ({size} bytes, shorter than the 8-byte safetensors header length)",
                   "A safetensors file starts with an 8-byte header length, a JSON header, then the tensors",
                   GET_AGAIN)
    if len(head) >= 9 and head[8:9] != b"{":
        kind = next((what for magic, what in FILE_SIGNATURES if head.lstrip().startswith(magic)), None)
        raise fail(f"{name!r} is not a safetensors file: "
                   + (f"it is {kind}" if kind else f"it starts with the bytes {head[:12].hex(' ')}"),
                   "A safetensors LoRA starts with an 8-byte header length and a JSON header beginning with '{'",
                   "Download the LoRA's .safetensors file again (the file itself, not its web page)")
    if header_len > size - 8:
        raise fail(f"{name!r} is truncated or not safetensors: its header claims {header_len} bytes but the file "
                   f"has {size}", "A complete safetensors file is needed", GET_AGAIN)
    return header_len


def _check_header(path: Path, header_len: int, size: int) -> None:
    """A ValueError when the JSON header is unreadable or points past the end of the file."""
    name = path.name
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"{name!r} is corrupt: its safetensors header is not valid JSON ({e})",
                   "A safetensors file starts with a JSON header", "Get the file again") from None
    if not isinstance(header, dict):
        raise fail(f"{name!r} is corrupt: its safetensors header is not a JSON object",
                   "A safetensors file starts with a JSON object", "Get the file again")
    data_end = _declared_data_end(header)
    if data_end is not None and 8 + header_len + data_end > size:
        raise fail(f"{name!r} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has "
                   f"{size}", "A complete safetensors file is needed", GET_AGAIN)


def _declared_data_end(header: dict) -> int | None:
    """Where the header says the last tensor ends; None when an entry is malformed (safetensors then names it)."""
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return None
        ends.append(offsets[1])
    return max(ends, default=0)


def _read_tensors(path: Path, keys=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys() if keys is None else keys:
                tensors[key] = f.get_tensor(key)
    except SafetensorError as e:   # what safetensors raises for a header or offsets it cannot use
        raise fail(f"{path.name!r} is corrupt: safetensors could not read it ({e})",
                   "A valid safetensors file is needed", "Get the file again") from None
    except (MemoryError, OSError):
        raise
    except Exception as e:   # e.g. torch failing to map the bytes: the file may be fine, so it is not "corrupt"
        raise RuntimeError(f"{path.name!r} could not be read ({type(e).__name__}: {e}). Its safetensors header is "
                           f"valid, so this is rarely the file's fault. Check free memory and disk, then run "
                           f"again; if it fails again, get the file again") from e
    return tensors, metadata


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _out_of_memory_message(path: Path, error: BaseException) -> str:
    try:
        size = f"{_size_text(path.stat().st_size)} on disk"
    except OSError:
        size = "size unknown"
    return (f"not enough memory to read the LoRA {path.name!r} ({size}; {type(error).__name__}: {error}). "
            f"The loader reads the whole file into system memory (RAM), about its size on disk. Free memory "
            f"(close other programs, or free ComfyUI's loaded models) and run again, or use a smaller file (a "
            f"lower-rank LoRA)")


def _os_error_message(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    where = error.filename if error.filename not in (None, str(path)) else None
    return (f"cannot read the LoRA file {str(path)!r}: {reason}" + (f" ({code})" if code else "")
            + (f" at {where!r}" if where else "")
            + ". The file must exist and be readable by the user ComfyUI runs as. Check the file's permissions and "
              "that it is still there (not moved, deleted, or on a disconnected drive), refresh the list, and run "
              "again")


class RecentFile:
    """The last LoRA file read, holding its weights by weak reference only.

    A loader that runs again on the same unchanged file (a new strength, another model) gets the same tensors
    without reading them again, for as long as something else keeps them: the patched model that ComfyUI's
    execution cache holds as the node's output does. Weights nothing holds any more (all of them once that output
    is dropped, or the layers the last run left out) are read from the file again. A strong cache would keep the
    last file's weights (up to a GB for a Flux LoRA) for the life of the server, whatever ComfyUI's own caching
    decided. Scalars (the alphas, which the canonical form copies) are kept as they are: a few bytes each.
    """

    def __init__(self):
        self._identity = None     # (path, mtime_ns, size) of the file
        self._order: list[str] = []     # its keys, in the file's order
        self._weights: dict[str, weakref.ref] = {}
        self._scalars: dict[str, torch.Tensor] = {}
        self._metadata: dict[str, str] = {}

    def read(self, path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        identity = _identity(path)
        if identity is None or identity != self._identity:
            tensors, metadata = read_lora_file(path)
        else:   # the same file: read only the weights nothing holds any more (layers the last run left out)
            alive = {key: ref() for key, ref in self._weights.items()}
            gone = [key for key, t in alive.items() if t is None]
            fresh = read_lora_file(path, gone)[0] if gone else {}
            tensors = {key: self._scalars.get(key, alive.get(key)) for key in self._order}
            tensors.update(fresh)
            metadata = dict(self._metadata)
        self._identity, self._order = identity, list(tensors)
        self._weights = {key: weakref.ref(t) for key, t in tensors.items() if t.numel() > 1}
        self._scalars = {key: t for key, t in tensors.items() if t.numel() <= 1}
        self._metadata = dict(metadata)
        return tensors, metadata


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None      # read_lora_file says what is wrong with the path
    return str(path), st.st_mtime_ns, st.st_size
