"""TCD Distill LoRA on flow transformers inside a real ComfyUI 0.3.75 (in-process): the tiny SD3-class MMDiT
(ModelSamplingDiscreteFlow, shift 3, CFG teacher) and the tiny FLUX.1-dev-class transformer (ModelSamplingFlux,
guidance embedding: embedded guidance), both built from ComfyUI's own classes (scripts/make_tiny_flow.py), with
random CONDITIONING and random 16-channel latents.

* a short run trains: finite losses, the LoRA changes the model's output, teacher mode is the base model exactly;
* exact resume (stop at N/2, resume to N = one run of N steps) and Cancel keeping a resumable checkpoint;
* the saved file is applied in full by the pack's loader and by core's loader, each patched weight equal to
  base + alpha / rank * up @ down;
* FLUX.1-dev receives the drawn w as its guidance input in every pass; a negative is refused with a clear error;
* the trained layers are exactly the ComfyUI ldm layers whose diffusers parts (ComfyUI's own mmdit_to_diffusers /
  flux_to_diffusers tables, read here directly) are all tcd.lora_targets.is_flow_lora_target.
"""
import importlib
import json
import math

import pytest
import torch

import make_tiny_flow as mtf
from support.comfy_folders import loras_folder, output_folder
from tcd.lora_targets import is_flow_lora_target

KINDS = ("sd3", "flux")
LATENT = (16, 8, 8)            # 64 px images through the 16-channel VAEs: 4 x 4 patches of 2 x 2
# Trained layers per model, counted from the architectures (tcd/lora_targets.py: DiT attention + MLP linears):
# tiny SD3 (depth 2, attn2 in block 0): block 0 x_block attn.qkv/proj, attn2.qkv/proj, mlp.fc1/fc2 (6) + context
# attn.qkv/proj, mlp.fc1/fc2 (4); block 1 x_block 4 + the last, pre-only context block's attn.qkv (1) = 15.
# tiny Flux (2 double + 2 single blocks): {img,txt}_attn.{qkv,proj} + {img,txt}_mlp.{0,2} = 8 per double block,
# linear1 + linear2 per single block: 2 * 8 + 2 * 2 = 20.
TRAINED_LAYERS = {"sd3": 15, "flux": 20}
MODULATION_OR_EDGE = ("adaLN_modulation", "_mod.", "modulation.", "embedder", "final_layer", "img_in", "txt_in",
                      "time_in", "vector_in", "guidance_in")
# Flux-dev guidance values (w is the model's guidance input, FluxGuidance's 2-5); SD3: CFG scales w = cfg - 1.
W_RANGE = {"sd3": (3.0, 6.0), "flux": (2.0, 5.0)}
BASE = dict(steps=4, batch_size=2, learning_rate=1e-3, rank=4, alpha=4.0, original_steps=50, tcf_order=1,
            ema_decay=0.9, loss="l2", seed=0, save_every=0, resume=False)


@pytest.fixture(scope="module")
def env(pack, tiny_flow_models, tmp_path_factory):
    """Both tiny models, 3 random prompts and latents each, the 16-channel TAESD, private output + loras folders."""
    import comfy.sd
    import comfy.utils
    import nodes
    models = {}
    with torch.inference_mode():                   # as the executor runs every prompt
        for kind in KINDS:
            g = torch.Generator().manual_seed(7)
            models[kind] = {
                "model": mtf.tiny_model_patcher(kind),
                "conds": [mtf.conditioning(kind, seed=10 + i) for i in range(3)],
                "uncond": mtf.conditioning(kind, seed=99, tokens=4),
                "latents": [{"samples": torch.randn(1, *LATENT, generator=g)} for _ in range(3)],
            }
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_flow_models["vae"])))
    with output_folder(tmp_path_factory.mktemp("flow_train_out")) as out_dir, \
            loras_folder(tmp_path_factory.mktemp("flow_train_loras"), first=True) as lora_dir:
        yield {"models": models, "vae": vae, "out": out_dir, "loras": lora_dir,
               "node": nodes.NODE_CLASS_MAPPINGS["TCD_DistillLoRA"](),
               "loop": importlib.import_module(pack.__name__ + ".train.comfy_loop"),
               "dataset": importlib.import_module(pack.__name__ + ".train.dataset"),
               "backend": importlib.import_module(pack.__name__ + ".tcd.backend")}


def run_node(env, kind, name, model=None, negative="default", **overrides):
    """Call the node as the executor does: every input a list (INPUT_IS_LIST), under inference_mode. The SD3
    (CFG) teacher gets a negative by default, Flux-dev (embedded guidance) none."""
    m = env["models"][kind]
    w_min, w_max = W_RANGE[kind]
    settings = dict(BASE, w_min=w_min, w_max=w_max, lora_name=name)
    settings.update(overrides)
    required = ["steps", "batch_size", "learning_rate", "rank", "alpha", "w_min", "w_max", "original_steps",
                "tcf_order", "ema_decay", "loss", "seed", "lora_name", "save_every", "resume"]
    args = [[model or m["model"]]] + [[settings.pop(k)] for k in required]
    optional = {k: [v] for k, v in settings.items()}
    optional.setdefault("save_dtype", ["fp32"])
    if negative == "default":
        negative = [m["uncond"]] if kind == "sd3" else None
    with torch.inference_mode():
        return env["node"].train(*args, latents=m["latents"], conditioning=m["conds"], negative=negative, **optional)


def read_lora(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def sample(patcher, cond, seed=0):
    """Two Euler steps through ComfyUI's sampling: the model's output on a fixed latent."""
    import comfy.sample
    latent = torch.zeros(1, *LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, 2, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True)


def expected_targets(patcher, kind):
    """ldm layers whose every part is a flow LoRA target, straight from ComfyUI's own tables. A part is a slice of
    a fused weight (qkv, Flux's linear1) or, for an unfused weight, the whole weight; newer tables give some parts
    more than one diffusers name (aliases for other trainers' layouts), and a part is a target when one of its names
    is. Returns (targets, ldm layer -> its parts' names)."""
    import comfy.utils
    base = patcher.model
    table = (comfy.utils.mmdit_to_diffusers if kind == "sd3" else comfy.utils.flux_to_diffusers)(
        base.model_config.unet_config)
    sd = base.diffusion_model.state_dict()
    regions = {}
    for diffusers_key, target in table.items():
        ldm_key = target if isinstance(target, str) else target[0]
        if diffusers_key.endswith(".weight") and ldm_key in sd and sd[ldm_key].ndim >= 2:
            region = "whole" if isinstance(target, str) or target[1] is None else tuple(target[1])
            names = regions.setdefault(ldm_key[:-len(".weight")], {}).setdefault(region, [])
            names.append(diffusers_key[:-len(".weight")])
    parts = {ldm: ({r: n for r, n in rs.items() if r != "whole"} or rs) for ldm, rs in regions.items()}
    targets = {ldm for ldm, rs in parts.items() if all(any(is_flow_lora_target(n) for n in names)
                                                         for names in rs.values())}
    return targets, parts


def make_run(env, kind, **overrides):
    """A DistillRun on the tiny model (what train_lora drives), set up and loaded; close() it afterwards."""
    loop, dataset = env["loop"], env["dataset"]
    m = env["models"][kind]
    w_min, w_max = W_RANGE[kind]
    cfg = loop.DistillConfig(**{k: v for k, v in dict(BASE, w_min=w_min, w_max=w_max, save_dtype="fp32",
                                                      **overrides).items() if k != "resume"})
    with torch.inference_mode():
        data = dataset.from_latents_and_conditioning(m["latents"], m["conds"], m["uncond"] if kind == "sd3" else None)
    run = loop.DistillRun(m["model"], data, cfg, env["out"] / "tcd_train" / f"direct_{kind}.state.pt",
                          env["backend"].torch_device(), None, None)
    run.start(False)
    return run


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("kind", KINDS)
def test_trained_layers_are_the_flow_targets_of_comfyuis_table(env, kind):
    patcher = env["models"][kind]["model"]
    expected, parts = expected_targets(patcher, kind)
    trained = env["loop"].lora_target_names(patcher)
    print(f"{kind}: {len(trained)} trained of {len(parts)} ldm layers in ComfyUI's table:", sorted(trained))
    assert trained == expected
    assert len(trained) == TRAINED_LAYERS[kind]
    assert not [n for n in trained if any(p in n for p in MODULATION_OR_EDGE)]
    fused = [n for n in trained if len(parts[n]) > 1]       # qkv (3 parts) and Flux's linear1 (q, k, v, proj_mlp)
    assert fused and all(len(parts[n]) in (3, 4) for n in fused)
    # every modulation layer of the model is in the table and left out
    modulation = {n for n in parts if "adaLN_modulation" in n or "mod.lin" in n or "modulation.lin" in n}
    assert modulation and not modulation & trained


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_is_the_base_model_exactly_and_the_student_is_not(env, kind):
    """Teacher mode bypasses every LoRA wrapper: bitwise the base model's apply_model, even with a non-zero LoRA."""
    m = env["models"][kind]
    run = make_run(env, kind)
    try:
        assert len(run.loras) == TRAINED_LAYERS[kind]
        with torch.no_grad():
            for w in run.loras.values():                        # a LoRA that changes every trained layer
                w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
                w.down.copy_(torch.randn(w.down.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
            _, x0, cond, _ = run.batches.draw(2, torch.Generator().manual_seed(3))
            sigma = torch.tensor([0.9, 0.4])
            x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
            w = torch.tensor([2.5, 4.0]) if kind == "flux" else None
            teacher = run.teacher(x, sigma, cond, w)
            student = run.student(x, sigma, cond, w)
        trained_model = m["model"]
    finally:
        run.close()
    # the reference: ComfyUI's apply_model on the untouched shared model (wrappers gone after close)
    base_cond = dict(cond) if w is None else env["backend"].with_guidance(cond, w)
    with torch.no_grad():
        base = trained_model.model.apply_model(x, sigma, **base_cond)
    assert torch.equal(teacher, base)
    assert float((student - base).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_short_run_trains_saves_and_changes_the_model(env, kind):
    m = env["models"][kind]
    model, listed, curve, images = run_node(env, kind, f"short_{kind}", validation_every=2, validation_draws=1,
                                            vae=env["vae"], validation_steps=2)
    sd, meta = read_lora(env["loras"] / listed)
    losses = json.loads(meta["tcd.losses"])
    print(f"{kind}: losses {losses}, validation {meta['tcd.validation_losses']}")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.layers"] == str(TRAINED_LAYERS[kind])
    assert json.loads(meta["tcd.config"])["w_max"] == W_RANGE[kind][1]
    assert all(k.startswith("diffusion_model.") for k in sd) and len(sd) == 3 * TRAINED_LAYERS[kind]
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(float(u.abs().max()) > 0 for u in ups)          # every layer moved away from its zero start
    cond = m["conds"][0]
    diff = float((sample(model, cond) - sample(m["model"], cond)).abs().max())
    print(f"{kind}: max |trained - base| of a 2-step Euler sample: {diff:.3g}")
    assert diff > 1e-4
    # validation images with the pack's TCD sampler on the flow schedule, decoded by the 16-channel VAE
    assert images.shape == (3, 64, 64, 3) and torch.isfinite(images).all()      # steps 0, 2, 4
    assert curve.shape[-1] == 3


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("kind", KINDS)
def test_stop_then_resume_equals_one_run(env, kind):
    run_node(env, kind, f"one_{kind}", steps=4)
    run_node(env, kind, f"two_{kind}", steps=2)
    run_node(env, kind, f"two_{kind}", steps=4, resume=True)
    one, one_meta = read_lora(env["loras"] / f"one_{kind}.safetensors")
    two, two_meta = read_lora(env["loras"] / f"two_{kind}.safetensors")
    assert set(one) == set(two)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"{kind}: resumed vs one run: max |dLoRA| = {worst}")
    assert worst == 0.0
    assert json.loads(two_meta["tcd.losses"]) == json.loads(one_meta["tcd.losses"])


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_keeps_a_checkpoint_that_resumes_exactly(env, kind):
    """Cancel through ComfyUI's interrupt flag at step 2 of 5 (or the first progress report after it), as in
    test_train_inproc.py, then resume to the end: the same LoRA as an uninterrupted run."""
    import comfy.model_management as mm
    import comfy.utils
    settings = dict(steps=5, save_every=2)
    run_node(env, kind, f"ref_{kind}", **settings)
    ref, _ = read_lora(env["loras"] / f"ref_{kind}.safetensors")
    cancelled_at = []

    def cancel_at_2(value, total, preview=None, node_id=None):
        if value >= 2 and not cancelled_at:
            cancelled_at.append(value)
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(cancel_at_2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(env, kind, f"cut_{kind}", **settings)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    state = torch.load(env["out"] / "tcd_train" / f"cut_{kind}.state.pt", weights_only=True)
    assert cancelled_at and 2 <= cancelled_at[0] < 5 and state["step"] == cancelled_at[0]
    assert state["config"]["guidance"] == ("embedded" if kind == "flux" else "cfg")
    run_node(env, kind, f"cut_{kind}", **dict(settings, resume=True))
    cut, _ = read_lora(env["loras"] / f"cut_{kind}.safetensors")
    assert set(cut) == set(ref) and max(float((cut[k] - ref[k]).abs().max()) for k in ref) == 0.0
    # the shift is part of the settings a checkpoint must share: another shift is refused, not mixed in
    import comfy_extras.nodes_model_advanced as adv
    with torch.inference_mode():
        shifted = adv.ModelSamplingSD3().patch(env["models"]["sd3"]["model"], 2.0)[0] if kind == "sd3" else \
            adv.ModelSamplingFlux().patch(env["models"]["flux"]["model"], 1.0, 0.6, 64, 64)[0]
    with pytest.raises(ValueError, match="path"):
        run_node(env, kind, f"cut_{kind}", model=shifted, **dict(settings, steps=6, resume=True))


# ------------------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("kind", KINDS)
def test_saved_lora_is_applied_in_full_by_the_packs_and_cores_loader(env, kind):
    import comfy.lora
    import nodes
    m = env["models"][kind]
    name = f"load_{kind}.safetensors"
    run_node(env, kind, name[:-len(".safetensors")], steps=2)
    sd, _ = read_lora(env["loras"] / name)
    layers = sorted({k[len("diffusion_model."):].rsplit(".", 2)[0] for k in sd if k.endswith("lora_up.weight")})
    assert len(layers) == TRAINED_LAYERS[kind]
    with torch.inference_mode():
        core = nodes.LoraLoaderModelOnly().load_lora_model_only(m["model"], name, 0.8)[0]
        pack, _, info, _ = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]().load_lora(m["model"], name, 0.8)
    print(f"{kind}: trained {len(layers)}, core patched {len(core.patches)}, pack patched {len(pack.patches)}")
    print(info)
    assert len(core.patches) == len(pack.patches) == len(layers)
    assert f"{len(layers)}/{len(layers)}" in info
    assert "family: TCD (SD3 / SD3.5 / FLUX.1, trained with this pack)" in info      # the flow preset, not SD's
    base_sd = m["model"].model.state_dict()
    for layer in layers:
        key = f"diffusion_model.{layer}.weight"
        up, down = sd[f"diffusion_model.{layer}.lora_up.weight"], sd[f"diffusion_model.{layer}.lora_down.weight"]
        alpha = float(sd[f"diffusion_model.{layer}.alpha"])
        expected = base_sd[key].float() + 0.8 * (alpha / down.shape[0]) * (up.float() @ down.float())
        for patched in (core, pack):
            got = comfy.lora.calculate_weight(patched.patches[key], base_sd[key].float().clone(), key)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (kind, layer)


# ------------------------------------------------------------------------------------------------ guidance
def test_flux_dev_receives_the_drawn_w_as_its_guidance_in_every_pass(env):
    """One training step on Flux-dev: teacher, target and student passes each give the model the step's drawn w
    (objective.last_stats["w"], in [w_min, w_max]) as `guidance`; SD3 (CFG) runs its teacher twice instead."""
    seen = {}
    for kind in KINDS:
        run = make_run(env, kind)
        calls = []

        def record(_module, args, kwargs):
            calls.append(kwargs.get("guidance"))
        net = env["backend"].diffusion_model_of(run.patcher)
        handle = net.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with env["backend"].training_mode():        # as train_lora runs every step (newer hosts' rope op)
                run.step()
        finally:
            handle.remove()
            run.close()
        seen[kind] = (calls, run.objective.last_stats["w"])
    calls, w = seen["flux"]
    w_min, w_max = W_RANGE["flux"]
    print("flux: drawn w", w.tolist(), "guidance per pass", [c.tolist() for c in calls])
    assert len(calls) == 3                                    # teacher, target, student (first-order TCF)
    assert bool(((w >= w_min) & (w <= w_max)).all()) and not torch.allclose(w, torch.full_like(w, 3.5))
    for guidance in calls:
        assert torch.equal(guidance.cpu().float(), w.float())
    sd3_calls, _ = seen["sd3"]
    assert len(sd3_calls) == 4 and all(c is None for c in sd3_calls)   # teacher cond + uncond, target, student


def test_negative_with_a_guidance_distilled_model_is_refused(env):
    m = env["models"]["flux"]
    with pytest.raises(ValueError, match="negative.*guidance scale as an input.*Disconnect the negative"):
        run_node(env, "flux", "refused", negative=[m["uncond"]])
    assert not list(env["loras"].glob("refused*"))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_unsupported_flow_inputs_give_clear_errors(env):
    import comfy_extras.nodes_model_advanced as adv
    m = env["models"]["sd3"]
    with torch.inference_mode():
        cosmos = adv.ModelSamplingContinuousEDM().patch(m["model"], "cosmos_rflow", 80.0, 0.002)[0]
    with pytest.raises(ValueError, match="ModelSamplingDiscreteFlow or Flux's ModelSamplingFlux"):
        run_node(env, "sd3", "bad_sampling", model=cosmos)
    odd = [{"samples": torch.randn(1, 16, 9, 8)}]
    with pytest.raises(ValueError, match=r"9x8.*multiples of 2.*multiples of 16"):
        with torch.inference_mode():
            env["node"].train([m["model"]], *[[v] for v in (1, 1, 1e-3, 4, 4.0, 3.0, 6.0, 50, 1, 0.9, "l2", 0,
                                                            "bad_size", 0, False)],
                              latents=odd, conditioning=[m["conds"][0]])


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_lora(env, kind):
    """Recomputing the DiT blocks in the backward pass changes memory, not numbers (Flux's blocks add to their
    inputs in place: recomputation from a changed input would give other gradients)."""
    run_node(env, kind, f"plain_{kind}", steps=2)
    run_node(env, kind, f"ckpt_{kind}", steps=2, gradient_checkpointing=True)
    plain, _ = read_lora(env["loras"] / f"plain_{kind}.safetensors")
    ckpt, _ = read_lora(env["loras"] / f"ckpt_{kind}.safetensors")
    worst = max(float((plain[k] - ckpt[k]).abs().max()) for k in plain)
    print(f"{kind}: checkpointed vs plain: max |dLoRA| = {worst}")
    assert worst <= 1e-6


def test_cfg_sized_w_range_on_flux_dev_is_warned_about(env, caplog):
    """The node's defaults (3-15) are CFG scales for UNets; on FLUX.1-dev w is the guidance value itself."""
    import logging
    with caplog.at_level(logging.WARNING):
        run_node(env, "flux", "w15", steps=1, batch_size=1, w_min=3.0, w_max=15.0)
    assert any("w_max=15" in r.getMessage() and "2-5" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_node(env, "flux", "w5", steps=1, batch_size=1)
    assert not any("w_max=" in r.getMessage() for r in caplog.records)
