"""Per-image sampling time of `tcd` vs core `euler` on the same tiny flow-matching model (SD3-class MMDiT built from
ComfyUI's classes, scripts/make_tiny_flow.py, widened so the model rather than Python dominates a step), same
sigmas and seed, through ComfyUI's sampling (comfy.sample.sample_custom).

euler is the deterministic flow sampler TCD reduces to at gamma 0; at gamma 0.3 a TCD step also draws its seeded
CPU noise. `euler_ancestral_RF` (core's ancestral flow sampler, one noise draw per step) is timed for reference.
Runs are interleaved (A B C A B C ...) so drift in the machine's speed hits every sampler alike; the median of
REPEATS runs is reported. Goal: tcd / euler <= 1.02.

    make bench            (or: source scripts/host/env.sh && $HOST_PY benchmarks/flow_sampler_overhead.py)
Writes benchmarks/results/flow_sampler_overhead.json.
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

STEPS = 4
REPEATS = 15
LATENT = (1, 16, 64, 64)       # a 512x512 image: 32 x 32 = 1024 patch tokens
MODEL = {"depth": 4, "context_embedder_config": {"target": "torch.nn.Linear",
                                                 "params": {"in_features": 4096, "out_features": 256}}}
RESULTS = REPO / "benchmarks" / "results" / "flow_sampler_overhead.json"


def main():
    import torch
    comfyhost.comfy_in_process(Path(os.environ["COMFYUI_DIR"]))
    import comfy.k_diffusion.sampling as kds
    import comfy.sample
    import comfy.samplers
    import make_tiny_flow
    import nodes
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = make_tiny_flow.tiny_model_patcher("sd3", **MODEL)
    cond = make_tiny_flow.conditioning("sd3")
    sigmas = nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(model, STEPS, 1.0, 50, "comfyui")[0]
    tcd = next(f for f in (getattr(kds, "sample_tcd", None), getattr(kds, "sample_tcd_suite", None))
               if getattr(f, "tcd_suite", False))
    samplers = {"tcd": comfy.samplers.KSAMPLER(tcd, extra_options={"gamma": 0.3}),
                "euler": comfy.samplers.ksampler("euler"),
                "euler_ancestral_RF": comfy.samplers.ksampler("euler_ancestral_RF")}
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(name):
        t0 = time.perf_counter()
        comfy.sample.sample_custom(model, noise, 1.0, samplers[name], sigmas, cond, cond, latent, seed=0,
                                   disable_pbar=True)
        return time.perf_counter() - t0

    for name in samplers:   # warm-up: first-call allocations
        run(name)
    times = {name: [] for name in samplers}
    for _ in range(REPEATS):
        for name in samplers:
            times[name].append(run(name))
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "what": f"seconds per image, {STEPS} steps, latent {list(LATENT)}, cfg 1, SD3-class MMDiT depth "
                f"{MODEL['depth']} (hidden {64 * MODEL['depth']}), ComfyUI 0.3.75 classes, median of {REPEATS} "
                f"interleaved runs; tcd at gamma 0.3",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "median_seconds": {k: round(v, 5) for k, v in medians.items()},
        "ratio_tcd_over_euler": round(medians["tcd"] / medians["euler"], 4),
        "ratio_tcd_over_euler_ancestral_RF": round(medians["tcd"] / medians["euler_ancestral_RF"], 4),
        # each round's tcd / euler (the two ran back to back): robust to drift between rounds
        "paired_ratio_tcd_over_euler_median": round(statistics.median(
            a / b for a, b in zip(times["tcd"], times["euler"])), 4),
        "goal": "tcd / euler <= 1.02",
        "all_seconds": {k: [round(x, 5) for x in v] for k, v in times.items()},
    }
    result["goal_met"] = result["ratio_tcd_over_euler"] <= 1.02
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_tcd_over_euler",
                                             "paired_ratio_tcd_over_euler_median",
                                             "ratio_tcd_over_euler_ancestral_RF", "goal_met")}))
    return result


if __name__ == "__main__":
    main()
