"""Train the flow efficacy teacher once and cache it, keyed by its code and settings.

Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024, Sec. 2): with x_sigma = (1 - sigma) x0 + sigma eps, the
network predicts the velocity v = dx/dsigma = eps - x0, trained by minimising E ||v_theta(x_sigma, sigma, c) -
(eps - x0)||^2 with sigma ~ U(0, 1). The condition c (a digit's fixed embedding, model.conditionings) is replaced by
the empty prompt's for a fraction of the samples, so the one network is also the unconditional model that
classifier-free guidance needs. Sampling uses the EMA of the weights.

The network is called as ComfyUI's BaseModel calls it for an SD3 model: diffusion_model(x, t, context=..., y=pooled)
with t = model_sampling.timestep(sigma) = 1000 sigma (ModelSamplingDiscreteFlow), x = x_sigma itself (CONST:
calculate_input is the identity), and apply_model returns x0 = x - sigma v (CONST.calculate_denoised); so the
teacher trained here is exactly the model KSampler samples. The timestep -> sigma map does not involve the shift:
the shift only moves where ComfyUI's schedulers put their steps.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from ..efficacy.teacher import _code_without_docs
from . import model as M

HERE = Path(__file__).resolve().parent
# "full": the benchmark's teacher (about 8 CPU minutes on one thread); "test": a smaller one the test trains in its
# own budget when the full one is not cached (about half a CPU minute).
TEACHER_SETTINGS = {
    "full": dict(depth=3, steps=1500, batch=128, lr=1e-3, warmup=100, ema_decay=0.998, cond_drop=0.15, seed=0,
                 threads=1),
    "test": dict(depth=2, steps=300, batch=64, lr=2e-3, warmup=30, ema_decay=0.98, cond_drop=0.15, seed=0,
                 threads=1),
}
CODE_FILES = ("model.py", "teacher.py", "../efficacy/data.py")


def cache_dir() -> Path:
    root = os.environ.get("TCD_EFFICACY_FLOW_CACHE") or \
        Path(os.environ.get("TCD_HOST_CACHE", Path.home() / ".cache" / "comfyui-tcd")) / "efficacy_flow"
    return Path(root)


def cache_key(settings: dict) -> str:
    """Hash of the teacher's code (this file, the model module, the data module) and its settings, without
    docstrings (so docs can change without retraining)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in CODE_FILES:
        h.update(_code_without_docs((HERE / name).read_text()).encode())
    return h.hexdigest()[:12]


def teacher_path(name: str = "full") -> Path:
    return cache_dir() / f"teacher-{name}-{cache_key(TEACHER_SETTINGS[name])}.safetensors"


def is_cached(name: str) -> bool:
    return teacher_path(name).is_file()


def get_teacher(name: str = "full", log=print):
    """(MODEL, info) of the cached teacher `name`, training and caching it first if needed."""
    path = teacher_path(name)
    if not path.is_file():
        log(f"flow efficacy teacher {name!r}: not cached, training it ({path})")
        train_and_save(TEACHER_SETTINGS[name], path, log)
    patcher, meta = M.load_teacher(path)
    info = {k: json.loads(v) if k in ("settings", "train", "overrides") else v for k, v in meta.items()}
    info["path"] = str(path)
    return patcher, info


def train_and_save(settings: dict, path: Path, log=print) -> dict:
    from ..efficacy.data import load
    data = load()
    x0 = M.model_space(M.encode_pixels(data.train))                  # [N, 16, 4, 4], what the transformer sees
    context, pooled = M.embeddings()
    patcher = M.patcher_with(M.initial_weights(settings["seed"], settings["depth"]), settings["depth"])
    net = patcher.model.diffusion_model
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(settings["threads"]))
    try:
        ema, record = _train(net, x0, data.train_labels, context, pooled, settings, log)
    finally:
        torch.set_num_threads(previous_threads)
    record["params"] = sum(p.numel() for p in net.parameters())
    M.save_teacher(path, ema.state_dict(), settings["depth"],
                   {"settings": settings, "train": record, "key": cache_key(settings)})
    log(f"flow efficacy teacher: {settings['steps']} steps in {record['wall_s']:.0f}s wall, {record['cpu_s']:.0f}s "
        f"CPU; saved {path}")
    return record


def learning_rate(s: dict, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    progress = max(0.0, (step - s["warmup"]) / max(1, s["steps"] - s["warmup"]))
    return s["lr"] * min(1.0, (step + 1) / s["warmup"]) * (0.55 + 0.45 * math.cos(math.pi * progress))


def _train(net, x0, labels, context, pooled, s: dict, log):
    generator = torch.Generator().manual_seed(s["seed"])
    empty = 10                                                       # row of the empty prompt in `context`
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net.train().requires_grad_(True)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=0.0)
        t0, c0 = time.time(), time.process_time()
        curve, running, every = [], 0.0, 100
        for step in range(s["steps"]):
            for group in opt.param_groups:
                group["lr"] = learning_rate(s, step)
            idx = torch.randint(0, x0.shape[0], (s["batch"],), generator=generator)
            sigma = torch.rand((s["batch"],), generator=generator)
            eps = torch.randn((s["batch"], *x0.shape[1:]), generator=generator)
            drop = torch.rand((s["batch"],), generator=generator) < s["cond_drop"]
            row = torch.where(drop, torch.full_like(idx, empty), labels[idx])
            x_sigma = (1 - sigma[:, None, None, None]) * x0[idx] + sigma[:, None, None, None] * eps
            v = net(x_sigma, sigma * 1000.0, context=context[row], y=pooled[row])
            loss = torch.nn.functional.mse_loss(v, eps - x0[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            with torch.no_grad():      # EMA; decay 0 for the first tenth, so it starts from trained weights
                decay = s["ema_decay"] if step >= s["steps"] // 10 else 0.0
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            running += float(loss.detach())
            if (step + 1) % every == 0 or step + 1 == s["steps"]:
                curve.append(running / (every if (step + 1) % every == 0 else (step + 1) % every))
                running = 0.0
                log(f"  flow teacher step {step + 1}/{s['steps']}: loss {curve[-1]:.4f} "
                    f"({time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU)")
    net.eval().requires_grad_(False)
    return ema, {"loss_per_100_steps": curve, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
