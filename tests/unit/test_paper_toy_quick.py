"""The toy study (benchmarks/paper_toy) end to end in its `quick` configuration: real teachers, distillation with
tcd.losses, the factorial sampling, the paired statistics and the report. Small, but it must show a real effect:
the distilled student at 4 NFE beats its own teacher's DDIM at 4 NFE by far more than the metric's noise."""
import json
import math

import pytest

from benchmarks.paper_toy import run as paper_toy


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_toy")
    results = paper_toy.run("quick", out, jobs=1, cache=tmp_path_factory.mktemp("cache"), log=lambda m: None)
    return out, results, json.loads((out / "results.json").read_text())


def test_outputs_written_atomically(quick):
    out, results, saved = quick
    summary = (out / "summary.md").read_text()
    assert "## Headline" in summary and "p (Holm)" in summary
    for figure in results["figures"]:
        assert (out / figure).stat().st_size > 5000, figure
    assert not list(out.glob("*.tmp"))
    assert saved["choice"]["recommended"] in saved["config"]["objectives"]


def test_distilled_student_beats_the_teacher_at_equal_nfe_far_outside_the_noise(quick):
    """A 4-step DDIM of the teacher is far from converged (its ODE needs tens of steps), while a consistency
    student is trained to jump: the paired difference must exclude zero and exceed 5x the metric's own noise
    (the spread of sliced W2 between independent exact samples of this size)."""
    _, _, saved = quick
    rec = saved["datasets"]["mog2d"]
    row = next(r for r in rec["comparisons"] if r["metric"] == "sw" and "teacher DDIM" in r["family"])
    floor_sd = rec["floors"]["sw"]["sd"]
    assert row["high"] < 0, row
    assert -row["mean"] > 5 * floor_sd, (row["mean"], floor_sd)


def test_every_graded_cell_is_finite_and_paired_over_all_seeds(quick):
    _, _, saved = quick
    cfg = saved["config"]
    rec = saved["datasets"]["mog2d"]
    for key, metrics in rec["grade_cells"].items():
        for name, stat in metrics.items():
            assert stat["n"] == len(cfg["seeds"]), (key, name)
            assert math.isfinite(stat["mean"]), (key, name)
    for row in rec["comparisons"]:
        assert row["n"] == len(cfg["seeds"]) and row["verdict"] in ("win", "loss", "tie")
