"""TCD trainer iteration time vs its floor, and its peak memory vs one model copy + activations.

One iteration of the first-order TCD objective must run four model passes: the teacher on the conditional and on
the unconditional prompt, the target network, and the student forward + backward. The floor is the sum of those
passes, each timed alone (median) on the same model, batch and LoRA wrappers in the same run. Everything else the
trainer does per step (batch draw, TCF arithmetic, loss, gradient clipping, AdamW, EMA update, progress, Cancel
check) shows up as the ratio above 1. Goal: ratio <= 1.15.

Trainer steps and floor passes are interleaved in blocks (floor, 6 trainer steps, floor, ...; the trainer resumes
from its own checkpoint between blocks), so a change in the machine's speed hits both alike; the first step of a
block (set-up, first-call allocations) is not counted.

Memory: the resident set size (RSS, sampled every 2 ms by a thread; CUDA: max_memory_allocated) above the level
with the model loaded, during trainer steps and during the student's forward + backward alone (= the activations
one model pass + backward needs). One model copy is the UNet's weight bytes; the trainer adds the LoRA, its EMA
and AdamW's two moments, and must not add a second model copy.

    source scripts/host/env.sh && $HOST_PY benchmarks/trainer_throughput.py
Writes benchmarks/results/trainer_throughput.json.
"""
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
    """A progress object for train_lora that records the time of every completed step."""

    stamps: list = []

    def __init__(self, total):
        StepTimer.stamps = [time.perf_counter()]

    def update(self, n=1):
        StepTimer.stamps.append(time.perf_counter())


def main():
    import torch
    load_at_start = list(os.getloadavg())
    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    pack = comfyhost.comfy_in_process(comfyui_dir)
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    dataset = importlib.import_module(pack.__name__ + ".train.dataset")
    backend = importlib.import_module(pack.__name__ + ".tcd.backend")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="tcd_bench_"))
    folder_paths.set_output_directory(str(work))
    ckpt = Path(os.environ.get("TINY_CKPT") or REPO / ".cache" / "tiny_sd15.safetensors")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    comfyhost.make_tiny_checkpoint(comfyui_dir, ckpt)
    device = backend.torch_device()
    cuda = device.type == "cuda"

    with torch.inference_mode():
        model, clip = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:2]
        prompts = ["a red cat", "a blue dog", "a green tree", "a white house"]
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]
        uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        g = torch.Generator().manual_seed(0)
        latents = [{"samples": torch.randn(1, *LATENT, generator=g)} for _ in prompts]
    data = dataset.from_latents_and_conditioning(latents, conds, uncond)
    del clip
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

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
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
            batches = loop.Batches(data, patcher, device)
            fns = {m: loop.ComfyModelFn(patcher, switch, m, torch.float32, device)
                   for m in (loop.STUDENT, loop.TARGET, loop.TEACHER)}
            gen = torch.Generator().manual_seed(1)
            _, x0, cond, unc = batches.draw(BATCH, gen)
            x = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((BATCH,), 499, dtype=torch.long, device=device)

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
                floor["teacher_cond"].append(timed(lambda: no_grad(fns[loop.TEACHER], cond)))
                floor["teacher_uncond"].append(timed(lambda: no_grad(fns[loop.TEACHER], unc)))
                floor["target"].append(timed(lambda: no_grad(fns[loop.TARGET], cond)))
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with rss:
                    floor["student_fwd_bwd"].append(timed(student))
                activation_peaks.append((torch.cuda.max_memory_allocated() if cuda else rss.peak) - baseline)
            backend.detach_weight_wrappers(patcher, list(loras.values()) + [
                f for fs in patcher.weight_wrapper_patches.values() for f in fs
                if isinstance(f, loop.PassThrough)])

    steps, trainer_peaks = [], []
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
        floor_block()

    medians = {k: statistics.median(v) for k, v in floor.items()}
    floor_sum = sum(medians.values())
    iteration = statistics.median(steps)
    probe = loop.attach_lora(model.clone(), RANK, float(RANK), 0, False, loop.LoRASwitch())
    n_lora = sum(p.numel() for w in probe.values() for p in w.trainable())
    lora_state = n_lora * 4 * 4           # fp32 LoRA + EMA + AdamW exp_avg + exp_avg_sq
    mb = 1 / 2 ** 20
    result = {
        "what": f"TCD trainer (1st-order TCF, CFG teacher, EMA target) on the tiny SD1.5 UNet (ComfyUI 0.3.75), "
                f"latent {list(LATENT)}, batch {BATCH}, LoRA rank {RANK}, fp32; median of {len(steps)} trainer "
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS)
    print(json.dumps({k: result[k] for k in ("iteration_seconds_median", "floor_seconds", "floor_seconds_sum",
                                             "ratio_iteration_over_floor", "goal_met", "memory",
                                             "load_average_at_end")}, indent=1))
    return result


if __name__ == "__main__":
    main()
