"""Run the toy-scale study of the TCD recipe: `python -m benchmarks.paper_toy.run [--path vp|flow]
[--config full|quick] [--out DIR]`.

`--path vp` (the default) is the SD-schedule eps study (results in benchmarks/results/paper_toy); `--path flow` runs
the same design on rectified-flow teachers (velocity prediction, FlowPath objectives, flow samplers: `flow.py`;
results in benchmarks/results/paper_toy_flow) with the configurations `flow_full` / `flow_quick`.

Phases (units in experiment.py, spread over `--jobs` worker processes with one torch thread each: these networks are
too small for intra-op threads to pay off):
  0. teachers (2 per dataset), classifiers and noise floors;
  1. `select`: every objective distilled per seed, every sampler x NFE cell scored on the selection draw;
  2. choose, per objective and NFE, its best sampler, and the recommended TCD objective (rules below), from the
     selection draw only;
  3. `grade`: the chosen cells and the shared sampler on the grading draw (independent sampling noise);
     `oracle`: the mixture's exact-denoiser ceilings;
  4. statistics, summary.md, results.json and plots.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "paper_toy"
DEFAULT_OUT_FLOW = REPO / "benchmarks" / "results" / "paper_toy_flow"
DEFAULT_CACHE = Path(os.environ.get("TCD_BENCH_CACHE", Path.home() / ".cache" / "comfyui-tcd" / "paper_toy"))

OBJECTIVES = ["lcm", "tcd_rho0", "tcd_rho0.25", "tcd_rho0.5", "tcd_rho0.75", "tcd_tcf2"]
# Declared before any measurement: the gamma of the "sss_declared" sampler at each NFE. Fewer steps mean longer jumps,
# where a student that cannot see s is least accurate, so more of each step is re-noised; with more steps the
# jumps are short and accurate, and less noise is re-injected.
DECLARED_GAMMA = {"1": 0.0, "2": 0.5, "4": 0.3, "8": 0.2, "16": 0.1}

CONFIGS = {
    # The measured configuration (`make bench`).
    "full": {
        "seeds": list(range(10)),
        "teacher_seeds": [0, 1],
        "nfes": [1, 2, 4, 8, 16],
        "claim_nfes": [2, 4, 8, 16],
        "teacher_ref_nfes": [25],
        "objectives": OBJECTIVES,
        "declared_gamma": DECLARED_GAMMA,
        "samplers": ["lcm", "sss_g0", "sss_g0.3", "sss2_g0.3", "sss_declared"],
        "shared_sampler": "sss_declared",
        "oracle_samplers": ["sss_declared", "lcm"],
        "primary": {"mog2d": "sw", "digits": "kid"},
        "loss": "huber",
        "datasets": {
            "mog2d": {"n_select": 5000, "n_grade": 50000, "n_probe": 5000, "n_oracle": 10000, "floor_draws": 5,
                      "teacher": dict(width=64, depth=3, steps=3000, batch=1024, lr=3e-3),
                      "distill": dict(steps=800, batch=256, lr=2e-4, ema_decay=0.95, eval_ema=0.99,
                                      probe_every=100)},
            "digits": {"n_select": 1000, "n_grade": 2000, "n_probe": 500, "floor_draws": 5,
                       "classifier_seeds": [0, 1, 2], "classifier_steps": 1500,
                       "guidance": dict(w_min=0.0, w_max=2.0, w_eval=1.0),
                       "teacher": dict(width=256, depth=3, steps=4000, batch=256, lr=1e-3),
                       "distill": dict(steps=800, batch=128, lr=2e-4, ema_decay=0.95, eval_ema=0.99,
                                       probe_every=100)},
        },
    },
    # The test suite's configuration (tests/unit/test_paper_toy_quick.py): the mixture only, 3 seeds, two
    # objectives; small but real: it must show the distilled student beating the teacher's DDIM at 4 NFE.
    "quick": {
        "seeds": [0, 1, 2],
        "teacher_seeds": [0],
        "nfes": [2, 4],
        "claim_nfes": [2, 4],
        "teacher_ref_nfes": [25],
        "objectives": ["lcm", "tcd_rho0.5"],
        "declared_gamma": DECLARED_GAMMA,
        "samplers": ["lcm", "sss_g0.3", "sss_declared"],
        "shared_sampler": "sss_declared",
        "oracle_samplers": [],
        "primary": {"mog2d": "sw"},
        "loss": "huber",
        "datasets": {
            "mog2d": {"n_select": 2000, "n_grade": 10000, "n_probe": 1000, "n_oracle": 2000, "floor_draws": 5,
                      "teacher": dict(width=64, depth=2, steps=800, batch=512, lr=3e-3),
                      "distill": dict(steps=500, batch=128, lr=5e-4, ema_decay=0.95, eval_ema=0.95,
                                      probe_every=50)},
        },
    },
}


def _flow_config(base: str, datasets: dict, **overrides) -> dict:
    """A rectified-flow configuration: the VP one's design (paired seeds, draws, floors, statistics) with velocity
    teachers, the flow objectives and samplers (`flow.py`), and the teacher's flow Euler as its reference.

    * shift 1 (SD3's time_snr_shift off): the toy data are 2-D points and 64-pixel digits, far from the
      high-resolution latents a shift > 1 compensates for (more noise per step at high resolution);
    * sigma drawn uniformly in training (not SD3's logit-normal): logit-normal(0, 1) puts 0.2% of its draws below
      sigma 0.05, where the mixture's modes (std 0.08) are resolved, and few near sigma 1, where every few-step
      sampler starts;
    * objectives: LCM (the jump to sigma 0), TCD rho 0.5 (`tcd.losses.RECIPES["recommended"]`, fixed in advance,
      not re-chosen) and rho 0 (the paper);
    * samplers: SSS gamma 0 (the student's flow Euler), gamma(NFE) declared, and LCM's (gamma 1); gamma 0.3 where a
      configuration lists it.
    """
    cfg = copy.deepcopy(CONFIGS[base])
    cfg.update(path="flow", shift=1.0, time_sampling="uniform", recommended="tcd_rho0.5",
               samplers=["lcm", "sss_g0", "sss_g0.3", "sss_declared"], oracle_samplers=[],
               teachers={"fast": "teacher_euler", "ref": "teacher_euler"}, teacher_ref_nfes=[50])
    cfg.update(overrides)
    for name, changes in datasets.items():
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(cfg["datasets"][name].get(key), dict):
                cfg["datasets"][name][key].update(value)
            else:
                cfg["datasets"][name][key] = value
    cfg["datasets"] = {name: cfg["datasets"][name] for name in datasets}
    return cfg


# Sized to finish in about half an hour on 2 CPU cores shared with other work (the VP study takes 100 min): 3
# objectives, 3 samplers, the claim NFEs only, 400 (mixture) / 300 (digits) distillation steps instead of 800, a
# 10k-sample mixture grading draw instead of 50k; the teachers, the 10 paired seeds, the digits draws and the
# statistics are the VP study's.
CONFIGS["flow_full"] = _flow_config(
    "full", {"mog2d": {"n_select": 3000, "n_grade": 10000, "n_probe": 2000, "distill": dict(steps=400)},
             "digits": {"distill": dict(steps=300, probe_every=50)}},
    objectives=["lcm", "tcd_rho0", "tcd_rho0.5"], nfes=[2, 4, 8, 16], samplers=["lcm", "sss_g0", "sss_declared"])
# tests/unit/test_paper_toy_flow_quick.py: the mixture only, 3 seeds; it must show the flow-distilled student
# beating the flow teacher's Euler at 4 NFE.
CONFIGS["flow_quick"] = _flow_config("quick", {"mog2d": {"distill": dict(steps=300, probe_every=100)}},
                                     objectives=["lcm", "tcd_rho0.5"], samplers=["lcm", "sss_g0.3", "sss_declared"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_key(cfg: dict) -> str:
    """Cached teachers/students/classifiers are reused only for the same settings and the same code."""
    code = "".join((Path(__file__).parent / f).read_text() for f in
                   ("data.py", "models.py", "teacher.py", "distill.py", "metrics.py"))
    code += "".join((REPO / "tcd" / f).read_text() for f in ("losses.py", "tcf.py", "paths.py"))
    return hashlib.sha256((json.dumps(cfg, sort_keys=True) + code).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ worker side
_CONTEXTS: dict = {}


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def _unit(config_name: str, cache: str, kind: str, dataset: str, *args):
    from . import experiment
    key = (config_name, dataset)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = experiment.Context(CONFIGS[config_name], dataset, Path(cache))
    ctx = _CONTEXTS[key]
    return getattr(experiment, f"unit_{kind}")(ctx, *args)


# ------------------------------------------------------------------------------------------------ parent side
def _map(pool, config_name, cache, jobs, log):
    futures = [pool.submit(_unit, config_name, str(cache), *job) if pool else None for job in jobs]
    results = []
    for job, fut in zip(jobs, futures):
        res = fut.result() if pool else _unit(config_name, str(cache), *job)
        log(f"  {job[0]} {job[1]} {job[2:] if len(job) > 2 else ''}: {res.get('cpu_s', 0):.1f} CPU s")
        results.append(res)
    return results


def choose(cfg: dict, select_runs: dict) -> dict:
    """Phase 2, from the selection draw only:
    * best sampler of each (dataset, objective, NFE): the lowest mean primary metric over seeds;
    * recommended TCD objective: the best mean rank among the TCD objectives over every (dataset, claim NFE) at
      their best samplers (ties: the lower rho)."""
    from . import report
    best, means = {}, {}
    for name, runs in select_runs.items():
        primary = cfg["primary"][name]
        table = report.mean_table(runs, primary)
        for (objective, sampler, nfe), value in table.items():
            cur = best.get((name, objective, nfe))
            if cur is None or value < means[(name, objective, nfe)]:
                best[(name, objective, nfe)], means[(name, objective, nfe)] = sampler, value
    tcd = [o for o in cfg["objectives"] if o != "lcm"]
    ranks = {o: 0.0 for o in tcd}
    for name in select_runs:
        for nfe in cfg["claim_nfes"]:
            order = sorted(tcd, key=lambda o: means[(name, o, nfe)])
            for r, o in enumerate(order):
                ranks[o] += r
    # a configuration may fix its recommended objective in advance (the flow study tests the VP study's recipe)
    recommended = cfg.get("recommended") or min(tcd, key=lambda o: (ranks[o], tcd.index(o)))
    return {"best_sampler": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in best.items()},
            "mean_rank": ranks, "recommended": recommended}


def run(config_name: str = "full", out: Path = DEFAULT_OUT, jobs: int = 2, cache: Path = DEFAULT_CACHE,
        log=print) -> dict:
    from . import plots, report
    cfg = CONFIGS[config_name]
    names = list(cfg["datasets"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) / f"{config_name}-{config_key(cfg)}"
    cache.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) if jobs > 1 else None
    if pool is None:
        _init_worker()
    try:
        log("phase 0: teachers, classifiers, floors")
        phase0 = [("teacher", n, s) for n in names for s in cfg["teacher_seeds"]
                  if not (cache / f"teacher_{n}_{s}.pt").exists()] + [("references", n) for n in names]
        done0 = _map(pool, config_name, cache, phase0, log)
        log("phase 1: distil every objective, score every cell on the selection draw")
        done1 = _map(pool, config_name, cache, [("select", n, s) for s in cfg["seeds"] for n in names], log)
        select_runs = {n: [r for u in done1 if u["dataset"] == n for r in u["runs"] if r["draw"] == "select"]
                       for n in names}
        choice = choose(cfg, select_runs)
        log(f"phase 2: recommended TCD objective {choice['recommended']}")
        log("phase 3: grading draw and oracles")
        jobs3 = []
        for n in names:
            cells = sorted({(o, choice["best_sampler"][f"{n}|{o}|{nfe}"], nfe) for o in cfg["objectives"]
                            for nfe in cfg["nfes"]} |
                           {(o, cfg["shared_sampler"], nfe) for o in cfg["objectives"] for nfe in cfg["nfes"]})
            jobs3 += [("grade", n, s, cells) for s in cfg["seeds"]]
        if "mog2d" in names and cfg["oracle_samplers"]:
            jobs3 += [("oracle", "mog2d", o) for o in cfg["objectives"] if o != "tcd_tcf2"]
        done3 = _map(pool, config_name, cache, jobs3, log)
    finally:
        if pool is not None:
            pool.shutdown()
    units = done0 + done1 + done3
    results = report.assemble(cfg, config_name, units, choice)
    results["wall_s"] = time.time() - t0
    results["cpu_s"] = time.process_time() - c0 + sum(u.get("cpu_s", 0.0) for u in units)
    results["machine"] = _machine()
    results["jobs"] = jobs
    figs = plots.all_figures(results, out)
    results["figures"] = [f.name for f in figs]
    for rec in results["datasets"].values():
        rec.pop("samples", None)   # shown in samples_<dataset>.png; the raw points would only bloat the JSON
    _atomic_write(out / "summary.md", report.summary_markdown(results))
    _atomic_write(out / "results.json", json.dumps(_rounded(results), indent=1, allow_nan=True))
    return results


def _rounded(obj, digits: int = 6):
    """Floats to `digits` significant digits (measurement noise is far above that), recursively."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _machine() -> str:
    import torch
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="vp", choices=["vp", "flow"],
                        help="vp: SD-schedule eps teachers; flow: rectified-flow teachers (config flow_<config>)")
    parser.add_argument("--config", default="full", choices=sorted(c for c in CONFIGS if not c.startswith("flow_")))
    parser.add_argument("--out", default=None, help="output folder (JSON, PNG, summary.md); default "
                        "benchmarks/results/paper_toy or, with --path flow, paper_toy_flow")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 = in this process)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE),
                        help="where teachers, classifiers and students are kept (keyed by settings and code)")
    args = parser.parse_args(argv)
    config = args.config if args.path == "vp" else f"flow_{args.config}"
    out = Path(args.out) if args.out else (DEFAULT_OUT if args.path == "vp" else DEFAULT_OUT_FLOW)
    t0 = time.time()
    results = run(config, out, args.jobs, Path(args.cache), log=lambda m: print(m, flush=True))
    print(f"paper_toy ({config}): {time.time() - t0:.1f}s wall, {results['cpu_s'] / 60:.1f} CPU min; wrote "
          f"{out / 'summary.md'}, results.json and {len(results['figures'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
