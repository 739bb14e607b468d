"""PNG plots of the aggregated results (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import DATASET_TITLE, DEFAULT_GAMMA, METRICS, method_label  # noqa: E402

STYLE = {"teacher_ddim": dict(color="0.55", ls="--", marker="s"),
         "teacher_dpmpp2m": dict(color="0.2", ls="--", marker="D"),
         "lcm": dict(color="tab:red", marker="o"),
         ("tcd", 1): dict(color="tab:blue", marker="o"),
         ("tcd", 2): dict(color="tab:purple", marker="^")}


def _series(agg, key_fn, nfes, metric):
    mean = np.array([agg[key_fn(n)][metric]["mean"] for n in nfes])
    std = np.array([agg[key_fn(n)][metric]["std"] for n in nfes])
    return mean, std


def _errorline(ax, nfes, mean, std, label, **style):
    ax.errorbar(nfes, mean, yerr=std, label=label, capsize=3, lw=1.6, ms=4, **style)


def _reference_lines(ax, rec, agg, metric):
    ref = [k for k in agg if k[0] == "teacher_ref" and k[1] == "main"]
    if ref:
        ax.axhline(agg[ref[0]][metric]["mean"], color="0.2", lw=0.8, ls=":", label=f"teacher, {ref[0][4]} steps")
    floor = rec["reference"].get("data_fresh_exact_samples") or rec["reference"].get("data_train_split")
    if floor and floor.get(metric) is not None:
        ax.axhline(floor[metric], color="tab:green", lw=0.8, ls=":", label="data vs data (floor)")


def _nfe_axes(ax, nfes):
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.set_xlabel("NFE")
    ax.grid(alpha=0.3)


def metric_vs_nfe(name, rec, nfes, out: Path, metrics=None) -> Path:
    agg = rec["aggregate_index"]
    metrics = metrics or [m for m, _, _ in METRICS[name]]
    titles = {m: t for m, t, _ in METRICS[name]}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in ("teacher_ddim", "teacher_dpmpp2m", "lcm"):
            mean, std = _series(agg, lambda n: (method, "main", None, None, n), nfes, metric)
            _errorline(ax, nfes, mean, std, method_label(method), **STYLE[method])
        for order in (1, 2):
            mean, std = _series(agg, lambda n: ("tcd", "main", order, DEFAULT_GAMMA, n), nfes, metric)
            _errorline(ax, nfes, mean, std, method_label("tcd", order, DEFAULT_GAMMA), **STYLE[("tcd", order)])
        _reference_lines(ax, rec, agg, metric)
        _nfe_axes(ax, nfes)
        if metric in ("sw", "mmd", "fd"):
            ax.set_yscale("log")
        ax.set_title(titles[metric])
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{DATASET_TITLE[name]}: metric vs NFE (mean ± std over seeds)")
    fig.tight_layout()
    path = out / f"metric_vs_nfe_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overview(results, nfes, out: Path) -> Path:
    """The README plot: the primary metric of each dataset vs NFE."""
    panels = [("mog2d", "sw"), ("digits", "fd")]
    panels = [(n, m) for n, m in panels if n in results["datasets"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, metric) in zip(axes[0], panels):
        rec = results["datasets"][name]
        agg = rec["aggregate_index"]
        for method in ("teacher_dpmpp2m", "lcm"):
            mean, std = _series(agg, lambda n: (method, "main", None, None, n), nfes, metric)
            _errorline(ax, nfes, mean, std, method_label(method), **STYLE[method])
        for gamma, ls in ((DEFAULT_GAMMA, "-"), (0.0, "-.")):
            mean, std = _series(agg, lambda n: ("tcd", "main", 1, gamma, n), nfes, metric)
            style = dict(STYLE[("tcd", 1)], ls=ls)
            _errorline(ax, nfes, mean, std, method_label("tcd", 1, gamma), **style)
        _reference_lines(ax, rec, agg, metric)
        _nfe_axes(ax, nfes)
        ax.set_yscale("log")
        ax.set_title(f"{DATASET_TITLE[name]}: {dict((m, t) for m, t, _ in METRICS[name])[metric]} (lower is better)",
                     fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gamma_sweep(name, rec, nfes, gammas, out: Path) -> Path:
    agg = rec["aggregate_index"]
    detail = "spread" if name == "mog2d" else "detail"
    metrics = [m for m, _, _ in METRICS[name] if m != detail][:2] + [detail]
    titles = {m: t for m, t, _ in METRICS[name]}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, metric in zip(axes[0], metrics):
        for i, nfe in enumerate(n for n in nfes if n >= 2):
            mean = [agg[("tcd", "main", 1, g, nfe)][metric]["mean"] for g in gammas]
            std = [agg[("tcd", "main", 1, g, nfe)][metric]["std"] for g in gammas]
            ax.errorbar(gammas, mean, yerr=std, label=f"NFE {nfe}", color=cmap(i / max(1, len(nfes) - 1)),
                        marker="o", capsize=3, ms=4)
        if metric == detail:
            ax.axhline(1.0, color="tab:green", lw=0.8, ls=":", label="like the data")
        ax.set_xlabel("γ")
        ax.set_title(titles[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{DATASET_TITLE[name]}: TCD γ sweep (sample_tcd, 1st-order-trained student)")
    fig.tight_layout()
    path = out / f"gamma_sweep_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tcf_order(name, rec, nfes, out: Path) -> Path:
    agg = rec["aggregate_index"]
    primary = METRICS[name][0][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for order in (1, 2):
        for gamma, ls in ((0.0, "-."), (DEFAULT_GAMMA, "-")):
            mean, std = _series(agg, lambda n: ("tcd", "main", order, gamma, n), nfes, primary)
            _errorline(ax1, nfes, mean, std, method_label("tcd", order, gamma), **dict(STYLE[("tcd", order)], ls=ls))
    mean, std = _series(agg, lambda n: ("lcm", "main", None, None, n), nfes, primary)
    _errorline(ax1, nfes, mean, std, "LCM", **STYLE["lcm"])
    _nfe_axes(ax1, nfes)
    ax1.set_yscale("log")
    ax1.set_title(f"{METRICS[name][0][1]} vs NFE")
    ax1.legend(fontsize=7)
    # jump errors: bars per (t -> s) pair
    groups = {}
    for j in rec["jump_errors"]:
        groups.setdefault((j["method"], j["order"]), []).append(j["errors"])
    pairs = list(rec["jump_errors"][0]["errors"].keys())
    keys = [k for k in [("teacher", 1), ("teacher", 2), ("tcd1", 1), ("tcd2", 2), ("tcd2", 1), ("lcm", None)]
            if k in groups]
    width = 0.8 / len(keys)
    names = {("teacher", 1): "teacher 1 step, order 1", ("teacher", 2): "teacher 1 step, order 2",
             ("tcd1", 1): "TCD (1st-order trained)", ("tcd2", 2): "TCD (2nd-order trained), order-2 jump",
             ("tcd2", 1): "TCD (2nd-order trained), order-1 jump", ("lcm", None): "LCM (to s = 0)"}
    for i, key in enumerate(keys):
        vals = [[e.get(p, np.nan) for e in groups[key]] for p in pairs]
        mean = [np.nanmean(v) if not np.all(np.isnan(v)) else np.nan for v in vals]
        ax2.bar(np.arange(len(pairs)) + i * width, mean, width, label=names[key])
    ax2.set_xticks(np.arange(len(pairs)) + 0.4 - width / 2)
    ax2.set_xticklabels(pairs, rotation=45, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("RMS error vs teacher ODE")
    ax2.set_title("one-jump distillation error (t→s)")
    ax2.legend(fontsize=6)
    fig.suptitle(f"{DATASET_TITLE[name]}: first- vs second-order TCF distillation")
    fig.tight_layout()
    path = out / f"tcf_order_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(name, rec, nfes, out: Path, test_points=None) -> Path:
    rows = [("teacher_dpmpp2m", None, None), ("lcm", None, None), ("tcd", 1, 0.0), ("tcd", 1, DEFAULT_GAMMA),
            ("tcd", 1, 1.0), ("tcd", 2, DEFAULT_GAMMA)]
    rows = [r for r in rows if f"{r[0]}|{r[1]}|{r[2]}|{nfes[0]}" in rec["samples"]]
    fig, axes = plt.subplots(len(rows), len(nfes), figsize=(1.9 * len(nfes), 1.9 * len(rows)), squeeze=False)
    for i, (method, order, gamma) in enumerate(rows):
        for j, nfe in enumerate(nfes):
            ax = axes[i][j]
            x = np.asarray(rec["samples"][f"{method}|{order}|{gamma}|{nfe}"])
            if name == "digits":
                k = int(np.sqrt(min(len(x), 25)))
                tiles = np.full((9 * k + 1, 9 * k + 1), 0.0)          # mid-grey 1-pixel gaps between digits
                for idx in range(k * k):
                    r, c = divmod(idx, k)
                    tiles[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = x[idx].reshape(8, 8)
                ax.imshow(np.clip(tiles, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            else:
                if test_points is not None:
                    ax.scatter(test_points[:, 0], test_points[:, 1], s=1, c="tab:green", alpha=0.15)
                ax.scatter(x[:, 0], x[:, 1], s=1, c="k", alpha=0.5)
                ax.set_xlim(-1.6, 1.6)
                ax.set_ylim(-1.6, 1.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"NFE {nfe}", fontsize=8)
            if j == 0:
                ax.set_ylabel(method_label(method, order, gamma).replace(", ", "\n"), fontsize=6)
    fig.suptitle(f"{DATASET_TITLE[name]}: samples (seed {rec.get('first_seed', 0)}, same initial noise per column)",
                 fontsize=9)
    fig.tight_layout()
    path = out / f"samples_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(results, out: Path) -> Path:
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        curves = results["datasets"][name]["loss_curves"]
        for key, curve in curves.items():
            if key == "teacher" or "seed" not in key:
                continue
            label, seed = key.split("|")
            color = {"lcm": "tab:red", "tcd1": "tab:blue", "tcd2": "tab:purple"}.get(label, "k")
            ax.plot(np.arange(1, len(curve) + 1) * 25, curve, color=color, alpha=0.7,
                    label=label if seed.endswith(str(results["config"]["seeds"][0])) else None)
        ax.set_yscale("log")
        ax.set_xlabel("distillation step")
        ax.set_title(f"{DATASET_TITLE[name]}: distillation loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
