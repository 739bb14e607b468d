"""`make bench`: run every benchmark, each in its own subprocess, then print a summary.

Runs each `benchmarks/*.py` script that defines a top-level `main()` (this file excepted), calling its `main()`,
the toy-scale paper reproduction (`python -m benchmarks.paper_toy.run`), its rectified-flow variant
(`python -m benchmarks.paper_toy.run --path flow`) and the end-to-end efficacy benchmark
(`python -m benchmarks.efficacy.run`: the trainer node on a teacher trained in ComfyUI's classes; the teacher is
trained once and cached) with its flow variant (`python -m benchmarks.efficacy_flow.run`: an SD3-class teacher). A failing benchmark does not stop the
others; the exit status is non-zero if any failed. Results land in `benchmarks/results/`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# Loads a script by path under a non-__main__ name and calls its main(), whether or not it has a __main__ guard.
CALL_MAIN = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('bench_' + {stem!r}, {path!r})\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "rc = module.main()\n"
    "sys.exit(rc if isinstance(rc, int) else 0)\n"
)


def has_main(path: Path) -> bool:
    """True if the file defines a top-level `def main(...)` (parsed, never imported)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError):
        return True   # let it run and fail visibly rather than be skipped silently
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main"
               for node in tree.body)


def discover() -> list[tuple[str, list[str]]]:
    """(name, command) of every benchmark, scripts first (sorted), then the paper reproduction and efficacy."""
    jobs = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.resolve() == Path(__file__).resolve() or path.name.startswith("_") or not has_main(path):
            continue
        jobs.append((path.name, [sys.executable, "-c", CALL_MAIN.format(stem=path.stem, path=str(path))]))
    jobs.append(("paper_toy", [sys.executable, "-m", "benchmarks.paper_toy.run"]))
    jobs.append(("paper_toy_flow", [sys.executable, "-m", "benchmarks.paper_toy.run", "--path", "flow"]))
    jobs.append(("efficacy", [sys.executable, "-m", "benchmarks.efficacy.run"]))
    jobs.append(("efficacy_flow", [sys.executable, "-m", "benchmarks.efficacy_flow.run"]))
    return jobs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = set(argv)
    jobs = [(n, c) for n, c in discover() if not only or n in only or n.removesuffix(".py") in only]
    summary, t_all = [], time.time()
    for name, cmd in jobs:
        print(f"=== {name}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=REPO)
        summary.append((name, rc, time.time() - t0))
    print("\n=== benchmark summary")
    for name, rc, seconds in summary:
        print(f"  {'ok    ' if rc == 0 else f'FAILED (exit {rc})'}  {name:<32} {seconds:7.1f}s")
    print(f"  total {time.time() - t_all:.1f}s; results in {BENCH_DIR / 'results'}")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
