"""Bad inputs through the real server API, as one table: every case gives a clear error (what was given, what is
allowed), leaves nothing partial in models/loras or output/, and the next prompt runs. Cancel (/interrupt) stops
sampling and training mid-loop. A corrupt training checkpoint gives a clear error while the previous good LoRA
stays usable, and a partial checkpoint write beside a good one does not stop a resume.

Every message is recorded in benchmarks/results/bad_input_matrix.json (refreshed by `make docs-assets`; a plain run
writes a temp copy); docs/bad_inputs.md lists them.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import comfyhost
from support import graphs, lora_files
from support.artifacts import artifact_path

REPO = Path(__file__).resolve().parents[2]
TRACKED_MATRIX = REPO / "benchmarks" / "results" / "bad_input_matrix.json"
MATRIX_JSON = artifact_path(TRACKED_MATRIX)
PREFIX = "hard_"                                    # every file this module puts in the server's folders
NAN = float("nan")


# ------------------------------------------------------------------------------------------------ graphs
def _seed() -> int:
    return int(time.time() * 1000) % 1_000_000 + int.from_bytes(os.urandom(2), "little")


def txt2img(**kw):
    return graphs.txt2img(steps=kw.pop("steps", 1), seed=_seed(), prefix=PREFIX + "img", **kw)


def advanced(sampler=None, scheduler=None, sigmas=None, model=None, sigmas_from=None):
    """SamplerCustomAdvanced + TCD Sampler + TCD Scheduler. `sigmas` (node, inputs, output slot) goes between the
    scheduler ("11") and the sampler; `sigmas_from` (node, inputs) replaces the scheduler as the SIGMAS source;
    `model` (node, inputs) patches the model of both the scheduler and the guider."""
    g = graphs.tcd_custom_advanced(seed=_seed(), prefix=PREFIX + "adv")
    g["10"]["inputs"].update(sampler or {})
    g["11"]["inputs"].update(scheduler or {})
    if sigmas:
        node, inputs, slot = sigmas
        g["15"] = {"class_type": node, "inputs": {"sigmas": ["11", 0], **inputs}}
        g["14"]["inputs"]["sigmas"] = ["15", slot]
    if sigmas_from:
        node, inputs = sigmas_from
        g["15"] = {"class_type": node, "inputs": inputs}
        g["14"]["inputs"]["sigmas"] = ["15", 0]
    if model:
        node, inputs = model
        g["16"] = {"class_type": node, "inputs": {"model": ["1", 0], **inputs}}
        g["11"]["inputs"]["model"] = g["13"]["inputs"]["model"] = ["16", 0]
    return g


def ksampler_on(model_node, inputs, **kw):
    g = txt2img(**kw)
    g["16"] = {"class_type": model_node, "inputs": {"model": ["1", 0], **inputs}}
    g["5"]["inputs"]["model"] = ["16", 0]
    return g


def lora_graph(name, seed=None):
    g = graphs.txt2img(steps=1, seed=seed or _seed(), prefix=PREFIX + "lora")
    g["20"] = {"class_type": "TCD_LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": 1.0, "strength_clip": 1.0,
        "on_unmatched": "error"}}
    g["5"]["inputs"]["model"] = ["20", 0]
    g["2"]["inputs"]["clip"] = g["3"]["inputs"]["clip"] = ["20", 1]
    return g


def train_graph(lora_name, folder=PREFIX + "set", steps=1, **overrides):
    inputs = {
        "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "image_folder": folder, "resolution": 64,
        "steps": steps, "batch_size": 1, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "w_min": 3.0,
        "w_max": 3.0, "original_steps": 50, "tcf_order": 1, "ema_decay": 0.95, "loss": "l2", "seed": 0,
        "lora_name": lora_name, "save_every": 1, "resume": True, "validation_every": 0, "save_dtype": "fp32",
        "training_dtype": "fp32"}
    inputs.update(overrides)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "TCD_DistillLoRA", "inputs": inputs},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": PREFIX + "loss"}}}


# ------------------------------------------------------------------------------------------------ files
def _png(colour=(200, 60, 40)) -> Image.Image:
    img = Image.new("RGB", (64, 64), colour)
    for x in range(0, 64, 8):
        img.putpixel((x, x), (0, 0, 0))
    return img


def write_bad_files(loras: Path, inputs: Path, ckpt: Path) -> None:
    """The bad LoRA files and training folders the table refers to (names start with PREFIX)."""
    shapes = lora_files.tiny_sd15_shapes(ckpt)
    good = lora_files.tiny_sd15_diffusers_lora(shapes, rank=4)
    save_file(good, str(loras / f"{PREFIX}good.safetensors"))
    data = (loras / f"{PREFIX}good.safetensors").read_bytes()
    sdxl = lora_files.tiny_sd15_diffusers_lora(shapes, rank=4, context=2048)    # cross-attention 2048 wide
    save_file(sdxl, str(loras / f"{PREFIX}sdxl.safetensors"))
    (loras / f"{PREFIX}truncated.safetensors").write_bytes(data[: len(data) // 2])
    (loras / f"{PREFIX}zero.safetensors").write_bytes(b"")
    (loras / f"{PREFIX}header.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    buf = io.BytesIO()
    _png().save(buf, format="PNG")
    (loras / f"{PREFIX}png.safetensors").write_bytes(buf.getvalue())
    (loras / f"{PREFIX}html.safetensors").write_bytes(b"<!DOCTYPE html><html><body>Sign in to download</body></html>")
    (loras / f"{PREFIX}lfs.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 134621556\n")
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / f"{PREFIX}pickle.ckpt")
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, loras / f"{PREFIX}pickle_renamed.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(loras / f"{PREFIX}checkpoint.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(loras / f"{PREFIX}vae.safetensors"))
    save_file({}, str(loras / f"{PREFIX}no_tensors.safetensors"))
    unmatched = dict(good)
    unmatched["unet.down_blocks.3.resnets.0.conv1.lora.down.weight"] = torch.zeros(4, 320, 3, 3)
    unmatched["unet.down_blocks.3.resnets.0.conv1.lora.up.weight"] = torch.zeros(320, 4, 1, 1)
    save_file(unmatched, str(loras / f"{PREFIX}unmatched.safetensors"))
    nan = {k: v.clone() for k, v in good.items()}
    nan["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"][0, 0] = NAN
    save_file(nan, str(loras / f"{PREFIX}nan.safetensors"))
    # Layers without alpha keys take their scale from diffusers' saved LoraConfig; here it is not JSON.
    save_file(good, str(loras / f"{PREFIX}bad_metadata.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": "{'r': 4, 'lora_alpha': 4"})
    (loras / f"{PREFIX}blocker").write_text("a file where the trainer would need a folder\n")

    def folder(name, images=(), captions=()):
        d = inputs / f"{PREFIX}{name}"
        d.mkdir(parents=True, exist_ok=True)
        for image in images:
            _png().save(d / image)
        for caption, text in captions:
            (d / caption).write_bytes(text)
        return d

    folder("set", ["a.png"], [("a.txt", b"a red square")])
    folder("empty")
    folder("nocaption", ["a.png", "lonely.png"], [("a.txt", b"a red square")])
    (folder("broken", ["a.png"], [("a.txt", b"a red square"), ("broken.txt", b"broken")])
     / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    folder("latin1", ["a.png"], [("a.txt", "caf\u00e9 au lait".encode("latin-1"))])


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    given: str                       # the bad input, in words
    graph: Callable[[], dict]
    outcome: str                     # rejected (400 at /prompt) | failed (node error in /history) | runs
    node: str | None                 # the node class named in the error
    expect: tuple = ()               # substrings of the message: what was given, what is allowed
    setup: Callable | None = None    # (server) -> undo function, for cases that change the server's folders
    note: str = ""                   # for cases that run: why that is the right answer
    forbid: tuple = ()               # substrings the message must not contain (unsafe or misleading advice)


def _block_train_folder(server):
    """Put a file where the trainer keeps its checkpoints and dataset cache (output/tcd_train)."""
    folder = server.base / "output" / "tcd_train"
    moved = folder.with_name(PREFIX + "tcd_train_moved")
    if folder.exists():
        folder.rename(moved)
    folder.write_text("a file where the trainer needs a folder\n")

    def undo():
        folder.unlink()
        if moved.exists():
            moved.rename(folder)
    return undo


def _state_file(name: str, content: bytes):
    def setup(server):
        state = server.base / "output" / "tcd_train" / f"{name}.state.pt"
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_bytes(content)

        def undo():
            state.unlink(missing_ok=True)
        return undo
    return setup


CASES = [
    # --- TCD Sampler: gamma
    Case("gamma_above_1", "TCD Sampler gamma = 1.5", lambda: advanced(sampler={"gamma": 1.5}),
         "rejected", "TCD_Sampler", ("1.5", "max of 1.0", "gamma")),
    Case("gamma_nan", "TCD Sampler gamma = NaN (JSON NaN in the API prompt)", lambda: advanced(sampler={"gamma": NAN}),
         "failed", "TCD_Sampler", ("gamma=nan", "outside [0, 1]")),
    Case("gamma_schedule_above_1", "gamma_schedule '0.3, 2.0'",
         lambda: advanced(sampler={"gamma_schedule": "0.3, 2.0"}), "failed", "TCD_Sampler",
         ("gamma=2.0", "outside [0, 1]")),
    Case("gamma_schedule_text", "gamma_schedule '0.3, x'", lambda: advanced(sampler={"gamma_schedule": "0.3, x"}),
         "failed", "TCD_Sampler", ("'x' is not a number", "[0, 1]")),
    Case("gamma_schedule_too_long", "gamma_schedule with 5 values for 4 steps",
         lambda: advanced(sampler={"gamma_schedule": "0.5, 0.4, 0.3, 0.2, 0.1"}), "failed", "SamplerCustomAdvanced",
         ("5 values", "runs 4 steps", "at most one value per step")),
    # --- steps and denoise
    Case("scheduler_steps_0", "TCD Scheduler steps = 0", lambda: advanced(scheduler={"steps": 0}),
         "rejected", "TCD_Scheduler", ("Value 0 smaller than min of 1", "steps")),
    Case("scheduler_steps_huge", "TCD Scheduler steps = 10^9", lambda: advanced(scheduler={"steps": 10 ** 9}),
         "rejected", "TCD_Scheduler", ("1000000000", "max of 1000", "steps")),
    Case("scheduler_steps_above_grid", "TCD Scheduler steps = 60 with original_steps = 50",
         lambda: advanced(scheduler={"steps": 60}), "failed", "TCD_Scheduler",
         ("steps=60 exceeds original_steps=50", "original_steps (e.g. 1000)")),
    Case("ksampler_steps_0", "KSampler (tcd/tcd) steps = 0", lambda: txt2img(steps=0),
         "rejected", "KSampler", ("Value 0 smaller than min of 1", "steps")),
    Case("ksampler_tcd_steps_10000", "KSampler with the tcd scheduler, steps = 10000", lambda: txt2img(steps=10000),
         "failed", "KSampler", ("asked for 10000 steps", "runs 1..50 steps", "TCD Scheduler node")),
    Case("scheduler_denoise_0", "TCD Scheduler denoise = 0", lambda: advanced(scheduler={"denoise": 0.0}),
         "failed", "TCD_Scheduler", ("denoise=0.0", "must be in (0, 1]")),
    Case("scheduler_denoise_tiny", "TCD Scheduler denoise = 0.01 with 4 steps",
         lambda: advanced(scheduler={"denoise": 0.01}), "failed", "TCD_Scheduler",
         ("denoise=0.01", "400-step schedule", "original_steps=50")),
    Case("ksampler_denoise_0", "KSampler (tcd/tcd) denoise = 0", lambda: txt2img(denoise=0.0),
         "runs", None, note="ComfyUI's KSampler makes empty SIGMAS at denoise 0 and returns the input latent "
                            "unchanged without calling any sampler or scheduler (core semantics for every sampler)"),
    # --- SIGMAS
    Case("sigmas_one_high", "SIGMAS with one value (SplitSigmas step 0, high_sigmas)",
         lambda: advanced(sigmas=("SplitSigmas", {"step": 0}, 0)), "failed", "SamplerCustomAdvanced",
         ("at least 2 values", "[14.614", "SplitSigmas")),
    Case("sigmas_one_low", "SIGMAS [0.0] (SplitSigmas at the last step, low_sigmas)",
         lambda: advanced(sigmas=("SplitSigmas", {"step": 4}, 1)), "failed", "SamplerCustomAdvanced",
         ("at least 2 values", "[0.0]", "SplitSigmas")),
    Case("sigmas_empty", "empty SIGMAS (SplitSigmas step 100, low_sigmas)",
         lambda: advanced(sigmas=("SplitSigmas", {"step": 100}, 1)), "runs", None,
         note="ComfyUI's guider returns the input latent unchanged for empty SIGMAS before any sampler is called "
              "(CFGGuider.sample: 0 steps); the TCD sampler never sees them"),
    Case("sigmas_nan", "NaN in SIGMAS (SetFirstSigma sigma = NaN)",
         lambda: advanced(sigmas=("SetFirstSigma", {"sigma": NAN}, 0)), "failed", "SamplerCustomAdvanced",
         ("NaN or inf", "[nan, 4.26", "finite")),
    Case("sigmas_inf", "inf in SIGMAS (VPScheduler beta_d = 5000)",
         lambda: advanced(sigmas_from=("VPScheduler", {"steps": 4, "beta_d": 5000.0, "beta_min": 0.1,
                                                       "eps_s": 0.001})),
         "failed", "SamplerCustomAdvanced", ("NaN or inf", "[inf, inf", "finite")),
    Case("sigmas_increasing", "increasing SIGMAS (FlipSigmas)",
         lambda: advanced(sigmas=("FlipSigmas", {}, 0)), "failed", "SamplerCustomAdvanced",
         ("non-increasing", "[0.0001, 0.71", "FlipSigmas")),
    # --- model sampling TCD cannot use
    Case("continuous_edm_scheduler", "TCD Scheduler on a ModelSamplingContinuousEDM model (no discrete schedule)",
         lambda: advanced(model=("ModelSamplingContinuousEDM", {"sampling": "eps", "sigma_max": 120.0,
                                                                "sigma_min": 0.002})),
         "failed", "TCD_Scheduler", ("ModelSamplingContinuousEDM", "0.002..120", "no discrete timesteps",
                                     "Allowed: a discrete schedule")),
    Case("continuous_v_ksampler", "KSampler tcd scheduler on a ModelSamplingContinuousV model",
         lambda: ksampler_on("ModelSamplingContinuousV", {"sampling": "v_prediction", "sigma_max": 500.0,
                                                          "sigma_min": 0.03}),
         "failed", "KSampler", ("ModelSamplingContinuousV", "no discrete timesteps", "karras")),
    Case("lcm_sampling", "TCD Scheduler on a model patched to LCM sampling (ModelSamplingDiscrete lcm)",
         lambda: advanced(model=("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False})),
         "failed", "TCD_Scheduler", ("patched to LCM", "'eps' / 'v_prediction'")),
    # --- LoRA files
    Case("lora_other_architecture", "SDXL LoRA on the SD1.5 model", lambda: lora_graph(f"{PREFIX}sdxl.safetensors"),
         "failed", "TCD_LoraLoader", ("is for SDXL", "context 2048", "model is SD1.x")),
    Case("lora_truncated", "LoRA file cut in half", lambda: lora_graph(f"{PREFIX}truncated.safetensors"),
         "failed", "TCD_LoraLoader", ("truncated", "the file has", "get the file again")),
    Case("lora_zero_bytes", "zero-byte LoRA file", lambda: lora_graph(f"{PREFIX}zero.safetensors"),
         "failed", "TCD_LoraLoader", ("empty (0 bytes)", "get the file again")),
    Case("lora_bad_header", "safetensors header that is not JSON", lambda: lora_graph(f"{PREFIX}header.safetensors"),
         "failed", "TCD_LoraLoader", ("corrupt", "not valid JSON")),
    Case("lora_png", "a PNG image named .safetensors", lambda: lora_graph(f"{PREFIX}png.safetensors"),
         "failed", "TCD_LoraLoader", ("not a safetensors file", "PNG image", "JSON header")),
    Case("lora_html", "an HTML page named .safetensors", lambda: lora_graph(f"{PREFIX}html.safetensors"),
         "failed", "TCD_LoraLoader", ("not a safetensors file", "HTML", "Download")),
    Case("lora_git_lfs_pointer", "a Git LFS pointer named .safetensors", lambda: lora_graph(f"{PREFIX}lfs.safetensors"),
         "failed", "TCD_LoraLoader", ("not a safetensors file", "Git LFS pointer", "git lfs pull")),
    Case("lora_pickle", "pickle LoRA (.ckpt)", lambda: lora_graph(f"{PREFIX}pickle.ckpt"),
         "failed", "TCD_LoraLoader", ("pickle-based", "Only .safetensors", "arbitrary code")),
    Case("lora_pickle_renamed", "pickle (torch.save) file renamed .safetensors",
         lambda: lora_graph(f"{PREFIX}pickle_renamed.safetensors"),
         "failed", "TCD_LoraLoader", ("pickle/zip", "arbitrary code")),
    Case("lora_is_checkpoint", "safetensors model checkpoint, not a LoRA",
         lambda: lora_graph(f"{PREFIX}checkpoint.safetensors"),
         "failed", "TCD_LoraLoader", ("is not a LoRA", "full checkpoint", "Allowed:")),
    Case("lora_is_vae", "safetensors VAE, not a LoRA", lambda: lora_graph(f"{PREFIX}vae.safetensors"),
         "failed", "TCD_LoraLoader", ("is not a LoRA", "VAE", "Allowed:")),
    Case("lora_no_tensors", "safetensors file without tensors", lambda: lora_graph(f"{PREFIX}no_tensors.safetensors"),
         "failed", "TCD_LoraLoader", ("is not a LoRA", "no tensors at all")),
    Case("lora_unmatched_layer", "LoRA with a layer the model does not have",
         lambda: lora_graph(f"{PREFIX}unmatched.safetensors"),
         "failed", "TCD_LoraLoader", ("1 of 8 layers", "down_blocks_3_resnets_0_conv1", "'warn'")),
    Case("lora_nan_weights", "LoRA with a NaN weight", lambda: lora_graph(f"{PREFIX}nan.safetensors"),
         "failed", "TCD_LoraLoader", ("NaN or infinite values", "attn1_to_q")),
    Case("lora_bad_adapter_metadata", "PEFT LoRA whose lora_adapter_metadata is not JSON (its layers need it)",
         lambda: lora_graph(f"{PREFIX}bad_metadata.safetensors"),
         "failed", "TCD_LoraLoader", ("lora_adapter_metadata of", "cannot be used", "fix or remove that metadata")),
    Case("lora_name_escapes", "lora_name '../escape.safetensors'", lambda: lora_graph("../escape.safetensors"),
         "rejected", "TCD_LoraLoader", ("Value not in list", "lora_name")),
    # --- trainer
    Case("train_steps_0", "TCD Distill LoRA steps = 0", lambda: train_graph(PREFIX + "t", steps=0),
         "rejected", "TCD_DistillLoRA", ("Value 0 smaller than min of 1", "steps")),
    Case("train_missing_folder", "image_folder that does not exist",
         lambda: train_graph(PREFIX + "t", folder=PREFIX + "no_such_folder"),
         "failed", "TCD_DistillLoRA", ("hard_no_such_folder", "does not exist", "input folder")),
    Case("train_empty_folder", "empty image_folder", lambda: train_graph(PREFIX + "t", folder=PREFIX + "empty"),
         "failed", "TCD_DistillLoRA", ("no images in", ".png", "same-name .txt caption")),
    Case("train_no_data", "no image_folder and no latents", lambda: train_graph(PREFIX + "t", folder=""),
         "failed", "TCD_DistillLoRA", ("no training latents", "image_folder")),
    Case("train_unreadable_image", "an image file that cannot be decoded",
         lambda: train_graph(PREFIX + "t", folder=PREFIX + "broken"),
         "failed", "TCD_DistillLoRA", ("cannot read training image 'broken.png'", "Replace or remove")),
    Case("train_caption_missing", "an image without a caption file",
         lambda: train_graph(PREFIX + "t", folder=PREFIX + "nocaption"),
         "failed", "TCD_DistillLoRA", ("no caption file", "lonely.png", "lonely.txt")),
    Case("train_caption_not_utf8", "a caption that is not UTF-8",
         lambda: train_graph(PREFIX + "t", folder=PREFIX + "latin1"),
         "failed", "TCD_DistillLoRA", ("caption 'a.txt'", "is not UTF-8 text")),
    Case("train_corrupt_checkpoint", "resume from a cut-off training checkpoint (zip header only)",
         lambda: train_graph(PREFIX + "corrupt"), "failed", "TCD_DistillLoRA",
         ("hard_corrupt.state.pt", "cannot be read", "turn resume off"),
         setup=_state_file(PREFIX + "corrupt", b"PK\x03\x04" + b"\x00" * 60)),
    Case("train_checkpoint_not_torch", "resume from a checkpoint file holding text, not a torch.save archive",
         lambda: train_graph(PREFIX + "garbage"), "failed", "TCD_DistillLoRA",
         ("hard_garbage.state.pt", "cannot be read", "turn resume off"), forbid=("weights_only",),
         setup=_state_file(PREFIX + "garbage", b"garbage" * 10)),
    Case("train_lora_folder_unwritable", "LoRA destination folder is a file (lora_name 'hard_blocker/x')",
         lambda: train_graph(PREFIX + "blocker/x"), "failed", "TCD_DistillLoRA",
         ("hard_blocker", "cannot", "lora_name")),
    Case("train_output_folder_unwritable", "output/tcd_train (checkpoints, cache) is a file",
         lambda: train_graph(PREFIX + "t"), "failed", "TCD_DistillLoRA",
         ("tcd_train", "cannot", "output"), setup=_block_train_folder),
]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hard(server, tiny_ckpt):
    loras, inputs = server.base / "models" / "loras", server.base / "input"
    write_bad_files(loras, inputs, tiny_ckpt)
    (server.base / "models" / "escape.safetensors").write_bytes(b"")
    yield server
    for folder in (loras, inputs, server.base / "output", server.base / "output" / "tcd_train"):
        for p in folder.glob(PREFIX + "*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (server.base / "models" / "escape.safetensors").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def matrix():
    """Messages of this run, merged into MATRIX_JSON (rows of cases not run this time are kept), in table order."""
    found = {}
    yield found
    if not found:
        return
    try:
        rows = {r["case"]: r for r in json.loads(TRACKED_MATRIX.read_text())["cases"]}
    except (OSError, ValueError, KeyError):
        rows = {}
    rows.update(found)
    order = [c.id for c in CASES] + sorted(k for k in rows if k not in {c.id for c in CASES})
    MATRIX_JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = MATRIX_JSON.with_name(MATRIX_JSON.name + ".tmp")
    tmp.write_text(json.dumps({"comfyui": "0.3.75", "cases": [rows[k] for k in order if k in rows]},
                              indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, MATRIX_JSON)


# ------------------------------------------------------------------------------------------------ checks
def snapshot(server) -> dict:
    """{path relative to the base: (size, mtime_ns)} for models/loras and output/."""
    out = {}
    for root in (server.base / "models" / "loras", server.base / "output"):
        for p in root.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(server.base))] = (st.st_size, st.st_mtime_ns)
    return out


def assert_nothing_partial(server, before: dict, allow_loras: bool = False) -> None:
    """No temporary file anywhere; no new or changed file in models/loras (unless allowed, then it must load);
    every new file in output/ complete: images open, safetensors load, training checkpoints load."""
    after = snapshot(server)
    changed = sorted(k for k, v in after.items() if before.get(k) != v)
    assert not [k for k in after if k.endswith(".tmp")], after
    for rel in changed:
        path = server.base / rel
        if rel.startswith("models/loras"):
            assert allow_loras, f"{rel} appeared in models/loras"
        if rel.endswith(".png"):
            Image.open(path).load()
        elif rel.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        elif rel.endswith(".pt"):
            torch.load(path, map_location="cpu", weights_only=True)
        else:
            pytest.fail(f"unexpected new file {rel}")


def rejection_message(body: dict) -> tuple[str, str]:
    node_errors = body.get("node_errors") or {}
    parts, node = [], None
    for entry in node_errors.values():
        node = node or entry.get("class_type")
        for e in entry.get("errors", []):
            parts.append(f"{e.get('message', '')}: {e.get('details', '')}".strip(": "))
    if not parts:
        parts.append(f"{body.get('error', {}).get('message', '')}: {body.get('error', {}).get('details', '')}")
    return node, "; ".join(parts)


def next_prompt_runs(server) -> None:
    out = server.run_prompt(txt2img())
    assert len(out["images"]) == 1 and server.alive()


def raised_in(traceback: list) -> str:
    """'tcd/sampling.py: check_sigmas' for the innermost frame of a node error's traceback."""
    import re
    m = re.search(r'File "([^"]+)", line \d+, in (\S+)', traceback[-1])
    if not m:
        return ""
    path = m.group(1)
    return f"{path.split(comfyhost.PACK_NAME + '/')[-1] if comfyhost.PACK_NAME in path else Path(path).name}: " \
           f"{m.group(2)}"


def run_case(server, case: Case) -> dict:
    """Run one case; returns its matrix row {case, given, where, node, message}."""
    try:
        graph = case.graph()
        out = server.run_prompt(graph, timeout=600)
    except comfyhost.PromptRejected as e:
        node, message = rejection_message(e.body)
        return {"case": case.id, "given": case.given, "where": "/prompt 400 (validation)", "node": node,
                "message": message}
    except comfyhost.PromptFailed as e:
        return {"case": case.id, "given": case.given, "where": "/history node error", "node": e.error.get("node_type"),
                "exception": e.error.get("exception_type"), "message": e.error.get("exception_message", "").strip(),
                "raised_in": raised_in(e.error.get("traceback") or [""])}
    return {"case": case.id, "given": case.given, "where": "runs", "node": None, "images": len(out["images"]),
            "message": case.note}


def for_the_doc(row: dict, server) -> dict:
    """The row with the server's temporary paths written as <base> (ComfyUI's --base-directory)."""
    base = str(server.base)
    return {k: (v.replace(base, "<base>") if isinstance(v, str) else v) for k, v in row.items()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_bad_input(hard, matrix, case):
    server = hard
    undo = case.setup(server) if case.setup else None
    try:
        before = snapshot(server)
        row = run_case(server, case)
        matrix[case.id] = for_the_doc(row, server)
        assert_nothing_partial(server, before)
    finally:
        if undo:
            undo()
    expected_where = {"rejected": "/prompt 400 (validation)", "failed": "/history node error", "runs": "runs"}
    assert row["where"] == expected_where[case.outcome], row
    if case.outcome == "runs":
        assert row["images"] == 1, row
    else:
        assert row["node"] == case.node, row
        for text in case.expect:
            assert text in row["message"], (text, row["message"])
        for text in case.forbid:
            assert text not in row["message"], (text, row["message"])
        # A ValueError raised on purpose, with its message: never a bare error from deep inside torch or PIL.
        assert row.get("exception", "ValueError") == "ValueError", row
    next_prompt_runs(server)


# --- Cancel
def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


async def _queue_and_cancel(server, graph: dict, node: str, total: int, min_progress: int,
                            timeout: float = 300.0) -> dict:
    """Queue `graph`, wait until `node` reported progress >= min_progress of `total` (its sampling or training
    loop is running), press Cancel (/interrupt), and return {prompt_id, progress, entry, seconds_to_stop}."""
    import aiohttp                                          # ComfyUI's own HTTP library: in the host venv
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{_ws_url(server)}?clientId={client_id}", heartbeat=30) as ws:
            async with session.post(server.url + "/prompt", json={"prompt": graph, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            t0, progress, interrupted_at = time.time(), 0, None
            while True:
                assert time.time() - t0 < timeout, f"no progress >= {min_progress} of node {node} in {timeout}s"
                msg = await ws.receive(timeout=timeout)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data", {})
                if body.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress" and body.get("node") == node and body.get("max") == total:
                    progress = max(progress, int(body["value"]))
                    if progress >= min_progress and interrupted_at is None:
                        async with session.post(server.url + "/interrupt", json={}) as r:
                            assert r.status == 200
                        interrupted_at = time.time()
                if kind in ("execution_interrupted", "execution_error", "execution_success"):
                    break
                if kind == "executing" and body.get("node") is None and interrupted_at is not None:
                    break
    entry = server.wait(prompt_id, timeout=60)
    return {"prompt_id": prompt_id, "progress": progress, "entry": entry,
            "seconds_to_stop": time.time() - (interrupted_at or time.time())}


def _interrupted(entry) -> dict:
    return next((m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"), {})


def test_cancel_mid_sampling(hard, matrix):
    server = hard
    before = snapshot(server)
    graph = txt2img(steps=2000, scheduler="normal")           # minutes of sampling if nothing stopped it
    result = asyncio.run(_queue_and_cancel(server, graph, node="5", total=2000, min_progress=3))
    stopped = _interrupted(result["entry"])
    matrix["cancel_mid_sampling"] = {
        "case": "cancel_mid_sampling", "given": "Cancel (/interrupt) at step 3 of a 2000-step KSampler tcd run",
        "where": "/history execution_interrupted", "node": stopped.get("node_type"),
        "message": f"interrupted after step {result['progress']}, stopped {result['seconds_to_stop']:.2f} s later"}
    assert result["entry"]["status"]["status_str"] == "error" and stopped.get("node_type") == "KSampler", result
    assert 3 <= result["progress"] < 2000 and result["seconds_to_stop"] < 20, result
    assert_nothing_partial(server, before)                    # SaveImage never ran: no image, no partial file
    next_prompt_runs(server)


def test_cancel_mid_training(hard, matrix):
    server = hard
    before = snapshot(server)
    name = PREFIX + "cancel"
    state = server.base / "output" / "tcd_train" / f"{name}.state.pt"
    result = asyncio.run(_queue_and_cancel(server, train_graph(name, steps=1000, save_every=0),
                                           node="2", total=1000, min_progress=1))
    stopped = _interrupted(result["entry"])
    saved = torch.load(state, map_location="cpu", weights_only=True)
    matrix["cancel_mid_training"] = {
        "case": "cancel_mid_training", "given": "Cancel (/interrupt) after step 1 of a 1000-step TCD Distill LoRA run",
        "where": "/history execution_interrupted", "node": stopped.get("node_type"),
        "message": f"interrupted after step {result['progress']}, stopped {result['seconds_to_stop']:.2f} s later; "
                   f"resumable checkpoint kept at step {saved['step']} (output/tcd_train/{state.name}); "
                   f"no LoRA file written"}
    assert stopped.get("node_type") == "TCD_DistillLoRA", result
    assert 1 <= saved["step"] < 1000 and len(saved["losses"]) == saved["step"]
    assert not (server.base / "models" / "loras" / f"{name}.safetensors").exists()
    assert result["seconds_to_stop"] < 60, result
    assert_nothing_partial(server, before)
    next_prompt_runs(server)


# --- corrupt checkpoints
def read_lora(path: Path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_corrupt_checkpoint_keeps_the_previous_good_lora_usable(hard, matrix):
    """A partial checkpoint write (`.state.pt.tmp`, what a crash mid-save leaves) beside a good checkpoint does not
    stop a resume; a damaged checkpoint itself gives a clear error and leaves the last good LoRA untouched and
    loadable, and turning resume off trains again."""
    server = hard
    name = PREFIX + "resume"
    lora = server.base / "models" / "loras" / f"{name}.safetensors"
    state = server.base / "output" / "tcd_train" / f"{name}.state.pt"
    server.run_prompt(train_graph(name, steps=1))
    first_losses = json.loads(read_lora(lora)[1]["tcd.losses"])
    good_state = state.read_bytes()
    state.with_name(state.name + ".tmp").write_bytes(good_state[: len(good_state) // 3])
    server.run_prompt(train_graph(name, steps=2))                # resumes from the good checkpoint at step 1
    losses = json.loads(read_lora(lora)[1]["tcd.losses"])
    assert len(losses) == 2 and losses[0] == first_losses[0]
    assert torch.load(state, weights_only=True)["step"] == 2
    state.with_name(state.name + ".tmp").unlink(missing_ok=True)

    good_lora = lora.read_bytes()
    damaged = state.read_bytes()[: len(state.read_bytes()) // 2]
    state.write_bytes(damaged)
    before = snapshot(server)
    with pytest.raises(comfyhost.PromptFailed) as err:
        server.run_prompt(train_graph(name, steps=3))
    message = err.value.error["exception_message"].strip()
    matrix["train_corrupt_checkpoint_previous_lora"] = for_the_doc({
        "case": "train_corrupt_checkpoint_previous_lora", "given": "resume from a checkpoint cut in half (after a "
        "good 2-step run)", "where": "/history node error", "node": err.value.error.get("node_type"),
        "message": message}, server)
    assert err.value.error["node_type"] == "TCD_DistillLoRA"
    assert f"{name}.state.pt" in message and "cannot be read" in message and "turn resume off" in message
    assert lora.read_bytes() == good_lora and state.read_bytes() == damaged     # nothing overwritten
    assert_nothing_partial(server, before)
    assert server.run_prompt(lora_graph(f"{name}.safetensors"))["images"]       # the last good LoRA still loads
    server.run_prompt(train_graph(name, steps=1, resume=False))                 # the way out the message names
    assert torch.load(state, weights_only=True)["step"] == 1
