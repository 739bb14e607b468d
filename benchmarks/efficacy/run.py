"""End-to-end efficacy in ComfyUI: `python -m benchmarks.efficacy.run [--config full|smoke] [--out DIR]`.

1. the teacher (cached; trained once, benchmarks/efficacy/teacher.py);
2. the training set as a graph makes it: one LATENT per digit image, one CONDITIONING per image from CLIP Text Encode
   on "a handwritten digit <label>", written and read back with core Save / Load Training Dataset;
3. TCD and LCM LoRAs from the TCD Distill LoRA node (same budget, same seed, same draws), and the TCD one once more
   over the HTTP API with the shipped distill workflow: three trainings at once (this process, a worker process,
   the server), one torch thread each;
4. samples from KSampler / SamplerCustom (sampling.py) at NFE 1, 2, 4, 8 (and the teacher at 25 and 50 steps) for
   several seeds, split over this process and a worker, scored by KID and class accuracy in a digit classifier's
   feature space (metrics.py); a gamma sweep of the TCD Sampler;
5. results.json, summary.md and grid.png in the output folder, and a measurement of what a loadable (SD1.5-shaped)
   demo model would cost to train (feasibility.py).
"""
from __future__ import annotations

import argparse
import contextlib
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
DATASET, UNCOND_DATASET = "efficacy_digits", "efficacy_uncond"    # folders in ComfyUI's output folder


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


def save_training_set(clip, data) -> None:
    """The training set as a graph makes it: one LATENT per digit image, one CONDITIONING per image from CLIP Text
    Encode on its prompt, written with core Save Training Dataset (and the empty prompt as a one-entry set)."""
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
        save = nodes.NODE_CLASS_MAPPINGS["SaveTrainingDataset"]
        save.execute(latents, conds, [DATASET], [1000])
        save.execute([latents[0]], [negative], [UNCOND_DATASET], [1000])


def load_training_set() -> tuple[list, list, object]:
    """(latents, conditionings, negative) as core Load Training Dataset hands them to the trainer in a graph."""
    import nodes
    import torch
    load = nodes.NODE_CLASS_MAPPINGS["LoadTrainingDataset"]
    with torch.inference_mode():
        out = load.execute(DATASET)
        latents, conds = (out.result if hasattr(out, "result") else out)[:2]
        out = load.execute(UNCOND_DATASET)
        negative = (out.result if hasattr(out, "result") else out)[1][0]
    return latents, conds, negative


@contextlib.contextmanager
def work_folder(prefix: str, keep_work: bool = False, log=print):
    """A temporary folder set up as ComfyUI's output and loras folders (comfy_setup), torch at one thread meanwhile;
    afterwards the thread count is restored and the folder removed (or kept, and said so)."""
    import torch
    work = Path(tempfile.mkdtemp(prefix=prefix))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comfy_setup(work)
        yield work
    finally:
        torch.set_num_threads(previous_threads)
        if keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def digit_scorer(data):
    """Scores in the digit classifier's features (metrics.Scorer), the classifier cached with this benchmark's
    teacher."""
    from . import metrics, teacher as T
    return metrics.Scorer(data.train, data.train_labels, data.test, data.test_labels, cache=T.cache_dir())


def prompt_conditionings(clip) -> tuple[list, object]:
    import nodes
    import torch
    from . import model as M
    with torch.inference_mode():
        encode = nodes.CLIPTextEncode()
        return [encode.encode(clip, M.prompt_for(d))[0] for d in range(10)], encode.encode(clip, "")[0]


def lora_difference(path_a: str, path_b: str) -> float:
    from safetensors.torch import load_file
    a, b = load_file(path_a), load_file(path_b)
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------------------------- the two phases
def distill_one(teacher, cfg: dict, objective: str, work: Path, prefix: str = "eff") -> dict:
    """The node's LoRA for `objective` on the saved training set; its file is named `prefix`_`objective`."""
    from . import distill
    latents, conds, negative = load_training_set()
    settings = distill.objective_settings(objective, cfg["teacher_cfg"])
    r = distill.run_node(teacher, latents, conds, negative, settings, cfg["budget"], f"{prefix}_{objective}")
    path = work / "models" / "loras" / r["lora_name"]
    return {"inputs": r["inputs"], "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1),
            "lora_name": r["lora_name"], "lora": str(path), "losses": _losses_of(path)}


def all_methods(cfg: dict) -> list:
    from . import sampling as S
    return S.methods(cfg["teacher_cfg"]) + S.gamma_sweep(cfg["teacher_cfg"])


def sampling_jobs(cfg: dict, methods: list | None = None) -> list[tuple[str, int]]:
    """(method key, steps) for every method (all_methods(cfg) unless given): cfg's NFEs or the method's own, and the
    reference step counts for the reference teachers."""
    jobs = []
    for m in all_methods(cfg) if methods is None else methods:
        steps = list(m.nfes or cfg["nfes"])
        if m.model == "teacher" and m.reference:
            steps += list(cfg["teacher_ref_steps"])
        jobs += [(m.key, n) for n in steps]
    return jobs


def split_jobs(jobs: list, cfg: dict, parts: int = 2) -> list[list]:
    """Greedy split by model passes (steps, twice with CFG) so both processes finish together."""
    methods = {m.key: m for m in all_methods(cfg)}
    cost = {j: j[1] * (2 if methods[j[0]].cfg != 1 else 1) for j in jobs}
    out, load = [[] for _ in range(parts)], [0] * parts
    for job in sorted(jobs, key=lambda j: -cost[j]):
        i = load.index(min(load))
        out[i].append(job)
        load[i] += cost[job]
    return out


def sample_jobs(jobs: list, cfg: dict, teacher, lora_names: dict, clip, scorer) -> tuple[dict, dict]:
    """Per-seed scores {method: {steps: [score per seed]}} and the seed-0 grid tiles {(method, steps): images}."""
    from . import sampling as S
    students = {"tcd": S.load_lora(teacher, lora_names["tcd"])}
    students["lcm"] = S.lcm_sampling(S.load_lora(teacher, lora_names["lcm"]))
    models = {"teacher": teacher, **students}
    methods = {m.key: m for m in all_methods(cfg)}
    prompts, negative = prompt_conditionings(clip)
    scores, tiles = {}, {}
    for key, steps in jobs:
        m = methods[key]
        per_seed, tiles[f"{key}@{steps}"] = score_seeds(S.sample_digits, m, models[m.model], steps, cfg, prompts,
                                                        negative, scorer)
        scores.setdefault(key, {})[str(steps)] = per_seed
    return scores, tiles


def score_seeds(sample_digits, method, model, steps: int, cfg: dict, prompts, negative, scorer) -> tuple[list, object]:
    """The scores of `method` on `model` at `steps`, one per seed of cfg["seeds"] (cfg["per_prompt"] samples of each
    prompt), and the first seed's first sample of each prompt (a grid row)."""
    per_seed, tile = [], None
    for seed in cfg["seeds"]:
        images, labels = sample_digits(method, model, steps, seed, prompts, negative, cfg["per_prompt"])
        per_seed.append(scorer(images, labels))
        if seed == cfg["seeds"][0]:
            tile = images[::cfg["per_prompt"]].clone()
    return per_seed, tile


def intervals(per_seed: dict) -> dict:
    """{method: {steps: {metric: 95% t-interval over seeds}}} from the per-seed scores."""
    from . import metrics
    return {key: {steps: {k: metrics.t_interval([s[k] for s in runs]) for k in runs[0]}
                  for steps, runs in sorted(by_steps.items(), key=lambda kv: int(kv[0]))}
            for key, by_steps in per_seed.items()}


class Worker:
    """This module in a child process (`--worker`), for one phase's second half; one torch thread each."""

    def __init__(self, kind: str, config_name: str, work: Path, job: dict):
        import subprocess
        self.result_path = work / f".worker_{kind}.json"
        job_path = work / f".worker_{kind}_job.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.efficacy.run", "--worker", kind,
                                      "--config", config_name, "--work", str(work), "--job", str(job_path)],
                                     cwd=REPO, env=env)

    def result(self) -> dict:
        if self.proc.wait() != 0:
            raise RuntimeError(f"efficacy worker failed (exit {self.proc.returncode}); see its output above")
        return json.loads(self.result_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def worker_main(kind: str, config_name: str, work: Path, job_path: Path) -> None:
    import torch
    from . import data as D, teacher as T
    torch.set_num_threads(1)
    cfg = CONFIGS[config_name]
    job = json.loads(job_path.read_text())
    comfy_setup(work)
    teacher, clip, _ = T.get_teacher(cfg["teacher"])
    c0 = time.process_time()
    if kind == "distill":
        out = distill_one(teacher, cfg, job["objective"], work)
    else:
        scorer = digit_scorer(D.load())
        scores, tiles = sample_jobs([tuple(j) for j in job["jobs"]], cfg, teacher, job["loras"], clip, scorer)
        torch.save(tiles, work / ".worker_tiles.pt")
        out = {"scores": scores, "cpu_s": time.process_time() - c0}
    tmp = work / f".worker_{kind}.json.tmp"
    tmp.write_text(json.dumps(out))
    os.replace(tmp, work / f".worker_{kind}.json")


def run(config_name: str = "full", out: Path = DEFAULT_OUT, keep_work: bool = False, log=print) -> dict:
    import torch
    from . import data as D, feasibility, metrics, report, server, teacher as T
    cfg = CONFIGS[config_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    t_all, c_all = time.time(), time.process_time()
    background, workers = None, []
    with work_folder("tcd_efficacy_", keep_work, log) as work:
        try:
            with clock("teacher (load or train)"):
                teacher, clip, info = T.get_teacher(cfg["teacher"], log=log)
            data = D.load()
            with clock("dataset + classifier"):
                save_training_set(clip, data)
                scorer = digit_scorer(data)
            # ---------------------------------------------------------------- distillation through the node
            # Three trainings at once, one thread each: TCD in this process, LCM in a worker, and TCD again on a
            # headless server through the HTTP API (the shipped distill workflow, adapted).
            with clock("distill: TCD here, LCM in a worker, TCD on the server (in parallel)"):
                graph = None
                if cfg["http"]:
                    from . import distill
                    graph = server.adapted_workflow(info["path"], DATASET, UNCOND_DATASET,
                                                    distill.objective_settings("tcd", cfg["teacher_cfg"]),
                                                    cfg["budget"], "eff_tcd_http")
                    threads = os.environ.get("OMP_NUM_THREADS")
                    os.environ["OMP_NUM_THREADS"] = "1"          # the server process inherits it
                    try:
                        background = server.HttpDistill(work, Path(os.environ["COMFYUI_DIR"]), sys.executable, graph,
                                                        "eff_tcd_http")
                    finally:
                        if threads is None:
                            os.environ.pop("OMP_NUM_THREADS")
                        else:
                            os.environ["OMP_NUM_THREADS"] = threads
                workers.append(Worker("distill", config_name, work, {"objective": "lcm"}))
                runs = {"tcd": distill_one(teacher, cfg, "tcd", work)}
                log(f"distilled tcd: {runs['tcd']['wall_s']:.0f}s wall, {runs['tcd']['cpu_s']:.0f}s CPU")
                runs["lcm"] = workers.pop().result()
                log(f"distilled lcm: {runs['lcm']['wall_s']:.0f}s wall, {runs['lcm']['cpu_s']:.0f}s CPU")
                http = None
                if background is not None:
                    http = background.result()
                    http["max_abs_difference_vs_in_process"] = lora_difference(http["lora_path"], runs["tcd"]["lora"])
                    http["graph"] = graph
                    log(f"server run: {http['prompt_s']:.0f}s; LoRA max |difference| vs in-process "
                        f"{http['max_abs_difference_vs_in_process']:.3g}")
            # ---------------------------------------------------------------- sampling and scores, in two processes
            with clock("sampling + scoring (two processes)"):
                mine, theirs = split_jobs(sampling_jobs(cfg), cfg)
                loras = {k: runs[k]["lora_name"] for k in runs}
                workers.append(Worker("sample", config_name, work, {"jobs": theirs, "loras": loras}))
                per_seed, tiles = sample_jobs(mine, cfg, teacher, loras, clip, scorer)
                theirs_result = workers.pop().result()
                sampler_cpu = theirs_result["cpu_s"]
                for key, by_steps in theirs_result["scores"].items():
                    per_seed.setdefault(key, {}).update(by_steps)
                tiles.update(torch.load(work / ".worker_tiles.pt", weights_only=True))
                floor = _data_floor(scorer, data, cfg, metrics)
            scores = intervals(per_seed)
            with clock("demo feasibility (loadable SD1.5-shaped model)"):
                feasible = feasibility.loadable_model_cost(float(info.get("train", {}).get("cpu_s", 0.0)))
            from . import sampling as S
            results = {
                "config_name": config_name, "config": cfg, "machine": _machine(),
                "teacher": {k: v for k, v in info.items() if k not in ("unet_config", "clip_config")},
                "teacher_unet_config": json.loads(info["unet_config"]),
                "teacher_clip_config": json.loads(info["clip_config"]),
                "gamma_by_nfe": S.GAMMA_BY_NFE, "teacher_schedulers": S.TEACHER_SCHEDULERS,
                "methods": [dict(m.__dict__) for m in all_methods(cfg)], "distill": runs, "http": http,
                "classifier_test_accuracy": scorer.test_accuracy, "floor": floor, "scores": scores,
                "demo_feasibility": feasible,
            }
            results["comparisons"] = report.comparisons(results)
            with clock("report"):
                by_method_steps = {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): v for k, v in tiles.items()}
                report.grid_png(by_method_steps, results, out / "grid.png")
            results["phases"] = clock.phases
            # CPU: this process and the two workers (the server's own CPU time is not visible from here)
            results["wall_s"] = round(time.time() - t_all, 1)
            results["cpu_s"] = round(time.process_time() - c_all + runs["lcm"]["cpu_s"] + sampler_cpu, 1)
            report.write(results, out)
            return results
        finally:
            for w in workers:
                w.stop()
            if background is not None:
                background.server.stop()            # idempotent; a no-op when the run finished


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
            f"Python {platform.python_version()}; two processes with one torch thread each")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="full", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary ComfyUI folders (LoRAs, logs)")
    parser.add_argument("--worker", choices=("distill", "sample"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.config, Path(args.work), Path(args.job))
        return 0
    t0 = time.time()
    run(args.config, Path(args.out), args.keep_work, log=lambda m: print(m, flush=True))
    print(f"efficacy ({args.config}): {time.time() - t0:.0f}s; wrote {Path(args.out) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
