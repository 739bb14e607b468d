"""Per-image sampling time of `tcd` vs core `euler` on the same tiny flow-matching model (SD3-class MMDiT built from
ComfyUI's classes, scripts/make_tiny_flow.py, widened so the model rather than Python dominates a step), same
sigmas and seed, through ComfyUI's sampling (comfy.sample.sample_custom).

euler is the deterministic flow sampler TCD reduces to at gamma 0; at gamma 0.3 a TCD step also draws its seeded
CPU noise. `euler_ancestral_RF` (core's ancestral flow sampler, one noise draw per step) is timed for reference.
Runs are interleaved (A B C A B C ...) so drift in the machine's speed hits every sampler alike; the median of
REPEATS runs is reported, in wall time and in this process's CPU time (one torch thread). The goal is checked on
CPU time: on a shared machine, wall time also counts the time other processes hold the cores (their load moves the
wall-time ratio by several percent between runs), CPU time counts the sampler's own work. Goal: tcd / euler <= 1.02.
Because even CPU time drifts by a few percent on a loaded machine, the time each run spends outside the model's
forward passes (timed by a model-function wrapper) is reported too: it is the samplers' and ComfyUI's own cost,
and its tcd - euler difference is the TCD step's cost without the model's share of the noise.

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
    torch.set_num_threads(1)   # one thread: CPU time is then the work itself, not spinning or waiting workers
    model = make_tiny_flow.tiny_model_patcher("sd3", **MODEL)
    in_model = [0.0]

    def timed(apply_model, args):     # ComfyUI's model-function wrapper: times every forward pass
        t0 = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        in_model[0] += time.perf_counter() - t0
        return out

    model.set_model_unet_function_wrapper(timed)
    cond = make_tiny_flow.conditioning("sd3")
    sigmas = nodes.NODE_CLASS_MAPPINGS["TCD_Scheduler"]().get_sigmas(model, STEPS, 1.0, 50, "comfyui")[0]
    tcd = next(f for f in (getattr(kds, "sample_tcd", None), getattr(kds, "sample_tcd_suite", None))
               if getattr(f, "tcd_suite", False))
    samplers = {"tcd": comfy.samplers.KSAMPLER(tcd, extra_options={"gamma": 0.3}),
                "euler": comfy.samplers.ksampler("euler"),
                "euler_ancestral_RF": comfy.samplers.ksampler("euler_ancestral_RF")}
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)

    outside = {name: [] for name in samplers}

    def run(name):
        in_model[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        comfy.sample.sample_custom(model, noise, 1.0, samplers[name], sigmas, cond, cond, latent, seed=0,
                                   disable_pbar=True)
        wall = time.perf_counter() - t0
        outside[name].append(wall - in_model[0])
        return wall, time.process_time() - c0

    for name in samplers:   # warm-up: first-call allocations
        run(name)
        outside[name].clear()
    times = {name: [] for name in samplers}
    cpu = {name: [] for name in samplers}
    for _ in range(REPEATS):
        for name in samplers:
            wall, used = run(name)
            times[name].append(wall)
            cpu[name].append(used)
    medians = {name: statistics.median(v) for name, v in times.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    result = {
        "what": f"seconds per image, {STEPS} steps, latent {list(LATENT)}, cfg 1, SD3-class MMDiT depth "
                f"{MODEL['depth']} (hidden {64 * MODEL['depth']}), ComfyUI 0.3.75 classes, median of {REPEATS} "
                f"interleaved runs; tcd at gamma 0.3",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "median_cpu_seconds": {k: round(v, 5) for k, v in cpu_medians.items()},
        "median_wall_seconds": {k: round(v, 5) for k, v in medians.items()},
        "cpu_ratio_tcd_over_euler": round(cpu_medians["tcd"] / cpu_medians["euler"], 4),
        "cpu_ratio_tcd_over_euler_ancestral_RF": round(cpu_medians["tcd"] / cpu_medians["euler_ancestral_RF"], 4),
        "wall_ratio_tcd_over_euler": round(medians["tcd"] / medians["euler"], 4),
        # each round's tcd / euler (the two ran back to back): robust to drift between rounds
        "paired_wall_ratio_tcd_over_euler_median": round(statistics.median(
            a / b for a, b in zip(times["tcd"], times["euler"])), 4),
        "median_ms_outside_the_model": {k: round(1000 * statistics.median(v), 2) for k, v in outside.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "goal": "tcd / euler <= 1.02 (CPU time)",
        "all_cpu_seconds": {k: [round(x, 5) for x in v] for k, v in cpu.items()},
        "all_wall_seconds": {k: [round(x, 5) for x in v] for k, v in times.items()},
    }
    result["goal_met"] = result["cpu_ratio_tcd_over_euler"] <= 1.02
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(json.dumps({k: result[k] for k in ("median_cpu_seconds", "cpu_ratio_tcd_over_euler",
                                             "cpu_ratio_tcd_over_euler_ancestral_RF", "wall_ratio_tcd_over_euler",
                                             "paired_wall_ratio_tcd_over_euler_median",
                                             "median_ms_outside_the_model", "load_average_1min",
                                             "goal_met")}))
    return result


if __name__ == "__main__":
    main()
