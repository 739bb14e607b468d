"""Paired comparisons, the picture grid, summary.md and results.json of the efficacy benchmark."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import metrics

METRICS = {"kid": ("KID", "lower is better", -1), "accuracy": ("class accuracy", "higher is better", +1)}
TCD_KEYS = ("tcd_ksampler", "tcd_sampler")
TEACHER_KEYS = ("teacher_ddim", "teacher_dpmpp_2m")            # sampled at every NFE and at 25 / 50 steps
FEW_STEP_TEACHER_KEYS = TEACHER_KEYS + ("teacher_dpmpp_2m_sgm",)  # sampled at every NFE


def _values(results, key, steps, metric):
    return results["scores"][key][str(steps)][metric]["values"]


def verdict(diff: dict, sign: int) -> str:
    """'better' / 'worse' when the paired interval of (A - B) excludes 0, else 'tie' (not resolved)."""
    if not diff["excludes_zero"]:
        return "tie"
    return "better" if diff["mean"] * sign > 0 else "worse"


def comparisons(results: dict) -> list[dict]:
    """Paired differences (A - B, same seeds) behind the goals: TCD vs LCM at every NFE, TCD at 4 steps vs the teacher
    at 25 / 50 steps with CFG and at 4 steps, TCD at every NFE vs the teacher at the same NFE."""
    cfg = results["config"]
    nfes, refs = cfg["nfes"], cfg["teacher_ref_steps"]
    pairs = []
    for tcd in TCD_KEYS:
        for n in nfes:
            pairs.append(("tcd_vs_lcm", tcd, n, "lcm", n))
        for teacher in TEACHER_KEYS:
            for r in refs:
                pairs.append(("tcd4_vs_teacher_ref", tcd, 4 if 4 in nfes else nfes[-1], teacher, r))
        for teacher in FEW_STEP_TEACHER_KEYS:
            for n in nfes:
                pairs.append(("tcd_vs_teacher_same_nfe", tcd, n, teacher, n))
    for m in results["methods"]:
        if m["sweep"] and m["model"] == "tcd":
            for n in m["nfes"]:
                pairs.append(("tcd_gamma_vs_lcm", m["key"], n, "lcm", n))
    return paired_comparisons(results, pairs)


def paired_comparisons(results: dict, pairs: list[tuple]) -> list[dict]:
    """For each (kind, A, A's steps, B, B's steps) and each metric: the paired difference A - B over seeds and its
    verdict."""
    out = []
    for kind, a, na, b, nb in pairs:
        for metric, (_, _, sign) in METRICS.items():
            diff = metrics.paired(_values(results, a, na, metric), _values(results, b, nb, metric))
            out.append({"kind": kind, "a": a, "a_steps": na, "b": b, "b_steps": nb, "metric": metric,
                        "difference": diff, "verdict": verdict(diff, sign)})
    return out


def _label(results, key):
    return next(m["label"] for m in results["methods"] if m["key"] == key)


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    a = abs(x)
    return f"{x:.3f}" if a < 10 else f"{x:.1f}" if a < 1000 else f"{x:.0f}"


def _cell(stat: dict) -> str:
    return f"{_fmt(stat['mean'])} ± {_fmt(stat['half'])}"


def best_teacher_at(results: dict, steps: int) -> str:
    """The teacher sampler with the lower mean KID at `steps` (the stronger baseline, shown in the grid)."""
    return min(TEACHER_KEYS, key=lambda k: results["scores"][k][str(steps)]["kid"]["mean"])


def teacher_short(key: str) -> str:
    return {"teacher_ddim": "DDIM", "teacher_dpmpp_2m": "DPM++ 2M Karras",
            "teacher_dpmpp_2m_sgm": "DPM++ 2M sgm_uniform"}.get(key, key)


def grid_rows(results: dict) -> list[tuple[str, int]]:
    cfg = results["config"]
    big = max(cfg["teacher_ref_steps"])
    few = 4 if 4 in cfg["nfes"] else cfg["nfes"][-1]
    teacher = best_teacher_at(results, few)
    return [(teacher, big), (teacher, few), ("lcm", few), ("tcd_ksampler", few), ("tcd_ksampler", 2)]


def grid_png(images: dict, results: dict, path: Path, scale: int = 4, rows: list | None = None) -> Path:
    """Rows: teacher at its most steps, teacher at 4, LCM-LoRA at 4, TCD-LoRA at 4 and 2 (or the (method key,
    steps) `rows` given); columns: prompts 0-9 (seed 0, first sample of each prompt)."""
    from PIL import Image, ImageDraw
    rows = grid_rows(results) if rows is None else rows
    cell, pad, label_w, head = 16 * scale, 4, 300, 20
    width = label_w + 10 * (cell + pad) + pad
    height = head + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for d in range(10):
        draw.text((label_w + pad + d * (cell + pad) + cell // 2 - 3, 4), str(d), fill=(0, 0, 0))
    for r, (key, steps) in enumerate(rows):
        y = head + pad + r * (cell + pad)
        text = f"{_label(results, key)}\n{steps} steps".replace("γ", "gamma")   # ASCII: PIL's default font
        draw.multiline_text((6, y + cell // 2 - 12), text, fill=(0, 0, 0))
        batch = images[(key, steps)]
        for d in range(10):
            img = ((batch[d].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(img, mode="L").resize((cell, cell), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (label_w + pad + d * (cell + pad), y))
    tmp = path.with_name(path.name + ".tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


def score_tables(results: dict, methods: list | None = None) -> list[str]:
    """The grid picture, then the KID and the class accuracy tables (_table)."""
    return ["![samples: rows teacher, LCM LoRA, TCD LoRA; columns prompts 0-9](grid.png)", "",
            "## KID (lower is better)", "", *_table(results, "kid", methods), "",
            "## Class accuracy (higher is better)", "", *_table(results, "accuracy", methods), ""]


def _table(results: dict, metric: str, methods: list | None = None) -> list[str]:
    """One row per method (those not in the gamma sweep unless `methods` are given), a column per step count, and
    the real digits' floor."""
    cfg = results["config"]
    cols = list(cfg["nfes"]) + list(cfg["teacher_ref_steps"])
    lines = ["| method | " + " | ".join(f"{c} steps" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    if methods is None:
        methods = [m for m in results["methods"] if not m["sweep"]]
    for m in methods:
        row = results["scores"][m["key"]]
        lines.append(f"| {m['label']} | " + " | ".join(_cell(row[str(c)][metric]) if str(c) in row else ""
                                                     for c in cols) + " |")
    lines.append(f"| real digits (training split vs held-out): the floor | {_cell(results['floor'][metric])} |"
                 + " |" * (len(cols) - 1))
    return lines


def _sweep_lines(results: dict) -> list[str]:
    """KID / accuracy of the TCD Sampler at several gammas, for the LoRA and for the teacher itself, and LCM."""
    rows = [m for m in results["methods"] if m["sweep"] or m["key"] in ("tcd_ksampler", "lcm")]
    rows.sort(key=lambda m: (m["model"] != "tcd", m["model"] != "lcm", m["gamma"] if m["gamma"] is not None else 0.3))
    nfes = [2, 4]
    lines = ["| sampler | " + " | ".join(f"NFE {n}: KID" + " | accuracy" for n in nfes) + " |",
             "|---" * (2 * len(nfes) + 1) + "|"]
    for m in rows:
        row = results["scores"][m["key"]]
        cells = []
        for n in nfes:
            if str(n) in row:
                cells += [_cell(row[str(n)]["kid"]), _cell(row[str(n)]["accuracy"])]
            else:
                cells += ["", ""]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    lines += ["", _gamma_trend(results, rows)]
    return lines


def _gamma_trend(results: dict, rows: list) -> str:
    """One sentence: does KID at NFE 4 fall as gamma grows, for the LoRA and for the teacher?"""
    def trend(model):
        # the sweep's rows of this model, plus KSampler `tcd` (gamma 0.3) for the LoRA
        chosen = [m for m in rows if m["model"] == model and (m["sweep"] or m["key"] == "tcd_ksampler")]
        pts = sorted((0.3 if m["gamma"] is None else m["gamma"], results["scores"][m["key"]]["4"]["kid"]["mean"])
                     for m in chosen)
        return pts, all(b[1] < a[1] for a, b in zip(pts, pts[1:]))

    parts = []
    for model, name in (("tcd", "the TCD LoRA"), ("teacher", "the teacher itself")):
        pts, falling = trend(model)
        if len(pts) > 1:
            parts.append(f"for {name} KID at NFE 4 goes " + " → ".join(f"{_fmt(k)} (γ {g:g})" for g, k in pts)
                         + (", falling as γ grows" if falling else ", not monotone in γ"))
    return "Measured: " + "; ".join(parts) + "." if parts else ""


def _say(c: dict) -> str:
    d = c["difference"]
    return f"{c['verdict']} (Δ {_fmt(d['mean'])} ± {_fmt(d['half'])})"


def _goal_lines(results: dict) -> list[str]:
    comps = results["comparisons"]
    cfg = results["config"]

    def find(kind, a, b, na=None, nb=None, metric="kid"):
        return next(c for c in comps if c["kind"] == kind and c["a"] == a and c["b"] == b and c["metric"] == metric
                    and (na is None or c["a_steps"] == na) and (nb is None or c["b_steps"] == nb))

    lines = []
    ref = 25 if 25 in cfg["teacher_ref_steps"] else max(cfg["teacher_ref_steps"])
    for tcd in TCD_KEYS:
        lines.append(f"- **{_label(results, tcd)} at 4 steps vs the teacher at {ref} steps with CFG** "
                     f"(goal: within the interval, i.e. not worse):")
        for teacher in TEACHER_KEYS:
            parts = [f"{METRICS[m][0]} {_say(find('tcd4_vs_teacher_ref', tcd, teacher, nb=ref, metric=m))}"
                     for m in METRICS]
            lines.append(f"  - vs {_label(results, teacher)}: " + "; ".join(parts))
    for tcd in TCD_KEYS:
        lines.append(f"- **{_label(results, tcd)} vs the LCM LoRA at the same NFE** (goal: not worse at NFE 2, 4, 8):")
        for n in cfg["nfes"]:
            parts = [f"{METRICS[m][0]} {_say(find('tcd_vs_lcm', tcd, 'lcm', na=n, metric=m))}" for m in METRICS]
            lines.append(f"  - NFE {n}: " + "; ".join(parts))
    sweep_tcd = [m["key"] for m in results["methods"] if m["sweep"] and m["model"] == "tcd"]
    if sweep_tcd:
        lines.append("- **TCD LoRA with the TCD Sampler at other gammas vs the LCM LoRA** (the gamma sweep below):")
        for key in sweep_tcd:
            parts = []
            for c in comps:
                if c["kind"] == "tcd_gamma_vs_lcm" and c["a"] == key:
                    parts.append(f"NFE {c['a_steps']} {METRICS[c['metric']][0]} {_say(c)}")
            lines.append(f"  - {_label(results, key)}: " + "; ".join(parts))
    for tcd in TCD_KEYS:
        lines.append(f"- **{_label(results, tcd)} vs the teacher at the same number of steps**:")
        for n in cfg["nfes"]:
            parts = []
            for teacher in FEW_STEP_TEACHER_KEYS:
                c = find("tcd_vs_teacher_same_nfe", tcd, teacher, na=n, nb=n)
                parts.append(f"vs {teacher_short(teacher)}: KID {_say(c)}")
            lines.append(f"  - NFE {n}: " + "; ".join(parts))
    return lines


def _feasibility_lines(results: dict) -> list[str]:
    f = results.get("demo_feasibility")
    if not f:
        return ["(not measured in this run)"]
    hours = f["extrapolated_cpu_s"] / 3600
    return [
        "ComfyUI's loaders open a file only if detection recognises it: SD1.5 means a 320-channel UNet with a "
        "768-wide CLIP-L context, and a picture needs a trained VAE in a layout they read (TAESD). Training cost per "
        "sample, measured in this run (one thread):",
        "",
        "| network | parameters | CPU s per training sample |",
        "|---|---|---|",
        f"| this teacher's UNet | {f['teacher_unet']['params'] / 1e6:.2f} M | "
        f"{f['teacher_unet']['train_cpu_s_per_sample'] * 1e3:.1f} ms |",
        f"| smallest UNet detected as SD1.5 (1 level x 320 channels) | {f['sd15_smallest_unet']['params'] / 1e6:.1f} M"
        f" | {f['sd15_smallest_unet']['train_cpu_s_per_sample'] * 1e3:.1f} ms |",
        f"| TAESD encoder + decoder, 64 x 64 px | {f['taesd_64px']['params'] / 1e6:.1f} M | "
        f"{f['taesd_64px']['train_cpu_s_per_sample'] * 1e3:.1f} ms |",
        "",
        f"At the teacher's number of training samples that is {f['cost_ratio']:.0f}x its "
        f"{f['teacher_train_cpu_s'] / 60:.0f} CPU minutes, about {hours:.1f} CPU hours, far beyond the 10-minute "
        "budget. So `make demo` keeps its tiny random-weight SD1.5 checkpoint (it shows the whole path runs over the "
        "HTTP API, not a picture) and points to this page for real samples.",
    ]


def summary_markdown(results: dict) -> str:
    cfg = results["config"]
    t = results["teacher"]
    train = t.get("train", {})
    runs = results["distill"]
    budget = cfg["budget"]
    tcd_inputs = runs["tcd"].get("inputs", {})
    lines = [
        "# Does the TCD Distill LoRA node work? End to end in ComfyUI (measured)",
        "",
        f"Produced by `make bench` (`benchmarks/efficacy`, config `{results['config_name']}`) in "
        f"{results['wall_s'] / 60:.1f} min wall, {results['cpu_s'] / 60:.1f} min CPU (this process and its two "
        f"workers; the server's own CPU time not counted), on {results['machine']}.",
        "",
        "**Teacher**: an SD1.5-family model built in-process from ComfyUI's own classes (`comfy.supported_models.SD15` "
        f"with a smaller UNet, {train.get('unet_params', 0) / 1e6:.2f} M parameters: 32/64/64 channels, attention at "
        "4x4 and 2x2; ComfyUI's SD1 CLIP text encoder at 2 layers x 64 wide, random weights), trained as a "
        "class-conditional ε-prediction model on scikit-learn's digits (8x8, upsampled to 16x16, 1198 training "
        "images) with the prompt \"a handwritten digit <d>\", the empty prompt for 15% of the samples (CFG). "
        "Latents: a fixed invertible space-to-depth map, 16x16 pixels <-> 4x8x8, so samples are scored in pixel "
        f"space. {t.get('settings', {}).get('steps', '?')} steps of batch {t.get('settings', {}).get('batch', '?')}: "
        f"{train.get('wall_s', 0) / 60:.1f} min wall, {train.get('cpu_s', 0) / 60:.1f} min CPU (trained once, cached "
        f"by code and settings). Its CFG: {cfg['teacher_cfg']:g}.",
        "",
        "**Students**: the TCD Distill LoRA node's own function, called as the executor calls it, on LATENT + "
        "CONDITIONING lists from core Load Training Dataset; objective `tcd` and `lcm` at the same budget "
        f"({budget['steps']} steps x batch {budget['batch_size']}, lr {budget['learning_rate']:g}, rank "
        f"{budget['rank']}, recipe `{tcd_inputs.get('recipe', 'custom')}` (rho {tcd_inputs.get('rho', 0):g}, "
        f"{tcd_inputs.get('loss', 'huber')} distance, TCF order {tcd_inputs.get('tcf_order', 1)}), EMA target "
        f"{tcd_inputs.get('ema_decay', 0.95):g}, 50-step grid, guidance w = cfg - 1 "
        f"= {cfg['teacher_cfg'] - 1:g}). Training time through the node: TCD {runs['tcd']['wall_s'] / 60:.1f} min "
        f"wall / {runs['tcd']['cpu_s'] / 60:.1f} min CPU, LCM {runs['lcm']['wall_s'] / 60:.1f} min wall / "
        f"{runs['lcm']['cpu_s'] / 60:.1f} min CPU.",
        "",
    ]
    if results.get("http"):
        h = results["http"]
        lines += [f"**Server path**: the shipped distill workflow (`workflows/api/distill_tcd_lora.json`), adapted "
                  f"(teacher loader, Load Training Dataset, the same settings), queued over the HTTP API on a headless "
                  f"server: {h['prompt_s'] / 60:.1f} min; its LoRA differs from the in-process one by at most "
                  f"{h['max_abs_difference_vs_in_process']:.3g} (max |Δ| over every tensor).", ""]
    lines += [
        "**Sampling** (all through nodes): teacher with KSampler `ddim` (`ddim_uniform`) and `dpmpp_2m` (`karras`) "
        "at its CFG; TCD LoRA with KSampler `tcd`/`tcd` (γ 0.3) and SamplerCustom + TCD Sampler (γ declared per NFE: "
        + ", ".join(f"{n}: {g:g}" for n, g in results["gamma_by_nfe"].items()) + ") + TCD Scheduler; LCM LoRA with "
        "ModelSamplingDiscrete (lcm) + KSampler `lcm`/`sgm_uniform`; students at cfg 1. "
        f"{cfg['per_prompt']} samples per prompt x 10 prompts per seed, seeds {cfg['seeds']} (the same initial "
        "noise for every method at a seed).",
        "",
        "**Scores**: KID (x1 in the classifier's 64-d feature space; unbiased, so ~0 for real digits) and class "
        "accuracy (the prompted digit is what a CNN classifier reads; "
        f"{results['classifier_test_accuracy']:.3f} on held-out digits) against the 599 held-out digits. Intervals: "
        "mean ± half-width of the 95% t-interval over seeds; comparisons use paired per-seed differences.",
        "",
        *score_tables(results),
        "KID's floor here is negative, not 0: every set scored (real or generated) holds exactly "
        f"{cfg['per_prompt']} digits of each class, which has fewer same-class pairs than the i.i.d. draws the "
        "unbiased estimator assumes, and that lowers it by the same amount for every row. Compare rows with each "
        "other and with the floor.",
        "",
        "## The goals, as measured (paired differences A − B over seeds, 95% t-intervals)",
        "",
        *_goal_lines(results),
        "",
        "## Gamma (γ), for the TCD LoRA and for the teacher itself",
        "",
        f"The TCD Sampler at several γ ({len(cfg['seeds'])} seeds, same noise): how far each step jumps along the "
        "learned trajectory (to s = (1 − γ)·t_next) before re-noising. The teacher row uses the same sampler on "
        "the teacher without the LoRA, with its CFG.",
        "",
        *_sweep_lines(results),
        "",
        "## A trained model for `make demo`?",
        "",
        *_feasibility_lines(results),
        "",
        *time_lines(results),
    ]
    return "\n".join(lines)


def time_lines(results: dict) -> list[str]:
    return ["## Where the time went", "", "| phase | wall | CPU |", "|---|---|---|",
            *[f"| {k} | {v['wall_s']:.0f} s | {v['cpu_s']:.0f} s |" for k, v in results["phases"].items()], ""]


def _rounded(obj, digits: int = 6):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {str(k): _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def write(results: dict, out: Path, summary: str | None = None) -> None:
    """summary.md (`summary`, else this benchmark's summary_markdown) and results.json in `out`, atomically."""
    summary = summary_markdown(results) if summary is None else summary
    for name, text in (("summary.md", summary),
                       ("results.json", json.dumps(_rounded(results), indent=1, allow_nan=True, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
