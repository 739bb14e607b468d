"""Aggregation, the graded comparisons and the markdown summary of the toy study."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from . import stats

DIRECTION = {"sw": "lower", "mmd": "lower", "spread": "one", "kid": "lower", "accuracy": "higher",
             "precision": "higher", "recall": "higher", "detail": "one", "memorised": "lower"}
METRIC_TITLE = {"sw": "sliced W2", "mmd": "MMD²", "spread": "mode spread ratio", "kid": "KID",
                "accuracy": "class accuracy", "precision": "precision", "recall": "recall",
                "detail": "detail ratio (TV)", "memorised": "memorised fraction"}
SHOWN = {"mog2d": ["sw", "mmd", "spread"], "digits": ["kid", "accuracy", "precision", "recall", "detail",
                                                       "memorised"]}
SECONDARY = {"mog2d": ["mmd"], "digits": ["accuracy"]}
DATASET_TITLE = {"mog2d": "2-D mixture of 8 Gaussians", "digits": "8x8 digits (scikit-learn), class-conditional"}
SAMPLER_TITLE = {"lcm": "LCM sampler", "sss_g0": "SSS γ=0", "sss_g0.3": "SSS γ=0.3", "sss2_g0.3": "SSS-2 γ=0.3",
                 "sss_declared": "SSS γ(NFE) declared", "teacher_ddim": "DDIM", "teacher_dpmpp2m": "DPM-Solver++(2M)",
                 "teacher_euler": "flow Euler"}
OBJECTIVE_TITLE = {"lcm": "LCM", "tcd_rho0": "TCD ρ=0 (paper)", "tcd_rho0.25": "TCD ρ=0.25",
                   "tcd_rho0.5": "TCD ρ=0.5", "tcd_rho0.75": "TCD ρ=0.75", "tcd_tcf2": "TCD, TCF-2 training",
                   "teacher_ddim": "Teacher, DDIM", "teacher_dpmpp2m": "Teacher, DPM-Solver++(2M)",
                   "teacher_euler": "Teacher, flow Euler"}


def teacher_methods(cfg: dict) -> dict:
    """The teacher's sampler at the students' NFE ("fast") and its many-step reference ("ref"): DDIM and
    DPM-Solver++(2M) for the VP study, flow Euler for both in the flow study."""
    return cfg.get("teachers", {"fast": "teacher_ddim", "ref": "teacher_dpmpp2m"})


def teacher_list(cfg: dict) -> list[str]:
    return list(dict.fromkeys(teacher_methods(cfg).values()))


def by_seed(runs, method, sampler, nfe, metric) -> dict:
    return {r["seed"]: r["metrics"].get(metric) for r in runs
            if r["method"] == method and r["sampler"] == sampler and r["nfe"] == nfe}


def mean_table(runs, metric) -> dict:
    """(method, sampler, nfe) -> mean of `metric` over seeds (finite values)."""
    groups = defaultdict(list)
    for r in runs:
        v = r["metrics"].get(metric)
        if v is not None and math.isfinite(v):
            groups[(r["method"], r["sampler"], r["nfe"])].append(v)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def cell_stats(runs) -> dict:
    """'method|sampler|nfe' -> metric -> mean and its 95% t-interval over seeds."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for m, v in r["metrics"].items():
            if v is not None and math.isfinite(v):
                groups[f"{r['method']}|{r['sampler']}|{r['nfe']}"][m].append(v)
    out = {}
    for key, ms in groups.items():
        out[key] = {}
        for m, values in ms.items():
            arr = np.asarray(values)
            ci = stats.t_interval(arr - 0.0) if arr.size > 1 else {"low": float("nan"), "high": float("nan")}
            out[key][m] = {"mean": float(arr.mean()), "low": ci["low"], "high": ci["high"], "n": int(arr.size)}
    return out


def compare(runs, name, metric, a, b, nfes, family: str) -> list[dict]:
    """Paired differences a - b per NFE; a, b: nfe -> (method, sampler, nfe_used). Holm across `nfes`."""
    rows = []
    for nfe in nfes:
        (ma, sa, na), (mb, sb, nb) = a(nfe), b(nfe)
        diffs = stats.paired(by_seed(runs, ma, sa, na, metric), by_seed(runs, mb, sb, nb, metric))
        ci = stats.t_interval(diffs)
        rows.append({"family": family, "dataset": name, "metric": metric, "nfe": nfe, "a": [ma, sa, na],
                     "b": [mb, sb, nb], **ci})
    adjusted = stats.holm([r["p"] for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"] = p
        r["verdict"] = stats.verdict(r, DIRECTION[metric], p)
    return rows


def comparisons(cfg, name, runs, choice) -> list[dict]:
    best = lambda o: (lambda nfe: (o, choice["best_sampler"][f"{name}|{o}|{nfe}"], nfe))   # noqa: E731
    shared = lambda o: (lambda nfe: (o, cfg["shared_sampler"], nfe))                        # noqa: E731
    rec = choice["recommended"]
    out = []
    for metric in [cfg["primary"][name]] + SECONDARY[name]:
        for tcd, label in ((rec, "recommended"), ("tcd_rho0", "paper")):
            if tcd not in cfg["objectives"]:
                continue
            for mode, pick in (("best sampler each", best), ("same sampler", shared)):
                family = f"TCD ({label}: {OBJECTIVE_TITLE.get(tcd, tcd)}) − LCM, {mode}"
                out += compare(runs, name, metric, pick(tcd), pick("lcm"), cfg["claim_nfes"], family)
                if 1 in cfg["nfes"]:
                    out += compare(runs, name, metric, pick(tcd), pick("lcm"), [1], family + " (NFE 1, alone)")
        # the teacher: TCD at 8 NFE vs its many-step reference (VP: DPM-Solver++(2M) at 25); the distilled student
        # at 4 vs the teacher's plain sampler at 4 (VP: DDIM; flow: Euler)
        ref, (fast_m, ref_m) = cfg["teacher_ref_nfes"][0], (teacher_methods(cfg)[k] for k in ("fast", "ref"))
        nfe8 = 8 if 8 in cfg["nfes"] else max(cfg["nfes"])
        out += compare(runs, name, metric, lambda _: best(rec)(nfe8), lambda _: (ref_m, ref_m, ref), [nfe8],
                       f"TCD ({rec}) at NFE {nfe8} − teacher {SAMPLER_TITLE[ref_m]} at NFE {ref}")
        for nfe4 in [n for n in (4,) if n in cfg["nfes"]]:
            out += compare(runs, name, metric, lambda _: best(rec)(nfe4),
                           lambda _: (fast_m, fast_m, nfe4), [nfe4],
                           f"TCD ({rec}) − teacher {SAMPLER_TITLE[fast_m]}, both at NFE {nfe4}")
    return out


def _floors(ref_unit: dict) -> dict:
    out = {}
    draws = ref_unit["floor_draws"]
    for m in draws[0]:
        vals = np.asarray([d[m] for d in draws if d.get(m) is not None], dtype=float)
        out[m] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                  "n": int(vals.size)}
    return out


def assemble(cfg: dict, config_name: str, units: list[dict], choice: dict) -> dict:
    results = {"config_name": config_name, "config": cfg, "choice": choice, "datasets": {}}
    for name in cfg["datasets"]:
        mine = [u for u in units if u.get("dataset") == name]
        ref = next(u for u in mine if u["kind"] == "references")
        select = [r for u in mine if u["kind"] == "select" for r in u["runs"] if r["draw"] == "select"]
        grade = [r for u in mine if u["kind"] in ("select", "grade") for r in u["runs"] if r["draw"] == "grade"]
        oracle = [r for u in mine if u["kind"] == "oracle" for r in u["runs"]]
        samples = {k: v for u in mine if u["kind"] == "grade" for k, v in u.get("samples", {}).items()}
        curves = defaultdict(dict)
        for u in mine:
            if u["kind"] == "select":
                for o, rec in u["curves"].items():
                    curves[o][str(u["seed"])] = rec
        rec = {"floors": _floors(ref), "gaussian_noise": ref["gaussian_noise"],
               "teacher_curves": {str(u["teacher_seed"]): u["loss_curve"] for u in mine if u["kind"] == "teacher"},
               "select_cells": cell_stats(select), "grade_cells": cell_stats(grade),
               "oracle_cells": cell_stats(oracle), "comparisons": comparisons(cfg, name, grade, choice),
               "curves": curves, "runs": grade, "samples": samples,
               "cpu_s": {k: sum(u.get("cpu_s", 0.0) for u in mine if u["kind"] == k)
                         for k in ("teacher", "references", "select", "grade", "oracle")},
               "distill_cpu_s": sum(u.get("distill_cpu_s", 0.0) for u in mine)}
        for k in ("classifier_test_accuracy", "memorisation_threshold"):
            if k in ref:
                rec[k] = ref[k]
        results["datasets"][name] = rec
    return results


# ------------------------------------------------------------------------------------------------ markdown
def _dec(v: float) -> int:
    mag = abs(v)
    if mag >= 100:
        return 1
    if mag >= 10:
        return 2
    if mag >= 0.1 or mag == 0:
        return 3
    return min(7, 2 - int(math.floor(math.log10(mag))))


def num(v) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{_dec(v)}f}"


def _ci(stat: dict | None) -> str:
    if not stat:
        return "–"
    d = _dec(stat["mean"])
    if not math.isfinite(stat.get("low", float("nan"))):
        return f"{stat['mean']:.{d}f}"
    return f"{stat['mean']:.{d}f} [{stat['low']:.{d}f}, {stat['high']:.{d}f}]"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _label(method, sampler=None) -> str:
    s = OBJECTIVE_TITLE.get(method, method)
    return s if sampler is None or sampler == method else f"{s} · {SAMPLER_TITLE.get(sampler, sampler)}"


def comparison_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        d = _dec(r["mean"]) if math.isfinite(r["mean"]) else 3
        body.append([r["family"], METRIC_TITLE[r["metric"]], str(r["nfe"]), _label(r["a"][0], r["a"][1]) + f" @{r['a'][2]}",
                     _label(r["b"][0], r["b"][1]) + f" @{r['b'][2]}",
                     f"{r['mean']:+.{d}f} [{r['low']:+.{d}f}, {r['high']:+.{d}f}]" if math.isfinite(r["low"])
                     else num(r["mean"]),
                     f"{r['p_holm']:.2g}" if math.isfinite(r["p_holm"]) else "–", f"**{r['verdict']}**"])
    return _table(["comparison", "metric", "NFE", "A", "B", "A − B (95% CI)", "p (Holm)", "A"], body)


def headline_rows(results) -> list[str]:
    """One line per dataset x NFE: TCD (recommended) − LCM on the primary metric, best sampler each / same."""
    cfg = results["config"]
    lines = []
    for name, rec in results["datasets"].items():
        metric = cfg["primary"][name]
        for r in rec["comparisons"]:
            if r["metric"] == metric and r["family"].startswith("TCD (recommended") and "alone" not in r["family"]:
                lines.append(r)
    return comparison_table(lines)


def cell_table(cfg, name, rec, metric, cells_key="grade_cells") -> list[str]:
    cells = rec[cells_key]
    rows = []
    methods = teacher_list(cfg) + cfg["objectives"]
    for method in methods:
        samplers = sorted({k.split("|")[1] for k in cells if k.split("|")[0] == method})
        for sampler in samplers:
            row = [_label(method, sampler)]
            for nfe in cfg["nfes"]:
                row.append(_ci(cells.get(f"{method}|{sampler}|{nfe}", {}).get(metric)))
            rows.append(row)
    ref_m = teacher_methods(cfg)["ref"]
    for nfe in cfg["teacher_ref_nfes"]:
        stat = cells.get(f"{ref_m}|{ref_m}|{nfe}", {}).get(metric)
        if stat:
            rows.append([f"{OBJECTIVE_TITLE[ref_m]}, {nfe} steps", _ci(stat)] + [""] * (len(cfg["nfes"]) - 1))
    return _table(["method · sampler"] + [f"NFE {n}" for n in cfg["nfes"]], rows)


def selection_table(cfg, name, rec, metric) -> list[str]:
    cells = rec["select_cells"]
    samplers = cfg["samplers"]
    rows = []
    for objective in cfg["objectives"]:
        for sampler in samplers:
            row = [_label(objective, sampler)]
            for nfe in cfg["nfes"]:
                stat = cells.get(f"{objective}|{sampler}|{nfe}", {}).get(metric)
                best = results_best(cfg, name, objective, nfe) == sampler
                row.append((f"**{num(stat['mean'])}**" if best else num(stat["mean"])) if stat else "–")
            rows.append(row)
    return _table(["objective · sampler"] + [f"NFE {n}" for n in cfg["nfes"]], rows)


_CHOICE: dict = {}


def results_best(cfg, name, objective, nfe):
    return _CHOICE.get("best_sampler", {}).get(f"{name}|{objective}|{nfe}")


def summary_markdown(results: dict) -> str:
    if results["config"].get("path") == "flow":
        return flow_summary_markdown(results)
    cfg, choice = results["config"], results["choice"]
    rec_obj = choice["recommended"]
    out = ["# Does it work? The TCD recipe against LCM and the teacher at toy scale (measured)", ""]
    out.append(
        f"Produced by `make bench` (`benchmarks/paper_toy`, config `{results['config_name']}`) in "
        f"{results['wall_s'] / 60:.1f} min wall ({results['cpu_s'] / 60:.1f} CPU min) on {results['machine']}, "
        f"{results['jobs']} worker processes. Design, declared before measuring (`benchmarks/paper_toy/run.py`): "
        f"{len(cfg['seeds'])} distillation seeds (paired: every objective of one seed sees the same data order, "
        f"timesteps, noise and guidance draws, and every method of one seed is sampled from the same noise), "
        f"{len(cfg['teacher_seeds'])} teacher(s) per dataset (seed s distils from teacher s mod "
        f"{len(cfg['teacher_seeds'])}); objectives × samplers × NFE "
        f"{cfg['nfes']}; students are full fine-tunes of the teacher with `tcd.losses` at equal budget, an EMA "
        f"target θ⁻ and an evaluation EMA of the student's weights. Sampling: SSS is the pack's `sample_tcd` "
        f"(second-order jumps count 2 NFE per step), LCM's sampler is diffusers' LCMScheduler, the teacher uses "
        f"diffusers' DDIM and DPM-Solver++(2M). Every sampler's best setting per objective and NFE, and the "
        f"recommended TCD objective, were chosen on a separate selection draw (independent sampling noise) and then "
        f"graded on the grading draw. Differences are paired over seeds with 95% t-intervals; across the claim NFEs "
        f"{cfg['claim_nfes']} the p-values are Holm-corrected; NFE 1 is reported on its own. "
        f"Declared γ per NFE of `SSS γ(NFE)`: {cfg['declared_gamma']}.")
    out += ["", f"**Recommended TCD objective (chosen on the selection draw): {OBJECTIVE_TITLE[rec_obj]}** "
            f"(mean rank over datasets × claim NFEs: " +
            ", ".join(f"{OBJECTIVE_TITLE[o]} {r:g}" for o, r in sorted(choice['mean_rank'].items(),
                                                                          key=lambda kv: kv[1])) + ").", ""]
    out += ["## Headline: TCD (recommended) − LCM on the primary metric", ""]
    out += ["Negative is better for sliced W2 and KID. **win**: the Holm-corrected test rejects in TCD's favour; "
            "**loss**: in LCM's; **tie**: no evidence either way.", ""]
    out += headline_rows(results)
    out.append("")
    out += dataset_sections(results)
    out += ["## Figures", ""] + [f"![{f}]({f})" for f in results.get("figures", [])]
    return "\n".join(out) + "\n"


def _verdict_cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if not math.isfinite(row["low"]):
        return num(row["mean"])
    d = _dec(row["mean"])
    return f"{row['mean']:+.{d}f} [{row['low']:+.{d}f}, {row['high']:+.{d}f}] **{row['verdict']}**"


def tcd_vs_lcm_rows(results: dict) -> list[dict]:
    """(dataset, TCD objective, sampler mode) -> {nfe: comparison row} of TCD − LCM on each primary metric."""
    cfg = results["config"]
    out = []
    for name, rec in results["datasets"].items():
        metric = cfg["primary"][name]
        for objective in dict.fromkeys([results["choice"]["recommended"], "tcd_rho0"]):
            for mode in ("best sampler each", "same sampler"):
                rows = {r["nfe"]: r for r in rec["comparisons"]
                        if r["metric"] == metric and r["a"][0] == objective and r["b"][0] == "lcm"
                        and r["family"].endswith(mode) and r["nfe"] in cfg["claim_nfes"]}
                if rows:
                    out.append({"dataset": name, "metric": metric, "objective": objective, "mode": mode,
                                "rows": rows})
    return out


FLOW_SAMPLER_NOTE = {"lcm": "LCM's multistep sampler (γ 1: x̂₀, re-noised to σ_next)",
                     "sss_g0": "SSS γ 0 (the student's flow Euler)", "sss_g0.3": "SSS γ 0.3",
                     "sss_declared": "SSS γ(NFE) declared"}


def flow_summary_markdown(results: dict) -> str:
    """The flow study's summary: the TCD − LCM table per dataset x NFE first, then the same sections as the VP
    study's summary."""
    cfg, choice = results["config"], results["choice"]
    rec_obj = choice["recommended"]
    sizes = "; ".join(
        f"{name}: teacher {d['teacher']['steps']} steps (width {d['teacher']['width']}), distillation "
        f"{d['distill']['steps']} steps (batch {d['distill']['batch']}), selection draw {d['n_select']}, grading "
        f"draw {d['n_grade']}" for name, d in cfg["datasets"].items())
    out = ["# Flow-matching teachers: flow TCD against flow LCM and the teacher at toy scale (measured)", ""]
    out.append(
        f"Produced by `python -m benchmarks.paper_toy.run --path flow` (config `{results['config_name']}`) in "
        f"{results['wall_s'] / 60:.1f} min wall ({results['cpu_s'] / 60:.1f} CPU min) on {results['machine']}, "
        f"{results['jobs']} worker processes. The VP study's design (`benchmarks/results/paper_toy/summary.md`) on "
        f"rectified-flow teachers: velocity networks trained on x_σ = (1 − σ) x₀ + σ ε with target ε − x₀, σ drawn "
        f"{cfg['time_sampling'].replace('_', '-')} in the unshifted time, shift {cfg['shift']:g} "
        f"(`tcd.paths.FlowPath.shifted`); the digits teacher with the VP teacher's classifier-free guidance setup "
        f"(label dropout 0.1). Students: full fine-tunes distilled with `tcd.losses.make_objective` on that FlowPath "
        f"with prediction_type \"flow\" (LCM = the jump to σ 0), the same budget and paired draws for every "
        f"objective. Sizes: {len(cfg['seeds'])} paired distillation seeds, {len(cfg['teacher_seeds'])} teachers per "
        f"dataset; {sizes}. Student samplers: `tcd.sampling.sample_tcd` on `FlowSchedule`: "
        f"{', '.join(FLOW_SAMPLER_NOTE.get(x, x) for x in cfg['samplers'])}; γ(NFE) declared: "
        f"{ {k: v for k, v in cfg['declared_gamma'].items() if int(k) in cfg['nfes']} }; timesteps "
        f"uniform in the model's time from σ = 1; the teacher: flow Euler at the same NFE and at "
        f"{cfg['teacher_ref_nfes'][0]} steps (the many-step reference). Best sampler per objective and NFE chosen on "
        f"the selection draw, graded on the grading draw; paired 95% t-intervals over seeds, Holm over NFE "
        f"{cfg['claim_nfes']}. The recommended objective is fixed in advance: {OBJECTIVE_TITLE[rec_obj]} "
        f"(`tcd.losses.RECIPES[\"recommended\"]`); mean rank on the selection draw, for information: " +
        ", ".join(f"{OBJECTIVE_TITLE[o]} {r:g}" for o, r in sorted(choice["mean_rank"].items(), key=lambda kv: kv[1]))
        + ".")
    if not any(rec["cpu_s"]["teacher"] for rec in results["datasets"].values()):
        out += ["", "The teachers (and the digits classifiers) came from the cache, trained by an earlier run with the "
                "same settings and code: their training is not in the times above."]
    out += ["", "## Headline: flow TCD − flow LCM on the primary metric", "",
            "Negative is better (sliced W2, KID). **win**: the Holm-corrected test rejects in TCD's favour; "
            "**loss**: in LCM's; **tie**: no evidence either way.", ""]
    table = tcd_vs_lcm_rows(results)
    body = [[f"{DATASET_TITLE[t['dataset']]} ({METRIC_TITLE[t['metric']]})", OBJECTIVE_TITLE[t["objective"]] +
             (" (recommended)" if t["objective"] == rec_obj else ""), t["mode"]] +
            [_verdict_cell(t["rows"].get(n)) for n in cfg["claim_nfes"]] for t in table]
    out += _table(["dataset", "TCD objective", "samplers"] + [f"NFE {n}" for n in cfg["claim_nfes"]], body)
    out.append("")
    for t in table:
        if t["objective"] == rec_obj:
            losses = [n for n, r in sorted(t["rows"].items()) if r["verdict"] == "loss"]
            out.append(f"- Goal \"flow TCD (recommended) ≥ flow LCM at every NFE {cfg['claim_nfes']}\" on "
                       f"{t['dataset']}, {t['mode']}: **{'met' if not losses else 'not met'}**"
                       + (f" (loss at NFE {losses})" if losses else " (no loss)") + ".")
    out.append("")
    out += dataset_sections(results)
    out += ["## Figures", ""] + [f"![{f}]({f})" for f in results.get("figures", [])]
    return "\n".join(out) + "\n"


def dataset_sections(results: dict) -> list[str]:
    """Per dataset: its draws and floors, every paired comparison, the graded cells per metric, the selection
    factorial, the oracles (if any), convergence and CPU time."""
    cfg = results["config"]
    _CHOICE.clear()
    _CHOICE.update(results["choice"])     # selection_table marks each objective's chosen sampler
    out = []
    for name, rec in results["datasets"].items():
        primary = cfg["primary"][name]
        dcfg = cfg["datasets"][name]
        out += [f"## {DATASET_TITLE[name]}", ""]
        fl = rec["floors"]
        floor_txt = ", ".join(f"{METRIC_TITLE[m]} {num(v['mean'])} ± {num(v['sd'])}" for m, v in fl.items()
                              if m in SHOWN[name])
        if name == "mog2d":
            out.append(f"Grading draw: {dcfg['n_grade']} samples against {dcfg['n_grade']} held-out exact samples "
                       f"(MMD on the first 1000); selection draw {dcfg['n_select']}. Noise floor (fresh exact samples "
                       f"against the held-out set, {fl['sw']['n']} draws, mean ± sd): {floor_txt}. Pure Gaussian "
                       f"noise: sliced W2 "
                       f"{num(rec['gaussian_noise']['sw'])}.")
        else:
            out.append(f"Class-conditional teacher with classifier-free guidance; distillation draws the guidance "
                       f"w ~ U[{dcfg['guidance']['w_min']}, {dcfg['guidance']['w_max']}] (x̂ = x_c + w (x_c − x_u)); "
                       f"students sample at cfg 1 (one pass), the teacher with w = {dcfg['guidance']['w_eval']}. "
                       f"Grading draw: {dcfg['n_grade']} samples (every class equally often); KID in the features "
                       f"of {len(dcfg['classifier_seeds'])} CNN classifiers (held-out accuracy "
                       + ", ".join(f"{a:.3f}" for a in rec.get("classifier_test_accuracy", [])) +
                       f"), precision/recall at equal counts, nothing clamped. Floor (the training split scored as "
                       f"samples, and its bootstrap resamples; mean ± sd): {floor_txt}. Memorised: the fraction of "
                       f"samples nearer a training digit than 99% of held-out digits are (fresh digits: 0.01).")
        out.append("")
        secondary = ", ".join(METRIC_TITLE[m] for m in SECONDARY[name])
        out += [f"**Paired comparisons ({METRIC_TITLE[primary]} and {secondary})**", ""]
        out += comparison_table(rec["comparisons"])
        out.append("")
        for metric in SHOWN[name]:
            out += [f"**{METRIC_TITLE[metric]}** (grading draw; mean [95% CI] over seeds)", ""]
            out += cell_table(cfg, name, rec, metric)
            out.append("")
        out += [f"**Selection draw, full factorial ({METRIC_TITLE[primary]}, mean over seeds; bold: the sampler "
                f"chosen for that objective and NFE)**", ""]
        out += selection_table(cfg, name, rec, primary)
        out.append("")
        if rec["oracle_cells"]:
            out += [f"**Ceilings: each objective's exact-denoiser oracle** ({cfg['datasets'][name]['n_oracle']} "
                    f"samples; `oracle.py`)", ""]
            rows = []
            objs = sorted({k.split("|")[0] for k in rec["oracle_cells"]}, key=lambda o: cfg["objectives"].index(o))
            for o in objs:
                for s in cfg["oracle_samplers"]:
                    rows.append([_label(o, s)] + [num(rec["oracle_cells"].get(f"{o}|{s}|{n}", {}).get(primary,
                                                                                                   {}).get("mean"))
                                                  for n in cfg["nfes"]])
            out += _table(["oracle · sampler"] + [f"NFE {n}" for n in cfg["nfes"]], rows)
            out.append("")
        out += _convergence_lines(rec, primary)
        cpu = rec["cpu_s"]
        out += [f"CPU time: teachers {cpu['teacher'] / 60:.1f} min, distillation {rec['distill_cpu_s'] / 60:.1f} min, "
                f"selection scoring {(cpu['select'] - rec['distill_cpu_s']) / 60:.1f} min, grading "
                f"{cpu['grade'] / 60:.1f} min, oracles {cpu['oracle'] / 60:.1f} min.", ""]
    return out


def _convergence_lines(rec, primary) -> list[str]:
    """Did every run converge? The probe metric's change over the last quarter of training vs the run spread."""
    rows = []
    for objective, seeds in rec["curves"].items():
        last, quarter = [], []
        for r in seeds.values():
            probes = r["probe"]
            if len(probes) < 3:
                continue
            key = [k for k in probes[-1] if k != "step"][0]
            last.append(probes[-1][key])
            quarter.append(probes[-1][key] - probes[int(len(probes) * 0.75)][key])
        if last:
            rows.append([OBJECTIVE_TITLE.get(objective, objective), key, f"{np.mean(last):.4g}",
                         f"{np.mean(quarter):+.3g} ± {np.std(quarter, ddof=1) if len(quarter) > 1 else 0:.2g}",
                         f"{np.std(last, ddof=1) if len(last) > 1 else 0:.3g}"])
    if not rows:
        return []
    return ["**Convergence** (probe: the primary metric at NFE 2 on a small fixed draw, every 100 steps; change over "
            "the last quarter of training vs the spread across seeds)", ""] + \
        _table(["objective", "probe", "final (mean)", "last-quarter change (mean ± sd)", "sd across seeds"], rows) + [""]
