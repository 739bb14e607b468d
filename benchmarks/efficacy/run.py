"""End-to-end efficacy in ComfyUI: `python -m benchmarks.efficacy.run [--config full|smoke] [--out DIR]`.

1. the teacher (cached; trained once, benchmarks/efficacy/teacher.py);
2. the training set as a graph makes it: one LATENT per digit image, one CONDITIONING per image from CLIP Text Encode
   on "a handwritten digit <label>", written and read back with core Save / Load Training Dataset;
3. TCD and LCM LoRAs from the TCD Distill LoRA node (same budget, same seed, same draws), and the TCD one once more
   over the HTTP API with the shipped distill workflow;
4. samples from KSampler / SamplerCustom (sampling.py) at NFE 1, 2, 4, 8 (and the teacher at 25 and 50 steps) for
   several seeds, scored by KID and class accuracy in a digit classifier's feature space (metrics.py);
5. results.json, summary.md and grid.png in the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "efficacy"

CONFIGS = {
    "full": {
        "teacher": "full",
        "teacher_cfg": 2.0,
        # The node's budget: the same for both objectives (and for the server run).
        "budget": dict(steps=400, batch_size=32, learning_rate=1e-3, rank=32, alpha=32.0, seed=0, warmup_steps=20,
                       max_grad_norm=1.0, training_dtype="auto", save_dtype="fp32"),
        "seeds": [0, 1, 2, 3, 4],
        "per_prompt": 20,
        "nfes": [1, 2, 4, 8],
        "teacher_ref_steps": [25, 50],
        "http": True,
    },
    # Seconds to minutes: the pipeline end to end; its numbers mean nothing.
    "smoke": {
        "teacher": "tiny",
        "teacher_cfg": 3.0,
        "budget": dict(steps=5, batch_size=8, learning_rate=1e-3, rank=8, alpha=8.0, seed=0, warmup_steps=0,
                       max_grad_norm=1.0, training_dtype="auto", save_dtype="fp32"),
        "seeds": [0, 1],
        "per_prompt": 2,
        "nfes": [1, 2, 4],
        "teacher_ref_steps": [8],
        "http": True,
    },
}
THREADS = 2


class Clock:
    """Wall and CPU seconds of named phases (CPU: this process, all threads)."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t0, self.c0 = time.time(), time.process_time()

            def __exit__(self, *exc):
                clock.phases[name] = {"wall_s": round(time.time() - self.t0, 1),
                                      "cpu_s": round(time.process_time() - self.c0, 1)}
        return _Phase()


def comfy_setup(work: Path):
    """ComfyUI in this process with the pack loaded; output and loras folders inside `work`."""
    sys.path.insert(0, str(REPO / "scripts"))
    import comfyhost
    comfyhost.comfy_in_process(Path(os.environ["COMFYUI_DIR"]), REPO)
    import comfy.utils
    import folder_paths
    comfy.utils.PROGRESS_BAR_ENABLED = False        # thousands of short sampler calls: no tqdm bars
    (work / "output").mkdir(parents=True, exist_ok=True)
    (work / "models" / "loras").mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.add_model_folder_path("loras", str(work / "models" / "loras"), is_default=True)


def training_set(clip, data, work: Path) -> tuple[list, list, object, dict]:
    """(latents, conditionings, negative) as Load Training Dataset gives them to the trainer, after writing them
    with Save Training Dataset: the same lists for the in-process and the server run."""
    import nodes
    import torch
    from . import model as M
    with torch.inference_mode():
        encode = nodes.CLIPTextEncode()
        by_digit = [encode.encode(clip, M.prompt_for(d))[0] for d in range(10)]
        negative = encode.encode(clip, "")[0]
        samples = M.encode_pixels(data.train)
        latents = [{"samples": samples[i:i + 1].clone()} for i in range(samples.shape[0])]
        conds = [by_digit[int(y)] for y in data.train_labels]
        save, load = nodes.NODE_CLASS_MAPPINGS["SaveTrainingDataset"], nodes.NODE_CLASS_MAPPINGS["LoadTrainingDataset"]
        save.execute(latents, conds, ["efficacy_digits"], [1000])
        save.execute([latents[0]], [negative], ["efficacy_uncond"], [1000])
        loaded = load.execute("efficacy_digits")
        loaded_latents, loaded_conds = (loaded.result if hasattr(loaded, "result") else loaded)[:2]
        loaded = load.execute("efficacy_uncond")
        loaded_negative = (loaded.result if hasattr(loaded, "result") else loaded)[1][0]
    return loaded_latents, loaded_conds, loaded_negative, {"prompts": by_digit, "negative": negative}


def lora_difference(path_a: str, path_b: str) -> float:
    from safetensors.torch import load_file
    a, b = load_file(path_a), load_file(path_b)
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run(config_name: str = "full", out: Path = DEFAULT_OUT, keep_work: bool = False, log=print) -> dict:
    import torch
    from . import data as D, distill, feasibility, metrics, report, sampling as S, server, teacher as T
    cfg = CONFIGS[config_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tcd_efficacy_"))
    clock = Clock()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    t_all, c_all = time.time(), time.process_time()
    background = None
    try:
        comfy_setup(work)
        with clock("teacher (load or train)"):
            teacher, clip, info = T.get_teacher(cfg["teacher"], log=log)
        data = D.load()
        with clock("dataset + classifier"):
            latents, conds, negative, prompts = training_set(clip, data, work)
            scorer = metrics.Scorer(data.train, data.train_labels, data.test, data.test_labels,
                                    cache=T.cache_dir())
        # ---------------------------------------------------------------- distillation through the node
        students, runs = {}, {}
        for objective in ("tcd", "lcm"):
            settings = distill.objective_settings(objective, cfg["teacher_cfg"])
            with clock(f"distill {objective} (node, in-process)"):
                r = distill.run_node(teacher, latents, conds, negative, settings, cfg["budget"], f"eff_{objective}")
            lora_path = work / "models" / "loras" / r["lora_name"]
            runs[objective] = {"inputs": r["inputs"], "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1),
                               "lora": str(lora_path), "losses": _losses_of(lora_path)}
            log(f"distilled {objective}: {r['wall_s']:.0f}s wall, {r['cpu_s']:.0f}s CPU")
            student = S.load_lora(teacher, r["lora_name"])
            students[objective] = S.lcm_sampling(student) if objective == "lcm" else student
        http = None
        if cfg["http"]:
            # The server trains in its own process while this one samples (one thread here, the server's default
            # threads there); its prompt time is measured from queueing to completion.
            graph = server.adapted_workflow(info["path"], "efficacy_digits", "efficacy_uncond",
                                            distill.objective_settings("tcd", cfg["teacher_cfg"]), cfg["budget"],
                                            "eff_tcd_http")
            background = server.HttpDistill(work, Path(os.environ["COMFYUI_DIR"]), sys.executable, graph,
                                            "eff_tcd_http")
            torch.set_num_threads(1)
        # ---------------------------------------------------------------- sampling and scores
        models = {"teacher": teacher, "tcd": students["tcd"], "lcm": students["lcm"]}
        methods = S.methods(cfg["teacher_cfg"])
        scores: dict = {}
        grid_images: dict = {}
        with clock("sampling + scoring"):
            for m in methods:
                steps_list = list(cfg["nfes"]) + (list(cfg["teacher_ref_steps"]) if m.model == "teacher" and m.reference else [])
                for steps in steps_list:
                    per_seed = []
                    for seed in cfg["seeds"]:
                        images, labels = S.sample_digits(m, models[m.model], steps, seed, prompts["prompts"],
                                                         prompts["negative"], cfg["per_prompt"])
                        per_seed.append(scorer(images, labels))
                        if seed == cfg["seeds"][0]:
                            grid_images[(m.key, steps)] = images[::cfg["per_prompt"]].clone()
                    scores.setdefault(m.key, {})[str(steps)] = {
                        k: metrics.t_interval([s[k] for s in per_seed]) for k in per_seed[0]}
                    s = scores[m.key][str(steps)]
                    log(f"  {m.label:<45} {steps:>3} steps: KID {s['kid']['mean']:.1f} ± {s['kid']['half']:.1f}, "
                        f"accuracy {s['accuracy']['mean']:.3f} ± {s['accuracy']['half']:.3f}")
            floor = _data_floor(scorer, data, cfg, metrics)
        if background is not None:
            with clock("server run: wait for the rest"):
                http = background.result()
            torch.set_num_threads(THREADS)
            http["max_abs_difference_vs_in_process"] = lora_difference(http["lora_path"], runs["tcd"]["lora"])
            http["graph"] = graph
            log(f"server run: {http['prompt_s']:.0f}s; LoRA max |difference| vs in-process "
                f"{http['max_abs_difference_vs_in_process']:.3g}")
        with clock("demo feasibility (loadable SD1.5-shaped model)"):
            feasible = feasibility.loadable_model_cost(float(info.get("train", {}).get("cpu_s", 0.0)))
        results = {
            "config_name": config_name, "config": cfg, "machine": _machine(),
            "teacher": {k: v for k, v in info.items() if k not in ("unet_config", "clip_config")},
            "teacher_unet_config": json.loads(info["unet_config"]), "teacher_clip_config": json.loads(info["clip_config"]),
            "gamma_by_nfe": S.GAMMA_BY_NFE, "teacher_schedulers": S.TEACHER_SCHEDULERS,
            "methods": [m.__dict__ for m in methods], "distill": runs, "http": http,
            "classifier_test_accuracy": scorer.test_accuracy, "floor": floor, "scores": scores,
            "demo_feasibility": feasible,
        }
        results["comparisons"] = report.comparisons(results)
        with clock("report"):
            report.grid_png(grid_images, results, out / "grid.png")
        results["phases"] = clock.phases
        results["wall_s"], results["cpu_s"] = round(time.time() - t_all, 1), round(time.process_time() - c_all, 1)
        report.write(results, out)
        return results
    finally:
        if background is not None:
            background.server.stop()            # idempotent; a no-op when the run finished
        torch.set_num_threads(previous_threads)
        if keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _losses_of(path: Path) -> list:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata().get("tcd.losses", "[]"))


def _data_floor(scorer, data, cfg, metrics) -> dict:
    """The same scores for real digits: per seed, per_prompt training digits of each class (a generator as good as
    the data) against the held-out digits."""
    import torch
    per_seed = []
    for seed in cfg["seeds"]:
        g = torch.Generator().manual_seed(10_000 + seed)
        picks = []
        for digit in range(10):
            idx = (data.train_labels == digit).nonzero().flatten()
            picks.append(idx[torch.randperm(idx.numel(), generator=g)[:cfg["per_prompt"]]])
        idx = torch.cat(picks)
        per_seed.append(scorer(data.train[idx], data.train_labels[idx]))
    return {k: metrics.t_interval([s[k] for s in per_seed]) for k in per_seed[0]}


def _machine() -> str:
    import torch
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}, {THREADS} torch threads")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="full", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary ComfyUI folders (LoRAs, logs)")
    args = parser.parse_args(argv)
    t0 = time.time()
    run(args.config, Path(args.out), args.keep_work, log=lambda m: print(m, flush=True))
    print(f"efficacy ({args.config}): {time.time() - t0:.0f}s; wrote {Path(args.out) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
