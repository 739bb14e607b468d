"""Run the toy-scale paper reproduction: `python -m benchmarks.paper_toy.run [--config full|smoke] [--out DIR]`.

Each dataset runs in its own worker process with one torch thread (tiny networks use two cores better as two
processes than as two intra-op threads); the parent merges the raw records, aggregates over seeds, checks the
paper's claims and writes results.json, summary.md and the PNG plots into the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "paper_toy"

CONFIGS = {
    # The measured configuration (`make bench`): ~6 CPU-minutes per dataset worker (two workers on two cores).
    "full": {
        "seeds": [0, 1, 2],
        "nfes": [1, 2, 4, 8, 16],
        "gammas": [0.0, 0.2, 0.3, 0.5, 1.0],
        "order2_gammas": [0.0, 0.3],     # the 2nd-order TCF student is compared at the deterministic and default gamma
        "ref_steps": 100,
        "claim_gammas": [0.3, 0.0],      # declared before measuring: the paper's default and deterministic SSS
        "ablations": ["loss_l2", "target_online", "skip_25", "tcd_s_zero"],
        "ablation_gammas": [0.0, 0.3],
        "datasets": {
            "mog2d": {"n_samples": 2000, "keep_samples": 400,
                      "teacher": dict(width=128, depth=3, steps=3000, batch=1024, lr=3e-3),
                      "distill": dict(steps=1200, batch=256, lr=2e-4, ema_decay=0.95)},
            "digits": {"n_samples": 1000, "keep_samples": 25,
                       "teacher": dict(width=256, depth=3, steps=4000, batch=256, lr=1e-3),
                       "distill": dict(steps=1200, batch=128, lr=2e-4, ema_decay=0.95)},
        },
    },
    # Seconds: proves the pipeline end to end (tests/unit/test_paper_toy_smoke.py); its numbers mean nothing.
    "smoke": {
        "seeds": [0],
        "nfes": [1, 2],
        "gammas": [0.0, 0.3],
        "ref_steps": 100,
        "claim_gammas": [0.3, 0.0],
        "ablations": ["tcd_s_zero"],
        "ablation_gammas": [0.3],
        "datasets": {
            "mog2d": {"n_samples": 500, "jump_points": 64, "data": dict(n_train=5000, n_test=500),
                      "teacher": dict(width=64, depth=2, steps=1000, batch=512, lr=3e-3),
                      "distill": dict(steps=10, batch=64, lr=2e-4, ema_decay=0.95)},
            "digits": {"n_samples": 200, "jump_points": 64, "classifier_steps": 100, "keep_samples": 16,
                       "teacher": dict(width=32, depth=1, steps=200, batch=128, lr=3e-3),
                       "distill": dict(steps=10, batch=64, lr=2e-4, ema_decay=0.95)},
        },
    },
}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _worker(name: str, config_name: str, raw_path: Path, threads: int) -> None:
    import torch
    from .experiment import run_dataset
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0, c0 = time.time(), time.process_time()
        record = run_dataset(name, CONFIGS[config_name], log=lambda m: print(m, flush=True))
        # CPU seconds of this worker: what its wall time would be with a core of its own (no other load)
        record["wall_s"], record["cpu_s"] = time.time() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(previous)
    _atomic_write(raw_path, json.dumps(record))


def _run_workers(names, config_name: str, out: Path, jobs: int) -> dict:
    raw = {n: out / f".raw_{n}.json" for n in names}
    # One thread per worker: these networks are too small for intra-op threads to pay off (and with other load on
    # the machine, spinning threads cost more than they give).
    threads = 1
    if jobs <= 1:
        for n in names:
            _worker(n, config_name, raw[n], threads)
    else:
        procs = [(n, subprocess.Popen([sys.executable, "-m", "benchmarks.paper_toy.run", "--worker", n,
                                       "--config", config_name, "--raw", str(raw[n]), "--threads", str(threads)],
                                      cwd=REPO)) for n in names]
        failed = [n for n, p in procs if p.wait() != 0]
        if failed:
            raise RuntimeError(f"paper_toy worker(s) {failed} failed; see their output above")
    records = {}
    for n in names:
        records[n] = json.loads(raw[n].read_text())
        raw[n].unlink()
    return records


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


def run(config_name: str = "full", out: Path = DEFAULT_OUT, jobs: int = 2, datasets=None) -> dict:
    from . import plots, report
    if config_name not in CONFIGS:
        raise ValueError(f"config {config_name!r} is not one of {sorted(CONFIGS)}")
    cfg = CONFIGS[config_name]
    names = list(datasets or cfg["datasets"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records = _run_workers(names, config_name, out, jobs)

    results = {"config_name": config_name, "config": cfg, "machine": _machine(), "datasets": {}}
    for name, rec in records.items():
        agg = report.aggregate(rec["runs"])
        rec["aggregate_index"] = agg
        rec["first_seed"] = cfg["seeds"][0]
        rec["claims"] = report.claim_checks(name, rec, agg, cfg["nfes"], cfg["gammas"], cfg["claim_gammas"])
        results["datasets"][name] = rec
    results["wall_s"] = time.time() - t0

    # plots (before the summary, whose run time then includes them)
    figs = []
    for name, rec in results["datasets"].items():
        figs.append(plots.metric_vs_nfe(name, rec, cfg["nfes"], out))
        figs.append(plots.gamma_sweep(name, rec, cfg["nfes"], cfg["gammas"], out))
        figs.append(plots.tcf_order(name, rec, cfg["nfes"], out))
        test = None
        if name == "mog2d":
            from .data import load
            test = load(name, **cfg["datasets"][name].get("data", {})).test.numpy()
        figs.append(plots.sample_grid(name, rec, cfg["nfes"], out, test_points=test))
    figs.append(plots.overview(results, cfg["nfes"], out))
    figs.append(plots.loss_curves(results, out))
    results["wall_s"] = time.time() - t0
    results["figures"] = [f.name for f in figs]

    _write(results, out)
    return results


def _write(results: dict, out: Path) -> None:
    """summary.md, then results.json (aggregates keyed by readable fields; raw per-seed runs kept for re-analysis)."""
    from . import report
    _atomic_write(out / "summary.md", report.summary_markdown(results))
    for rec in results["datasets"].values():
        rec.pop("samples", None)   # shown in samples_<dataset>.png; the raw points would only bloat the JSON
        # per-seed values live in "runs"; the aggregate keeps mean, std and n
        rec["aggregate"] = [{"method": k[0], "variant": k[1], "order": k[2], "gamma": k[3], "nfe": k[4],
                             "label": report.method_label(k[0], k[2], k[3]),
                             "metrics": {m: {x: y for x, y in st.items() if x != "values"} for m, st in v.items()}}
                            for k, v in rec.pop("aggregate_index").items()]
    _atomic_write(out / "results.json", json.dumps(_rounded(results), indent=1, allow_nan=True))


def resummarize(out: Path = DEFAULT_OUT) -> None:
    """Recompute aggregates and claim checks from the per-seed runs in results.json; rewrite it and summary.md."""
    from . import report
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    for name, rec in results["datasets"].items():
        rec["aggregate_index"] = report.aggregate(rec["runs"])
        rec["claims"] = report.claim_checks(name, rec, rec["aggregate_index"], cfg["nfes"], cfg["gammas"],
                                            cfg["claim_gammas"])
    _write(results, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="full", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (JSON, PNG, summary.md)")
    parser.add_argument("--jobs", type=int, default=2, help="dataset workers in parallel (1 = in this process)")
    parser.add_argument("--datasets", nargs="*", default=None, help="subset of: mog2d digits")
    parser.add_argument("--resummarize", action="store_true",
                        help="only recompute aggregates, claims and summary.md from the runs in --out's results.json "
                             "(no training, no plots)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.config, Path(args.raw), args.threads)
        return 0
    if args.resummarize:
        resummarize(Path(args.out))
        return 0
    t0 = time.time()
    results = run(args.config, Path(args.out), args.jobs, args.datasets)
    print(f"paper_toy ({args.config}): {time.time() - t0:.1f}s; wrote {Path(args.out) / 'summary.md'}, "
          f"results.json and {len(results['figures'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
