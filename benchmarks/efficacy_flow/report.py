"""Paired comparisons, the picture grid, summary.md and results.json of the flow efficacy benchmark (the VP
benchmark's paired differences, verdicts, number format, score tables, picture grid and file writing:
benchmarks/efficacy/report.py)."""
from __future__ import annotations

import json
from pathlib import Path

from ..efficacy import report as vp
from ..efficacy.report import METRICS, _fmt, _label, _say, grid_png

LORA = "tcd"


def teachers(results: dict) -> list[str]:
    """Teacher rows (every sampler, shift and CFG; all sampled at every NFE) that this run has scores for."""
    return [m["key"] for m in results["methods"] if m["model"].startswith("teacher") and m["key"] in results["scores"]]


def reference_teachers(results: dict) -> list[str]:
    """Teacher rows also sampled at the reference step counts."""
    return [m["key"] for m in results["methods"] if m["model"] == "teacher" and m["reference"]
            and m["key"] in results["scores"]]


def comparisons(results: dict) -> list[dict]:
    """Paired differences A - B over seeds (same initial noise): the TCD LoRA at every NFE vs every few-step teacher
    at the same NFE (the headline: NFE 4) and vs the LCM LoRA, and the TCD LoRA at 4 steps vs the teacher at its
    reference step counts."""
    cfg = results["config"]
    pairs = []
    for n in cfg["nfes"]:
        pairs += [("tcd_vs_teacher_same_nfe", LORA, n, t, n) for t in teachers(results)]
        pairs.append(("tcd_vs_lcm", LORA, n, "lcm", n))
    pairs += [("tcd4_vs_teacher_ref", LORA, 4, t, r) for t in reference_teachers(results)
              for r in cfg["teacher_ref_steps"]]
    return vp.paired_comparisons(results, pairs)


def grid(tiles: dict, results: dict, path: Path) -> Path:
    """Rows: the teacher (Euler) at its most steps and at 4, the LCM LoRA at 4, the TCD LoRA at 4 and 2."""
    cfg = results["config"]
    few = 4 if 4 in cfg["nfes"] else cfg["nfes"][-1]
    rows = [("teacher_euler", max(cfg["teacher_ref_steps"])), ("teacher_euler", few), ("teacher_tcd", few),
            ("lcm", few), (LORA, few), (LORA, min(cfg["nfes"]))]
    return grid_png(tiles, results, path, rows=rows)


def _find(results, kind, b, na, nb, metric):
    return next(c for c in results["comparisons"] if c["kind"] == kind and c["b"] == b and c["a_steps"] == na
                and c["b_steps"] == nb and c["metric"] == metric)


def _both(results, kind, b, na, nb) -> str:
    return "; ".join(f"{METRICS[m][0]} {_say(_find(results, kind, b, na, nb, m))}" for m in METRICS)


def goal_lines(results: dict) -> list[str]:
    cfg = results["config"]
    lines = [f"- **{_label(results, LORA)} at 4 steps vs the teacher at 4 steps** (the claim):"]
    lines += [f"  - vs {_label(results, t)}: " + _both(results, "tcd_vs_teacher_same_nfe", t, 4, 4)
              for t in teachers(results)]
    lines.append(f"- **{_label(results, LORA)} vs {_label(results, 'lcm')}, same NFE and budget**:")
    lines += [f"  - NFE {n}: " + _both(results, "tcd_vs_lcm", "lcm", n, n) for n in cfg["nfes"]]
    for n in cfg["nfes"]:
        if n == 4:
            continue
        lines.append(f"- **{_label(results, LORA)} vs the teacher at {n} steps**:")
        lines += [f"  - vs {_label(results, t)}: " + _both(results, "tcd_vs_teacher_same_nfe", t, n, n)
                  for t in teachers(results)]
    lines.append(f"- **{_label(results, LORA)} at 4 steps vs the teacher at its reference step counts**:")
    lines += [f"  - vs {_label(results, t)} at {r}: " + _both(results, "tcd4_vs_teacher_ref", t, 4, r)
              for t in reference_teachers(results) for r in cfg["teacher_ref_steps"]]
    return lines


def _kid(results, key, steps) -> float:
    return results["scores"][key][str(steps)]["kid"]["mean"]


def reading_lines(results: dict) -> list[str]:
    """What the tables say about the claim, with the numbers: the LoRA at 4 steps against the teacher at 4 steps
    with the CFG it imitates, against the teacher's best row at 4 steps, and how CFG moves the teacher itself."""
    cfg = results["config"]
    lines = []
    for key in ("teacher_tcd", "teacher_euler"):
        c = _find(results, "tcd_vs_teacher_same_nfe", key, 4, 4, "kid")
        lines.append(f"- {_label(results, LORA)} at 4 steps − {_label(results, key)} at 4 steps: KID "
                     f"{_say(c)}, over {c['difference']['n']} seeds.")
    rows = teachers(results)
    best = min(rows, key=lambda k: _kid(results, k, 4))
    c = _find(results, "tcd_vs_teacher_same_nfe", best, 4, 4, "kid")
    a = _find(results, "tcd_vs_teacher_same_nfe", best, 4, 4, "accuracy")
    lines.append(f"- The teacher's lowest-KID row at 4 steps is {_label(results, best)} "
                 f"({_fmt(_kid(results, best, 4))}); the LoRA at 4 steps against it: KID {_say(c)}, class "
                 f"accuracy {_say(a)}.")
    ref = max(cfg["teacher_ref_steps"])
    euler = [m for m in results["methods"] if m["model"] == "teacher" and m["sampler"] == "euler"
             and m["reference"] and m["key"] in results["scores"] and str(ref) in results["scores"][m["key"]]]
    if len(euler) > 1:
        euler.sort(key=lambda m: m["cfg"])
        lines.append(f"- CFG moves the teacher itself: Euler at {ref} steps scores KID "
                     + ", ".join(f"{_fmt(_kid(results, m['key'], ref))} at cfg {m['cfg']:g}" for m in euler)
                     + f" (floor {_fmt(results['floor']['kid']['mean'])}); the LoRAs imitate the teacher at cfg "
                     f"{cfg['teacher_cfg']:g} (w = {cfg['teacher_cfg'] - 1:g}).")
    return lines


COMPANION = ("full", "full_cfg1.5", "cfg1.5")     # (this config, the companion config, its folder inside OUT)


def companion_lines(results: dict, out: Path) -> list[str]:
    """The headline of the companion run (the LoRAs distilled at CFG 1.5), when its results sit in OUT/cfg1.5."""
    mine, theirs, folder = COMPANION
    path = out / folder / "results.json"
    if results["config_name"] != mine or not path.is_file():
        return []
    other = json.loads(path.read_text())
    if other["config_name"] != theirs:
        return []
    w = other["config"]["teacher_cfg"]
    return ["## The same with the LoRAs distilled at CFG " + f"{w:g}", "",
            f"`--config {theirs} --out <OUT>/{folder}`; full tables in [{folder}/summary.md]({folder}/summary.md). "
            "Same teacher, budget, seeds and samplers; the LoRAs imitate the teacher at cfg "
            f"{w:g} and the teacher rows are at cfg {w:g} (and 1).", "",
            *reading_lines(other), "", *goal_lines(other)[:len(teachers(other)) + 1 + 1 + len(other["config"]["nfes"])],
            ""]


def _shift_effect(results: dict) -> str:
    """Where Euler at shift 1 scores a lower mean KID than Euler at shift 3, in words."""
    nfes = results["config"]["nfes"]
    lower = [n for n in nfes if _kid(results, "teacher_euler_shift1", n) < _kid(results, "teacher_euler", n)]
    higher = [n for n in nfes if n not in lower]
    parts = [f"lower mean KID than shift 3 at {', '.join(map(str, lower))} steps"] if lower else []
    parts += [f"higher at {', '.join(map(str, higher))}"] if higher else []
    return "shift 1: " + ", ".join(parts)


def summary_markdown(results: dict, out: Path | None = None) -> str:
    cfg, t = results["config"], results["teacher"]
    s, train = t.get("settings", {}), t.get("train", {})
    runs, budget = results["distill"], cfg["budget"]
    tcd_inputs = runs["tcd"].get("inputs", {})
    ms = results["model_sampling"]
    lines = [
        "# Does the TCD Distill LoRA node work on a flow model? End to end in ComfyUI (measured)",
        "",
        f"Produced by `python -m benchmarks.efficacy_flow.run` (config `{results['config_name']}`) in "
        f"{results['wall_s'] / 60:.1f} min wall, {results['cpu_s'] / 60:.1f} min CPU, on {results['machine']}.",
        "",
        "**Teacher**: an SD3-class model built in-process from ComfyUI's own classes (`comfy.supported_models.SD3` "
        "-> `comfy.model_base.SD3` around ComfyUI's MMDiT, "
        f"{train.get('params', 0) / 1e6:.2f} M parameters: depth {s.get('depth', '?')}, hidden "
        f"{64 * int(s.get('depth', 0))}, RMS q/k norms, patch 2; {ms['class']} with shift {ms['shift']:g}, "
        "CONST), trained with the rectified-flow objective (x = (1 − σ) x0 + σ ε, velocity target ε − x0, "
        "σ ~ U(0, 1), t = 1000 σ as ComfyUI passes it) on scikit-learn's digits (8x8 upsampled to 16x16, 1198 "
        "training images). Latents: a fixed invertible space-to-depth map, 16x16 pixels <-> 16 x 4 x 4 (SD3's 16 "
        "channels; 2x2 patches -> 4 image tokens), stored as SD3's latent format expects. Conditioning: a fixed "
        "random text embedding per digit (4 tokens x 4096 context, 2048 pooled: the widths SD3's text encoders "
        "give), the empty prompt's for 15% of the samples (CFG). "
        f"{s.get('steps', '?')} steps of batch {s.get('batch', '?')}: {train.get('wall_s', 0) / 60:.1f} min wall, "
        f"{train.get('cpu_s', 0) / 60:.1f} min CPU on one thread (trained once, cached by code and settings). "
        f"Its CFG: {cfg['teacher_cfg']:g}.",
        "",
        "**Shift**: 3, SD3's own (`comfy.supported_models.SD3.sampling_settings`), so teacher, trainer node and "
        "samplers all read the model's unpatched model_sampling: the path an SD3 checkpoint takes in ComfyUI. The "
        "teacher itself does not depend on it (it is trained over all σ; the shift only moves where schedulers put "
        "steps). Shift 3 spends half of a 4-step schedule above σ 0.75; whether that weakens the few-step teacher "
        "on a 256-value latent is measured: the teacher's flow Euler after core ModelSamplingSD3 with shift 1 is a "
        f"row of its own ({_shift_effect(results)}).",
        "",
        "**Students**: the TCD Distill LoRA node's own function (benchmarks/efficacy/distill.py), called as the "
        "executor calls it, on LATENT + CONDITIONING lists read back with core Load Training Dataset; objective "
        f"`tcd` and `lcm` at the same budget ({budget['steps']} steps x batch {budget['batch_size']}, lr "
        f"{budget['learning_rate']:g}, rank {budget['rank']}, recipe `{tcd_inputs.get('recipe', 'custom')}` (rho "
        f"{tcd_inputs.get('rho', 0):g}, {tcd_inputs.get('loss', 'huber')} distance, TCF order "
        f"{tcd_inputs.get('tcf_order', 1)}), EMA target {tcd_inputs.get('ema_decay', 0.95):g}, 50-step grid, "
        f"guidance w = cfg − 1 = {cfg['teacher_cfg'] - 1:g}). Time through the node: TCD "
        f"{runs['tcd']['wall_s'] / 60:.1f} min wall / {runs['tcd']['cpu_s'] / 60:.1f} min CPU, LCM "
        f"{runs['lcm']['wall_s'] / 60:.1f} min wall / {runs['lcm']['cpu_s'] / 60:.1f} min CPU.",
        "",
        "**Sampling** (all through nodes, benchmarks/efficacy_flow/sampling.py): teacher at its CFG with KSampler "
        "`euler`/`simple` (flow Euler), `dpmpp_2m`/`sgm_uniform`, SamplerCustom + the pack's TCD Sampler "
        f"(γ {results['gamma']:g}) + TCD Scheduler, and Euler at shift 1; Euler and the TCD Sampler on the teacher "
        "at lower CFG too (the rows with their own cfg); TCD LoRA with the same TCD Sampler at "
        "cfg 1; LCM LoRA with KSampler `lcm` + the `tcd` scheduler (the same timesteps) at cfg 1. "
        f"{cfg['per_prompt']} samples per prompt x 10 prompts per seed, seeds {cfg['seeds']} (the same initial "
        "noise for every method at a seed).",
        "",
        "**Scores**: the VP benchmark's (benchmarks/efficacy/metrics.py): KID in a digit classifier's 64-d "
        "features and class accuracy (the classifier reads the prompted digit; "
        f"{results['classifier_test_accuracy']:.3f} on held-out digits), against the 599 held-out digits. "
        "Intervals: mean ± half-width of the 95% t-interval over seeds; comparisons are paired per-seed "
        "differences A − B.",
        "",
        *vp.score_tables(results, [m for m in results["methods"] if m["key"] in results["scores"]]),
        "KID's floor is negative, not 0, for the reason the VP benchmark gives (every scored set holds exactly "
        f"{cfg['per_prompt']} digits of each class); compare rows with each other and with the floor.",
        "",
        "## Reading",
        "",
        *reading_lines(results),
        "",
        "## The comparisons (paired differences A − B over seeds, 95% t-intervals; 'tie' = the interval holds 0)",
        "",
        *goal_lines(results),
        "",
        *(companion_lines(results, out) if out is not None else []),
        *vp.time_lines(results),
    ]
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    vp.write(results, out, summary_markdown(results, out))
