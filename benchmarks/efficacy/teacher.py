"""Train the efficacy teacher once and cache it, keyed by its code and settings.

Class-conditional eps-prediction (DDPM: minimise E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2,
t ~ U{0..999}) on SD1.5's own schedule (the BaseModel's ModelSamplingDiscrete, abar_t = 1 / (1 + sigma_t^2)), with
the condition c = CLIP("a handwritten digit <label>") replaced by CLIP("") for a fraction of the samples, so the one
network is also the unconditional model classifier-free guidance needs. Sampling uses the EMA of the weights.

The network is called as ComfyUI's BaseModel calls it (diffusion_model(x_vp, t, context=...), t the integer
timestep as a float: what apply_model passes after model_sampling.timestep(sigma)), so the teacher trained here
is exactly the model KSampler samples.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from . import model as M

HERE = Path(__file__).resolve().parent
# Settings of the cached teacher (the benchmark's and the test's) and of a seconds-long one for smoke runs of the
# pipeline (its samples are noise).
TEACHER_SETTINGS = {
    "full": dict(steps=1600, batch=128, lr=2e-3, warmup=100, ema_decay=0.998, cond_drop=0.15, seed=0, threads=2),
    "tiny": dict(steps=40, batch=32, lr=2e-3, warmup=10, ema_decay=0.9, cond_drop=0.15, seed=0, threads=2),
}
CODE_FILES = ("model.py", "data.py", "teacher.py")


def cache_dir() -> Path:
    root = os.environ.get("TCD_EFFICACY_CACHE") or \
        Path(os.environ.get("TCD_HOST_CACHE", Path.home() / ".cache" / "comfyui-tcd")) / "efficacy"
    return Path(root)


def cache_key(settings: dict) -> str:
    """Hash of the teacher's code (this file, the model and data modules) and its settings. The code enters as its
    syntax tree without docstrings, so comments and docs can change without retraining."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in CODE_FILES:
        h.update(_code_without_docs((HERE / name).read_text()).encode())
    return h.hexdigest()[:12]


def _code_without_docs(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def teacher_path(name: str = "full") -> Path:
    return cache_dir() / f"teacher-{name}-{cache_key(TEACHER_SETTINGS[name])}.safetensors"


def get_teacher(name: str = "full", log=print):
    """(MODEL, CLIP, info) of the cached teacher `name`, training and caching it first if needed."""
    path = teacher_path(name)
    if not path.is_file():
        log(f"efficacy teacher {name!r}: not cached, training it ({path.name})")
        train_and_save(TEACHER_SETTINGS[name], path, log)
    patcher, clip, meta = M.load_teacher(path)
    info = {k: json.loads(v) if k in ("settings", "train") else v for k, v in meta.items()}
    info["path"] = str(path)
    return patcher, clip, info


def train_and_save(settings: dict, path: Path, log=print) -> dict:
    from .data import load
    data = load()
    clip = M.new_clip(seed=settings["seed"])
    model = M.new_unet()
    M.init_unet_(model, settings["seed"])
    prompts = [M.prompt_for(d) for d in range(10)]
    contexts = torch.cat([c[0][0] for c in M.encode_prompts(clip, prompts)])        # [10, 77, 64]
    empty = M.encode_prompts(clip, [""])[0][0][0]                                    # [1, 77, 64]
    x0 = M.encode_pixels(data.train) * M.LATENT_SCALE                                # model space (process_latent_in)
    abar = (1.0 / (1.0 + model.model_sampling.sigmas.double() ** 2)).float()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(settings["threads"]))
    try:
        ema, record = _train(model.diffusion_model, x0, data.train_labels, contexts, empty, abar, settings, log)
    finally:
        torch.set_num_threads(previous_threads)
    model.diffusion_model.load_state_dict(ema.state_dict())
    record["unet_params"] = sum(p.numel() for p in model.diffusion_model.parameters())
    M.save_teacher(path, model, clip, {"settings": settings, "train": record, "key": cache_key(settings)})
    log(f"efficacy teacher: {settings['steps']} steps in {record['wall_s']:.0f}s wall, {record['cpu_s']:.0f}s CPU; "
        f"saved {path}")
    return record


def _train(net, x0, labels, contexts, empty, abar, s: dict, log):
    generator = torch.Generator().manual_seed(s["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net.train().requires_grad_(True)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=0.0)
        t0, c0 = time.time(), time.process_time()
        curve, running = [], 0.0
        for step in range(s["steps"]):
            # learning rate: linear warmup, then cosine decay to 10%
            progress = max(0.0, (step - s["warmup"]) / max(1, s["steps"] - s["warmup"]))
            lr = s["lr"] * min(1.0, (step + 1) / s["warmup"]) * (0.55 + 0.45 * math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, x0.shape[0], (s["batch"],), generator=generator)
            t = torch.randint(0, abar.numel(), (s["batch"],), generator=generator)
            eps = torch.randn((s["batch"], *x0.shape[1:]), generator=generator)
            drop = torch.rand((s["batch"],), generator=generator) < s["cond_drop"]
            context = torch.where(drop[:, None, None], empty, contexts[labels[idx]])
            a = abar[t].reshape(-1, 1, 1, 1)
            x_t = a.sqrt() * x0[idx] + (1 - a).sqrt() * eps
            loss = torch.nn.functional.mse_loss(net(x_t, t.float(), context=context), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            with torch.no_grad():      # EMA, warmed up (decay 0 for the first tenth: the EMA starts from trained weights)
                decay = s["ema_decay"] if step >= s["steps"] // 10 else 0.0
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            running += float(loss.detach())
            if (step + 1) % 100 == 0:
                curve.append(running / 100)
                running = 0.0
                log(f"  teacher step {step + 1}/{s['steps']}: loss {curve[-1]:.4f} "
                    f"({time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU)")
    net.eval().requires_grad_(False)
    return ema, {"loss_per_100_steps": curve, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
