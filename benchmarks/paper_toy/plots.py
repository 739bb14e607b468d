"""Figures of the toy study (matplotlib, Agg): metric vs NFE with intervals, convergence, samples."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import (DATASET_TITLE, METRIC_TITLE, OBJECTIVE_TITLE, SAMPLER_TITLE, teacher_list,  # noqa: E402
                     teacher_methods)

COLORS = {"lcm": "tab:red", "tcd_rho0": "tab:blue", "tcd_rho0.25": "tab:cyan", "tcd_rho0.5": "tab:green",
          "tcd_rho0.75": "tab:olive", "tcd_tcf2": "tab:purple", "teacher_ddim": "0.55", "teacher_dpmpp2m": "0.2",
          "teacher_euler": "0.4"}


def _series(cells, method, sampler_of, nfes, metric):
    mean, low, high = [], [], []
    for n in nfes:
        st = cells.get(f"{method}|{sampler_of(n)}|{n}", {}).get(metric)
        mean.append(st["mean"] if st else np.nan)
        low.append(st["low"] if st else np.nan)
        high.append(st["high"] if st else np.nan)
    return np.array(mean), np.array(low), np.array(high)


def _panel(ax, results, name, metric):
    cfg, choice = results["config"], results["choice"]
    rec = results["datasets"][name]
    cells, nfes = rec["grade_cells"], cfg["nfes"]
    lines = [(t, lambda n, t=t: t, "--") for t in teacher_list(cfg)]
    for o in [o for o in dict.fromkeys(["lcm", "tcd_rho0", choice["recommended"]]) if o in cfg["objectives"]]:
        lines.append((o, lambda n, o=o: choice["best_sampler"][f"{name}|{o}|{n}"], "-"))
    for method, sampler_of, ls in lines:
        mean, low, high = _series(cells, method, sampler_of, nfes, metric)
        label = OBJECTIVE_TITLE.get(method, method) + ("" if method.startswith("teacher") else ", best sampler")
        if method == choice["recommended"]:
            label += " (recommended)"
        ax.plot(nfes, mean, ls=ls, marker="o", ms=4, color=COLORS.get(method, "k"), label=label)
        ax.fill_between(nfes, low, high, color=COLORS.get(method, "k"), alpha=0.15)
    floor = rec["floors"].get(metric)
    if floor:
        ax.axhline(floor["mean"], color="tab:green", lw=0.8, ls=":", label="noise floor (data vs data)")
    ref_m = teacher_methods(cfg)["ref"]
    ref = cells.get(f"{ref_m}|{ref_m}|{cfg['teacher_ref_nfes'][0]}", {}).get(metric)
    if ref:
        ax.axhline(ref["mean"], color="0.2", lw=0.8, ls="-.", label=f"teacher, {cfg['teacher_ref_nfes'][0]} steps")
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.set_xlabel("NFE")
    if metric in ("sw", "kid", "mmd"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"{DATASET_TITLE[name]}: {METRIC_TITLE[metric]}", fontsize=9)


def overview(results, out: Path) -> Path:
    cfg = results["config"]
    panels = [(n, cfg["primary"][n]) for n in results["datasets"]]
    if "digits" in results["datasets"]:
        panels.append(("digits", "accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.9), squeeze=False)
    for ax, (name, metric) in zip(axes[0], panels):
        _panel(ax, results, name, metric)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("mean and 95% interval over seeds (grading draw)", fontsize=9)
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def convergence(results, out: Path) -> Path:
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rec = results["datasets"][name]
        for objective, seeds in rec["curves"].items():
            probes = [r["probe"] for r in seeds.values() if r["probe"]]
            if not probes:
                continue
            key = [k for k in probes[0][0] if k != "step" and k.endswith("@2")][0]
            steps = [p["step"] for p in probes[0]]
            vals = np.array([[p[key] for p in run] for run in probes])
            m = vals.mean(0)
            ax.plot(steps, m, color=COLORS.get(objective, "k"), label=OBJECTIVE_TITLE.get(objective, objective))
            ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS.get(objective, "k"), alpha=0.12)
        ax.set_yscale("log")
        ax.set_xlabel("distillation step")
        ax.set_title(f"{DATASET_TITLE[name]}: {key} (evaluation EMA; band: min–max over seeds)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = out / "convergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_figure(results, name, out: Path) -> Path | None:
    cfg, choice = results["config"], results["choice"]
    kept = results["datasets"][name].get("samples", {})
    ref_m = teacher_methods(cfg)["ref"]
    rows = [(ref_m, lambda n: ref_m)] + [
        (o, lambda n, o=o: choice["best_sampler"][f"{name}|{o}|{n}"]) for o in dict.fromkeys(
            ["lcm", "tcd_rho0", choice["recommended"]]) if o in cfg["objectives"]]
    nfes = [n for n in cfg["nfes"] if n in (1, 2, 4, 8)]
    rows = [r for r in rows if any(f"{r[0]}|{r[1](n)}|{n}" in kept for n in nfes)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(nfes), figsize=(2.0 * len(nfes), 2.0 * len(rows)), squeeze=False)
    for i, (method, sampler_of) in enumerate(rows):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            x = np.asarray(kept.get(f"{method}|{sampler_of(n)}|{n}", []))
            if x.size and name == "digits":
                tiles = np.full((4 * 9 + 1, 5 * 9 + 1), -1.0)
                for idx in range(min(len(x), 20)):
                    r, c = divmod(idx, 5)
                    tiles[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = x[idx].reshape(8, 8)
                ax.imshow(np.clip(tiles, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            elif x.size:
                ax.scatter(x[:, 0], x[:, 1], s=0.5, c="k", alpha=0.4)
                ax.set_xlim(-1.5, 1.5)
                ax.set_ylim(-1.5, 1.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"NFE {n}", fontsize=8)
            if j == 0:
                ax.set_ylabel(OBJECTIVE_TITLE.get(method, method), fontsize=6)
    fig.suptitle(f"{DATASET_TITLE[name]}: samples (seed {cfg['seeds'][0]}, same initial noise everywhere; "
                 f"digits: classes 0-9 requested twice)", fontsize=8)
    fig.tight_layout()
    path = out / f"samples_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_figures(results, out: Path) -> list[Path]:
    figs = [overview(results, out), convergence(results, out)]
    for name in results["datasets"]:
        p = samples_figure(results, name, out)
        if p:
            figs.append(p)
    return figs
