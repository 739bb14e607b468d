"""The toy-scale paper reproduction (benchmarks/paper_toy) runs end to end in a drastically reduced configuration:
real teacher training, LCM / TCD distillation with tcd.losses, sample_tcd / diffusers samplers, metrics, plots."""
import json
import math

import pytest

from benchmarks.paper_toy import run as paper_toy


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_toy")
    results = paper_toy.run("smoke", out, jobs=1)
    return out, results, json.loads((out / "results.json").read_text())


def _stats(saved, name):
    return {(a["method"], a["variant"], a["order"], a["gamma"], a["nfe"]): a["metrics"]
            for a in saved["datasets"][name]["aggregate"]}


def test_outputs_written(smoke):
    out, results, _ = smoke
    summary = (out / "summary.md").read_text()
    assert "| method | NFE 1 | NFE 2 |" in summary and "Claims, as measured" in summary
    for figure in results["figures"]:
        assert (out / figure).stat().st_size > 5000, figure
    assert {"overview.png", "samples_digits.png", "gamma_sweep_mog2d.png", "tcf_order_digits.png"} <= set(
        results["figures"])
    assert not list(out.glob("*.tmp")) and not list(out.glob(".raw_*"))


def test_every_method_measured_and_finite(smoke):
    _, _, saved = smoke
    cfg = saved["config"]
    for name in ("mog2d", "digits"):
        stats = _stats(saved, name)
        for nfe in cfg["nfes"]:
            for key in [("teacher_ddim", "main", None, None, nfe), ("teacher_dpmpp2m", "main", None, None, nfe),
                        ("lcm", "main", None, None, nfe)] + [("tcd", "main", o, g, nfe) for o in (1, 2)
                                                             for g in cfg["gammas"]]:
                assert key in stats, (name, key)
                for metric, s in stats[key].items():
                    assert s["mean"] is not None and math.isfinite(s["mean"]), (name, key, metric)
        for jump in saved["datasets"][name]["jump_errors"]:
            assert all(math.isfinite(v) and v >= 0 for v in jump["errors"].values())


def test_teacher_at_100_steps_beats_noise(smoke):
    _, _, saved = smoke
    for name, metric in (("mog2d", "mmd"), ("mog2d", "sw"), ("digits", "fd")):
        ref = _stats(saved, name)[("teacher_ref", "main", None, None, 100)][metric]["mean"]
        noise = saved["datasets"][name]["reference"]["gaussian_noise"][metric]
        assert ref < 0.8 * noise, (name, metric, ref, noise)


def test_one_step_tcd_ignores_gamma(smoke):
    # With one step, SSS goes straight to t = 0 and never re-noises: gamma cannot matter (sample_tcd, x0 output).
    _, _, saved = smoke
    for name in ("mog2d", "digits"):
        stats = _stats(saved, name)
        a, b = stats[("tcd", "main", 1, 0.0, 1)], stats[("tcd", "main", 1, 0.3, 1)]
        assert a == b
        # ... while at 2 steps it does (different noise injected between the steps)
        assert stats[("tcd", "main", 1, 0.0, 2)] != stats[("tcd", "main", 1, 0.3, 2)]
