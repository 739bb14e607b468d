"""Helpers for the example-workflow tests: list them, normalise them, point them at the tiny test models."""
import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SEED_KEYS = {"seed", "noise_seed"}
MODEL_KEYS = {"ckpt_name", "lora_name", "unet_name", "vae_name", "clip_name"}


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


def for_tiny_models(api, ckpt="tiny_sd15.safetensors", lora=None, image="example.png", size=64, train_steps=3):
    """The same graph on the tiny SD1.5 test models: model names, image sizes and training length substituted."""
    g = copy.deepcopy(api)
    for node in g.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        if "lora_name" in inputs and lora is not None and not isinstance(inputs["lora_name"], list):
            inputs["lora_name"] = lora
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        if node["class_type"] == "LoadImage":
            inputs["image"] = image
        if node["class_type"] == "TCD_DistillLoRA":   # seconds, not hours: tiny data, rank and step count
            inputs.update(steps=train_steps, resolution=size, batch_size=1, rank=4, alpha=4.0, resume=False,
                          validation_every=train_steps, validation_draws=1, validation_steps=2,
                          gradient_checkpointing=False, warmup_steps=0)
    return g
