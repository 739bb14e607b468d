"""The units of work of the toy benchmark, each a pure function of (config, dataset, seed) returning JSON-able
records, so that `run.py` can spread them over worker processes.

Design (all declared in `run.CONFIGS` before measuring):
* 2 teachers per dataset (teacher seeds 0, 1); distillation seed s uses teacher s mod 2.
* objectives (`distill.OBJECTIVES`) x samplers (`samplers.student_samplers`) x NFE: every objective is distilled
  once per seed with the same draws (paired), and its evaluation-EMA student is sampled by every sampler.
* Two evaluation draws with independent sampling noise:
  - selection (`select` unit, smaller n): every factorial cell; picks each objective's best sampler per NFE and the
    recommended TCD objective, over all seeds, before grading;
  - grading (`grade` unit, full n, sampling seed 1000 + s shared by every method of seed s): only the cells the
    claims use (each objective's selected sampler, and the sampler all methods share), plus the teacher.
* Noise floors: the metrics between two exact/held-out samples; the mixture's objective oracles (`oracle.py`).
* `cfg["path"]` "flow" runs the same units on rectified-flow teachers (velocity networks, `teacher.flow_training_pair`)
  with the flow objectives, the flow samplers of `flow.py` and the teacher's flow Euler; "vp" (the default) is the
  SD-schedule eps study.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tcd.paths import FlowPath
from tcd.schedule import DiscreteSchedule, vp_alphas_cumprod

from . import data as datasets
from . import distill as dist
from . import flow
from . import metrics
from . import samplers
from .models import EpsMLP, VelocityMLP
from .oracle import ExactDenoiser, ObjectiveOracle
from .teacher import train_teacher


def _finite(d: dict) -> dict:
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in d.items()}


class Context:
    """Everything a unit needs about one dataset: data, schedule, evaluator, teachers (cached under `cache`)."""

    def __init__(self, cfg: dict, name: str, cache: Path):
        self.cfg, self.name, self.cache = cfg, name, Path(cache)
        self.dcfg = cfg["datasets"][name]
        self.abar = vp_alphas_cumprod()
        self.schedule = DiscreteSchedule.from_alphas_cumprod(self.abar)
        self.ds = datasets.load(name, **self.dcfg.get("data", {}))
        self._evaluator = None
        self.kind = cfg.get("path", "vp")
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"path={self.kind!r} is not 'vp' or 'flow'")
        self.flow_path = FlowPath.shifted(cfg["shift"]) if self.kind == "flow" else None

    # --- the path's variants: network, objective, samplers
    @property
    def network(self):
        return VelocityMLP if self.kind == "flow" else EpsMLP

    def objective(self, name: str):
        guidance = self.dcfg.get("guidance", {})
        common = dict(w_min=guidance.get("w_min", 0.0), w_max=guidance.get("w_max", 0.0),
                      loss=self.cfg.get("loss", "huber"))
        if self.kind == "flow":
            return dist.make_objective(name, FlowPath.shifted(self.cfg["shift"]), prediction_type="flow",
                                       **common)
        return dist.make_objective(name, self.abar, **common)

    def sampler_specs(self) -> dict:
        module = flow if self.kind == "flow" else samplers
        return module.student_samplers(self.cfg["declared_gamma"])

    def sample(self, spec, fn, n: int, nfe: int, seed: int):
        """Samples of one student sampler cell (None where it cannot spend exactly `nfe` calls)."""
        if self.kind == "flow":
            return flow.run_sampler(spec, fn, self.flow_path, n, self.ds.dim, nfe, seed)
        return samplers.run_sampler(spec, fn, self.schedule, n, self.ds.dim, nfe, seed)

    def teacher_samplers(self) -> list:
        """(name, sample(fn, n, dim, nfe, seed), NFEs) of the teacher's reference samplers."""
        nfes, ref = self.cfg["nfes"], self.cfg["teacher_ref_nfes"]
        if self.kind == "flow":
            euler = lambda fn, *a: flow.sample_flow_euler(fn, self.flow_path, *a)   # noqa: E731
            return [("teacher_euler", euler, nfes + ref)]
        return [("teacher_ddim", samplers.sample_ddim, nfes), ("teacher_dpmpp2m", samplers.sample_dpmpp_2m, nfes + ref)]

    # --- evaluation
    @property
    def evaluator(self):
        if self._evaluator is None:
            if self.name == "mog2d":
                self._evaluator = metrics.MixtureEvaluator(self.ds.test, self.ds.mixture.centers,
                                                           self.ds.mixture.std)
            else:
                path = self.cache / f"classifiers_{self.name}.pt"
                if path.exists():
                    state = torch.load(path, weights_only=False)
                    ev = metrics.DigitsEvaluator.from_state(state, self.ds)
                else:
                    ev = metrics.DigitsEvaluator(self.ds.train, self.ds.train_labels, self.ds.test,
                                                 self.ds.test_labels, classifier_seeds=self.dcfg["classifier_seeds"],
                                                 classifier_steps=self.dcfg["classifier_steps"])
                    _atomic_save(ev.state(), path)
                self._evaluator = ev
        return self._evaluator

    def labels_for(self, n: int) -> torch.Tensor | None:
        """Requested classes of n conditional samples: every class equally often."""
        return torch.arange(n) % self.ds.classes if self.ds.classes else None

    def evaluate(self, x: torch.Tensor, labels, light: bool = False) -> dict:
        return _finite(self.evaluator(x, labels, light=light))

    # --- teachers
    def teacher(self, teacher_seed: int) -> EpsMLP:
        path = self.cache / f"teacher_{self.name}_{teacher_seed}.pt"
        tcfg = self.dcfg["teacher"]
        net = self.network(self.ds.dim, width=tcfg["width"], depth=tcfg["depth"], classes=self.ds.classes)
        net.load_state_dict(torch.load(path, weights_only=True)["state"])
        return net.eval().requires_grad_(False)

    def student_path(self, objective: str, seed: int) -> Path:
        return self.cache / f"student_{self.name}_{objective}_{seed}.pt"

    def teacher_of(self, seed: int) -> int:
        """Distillation seed s uses teacher s mod (number of teachers)."""
        seeds = self.cfg["teacher_seeds"]
        return seeds[seed % len(seeds)]

    def load_student(self, objective: str, seed: int) -> EpsMLP:
        net = self.teacher(self.teacher_of(seed))
        net.load_state_dict(torch.load(self.student_path(objective, seed), weights_only=True))
        return net

    def eps_fn(self, net, n: int, guidance: float = 0.0):
        """The network's raw output as a function of (x, t), CFG-combined: eps on VP, the velocity on a flow path
        (classifier-free guidance is the same linear combination of either)."""
        return samplers.eps_function(net, self.labels_for(n), guidance)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ================================================================================================ units
def unit_teacher(ctx: Context, teacher_seed: int) -> dict:
    t0 = time.process_time()
    tcfg = dict(ctx.dcfg["teacher"])
    if ctx.kind == "flow":
        tcfg["flow"] = dict(shift=ctx.cfg["shift"], time_sampling=ctx.cfg["time_sampling"])
    net, curve = train_teacher(ctx.ds.train, ctx.abar, seed=teacher_seed, labels=ctx.ds.train_labels,
                               classes=ctx.ds.classes, **tcfg)
    _atomic_save({"state": net.state_dict()}, ctx.cache / f"teacher_{ctx.name}_{teacher_seed}.pt")
    return {"kind": "teacher", "dataset": ctx.name, "teacher_seed": teacher_seed, "loss_curve": curve,
            "cpu_s": time.process_time() - t0}


def unit_references(ctx: Context) -> dict:
    """Noise floors: the metrics between independent draws of the truth (several draws: mean and spread)."""
    t0 = time.process_time()
    n = ctx.dcfg["n_grade"]
    floors = []
    if ctx.name == "mog2d":
        for k in range(ctx.dcfg.get("floor_draws", 5)):
            fresh = ctx.ds.mixture.sample(n, torch.Generator().manual_seed(7000 + k))
            floors.append(ctx.evaluate(fresh, None))
        noise = ctx.evaluate(torch.randn(n, ctx.ds.dim, generator=torch.Generator().manual_seed(98)), None)
        extra = {}
    else:
        ev = ctx.evaluator
        # the training split scored as if it were samples (its own labels requested): what real digits get
        floors.append(ctx.evaluate(ctx.ds.train, ctx.ds.train_labels))
        # bootstrap resamples of the training split: the metric's spread at this sample count
        g = torch.Generator().manual_seed(5)
        for _ in range(ctx.dcfg.get("floor_draws", 5)):
            idx = torch.randint(0, ctx.ds.train.shape[0], (ctx.ds.train.shape[0],), generator=g)
            floors.append(ctx.evaluate(ctx.ds.train[idx], ctx.ds.train_labels[idx]))
        noise = ctx.evaluate(torch.randn(n, ctx.ds.dim, generator=torch.Generator().manual_seed(98)),
                             ctx.labels_for(n))
        extra = {"classifier_test_accuracy": ev.accuracy, "memorisation_threshold": ev.nn_threshold}
    return {"kind": "references", "dataset": ctx.name, "floor_draws": floors, "gaussian_noise": noise,
            "cpu_s": time.process_time() - t0, **extra}


def _probe(ctx: Context, objective: str):
    """A cheap convergence metric of an evaluation-EMA student: the primary metric at NFE 2 and 4 with the
    objective's own sampler on a small draw (same noise at every probe)."""
    n = ctx.dcfg["n_probe"]
    primary = ctx.cfg["primary"][ctx.name]
    spec = ctx.sampler_specs()["lcm" if objective == "lcm" else "sss_declared"]

    def probe(net):
        out = {}
        for nfe in (2, 4):
            x = ctx.sample(spec, ctx.eps_fn(net, n), n, nfe, 424242)
            out[f"{primary}@{nfe}"] = ctx.evaluate(x, ctx.labels_for(n), light=True)[primary]
        return out
    return probe


def unit_select(ctx: Context, seed: int) -> dict:
    """Distil every objective with this seed (paired draws), keep the students, score every factorial cell on the
    selection draw; also sample the teacher on the grading draw (it needs no selection)."""
    t0 = time.process_time()
    dcfg, cfg = ctx.dcfg, ctx.cfg
    teacher = ctx.teacher(ctx.teacher_of(seed))
    runs, curves = [], {}
    n_sel, sel_seed = dcfg["n_select"], 50000 + seed
    specs = {k: v for k, v in ctx.sampler_specs().items() if k in cfg["samplers"]}
    distill_cpu = 0.0
    for objective in cfg["objectives"]:
        c0 = time.process_time()
        student, record = dist.distill(teacher, ctx.ds.train, ctx.ds.train_labels, ctx.objective(objective), seed=seed,
                                       probe=_probe(ctx, objective), **dcfg["distill"])
        distill_cpu += time.process_time() - c0
        _atomic_save(student.state_dict(), ctx.student_path(objective, seed))
        curves[objective] = record
        eps = ctx.eps_fn(student, n_sel)
        for sampler, spec in specs.items():
            for nfe in cfg["nfes"]:
                x = ctx.sample(spec, eps, n_sel, nfe, sel_seed)
                if x is not None:
                    runs.append({"draw": "select", "method": objective, "sampler": sampler, "nfe": nfe,
                                 "seed": seed, "metrics": ctx.evaluate(x, ctx.labels_for(n_sel), light=True)})
    runs += _teacher_runs(ctx, teacher, seed)
    return {"kind": "select", "dataset": ctx.name, "seed": seed, "runs": runs, "curves": curves,
            "distill_cpu_s": distill_cpu, "cpu_s": time.process_time() - t0}


def _teacher_runs(ctx: Context, teacher, seed: int) -> list[dict]:
    n, sseed = ctx.dcfg["n_grade"], 1000 + seed
    w = ctx.dcfg.get("guidance", {}).get("w_eval", 0.0)
    eps = ctx.eps_fn(teacher, n, w)
    runs = []
    for name, fn, nfes in ctx.teacher_samplers():
        for nfe in nfes:
            x = fn(eps, n, ctx.ds.dim, nfe, sseed)
            runs.append({"draw": "grade", "method": name, "sampler": name, "nfe": nfe, "seed": seed,
                         "metrics": ctx.evaluate(x, ctx.labels_for(n))})
    return runs


def unit_grade(ctx: Context, seed: int, cells: list[tuple[str, str, int]]) -> dict:
    """Score the (objective, sampler, nfe) cells on the grading draw (sampling seed 1000 + seed for every method)."""
    t0 = time.process_time()
    n, sseed = ctx.dcfg["n_grade"], 1000 + seed
    specs = ctx.sampler_specs()
    runs, students, samples = [], {}, {}
    for objective, sampler, nfe in cells:
        if objective not in students:
            students[objective] = ctx.eps_fn(ctx.load_student(objective, seed), n)
        x = ctx.sample(specs[sampler], students[objective], n, nfe, sseed)
        if x is not None:
            runs.append({"draw": "grade", "method": objective, "sampler": sampler, "nfe": nfe, "seed": seed,
                         "metrics": ctx.evaluate(x, ctx.labels_for(n))})
            if seed == ctx.cfg["seeds"][0]:
                samples[f"{objective}|{sampler}|{nfe}"] = _kept(ctx, x)
    return {"kind": "grade", "dataset": ctx.name, "seed": seed, "runs": runs, "samples": samples,
            "cpu_s": time.process_time() - t0}


def _kept(ctx: Context, x: torch.Tensor) -> list:
    """What the sample figures show: 2000 points of the mixture, or the first 20 digits (two of each class)."""
    return x[:2000 if ctx.name == "mog2d" else 20].tolist()


def unit_oracle(ctx: Context, objective: str) -> dict:
    """The mixture's exact-denoiser oracle of one objective, sampled by the SSS and LCM samplers (oracle.py)."""
    t0 = time.process_time()
    spec = dist.OBJECTIVES[objective]
    oracle = ObjectiveOracle(ExactDenoiser(ctx.ds.mixture, ctx.abar), spec["method"], rho=spec.get("rho", 0.0),
                             loss=ctx.cfg.get("loss", "huber"))
    n = ctx.dcfg["n_oracle"]
    specs = samplers.student_samplers(ctx.cfg["declared_gamma"])
    runs = []
    for sampler in ctx.cfg["oracle_samplers"]:
        for nfe in ctx.cfg["nfes"]:
            x = samplers.run_sampler(specs[sampler], lambda x, t: oracle(x, t), ctx.schedule, n, ctx.ds.dim, nfe,
                                     1000)
            if x is not None:
                runs.append({"draw": "oracle", "method": objective, "sampler": sampler, "nfe": nfe, "seed": 0,
                             "metrics": ctx.evaluate(x, None)})
    return {"kind": "oracle", "dataset": ctx.name, "objective": objective, "runs": runs,
            "cpu_s": time.process_time() - t0}
