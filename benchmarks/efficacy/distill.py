"""Distil with the product: the TCD Distill LoRA node's function, called as the executor calls it.

The node declares INPUT_IS_LIST, so the executor hands it every input as a list: widgets as one-element lists, the
training data as the lists Load Training Dataset outputs (one LATENT and one CONDITIONING per image). `run_node`
does the same under torch.inference_mode (the executor runs every prompt in it), with the objective settings as one
dict and the budget as another, so a new objective input of the node is one more dict entry.
"""
from __future__ import annotations

import time

import torch


def objective_settings(objective: str, teacher_cfg: float, recipe: str = "recommended") -> dict:
    """The objective inputs of the node's defaults (50-step skipping grid, EMA target 0.95, recipe "recommended":
    rho 0.5, pseudo-Huber distance, first-order TCF; tcd/losses.py RECIPES) with the guidance fixed at the teacher's
    CFG: the student, sampled at cfg 1, is to reproduce the teacher sampled at that CFG (w = cfg - 1 in the
    objective's x_c + w (x_c - x_u)).

    `recipe` is passed explicitly: a call without it means "custom" (graphs saved before the input existed), which
    with these tcf_order / loss and the rho input's default 0 would train the paper's recipe instead. tcf_order and
    loss are required inputs of the node, so they are given too (the recipe's own values); rho is the shipped
    workflow's widget value, unused unless recipe is "custom"."""
    from tcd.losses import RECIPES
    w = float(teacher_cfg) - 1.0
    chosen = RECIPES.get(recipe, RECIPES["paper"])
    return dict(objective=objective, w_min=w, w_max=w, original_steps=50, tcf_order=chosen["tcf_order"],
                ema_decay=0.95, loss=chosen["loss"], recipe=recipe, rho=chosen["rho"])


def run_node(teacher, latents: list, conditionings: list, negative, objective: dict, budget: dict,
             lora_name: str) -> dict:
    """Train a LoRA with the TCD Distill LoRA node; returns its outputs, the LoRA's name and the time it took."""
    import nodes
    inputs = dict(budget, **objective, lora_name=lora_name, save_every=0, resume=False)
    kwargs = {k: [v] for k, v in inputs.items()}
    t0, c0 = time.time(), time.process_time()
    with torch.inference_mode():
        model, listed, curve, images = nodes.NODE_CLASS_MAPPINGS["TCD_DistillLoRA"]().train(
            model=[teacher], latents=latents, conditioning=conditionings, negative=[negative], **kwargs)
    return {"model": model, "lora_name": listed, "loss_curve": curve, "validation_images": images,
            "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "inputs": inputs}
