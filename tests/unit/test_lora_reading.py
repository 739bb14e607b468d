"""tcd.lora.io without ComfyUI: only a broken or non-safetensors file is called corrupt; running out of memory and
operating-system errors say what happened; RecentFile never keeps a file's weights alive on its own.

The memory and OS failures are real ones, made in a child process: an address-space limit (RLIMIT_AS) smaller
than the file, an open-files limit (RLIMIT_NOFILE) already reached, and a file the process may not read."""
import gc
import json
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tcd import lora as tl

REPO = Path(__file__).resolve().parents[2]

# Runs in a child process (the limits and the user change stay there). argv: the scenario, the file.
CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[3])
from tcd.lora import read_lora_file
import safetensors  # imported before the limits: the reader imports it lazily

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

scenario, path = sys.argv[1], sys.argv[2]
if scenario == "memory":          # room for a few MB more than the process has mapped: less than the file
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + 8 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
elif scenario == "open-files":    # the lowest free descriptor is the limit: the next open() fails
    free = os.dup(0)
    os.close(free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
elif scenario == "permission":
    if os.getuid() == 0:          # root reads anything: become 'nobody', who cannot enter the 0700 folder
        os.setgid(65534)
        os.setuid(65534)
    else:
        os.chmod(path, 0)
try:
    read_lora_file(path)
    result = ["read", ""]
except BaseException as e:
    result = [type(e).__name__, str(e)]
print(json.dumps(result))
"""


def _read_in_child(scenario: str, path: Path) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, scenario, str(path), str(REPO)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kind, message = json.loads(out.stdout.strip().splitlines()[-1])
    return kind, message


def _lora(path: Path, numel: int = 16, value: float = 1.0) -> Path:
    save_file({"lora_unet_a.lora_up.weight": torch.full((numel,), value).reshape(-1, 4),
               "lora_unet_a.lora_down.weight": torch.full((4, 4), value), "lora_unet_a.alpha": torch.tensor(2.0)},
              str(path), metadata={"k": "v"})
    return path


# ------------------------------------------------------------------------------------------------ read errors
def test_out_of_memory_is_reported_as_memory_with_the_file_size(tmp_path):
    path = _lora(tmp_path / "big.safetensors", numel=16 * 2**20)       # 64 MiB of weights
    kind, message = _read_in_child("memory", path)
    assert kind == "MemoryError", message
    assert "not enough memory to read the LoRA 'big.safetensors' (67.1 MB on disk" in message
    assert "Free memory" in message and "corrupt" not in message


def test_an_os_error_names_the_path_and_the_systems_reason(tmp_path):
    path = _lora(tmp_path / "fine.safetensors")
    kind, message = _read_in_child("open-files", path)
    assert kind == "OSError", message
    assert f"cannot read the LoRA file {str(path)!r}: Too many open files (EMFILE)" in message
    assert "corrupt" not in message and "Check the file's permissions" in message


def test_permission_denied_names_the_path(tmp_path):
    path = _lora(tmp_path / "locked.safetensors")
    tmp_path.chmod(0o700)            # whoever runs the tests, 'nobody' may not enter the file's folder
    kind, message = _read_in_child("permission", path)
    assert kind == "OSError", message
    assert f"cannot read the LoRA file {str(path)!r}: Permission denied (EACCES)" in message
    assert "corrupt" not in message


def test_missing_files_and_folders_say_what_is_at_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"'gone.safetensors' does not exist \(no file at .*gone\.safetensors'\)"):
        tl.read_lora_file(tmp_path / "gone.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"'folder.safetensors' is a folder .* Choose a file inside that folder"):
        tl.read_lora_file(tmp_path / "folder.safetensors")


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


@pytest.mark.parametrize("label,header", [
    ("unknown dtype", {"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}),
    ("shape against offsets", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
    ("overlapping tensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}),
    ("offsets not numbers", {"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}),
    ("no offsets", {"a": {"dtype": "F32", "shape": [2]}}),
    ("metadata not text", {"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
])
def test_inconsistent_safetensors_headers_are_corrupt(tmp_path, label, header):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(ValueError, match=r"'bad.safetensors' is corrupt: safetensors could not read it .*Get the "
                                         r"file again"):
        tl.read_lora_file(path)


# ------------------------------------------------------------------------------------------------ RecentFile
def test_recent_file_reuses_tensors_only_while_something_else_holds_them(tmp_path):
    recent = tl.RecentFile()
    path = _lora(tmp_path / "a.safetensors")
    first, meta = recent.read(path)
    again, meta_again = recent.read(path)
    assert all(again[k] is first[k] for k in first) and meta_again == meta == {"k": "v"}
    assert list(again) == list(first)                                        # the file's key order
    up = weakref.ref(first["lora_unet_a.lora_up.weight"])
    del first, again
    gc.collect()
    assert up() is None                                                      # the memo kept nothing alive
    reread, _ = recent.read(path)
    assert torch.equal(reread["lora_unet_a.lora_up.weight"], torch.ones(4, 4))


def test_recent_file_lets_the_previous_file_go_and_notices_a_changed_file(tmp_path):
    recent = tl.RecentFile()
    a, _ = recent.read(_lora(tmp_path / "a.safetensors"))
    refs = [weakref.ref(t) for t in a.values()]
    del a
    b, _ = recent.read(_lora(tmp_path / "b.safetensors", value=2.0))
    gc.collect()
    assert all(r() is None for r in refs)                                    # nothing of a.safetensors is left
    path = tmp_path / "b.safetensors"
    st = path.stat()
    _lora(path, value=3.0)                                                  # same size, rewritten
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = recent.read(path)
    assert changed["lora_unet_a.lora_up.weight"] is not b["lora_unet_a.lora_up.weight"]
    assert float(changed["lora_unet_a.lora_up.weight"][0, 0]) == 3.0


def test_recent_file_reads_again_only_the_weights_nothing_holds(tmp_path):
    recent = tl.RecentFile()
    path = _lora(tmp_path / "a.safetensors")
    first, _ = recent.read(path)
    kept = first["lora_unet_a.lora_up.weight"]          # what a patched model would hold: the applied layers
    down = weakref.ref(first["lora_unet_a.lora_down.weight"])
    del first
    gc.collect()
    assert down() is None
    again, _ = recent.read(path)
    assert again["lora_unet_a.lora_up.weight"] is kept
    assert torch.equal(again["lora_unet_a.lora_down.weight"], torch.ones(4, 4))
    assert list(again) == ["lora_unet_a.alpha", "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"]
