"""One dataset's experiment: teacher, students, samples, metrics. Returns a JSON-able record of raw measurements.

Seeds: the teacher is trained once per dataset (seed 0). Each seed s in `seeds` distills every student with
seed s and samples every method (teacher samplers included) from the same initial noise, seed 1000 + s; the spread
over seeds is thus distillation + sampling variance (teacher rows: sampling variance only).
"""
from __future__ import annotations

import math
import time

import torch

from tcd.losses import TCDLoss
from tcd.schedule import DiscreteSchedule, vp_alphas_cumprod

from . import data as datasets
from . import distill as dist
from . import metrics
from . import samplers
from .teacher import train_teacher

JUMP_CHECKPOINTS = [999, 759, 499, 259, 0]


class TCDLossSZero(TCDLoss):
    """TCD's objective with the target time pinned to s = 0 (LCM's choice) and everything else unchanged.

    An investigation variant: it separates TCD's s-sampling (s ~ U on the grid below t_n) from its TCF
    parameterisation (no c_skip / c_out). Same generator draws as `TCDLoss`, so the budget stays identical.
    """

    def draw(self, x0, generator):
        index, end_index, noise, w = super().draw(x0, generator)
        return index, torch.zeros_like(end_index), noise, w


# An ablation changes one knob of the main recipe, for LCM and TCD alike where the knob exists for both.
ABLATIONS = {
    "loss_l2": dict(loss="l2"),                  # L2 instead of pseudo-Huber (c = 0.001, ~L1 at this scale)
    "target_online": dict(ema_decay=0.0),        # theta^- = the online student (LoRA scripts) instead of an EMA
    "skip_25": dict(original_steps=25),          # skipping grid of 25 steps (k = 40) instead of 50 (k = 20)
    "tcd_s_zero": dict(s_zero=True),             # TCD only: s = 0 always
}


def _student(method: str, order: int, teacher, train, abar, dcfg: dict, seed: int, variant: dict):
    kw = dict(tcf_order=order) if method == "tcd" else {}
    obj_kw = dict(original_steps=variant.get("original_steps", 50), loss=variant.get("loss", "huber"))
    if variant.get("s_zero"):
        objective = TCDLossSZero(abar, w_min=0.0, w_max=0.0, **obj_kw)
    else:
        objective = dist.make_objective(method, abar, **kw, **obj_kw)
    return dist.distill(teacher, train, objective, steps=dcfg["steps"], batch=dcfg["batch"], lr=dcfg["lr"],
                        seed=seed, ema_decay=variant.get("ema_decay", dcfg.get("ema_decay", 0.95)))


def _finite(d: dict) -> dict:
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in d.items()}


def run_dataset(name: str, cfg: dict, log=print) -> dict:
    dcfg = cfg["datasets"][name]
    abar = vp_alphas_cumprod()
    schedule = DiscreteSchedule.from_alphas_cumprod(abar)
    ds = datasets.load(name, **dcfg.get("data", {}))
    n = dcfg["n_samples"]
    timings, record = {}, {"dataset": name, "dim": ds.dim, "n_train": int(ds.train.shape[0]),
                           "n_test": int(ds.test.shape[0]), "n_samples": n, "runs": [], "jump_errors": [],
                           "loss_curves": {}, "samples": {}}
    t0 = time.time()

    # --- evaluator and reference points (data against data, pure noise)
    if name == "mog2d":
        evaluate = metrics.MixtureEvaluator(ds.test, ds.mixture.centers, ds.mixture.std)
        fresh = ds.mixture.sample(ds.test.shape[0], torch.Generator().manual_seed(99))
        record["reference"] = {"data_fresh_exact_samples": _finite(evaluate(fresh))}
        n = ds.test.shape[0]     # sliced W2 pairs equal-size samples
        record["n_samples"] = n
    else:
        evaluate = metrics.DigitsEvaluator(ds.train, ds.train_labels, ds.test, ds.test_labels,
                                           classifier_steps=dcfg.get("classifier_steps", 600))
        record["classifier_test_accuracy"] = evaluate.accuracy
        record["reference"] = {"data_train_split": _finite(evaluate(ds.train[:n]))}
    record["reference"]["gaussian_noise"] = _finite(evaluate(torch.randn(n, ds.dim,
                                                                       generator=torch.Generator().manual_seed(98))))
    timings["evaluator_s"] = time.time() - t0

    # --- teacher
    t0 = time.time()
    teacher, curve = train_teacher(ds.train, abar, seed=0, **dcfg["teacher"])
    timings["teacher_s"] = time.time() - t0
    record["loss_curves"]["teacher"] = curve
    log(f"[{name}] teacher trained in {timings['teacher_s']:.1f}s (final loss {curve[-1]:.4f})")

    nfes, gammas, seeds = cfg["nfes"], cfg["gammas"], cfg["seeds"]
    keep = dcfg.get("keep_samples", 64)

    def add(method, nfe, seed, x, gamma=None, order=None, variant="main"):
        m = _finite(evaluate(x))
        record["runs"].append({"method": method, "variant": variant, "order": order, "gamma": gamma, "nfe": nfe,
                               "seed": seed, "metrics": m})
        if seed == seeds[0] and variant == "main" and (method in ("teacher_dpmpp2m", "lcm") or
                                                       (method == "tcd" and gamma in (0.0, 0.3, 1.0))):
            key = f"{method}|{order}|{gamma}|{nfe}"
            record["samples"][key] = x[:keep].tolist()   # for the sample grids

    # --- teacher trajectory: what the distilled jumps are scored against
    traj_noise = torch.randn(dcfg.get("jump_points", 512), ds.dim, generator=torch.Generator().manual_seed(97))
    states = dist.teacher_trajectory(teacher, abar, traj_noise, JUMP_CHECKPOINTS)
    for order in (1, 2):
        record["jump_errors"].append({"method": "teacher", "order": order, "seed": None,
                                      "errors": dist.jump_errors(teacher, abar, states, order)})
    lcm_fn = dist.make_objective("lcm", abar)

    t_sample = t_distill = 0.0
    for seed in seeds:
        sseed = 1000 + seed
        # --- the teacher at equal NFE, and the 100-step reference
        t0 = time.time()
        for nfe in nfes:
            add("teacher_ddim", nfe, seed, samplers.sample_ddim(teacher, n, ds.dim, nfe, sseed))
            add("teacher_dpmpp2m", nfe, seed, samplers.sample_dpmpp_2m(teacher, n, ds.dim, nfe, sseed))
        ref_steps = cfg["ref_steps"]
        add("teacher_ref", ref_steps, seed, samplers.sample_dpmpp_2m(teacher, n, ds.dim, ref_steps, sseed))
        t_sample += time.time() - t0

        # --- students at equal budget
        for method, order in (("lcm", None), ("tcd", 1), ("tcd", 2)):
            label = "lcm" if method == "lcm" else f"tcd{order}"
            t0 = time.time()
            student, curve = _student(method, order or 1, teacher, ds.train, abar, dcfg["distill"], seed, {})
            t_distill += time.time() - t0
            record["loss_curves"][f"{label}|seed{seed}"] = curve
            t0 = time.time()
            if method == "lcm":
                for nfe in nfes:
                    add("lcm", nfe, seed, samplers.sample_lcm_student(student, n, ds.dim, nfe, sseed))
                record["jump_errors"].append({"method": "lcm", "order": None, "seed": seed,
                                              "errors": dist.jump_errors(student, abar, states, None, lcm=lcm_fn)})
            else:
                for nfe in nfes:
                    for gamma in (gammas if order == 1 else cfg.get("order2_gammas", gammas)):
                        add("tcd", nfe, seed, samplers.sample_tcd_student(student, schedule, n, ds.dim, nfe, gamma,
                                                                          sseed), gamma=gamma, order=order)
                for jump_order in (1, 2):
                    record["jump_errors"].append({"method": f"tcd{order}", "order": jump_order, "seed": seed,
                                                  "errors": dist.jump_errors(student, abar, states, jump_order)})
            t_sample += time.time() - t0
            log(f"[{name}] seed {seed}: {label} distilled and sampled ({time.time() - t0:.1f}s sampling)")

    # --- investigation: one knob at a time, first seed only
    t0 = time.time()
    seed = seeds[0]
    for variant_name in cfg.get("ablations", []):
        variant = ABLATIONS[variant_name]
        methods = [("tcd", 1)] if variant.get("s_zero") else [("lcm", None), ("tcd", 1)]
        osteps = variant.get("original_steps", 50)
        for method, order in methods:
            student, curve = _student(method, order or 1, teacher, ds.train, abar, dcfg["distill"], seed, variant)
            record["loss_curves"][f"{method}|{variant_name}"] = curve
            for nfe in nfes:
                if method == "lcm":
                    x = samplers.sample_lcm_student(student, n, ds.dim, nfe, 1000 + seed, original_steps=osteps)
                    add("lcm", nfe, seed, x, variant=variant_name)
                else:
                    for gamma in cfg.get("ablation_gammas", [0.3]):
                        x = samplers.sample_tcd_student(student, schedule, n, ds.dim, nfe, gamma, 1000 + seed,
                                                        original_steps=osteps)
                        add("tcd", nfe, seed, x, gamma=gamma, order=order, variant=variant_name)
        log(f"[{name}] ablation {variant_name} done")
    timings["ablations_s"] = time.time() - t0
    timings["distill_s"], timings["sampling_and_metrics_s"] = t_distill, t_sample
    record["timings"] = timings
    return record
