"""Helpers for the example-workflow tests: list them, normalise them, point them at the tiny test models."""
import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SEED_KEYS = {"seed", "noise_seed"}
MODEL_KEYS = {"ckpt_name", "lora_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2"}
# Which tiny model a workflow runs on in the tests (default: the tiny SD1.5 checkpoint).
FLOW_KIND = {"sd3_tcd_txt2img": "sd3", "flux_tcd_txt2img": "flux", "sd3_distill_tcd_lora": "sd3",
             "flux_distill_tcd_lora": "flux"}
SIZE_NODES = {"EmptyLatentImage", "EmptySD3LatentImage", "ModelSamplingFlux"}


def api_workflows():
    return {p.stem: json.loads(p.read_text()) for p in sorted((WORKFLOWS / "api").glob("*.json"))}


def ui_workflows():
    return {p.stem: p for p in sorted(WORKFLOWS.glob("*.json"))}


def normalised(api):
    """The graph without the things a user is expected to change: seeds, model file names, titles."""
    out = {}
    for node_id, node in api.items():
        inputs = {k: ("<seed>" if k in SEED_KEYS else "<model>" if k in MODEL_KEYS else v)
                  for k, v in node["inputs"].items()}
        out[str(node_id)] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def for_tiny_models(api, ckpt="tiny_sd15.safetensors", lora=None, image="example.png", size=64, train_steps=3,
                    kind="sd15"):
    """The same graph on the tiny test models: model names, image sizes and training length substituted. kind
    "sd3": the tiny SD3 checkpoint; "flux": the tiny Flux (through the test-only TCDTest_TinyFluxLoader, as
    ComfyUI's detection refuses tiny Flux files), CLIP-L as its text encoder (T5-XXL cannot be tiny) and the
    16-channel TAESD. LoRA names of flow workflows are kept: the tests write tiny LoRAs under those names."""
    g = copy.deepcopy(api)
    for node in g.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = "tiny_sd3.safetensors" if kind == "sd3" else ckpt
        if "lora_name" in inputs and lora is not None and kind == "sd15" and not isinstance(inputs["lora_name"], list):
            inputs["lora_name"] = lora
        if node["class_type"] == "UNETLoader" and kind == "flux":
            node.update(class_type="TCDTest_TinyFluxLoader", inputs={"unet_name": "tiny_flux.safetensors"})
        if node["class_type"] == "DualCLIPLoader" and kind == "flux":
            node.update(class_type="CLIPLoader", inputs={"clip_name": "tiny_clip_l.safetensors",
                                                         "type": "stable_diffusion"})
        if node["class_type"] == "VAELoader" and kind == "flux":
            inputs["vae_name"] = "tiny_taesd16.safetensors"
        if node["class_type"] in SIZE_NODES:
            inputs["width"] = inputs["height"] = size
        if node["class_type"] == "LoadImage":
            inputs["image"] = image
        if node["class_type"] == "TCD_DistillLoRA":   # seconds, not hours: tiny data, rank and step count
            inputs.update(steps=train_steps, resolution=size, batch_size=1, rank=4, alpha=4.0, resume=False,
                          validation_every=train_steps, validation_draws=1, validation_steps=2,
                          gradient_checkpointing=False, warmup_steps=0)
    return g
