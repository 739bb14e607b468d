"""`make soak`: 50 prompts queued at once on one headless ComfyUI with the pack, as an unattended queue runs them.

The mix, on the tiny SD1.5 checkpoint: TCD text-to-image through KSampler (sampler/scheduler `tcd`) and through
SamplerCustomAdvanced (TCD Sampler + TCD Scheduler, gamma varied), img2img from an uploaded image (denoise 0.5),
the TCD LoRA Loader with a diffusers-format LoRA, and short TCD Distill LoRA training runs (4 steps each). Every
prompt has its own seed, so nothing comes from ComfyUI's cache. Goal: 0 failures.

The server's resident memory (psutil on its pid) is sampled every 0.5 s: at start (server ready, nothing loaded),
after the first WARM prompts (every kind has run once: models loaded, caches filled), at the end, and its peak. The
growth from warm to end is what a long queue would accumulate.

    make soak        (or: source scripts/host/env.sh && $HOST_PY scripts/soak.py)
Writes benchmarks/results/soak.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))      # support.lora_files: a LoRA for the tiny checkpoint
sys.path.insert(0, str(REPO))
import comfyhost  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "soak.json"
CKPT = "tiny_sd15.safetensors"
LORA = "soak_tcd_lora.safetensors"
KINDS = ("txt2img", "custom_advanced", "img2img", "lora", "txt2img", "custom_advanced", "img2img", "lora",
         "txt2img", "train")                 # one cycle of 10; 5 cycles = 50 prompts, 5 training runs
WARM = 10                                    # prompts after which every kind has run once


def _common(g: dict, seed: int) -> dict:
    g.setdefault("1", {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}})
    g.setdefault("2", {"class_type": "CLIPTextEncode", "inputs": {"text": f"a photo of a cat #{seed}",
                                                                  "clip": ["1", 1]}})
    g.setdefault("3", {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}})
    return g


def ksampler(seed, model=("1", 0), latent=("4", 0), denoise=1.0):
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "tcd", "denoise": denoise,
        "model": list(model), "positive": ["2", 0], "negative": ["3", 0], "latent_image": list(latent)}}


def decode_and_save(g, samples, prefix):
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": list(samples), "vae": ["1", 2]}}
    g["7"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}}
    return g


def graph(kind: str, i: int, k: int, image_name: str) -> dict:
    """Prompt `i` of the queue, the `k`-th of its kind."""
    seed = 1000 + i
    g = _common({}, seed)
    if kind == "txt2img":
        g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        g["5"] = ksampler(seed)
        return decode_and_save(g, ("5", 0), "soak_txt2img")
    if kind == "custom_advanced":
        g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        g["10"] = {"class_type": "TCD_Sampler", "inputs": {"gamma": (0.0, 0.3, 0.6, 1.0)[k % 4],
                                                           "gamma_schedule": "", "final_step": "diffusers"}}
        g["11"] = {"class_type": "TCD_Scheduler", "inputs": {"model": ["1", 0], "steps": 4, "denoise": 1.0,
                                                             "original_steps": 50, "denoise_mode": "comfyui"}}
        g["12"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        g["13"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                         "negative": ["3", 0], "cfg": 1.0}}
        g["14"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["12", 0], "guider": ["13", 0], "sampler": ["10", 0], "sigmas": ["11", 0],
            "latent_image": ["4", 0]}}
        return decode_and_save(g, ("14", 0), "soak_advanced")
    if kind == "img2img":
        g["8"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
        g["4"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
        g["5"] = ksampler(seed, denoise=0.5)
        return decode_and_save(g, ("5", 0), "soak_img2img")
    if kind == "lora":
        g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        g["20"] = {"class_type": "TCD_LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": (1.0, 0.5)[k % 2],
            "strength_clip": 1.0}}
        g["2"]["inputs"]["clip"] = g["3"]["inputs"]["clip"] = ["20", 1]
        g["5"] = ksampler(seed, model=("20", 0))
        return decode_and_save(g, ("5", 0), "soak_lora")
    if kind == "train":
        g = {"1": g["1"]}
        g["30"] = {"class_type": "TCD_DistillLoRA", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "image_folder": "soak_set", "resolution": 64,
            "steps": 4, "batch_size": 1, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "w_min": 3.0,
            "w_max": 3.0, "original_steps": 50, "tcf_order": 1, "ema_decay": 0.95, "loss": "huber", "seed": seed,
            "lora_name": f"soak_trained_{i}", "save_every": 2, "resume": False, "validation_every": 0,
            "save_dtype": "fp16", "training_dtype": "fp32"}}
        g["31"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "soak_loss", "images": ["30", 2]}}
        return g
    raise ValueError(kind)


def png(colour) -> bytes:
    from PIL import Image
    img = Image.new("RGB", (64, 64), colour)
    for x in range(0, 64, 4):
        img.putpixel((x, (x * 7) % 64), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class RssSampler(threading.Thread):
    """Resident memory of one process, every `period` seconds (MB)."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process(pid)
        self.period, self.samples, self.stopped = period, [], threading.Event()

    def now(self) -> float:
        return self.proc.memory_info().rss / 2 ** 20

    def run(self):
        while not self.stopped.is_set():
            try:
                self.samples.append((time.time(), self.now()))
            except Exception:
                return
            self.stopped.wait(self.period)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base folder")
    a = ap.parse_args()

    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    tiny = Path(os.environ.get("TINY_CKPT") or REPO / ".cache" / "tiny_sd15.safetensors")
    tiny.parent.mkdir(parents=True, exist_ok=True)
    comfyhost.make_tiny_checkpoint(comfyui_dir, tiny)
    from support import lora_files

    base = Path(tempfile.mkdtemp(prefix="tcd_soak_"))
    comfyhost.prepare_base(base)
    (base / "models" / "checkpoints" / CKPT).symlink_to(tiny)
    lora_files.write_tiny_sd15_lora(base / "models" / "loras" / LORA, tiny)
    folder = base / "input" / "soak_set"
    folder.mkdir(parents=True)
    for j, (colour, caption) in enumerate([((220, 40, 40), "a red square"), ((40, 60, 220), "a blue square")]):
        (folder / f"img{j}.png").write_bytes(png(colour))
        (folder / f"img{j}.txt").write_text(caption)

    t_start = time.time()
    server = comfyhost.ComfyServer(base, comfyui_dir)
    server.start()
    failures, records = [], []
    try:
        image_name = server.upload_image("soak_input.png", png((90, 160, 60)))["name"]
        sampler = RssSampler(server.proc.pid)
        rss_start = sampler.now()
        sampler.start()
        kinds = [KINDS[i % len(KINDS)] for i in range(a.prompts)]
        t_queue = time.time()
        queued = [(i, kind, server.queue(graph(kind, i, kinds[:i].count(kind), image_name)))
                  for i, kind in enumerate(kinds)]
        print(f"queued {len(queued)} prompts in {time.time() - t_queue:.2f}s; server RSS at start "
              f"{rss_start:.0f} MB", flush=True)
        rss_warm = None
        previous_done = t_queue
        for n, (i, kind, prompt_id) in enumerate(queued, 1):
            entry = server.wait(prompt_id, timeout=1800)
            done = time.time()
            status = entry["status"].get("status_str")
            images = sum(len(out.get("images", [])) for out in entry.get("outputs", {}).values())
            records.append({"index": i, "kind": kind, "status": status, "images": images,
                            "seconds": round(done - previous_done, 3)})
            previous_done = done
            if status != "success" or images < 1:
                msg = next((m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"), {})
                failures.append({"index": i, "kind": kind, "status": status,
                                 "error": msg.get("exception_message", "no image")})
            if n == WARM:
                rss_warm = sampler.now()
            if n % 10 == 0:
                print(f"{n}/{len(queued)} done, {len(failures)} failed, RSS {sampler.now():.0f} MB", flush=True)
        rss_end = sampler.now()
        sampler.stopped.set()
        sampler.join(2)
        alive = server.alive()
    finally:
        server.stop()
    duration = time.time() - t_start

    import torch
    per_kind = {k: {"count": sum(1 for r in records if r["kind"] == k),
                    "median_seconds": round(statistics.median(r["seconds"] for r in records if r["kind"] == k), 3)}
                for k in dict.fromkeys(KINDS)}
    peak = max((mb for _, mb in sampler.samples), default=rss_end)
    result = {
        "prompts": len(records), "failures": len(failures), "failed": failures, "server_alive_at_end": alive,
        "kinds": per_kind,
        "rss_mb": {"start": round(rss_start, 1), f"after_{WARM}_prompts": round(rss_warm or rss_end, 1),
                   "end": round(rss_end, 1), "peak": round(peak, 1)},
        "rss_growth_mb": {"start_to_end": round(rss_end - rss_start, 1),
                          f"after_{WARM}_to_end": round(rss_end - (rss_warm or rss_end), 1)},
        "rss_samples_every_s": 0.5, "rss_trace_mb": [round(mb, 1) for _, mb in sampler.samples[::10]],
        "duration_s": round(duration, 1), "server_start_s": round(server.ready_seconds or 0.0, 1),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__},
        "comfyui": "0.3.75 (pinned host)" if "host-" in str(comfyui_dir) else str(comfyui_dir),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("prompts", "failures", "rss_mb", "rss_growth_mb", "duration_s")}))
    print(f"wrote {RESULTS}")
    if a.keep:
        print(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if failures or not alive:
        raise SystemExit(f"soak: {len(failures)} of {len(records)} prompts failed")


if __name__ == "__main__":
    main()
