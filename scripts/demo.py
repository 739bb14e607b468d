"""`make demo`: start ComfyUI headless with this pack, run a TCD text-to-image graph over its HTTP API, save the PNG.

    make demo                                   # the embedded tiny SD1.5 checkpoint (random weights: the image is
                                                # noise-like; it proves the whole path runs)
    make demo CKPT=/path/sd15.safetensors LORA=/path/TCD-SD15-LoRA.safetensors [OUT=cat.png]

The graph is the one users build: checkpoint -> (TCD LoRA Loader) -> KSampler(sampler tcd, scheduler tcd,
4 steps, cfg 1.0) -> VAE decode -> SaveImage. It prints the PNG's path and the timings.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import comfyhost  # noqa: E402


def demo_graph(ckpt_name, lora_name, size, steps, seed, prompt):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "tcd", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tcd_demo", "images": ["6", 0]}},
    }
    if lora_name:
        g["8"] = {"class_type": "TCD_LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0,
            "strength_clip": 1.0}}
        g["5"]["inputs"]["model"] = ["8", 0]
        g["2"]["inputs"]["clip"] = ["8", 1]
        g["3"]["inputs"]["clip"] = ["8", 1]
    return g


def link_into(folder: Path, src: Path) -> str:
    if not src.is_file():
        raise SystemExit(f"{src} is not a file: give the path of a .safetensors file")
    dst = folder / src.name
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())
    return src.name


DEFAULT_NAME = "tcd_demo.png"


def output_file(given: str) -> Path:
    """--out as a file, or as a folder (an existing one, or a path ending in a slash) that gets tcd_demo.png: make
    passes OUT from the environment, where it often names a folder."""
    path = Path(given).expanduser()
    if path.is_dir() or given.endswith(("/", "\\")):
        path = path / DEFAULT_NAME
    return path.resolve()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="an SD1.5/SDXL checkpoint (.safetensors); default: the embedded tiny model")
    ap.add_argument("--lora", help="a TCD / Hyper-SD LoRA (.safetensors), applied with the TCD LoRA Loader")
    ap.add_argument("--out", default="tcd_demo.png", help="where to write the PNG (default ./tcd_demo.png)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of a cat, high detail")
    a = ap.parse_args()

    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    host_dir = Path(os.environ.get("HOST_DIR") or REPO / ".cache")
    base = host_dir / "demo-base"
    comfyhost.prepare_base(base)
    t0 = time.time()
    if a.ckpt:
        ckpt_name, size = link_into(base / "models" / "checkpoints", Path(a.ckpt)), 512
    else:
        tiny = Path(os.environ.get("TINY_CKPT") or host_dir / "models" / "tiny_sd15.safetensors")
        tiny.parent.mkdir(parents=True, exist_ok=True)
        comfyhost.make_tiny_checkpoint(comfyui_dir, tiny)
        ckpt_name, size = link_into(base / "models" / "checkpoints", tiny), 128
    lora_name = link_into(base / "models" / "loras", Path(a.lora)) if a.lora else None

    with comfyhost.ComfyServer(base, comfyui_dir) as server:
        print(f"ComfyUI up on {server.url} after {server.ready_seconds:.1f}s (log: {server.log_path})")
        try:
            result = server.run_prompt(demo_graph(ckpt_name, lora_name, size, a.steps, a.seed, a.prompt))
        except (comfyhost.PromptRejected, comfyhost.PromptFailed) as e:
            raise SystemExit(f"the demo graph failed: {e}")
    out = output_file(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(result["images"][0])
    os.replace(tmp, out)
    print(json.dumps({"image": str(out), "size": [size, size], "steps": a.steps, "sampler": "tcd",
                      "scheduler": "tcd", "checkpoint": ckpt_name, "lora": lora_name,
                      "prompt_seconds": round(result["seconds"], 2), "total_seconds": round(time.time() - t0, 2)}))
    print(f"wrote {out}")
    if not a.ckpt:
        # A trained model that ComfyUI's loaders open (an SD1.5-shaped, 320-channel UNet plus a trained TAESD) costs
        # hours of CPU to train (measured in benchmarks/results/efficacy/summary.md), so the embedded model stays
        # random; the trainer's real pictures are the efficacy benchmark's.
        grid = REPO / "benchmarks" / "results" / "efficacy" / "grid.png"
        print(f"the embedded model has random weights, so this image is noise: it shows the whole path runs. Real "
              f"samples (a teacher trained in ComfyUI's classes, its TCD / LCM LoRAs from the trainer node, 1-8 "
              f"steps): {grid} and {grid.with_name('summary.md')}")


if __name__ == "__main__":
    main()
