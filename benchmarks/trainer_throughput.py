"""TCD trainer iteration time vs its floor, and its peak memory vs one model copy + activations.

One iteration of the first-order TCD objective must run four model passes: the teacher on the conditional and on
the unconditional prompt, the target network, and the student forward + backward. The floor is the sum of those
passes, each timed alone (median) on the same model, batch and LoRA wrappers in the same run. Everything else the
trainer does per step (batch draw, TCF arithmetic, loss, gradient clipping, AdamW, EMA update, progress, Cancel
check) shows up as the ratio above 1. Goal: ratio <= 1.15.

Cases (--case, default all):
  vp    the tiny SD1.5 UNet (the top-level keys of the results file);
  flow  an SD3-class MMDiT built from ComfyUI's own classes (scripts/make_tiny_flow.py, depth 6 = hidden 384, the
        tiny model being too small for the model to dominate a pass on a CPU), 16-channel latents, CFG teacher,
        the same four passes at sigma 0.5 (results key "flow_sd3"). The trainer's flow-only set-up (copies of
        inference-tensor norm scales, norm-input copies for in-place residual adds) is in the floor's passes too.

Trainer steps and floor passes are interleaved in blocks (floor, 6 trainer steps, floor, ...; the trainer resumes
from its own checkpoint between blocks), so a change in the machine's speed hits both alike; the first step of a
block (set-up, first-call allocations) is not counted.

Memory: the resident set size (RSS, sampled every 2 ms by a thread; CUDA: max_memory_allocated) above the level
with the model loaded, during trainer steps and during the student's forward + backward alone (= the activations
one model pass + backward needs). One model copy is the UNet's weight bytes; the trainer adds the LoRA, its EMA
and AdamW's two moments, and must not add a second model copy.

    source scripts/host/env.sh && $HOST_PY benchmarks/trainer_throughput.py [--case vp|flow|all]
Writes benchmarks/results/trainer_throughput.json (a single case keeps the other case's numbers there).
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import comfyhost  # noqa: E402

LATENT = (4, 32, 32)        # 256x256 images: the model, not Python, dominates a pass
FLOW_LATENT = (16, 32, 32)  # 256x256 images through a 16-channel VAE: 16 x 16 patches of 2 x 2
# SD3-class MMDiT: hidden = 64 x depth (ComfyUI's MMDiT), context embedder 4096 (SD3's text width) -> hidden
FLOW_DEPTH = 6
FLOW_OVERRIDES = {"depth": FLOW_DEPTH, "context_embedder_config": {
    "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * FLOW_DEPTH}}}
BATCH = 1
RANK = 8
BLOCKS = 4                  # trainer blocks (each STEPS_PER_BLOCK steps) interleaved with BLOCKS + 1 floor blocks
STEPS_PER_BLOCK = 6
FLOOR_REPEATS = 3           # each pass, per floor block
GOAL = 1.15
RESULTS = REPO / "benchmarks" / "results" / "trainer_throughput.json"


class RssPeak:
    """Peak resident set size while active (a 2 ms sampling thread)."""

    def __init__(self):
        import psutil
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def now(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self):
        self.peak = self.now()
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.now())
                time.sleep(0.002)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


class StepTimer:
    """A progress object for train_lora that records the time (wall and process CPU) of every completed step."""

    stamps: list = []
    cpu_stamps: list = []

    def __init__(self, total):
        StepTimer.stamps = [time.perf_counter()]
        StepTimer.cpu_stamps = [time.process_time()]

    def update(self, n=1):
        StepTimer.stamps.append(time.perf_counter())
        StepTimer.cpu_stamps.append(time.process_time())


def vp_inputs(comfyui_dir):
    """The tiny SD1.5 checkpoint, 4 prompts and random latents, loaded as a prompt loads them."""
    import torch
    import comfy.sd
    ckpt = Path(os.environ.get("TINY_CKPT") or REPO / ".cache" / "tiny_sd15.safetensors")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    comfyhost.make_tiny_checkpoint(comfyui_dir, ckpt)
    with torch.inference_mode():
        model, clip = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:2]
        prompts = ["a red cat", "a blue dog", "a green tree", "a white house"]
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]
        uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        g = torch.Generator().manual_seed(0)
        latents = [{"samples": torch.randn(1, *LATENT, generator=g)} for _ in prompts]
    return model, latents, conds, uncond


def flow_inputs(comfyui_dir):
    """The SD3-class MMDiT of FLOW_OVERRIDES (random weights, ComfyUI's classes), 4 random prompts of SD3's text
    widths, a random negative and random 16-channel latents, built under inference_mode as a prompt loads them."""
    import torch
    import make_tiny_flow as mtf
    with torch.inference_mode():
        model = mtf.tiny_model_patcher("sd3", **FLOW_OVERRIDES)
        conds = [mtf.conditioning("sd3", seed=10 + i, tokens=77) for i in range(4)]
        uncond = mtf.conditioning("sd3", seed=99, tokens=77)
        g = torch.Generator().manual_seed(0)
        latents = [{"samples": torch.randn(1, *FLOW_LATENT, generator=g)} for _ in conds]
    return model, latents, conds, uncond


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("vp", "flow", "all"), default="all")
    cases = ("vp", "flow") if ap.parse_args().case == "all" else (ap.parse_args().case,)
    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    pack = comfyhost.comfy_in_process(comfyui_dir)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for case in cases:
        result = measure(pack, comfyui_dir, case)
        if case == "vp":
            results = {**result, **({"flow_sd3": results["flow_sd3"]} if "flow_sd3" in results else {})}
        else:
            results["flow_sd3"] = result
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, RESULTS)
        print(case, json.dumps({k: result[k] for k in (
            "iteration_seconds_median", "floor_seconds", "floor_seconds_sum", "ratio_iteration_over_floor",
            "goal_met", "cpu_seconds", "memory", "load_average_at_end")}, indent=1))
    return results


def measure(pack, comfyui_dir, case):
    import torch
    load_at_start = list(os.getloadavg())
    import comfy.model_management as mm
    import folder_paths
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    dataset = importlib.import_module(pack.__name__ + ".train.dataset")
    backend = importlib.import_module(pack.__name__ + ".tcd.backend")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="tcd_bench_"))
    folder_paths.set_output_directory(str(work))
    device = backend.torch_device()
    cuda = device.type == "cuda"
    flow = case == "flow"
    model, latents, conds, uncond = (flow_inputs if flow else vp_inputs)(comfyui_dir)
    data = dataset.from_latents_and_conditioning(latents, conds, uncond)
    latent_shape = FLOW_LATENT if flow else LATENT
    cfg = loop.DistillConfig(steps=STEPS_PER_BLOCK, batch_size=BATCH, rank=RANK, alpha=float(RANK),
                             learning_rate=1e-4, dtype="fp32", save_dtype="fp32")
    mm.load_models_gpu([model])
    unet_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    rss = RssPeak()
    baseline = rss.now()
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cpu_floor = {}

    def timed(fn, key):
        """Wall seconds of fn (returned); its process CPU seconds go to cpu_floor[key]. On a shared CPU host the
        CPU time is the load-robust measure: other processes stretch wall time, not this process's CPU time."""
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        cpu_floor.setdefault(key, []).append(time.process_time() - c0)
        return time.perf_counter() - t0

    floor = {"teacher_cond": [], "teacher_uncond": [], "target": [], "student_fwd_bwd": []}
    activation_peaks = []

    def floor_block():
        with torch.inference_mode(False), torch.enable_grad():
            patcher = model.clone()
            switch = loop.LoRASwitch()
            loras = loop.attach_lora(patcher, RANK, float(RANK), 0, True, switch)
            params = [p for w in loras.values() for p in w.trainable()]
            for p in params:
                p.requires_grad_(True)
            backend.load_for_training(patcher)
            copied = backend.copy_inference_parameters(patcher)        # as DistillRun.start
            hooks = backend.copy_norm_inputs(patcher) if flow else []
            batches = loop.Batches(data, patcher, device)
            fns = {m: loop.ComfyModelFn(patcher, switch, m, torch.float32, device, flow)
                   for m in (loop.STUDENT, loop.TARGET, loop.TEACHER)}
            gen = torch.Generator().manual_seed(1)
            _, x0, cond, unc = batches.draw(BATCH, gen)
            x = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((BATCH,), 0.5, device=device) if flow else \
                torch.full((BATCH,), 499, dtype=torch.long, device=device)

            def no_grad(fn, c):
                with torch.no_grad():
                    fn(x, t, c)

            def student():
                out = fns[loop.STUDENT](x, t, cond)
                out.square().mean().backward()
                for p in params:
                    p.grad = None
            no_grad(fns[loop.TEACHER], cond)                # first-call warm-up of this block
            for _ in range(FLOOR_REPEATS):
                floor["teacher_cond"].append(timed(lambda: no_grad(fns[loop.TEACHER], cond), "teacher_cond"))
                floor["teacher_uncond"].append(timed(lambda: no_grad(fns[loop.TEACHER], unc), "teacher_uncond"))
                floor["target"].append(timed(lambda: no_grad(fns[loop.TARGET], cond), "target"))
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with rss:
                    floor["student_fwd_bwd"].append(timed(student, "student_fwd_bwd"))
                activation_peaks.append((torch.cuda.max_memory_allocated() if cuda else rss.peak) - baseline)
            backend.remove_hooks(hooks)
            backend.restore_inference_parameters(copied)
            backend.detach_weight_wrappers(patcher, list(loras.values()) + [
                f for fs in patcher.weight_wrapper_patches.values() for f in fs
                if isinstance(f, loop.PassThrough)])

    steps, cpu_steps, trainer_peaks = [], [], []
    state = work / "bench.state.pt"
    floor_block()
    for block in range(BLOCKS):
        cfg.steps = STEPS_PER_BLOCK * (block + 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with rss:
            with torch.inference_mode():
                loop.train_lora(model, data, cfg, state, resume=True, progress_factory=StepTimer)
        trainer_peaks.append((torch.cuda.max_memory_allocated() if cuda else rss.peak) - baseline)
        stamps = StepTimer.stamps
        steps.extend(b - a for a, b in zip(stamps[1:-1], stamps[2:]))     # not the block's first step
        cpu = StepTimer.cpu_stamps
        cpu_steps.extend(b - a for a, b in zip(cpu[1:-1], cpu[2:]))
        floor_block()

    medians = {k: statistics.median(v) for k, v in floor.items()}
    floor_sum = sum(medians.values())
    iteration = statistics.median(steps)
    cpu_medians = {k: statistics.median(v) for k, v in cpu_floor.items()}
    cpu_floor_sum, cpu_iteration = sum(cpu_medians.values()), statistics.median(cpu_steps)
    probe = loop.attach_lora(model.clone(), RANK, float(RANK), 0, False, loop.LoRASwitch())
    n_lora = sum(p.numel() for w in probe.values() for p in w.trainable())
    lora_state = n_lora * 4 * 4           # fp32 LoRA + EMA + AdamW exp_avg + exp_avg_sq
    mb = 1 / 2 ** 20
    model_text = f"an SD3-class MMDiT (ComfyUI's MMDiT, depth {FLOW_DEPTH}, hidden {64 * FLOW_DEPTH}, " \
        f"{unet_bytes / 2 ** 20:.0f} MB of weights, random)" if flow else "the tiny SD1.5 UNet"
    result = {
        "what": f"TCD trainer (1st-order TCF, CFG teacher, EMA target) on {model_text} (ComfyUI 0.3.75), "
                f"latent {list(latent_shape)}, batch {BATCH}, LoRA rank {RANK}, fp32; median of {len(steps)} trainer "
                f"steps vs the sum of the median of {len(floor['target'])} solo timings of each model pass",
        "device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "iteration_seconds_median": round(iteration, 5),
        "floor_seconds": {k: round(v, 5) for k, v in medians.items()},
        "floor_seconds_sum": round(floor_sum, 5),
        "ratio_iteration_over_floor": round(iteration / floor_sum, 4),
        "goal": f"ratio <= {GOAL}",
        "goal_met": iteration / floor_sum <= GOAL,
        "cpu_seconds": {"iteration_median": round(cpu_iteration, 5),
                        "floor": {k: round(v, 5) for k, v in cpu_medians.items()},
                        "floor_sum": round(cpu_floor_sum, 5),
                        "ratio_iteration_over_floor": round(cpu_iteration / cpu_floor_sum, 4),
                        "goal_met": cpu_iteration / cpu_floor_sum <= GOAL,
                        "note": "process CPU time (all threads): not stretched by other processes on a shared host"},
        "memory": {
            "measure": "CUDA max_memory_allocated" if cuda else "process RSS (2 ms sampling)",
            "unet_weights_mb": round(unet_bytes * mb, 1),
            "lora_ema_adam_mb": round(lora_state * mb, 2),
            "student_fwd_bwd_peak_above_loaded_model_mb": round(max(activation_peaks) * mb, 1),
            "trainer_peak_above_loaded_model_mb": round(max(trainer_peaks) * mb, 1),
            "one_model_copy_plus_activations_mb": round((unet_bytes + max(activation_peaks)) * mb, 1),
            "trainer_peak_mb": round((unet_bytes + max(trainer_peaks)) * mb, 1),
        },
        "all_iteration_seconds": [round(s, 5) for s in steps],
        "all_floor_seconds": {k: [round(s, 5) for s in v] for k, v in floor.items()},
    }
    mm.unload_all_models()
    return result


if __name__ == "__main__":
    main()
