"""Per-image sampling time of `tcd` vs `euler_ancestral` vs `lcm` on the same tiny SD1.5 model, steps and seed.

All three are ancestral one-model-call-per-step samplers, so the ratio TCD / euler_ancestral measures the TCD
step's own overhead (schedule lookups, seeded CPU noise). Runs are interleaved (A B C A B C ...) so drift in the
machine's speed hits every sampler alike; the median of REPEATS runs is reported. Goal: tcd / euler_ancestral <= 1.02.

    make bench            (or: source scripts/host/env.sh && $HOST_PY benchmarks/sampler_overhead.py)
Writes benchmarks/results/sampler_overhead.json.
"""
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import comfyhost  # noqa: E402

SAMPLERS = ("tcd", "euler_ancestral", "lcm")
STEPS = 4
REPEATS = 15
LATENT = (1, 4, 32, 32)   # a 256x256 image: large enough that the model, not Python, dominates a step
RESULTS = REPO / "benchmarks" / "results" / "sampler_overhead.json"


def main():
    import torch
    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    comfyhost.comfy_in_process(comfyui_dir)
    import comfy.sample
    import comfy.sd
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ckpt = Path(os.environ.get("TINY_CKPT") or REPO / ".cache" / "tiny_sd15.safetensors")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    comfyhost.make_tiny_checkpoint(comfyui_dir, ckpt)
    model, clip = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:2]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(name):
        t0 = time.perf_counter()
        comfy.sample.sample(model, noise, STEPS, 1.0, name, "tcd", cond, cond, latent, seed=0, disable_pbar=True)
        return time.perf_counter() - t0

    for name in SAMPLERS:   # warm-up: model load, first-call allocations
        run(name)
    times = {name: [] for name in SAMPLERS}
    for _ in range(REPEATS):
        for name in SAMPLERS:
            times[name].append(run(name))
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "what": f"seconds per image, {STEPS} steps, latent {list(LATENT)}, cfg 1, tiny SD1.5 (ComfyUI 0.3.75), "
                f"median of {REPEATS} interleaved runs",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "median_seconds": {k: round(v, 5) for k, v in medians.items()},
        "ratio_tcd_over_euler_ancestral": round(medians["tcd"] / medians["euler_ancestral"], 4),
        "ratio_tcd_over_lcm": round(medians["tcd"] / medians["lcm"], 4),
        "goal": "tcd / euler_ancestral <= 1.02",
        "all_seconds": {k: [round(x, 5) for x in v] for k, v in times.items()},
    }
    result["goal_met"] = result["ratio_tcd_over_euler_ancestral"] <= 1.02
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS)
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_tcd_over_euler_ancestral",
                                             "ratio_tcd_over_lcm", "goal_met")}))
    return result


if __name__ == "__main__":
    main()
