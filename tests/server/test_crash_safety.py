"""Crash safety of LoRA saves: the server process is killed (SIGKILL, no cleanup runs) while the trainer writes its
LoRA, at random moments, several times in a row. After every kill the loras folder holds the old complete file or
the new complete file, never a partial one (every .safetensors there loads completely), the loaders never offer a
leftover `.tmp`, and the next server resumes training from the last good checkpoint.

The kill moments, in a random order. "in write" rounds time one LoRA save (from its `<name>.safetensors.tmp` being
created to the rename) and kill the next save a random fraction of that time after its `.tmp` appears: inside the
write or the fsync. "after rename" rounds kill a random 0..AFTER_RENAME_MS after the `.tmp` was renamed over the
LoRA (while the folder entry is synced, or early in the next step). Both kinds always occur; if no "in write" kill
happened to land before its rename, extra rounds kill the moment the `.tmp` appears. The seed is printed; set
TCD_CRASH_SEED to replay a run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import comfyhost
from support import graphs, lora_files

ROUNDS = 5
AFTER_RENAME_MS = 10.0
EXTRA_ROUNDS = 2                 # at most, when no "in write" kill landed before its rename
ROUND_TIMEOUT = 120.0
NAME = "crash_lora"


def train_graph(steps=1000):
    inputs = {
        "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "image_folder": "crash_set", "resolution": 64,
        "steps": steps, "batch_size": 1, "learning_rate": 1e-3, "rank": 16, "alpha": 16.0, "w_min": 3.0,
        "w_max": 3.0, "original_steps": 50, "tcf_order": 1, "ema_decay": 0.95, "loss": "l2", "seed": 0,
        "lora_name": NAME, "save_every": 1, "resume": True, "validation_every": 0, "save_dtype": "fp32",
        "training_dtype": "fp32"}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "TCD_DistillLoRA", "inputs": inputs},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}}}


def load_completely(path: Path) -> tuple[dict, dict]:
    """Every tensor of a safetensors file (raises on any partial or damaged file) and its metadata."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, dict(f.metadata() or {})


def offered_loras(srv) -> set:
    names = set()
    for node in ("TCD_LoraLoader", "LoraLoader"):
        info = srv.get(f"/object_info/{node}")[node]["input"]["required"]["lora_name"]
        names.update(info[0])
    return names


@pytest.fixture
def crash_base(tmp_path, tiny_ckpt):
    base = comfyhost.prepare_base(tmp_path / "base")
    (base / "models" / "checkpoints" / "tiny_sd15.safetensors").symlink_to(tiny_ckpt)
    folder = base / "input" / "crash_set"
    folder.mkdir(parents=True)
    for i, colour in enumerate([(220, 40, 40), (40, 60, 220)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a plain colour {i}")
    # The "old" file: a complete LoRA for the model already under the name the trainer saves to.
    shapes = lora_files.tiny_sd15_shapes(tiny_ckpt)
    old = lora_files.tiny_sd15_diffusers_lora(shapes, rank=4)
    save_file(old, str(base / "models" / "loras" / f"{NAME}.safetensors"))
    return base


def _stat(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def kill_during_lora_save(srv, lora_tmp: Path, phase: str, fraction: float, rng, timeout: float) -> dict:
    """Queue a long training run and SIGKILL the server during a LoRA save (see the module docstring)."""
    leftover = _stat(lora_tmp)
    srv.queue(train_graph())
    t0 = time.time()

    def wait_for(condition, what):
        while not condition():
            if time.time() - t0 > timeout:
                raise TimeoutError(f"no {what} within {timeout}s:\n" + srv.log_tail())
            if not srv.alive():
                raise RuntimeError("the server died by itself:\n" + srv.log_tail())
            time.sleep(0.0001)
        return time.perf_counter()

    # A save begins when its .tmp is created, or when a .tmp left by the last kill is truncated and rewritten.
    began = wait_for(lambda: _stat(lora_tmp) not in (None, leftover), "LoRA save")
    renamed = wait_for(lambda: not lora_tmp.exists(), "rename of the LoRA")
    if phase == "in write":
        write_s = renamed - began
        old = lora_tmp.with_suffix("").read_bytes()     # what the next save replaces (a training step away)
        began = wait_for(lambda: lora_tmp.exists(), "second LoRA save")
        delay_s = fraction * write_s
    else:
        delay_s = rng.uniform(0.0, AFTER_RENAME_MS / 1000.0)
    while time.perf_counter() - began < delay_s:
        pass
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)
    srv.stop()
    info = {"delay_ms": round(delay_s * 1000, 2), "seconds_to_kill": round(time.time() - t0, 2)}
    if phase == "in write":
        info["timed_write_ms"] = round(write_s * 1000, 2)
        info["old"] = old
    return info


def test_sigkill_during_lora_saves_leaves_old_or_new_complete_file(crash_base, comfyui_path):
    seed = int(os.environ.get("TCD_CRASH_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    print(f"TCD_CRASH_SEED={seed}")
    loras = crash_base / "models" / "loras"
    target, lora_tmp = loras / f"{NAME}.safetensors", loras / f"{NAME}.safetensors.tmp"
    state = crash_base / "output" / "tcd_train" / f"{NAME}.state.pt"
    previous = target.read_bytes()
    previous_steps, layer_keys = 0, None
    rounds = []
    phases = rng.sample(["in write"] * (ROUNDS - ROUNDS // 2) + ["after rename"] * (ROUNDS // 2), ROUNDS)
    while phases:
        phase = phases.pop(0)
        extra = len(rounds) >= ROUNDS
        srv = comfyhost.ComfyServer(crash_base, comfyui_path)
        srv.start()
        try:
            listed = offered_loras(srv)
            assert f"{NAME}.safetensors" in listed and not [n for n in listed if n.endswith(".tmp")], listed
            info = kill_during_lora_save(srv, lora_tmp, phase, 0.0 if extra else rng.uniform(0.0, 0.8), rng,
                                         ROUND_TIMEOUT)
        finally:
            srv.stop()
        # Every .safetensors in the folder is complete; the target is byte-for-byte the old file or a new
        # complete trainer file at a step no earlier than the last one seen.
        for path in sorted(loras.glob("*.safetensors")):
            load_completely(path)
        now = target.read_bytes()
        tensors, meta = load_completely(target)
        tmp_left = lora_tmp.exists()
        old = info.pop("old", previous)          # the file the killed save was replacing
        if now == old:
            outcome = "old file"
        else:
            steps = int(meta["tcd.steps"])
            assert len(json.loads(meta["tcd.losses"])) == steps >= max(previous_steps, 1), meta
            assert all(torch.isfinite(t).all() for t in tensors.values())
            layer_keys = layer_keys or set(tensors)
            assert set(tensors) == layer_keys
            outcome, previous_steps = f"new file (step {steps})", steps
        previous = now
        if state.exists():                      # the resumable checkpoint is complete too (old or new)
            torch.load(state, map_location="cpu", weights_only=True)
        # A .tmp is left exactly when the kill came before the rename, and then the old file must be intact.
        assert tmp_left == (outcome == "old file"), (phase, tmp_left, outcome)
        rounds.append({"round": len(rounds) + 1, "phase": phase + (" (extra)" if extra else ""),
                       "tmp_left": tmp_left, "outcome": outcome, **info})
        print(rounds[-1])
        if not phases and not any(r["tmp_left"] for r in rounds) and len(rounds) < ROUNDS + EXTRA_ROUNDS:
            phases.append("in write")

    # A fresh server: a leftover .tmp is never offered, and the LoRA in the folder loads in the pack's loader.
    srv = comfyhost.ComfyServer(crash_base, comfyui_path)
    srv.start()
    try:
        listed = offered_loras(srv)
        assert not [n for n in listed if n.endswith(".tmp")], listed
        g = graphs.txt2img(steps=1, seed=5, prefix="after_crash")
        g["20"] = {"class_type": "TCD_LoraLoader", "inputs": {
            "model": ["1", 0], "lora_name": f"{NAME}.safetensors", "strength_model": 1.0}}
        g["5"]["inputs"]["model"] = ["20", 0]
        assert srv.run_prompt(g)["images"]
    finally:
        srv.stop()
    print("kills that landed inside the write (a .tmp was left):", sum(r["tmp_left"] for r in rounds), "of", ROUNDS)
    print("rounds:", json.dumps(rounds))
    assert previous_steps >= 1, "no new LoRA after an 'after rename' kill: the rename did not make it complete"
    assert any(r["tmp_left"] for r in rounds), "no kill landed inside a LoRA write, even at 0 ms after its .tmp"
