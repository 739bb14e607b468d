"""The same distillation over ComfyUI's HTTP API: the shipped distill workflow (workflows/api/distill_tcd_lora.json),
adapted to this teacher and dataset, queued on a real headless server.

Adaptations, all at the graph's inputs: the checkpoint loader becomes the benchmark's teacher loader (the teacher has
no shape ComfyUI's checkpoint detection knows; benchmarks/efficacy/server_nodes), the image folder becomes core Load
Training Dataset nodes (the very latents and conditionings the in-process run used, saved with core Save Training
Dataset), and the trainer's widgets take the benchmark's objective and budget. The LoRA it writes is compared with
the in-process one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_NODES = Path(__file__).resolve().parent / "server_nodes"
WORKFLOW = REPO / "workflows" / "api" / "distill_tcd_lora.json"


def adapted_workflow(teacher_path: str, dataset: str, uncond_dataset: str, objective: dict, budget: dict,
                     lora_name: str) -> dict:
    graph = json.loads(WORKFLOW.read_text())
    trainer_id = next(k for k, v in graph.items() if v["class_type"] == "TCD_DistillLoRA")
    loader_id = next(k for k, v in graph.items() if v["class_type"] == "CheckpointLoaderSimple")
    graph[loader_id] = {"class_type": "EfficacyTeacherLoader", "inputs": {"path": str(teacher_path)},
                        "_meta": {"title": "Efficacy teacher (benchmark loader)"}}
    graph["100"] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": dataset}}
    graph["101"] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": uncond_dataset},
                    "_meta": {"title": "Unconditional prompt (one entry)"}}
    inputs = graph[trainer_id]["inputs"]
    for key in ("image_folder", "resolution", "vae", "clip"):
        inputs.pop(key, None)
    inputs.update(latents=["100", 0], conditioning=["100", 1], negative=["101", 1], model=[loader_id, 0])
    inputs.update(dict(budget, **objective, lora_name=lora_name, save_every=0, resume=False, validation_every=0))
    return graph


class HttpDistill:
    """A server on `base` (its output folder already holds the datasets) running the graph in the background, so the
    caller can sample in the meantime; `result()` waits and returns the LoRA path and the times."""

    def __init__(self, base: Path, comfyui_dir: Path, python: str, graph: dict, lora_name: str):
        import sys
        sys.path.insert(0, str(REPO / "scripts"))
        import comfyhost
        comfyhost.prepare_base(base)
        link = base / "custom_nodes" / "efficacy_benchmark_nodes"
        if not link.exists():
            link.symlink_to(SERVER_NODES, target_is_directory=True)
        self.path = base / "models" / "loras" / f"{lora_name}.safetensors"
        t0 = time.time()
        self.server = comfyhost.ComfyServer(base, comfyui_dir, python).start()
        self.server_start_s = time.time() - t0
        self.t_queued = time.time()
        try:
            self.prompt_id = self.server.queue(graph)
        except BaseException:
            self.server.stop()
            raise

    def result(self) -> dict:
        import comfyhost
        try:
            entry = self.server.wait(self.prompt_id, timeout=3600)
            seconds = time.time() - self.t_queued
            if entry["status"].get("status_str") != "success":
                raise comfyhost.PromptFailed(self.prompt_id, entry["status"])
        finally:
            self.server.stop()
        if not self.path.is_file():
            raise RuntimeError(f"the server run finished but wrote no {self.path}")
        return {"lora_path": str(self.path), "prompt_s": seconds, "server_start_s": self.server_start_s}
