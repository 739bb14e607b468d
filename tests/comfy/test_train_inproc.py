"""TCD Distill LoRA inside a real ComfyUI 0.3.75 (in-process) on the tiny SD1.5 checkpoint: the loss on fixed
draws falls, the saved LoRA loads with every layer in core LoraLoader (and the pack's loader), Cancel + resume
equals an uninterrupted run, bad inputs give clear errors."""
import importlib
import json
import math

import pytest
import torch

from support.comfy_folders import loras_folder, output_folder

PROMPTS = ["a red cat", "a blue dog", "a green tree", "a white house"]
# Tiny but real: 8x8 latents, rank 4, batch 1; lr high enough that 30 steps move the LoRA visibly. The guidance
# scale is fixed (w_min = w_max): with w drawn from [3, 15] the student, which does not see w, keeps an
# irreducible loss from w's spread that hides 30 steps of progress on a fixed set of draws (measured: flat
# 0.68 -> 0.66, vs 0.233 -> 0.208 -> 0.185 -> 0.172 with w = 7.5).
BASE_SETTINGS = dict(steps=30, batch_size=1, learning_rate=1e-3, rank=4, alpha=4.0, w_min=7.5, w_max=7.5,
                     original_steps=50, tcf_order=1, ema_decay=0.95, loss="l2", seed=0, save_every=0, resume=False)


@pytest.fixture(scope="module")
def env(pack, tiny_ckpt, tmp_path_factory):
    """The tiny model, prompts, random 8x8 latents, and private output + loras folders (first in the list, so the
    trainer writes there and not into the host's models/loras)."""
    import comfy.sd
    import nodes
    with torch.inference_mode():                         # as the executor runs every prompt
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))[:3]
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in PROMPTS]
        uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        g = torch.Generator().manual_seed(0)
        latents = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in PROMPTS]
    with output_folder(tmp_path_factory.mktemp("train_out")) as out_dir, \
            loras_folder(tmp_path_factory.mktemp("train_loras"), first=True) as lora_dir:
        yield {"model": model, "clip": clip, "vae": vae, "conds": conds, "uncond": uncond, "latents": latents,
               "out": out_dir, "loras": lora_dir, "node": nodes.NODE_CLASS_MAPPINGS["TCD_DistillLoRA"](),
               "loop": importlib.import_module(pack.__name__ + ".train.comfy_loop"),
               "backend": importlib.import_module(pack.__name__ + ".tcd.backend")}


def run_node(env, name, latents=None, conds=None, negative="default", **overrides):
    """Call the node as the executor does: every input a list (INPUT_IS_LIST), under inference_mode."""
    settings = dict(BASE_SETTINGS, lora_name=name, **overrides)
    required = ["steps", "batch_size", "learning_rate", "rank", "alpha", "w_min", "w_max", "original_steps",
                "tcf_order", "ema_decay", "loss", "seed", "lora_name", "save_every", "resume"]
    args = [[env["model"]]] + [[settings.pop(k)] for k in required]
    optional = {k: [v] for k, v in settings.items()}
    optional.setdefault("save_dtype", ["fp32"])
    neg = [env["uncond"]] if negative == "default" else negative
    with torch.inference_mode():
        return env["node"].train(*args, latents=env["latents"] if latents is None else latents,
                                 conditioning=env["conds"] if conds is None else conds, negative=neg, **optional)


def read_lora(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def ksample(model, cond, seed=1):
    import comfy.sample
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 4, 1.0, "tcd", "tcd", cond, cond, latent, seed=seed, disable_pbar=True)


@pytest.fixture(scope="module")
def trained(env):
    model, name, curve, images = run_node(env, "inproc_tcd", validation_every=10, validation_draws=2)
    return {"model": model, "name": name, "curve": curve, "images": images}


def test_loss_on_fixed_draws_falls_over_30_steps(env, trained):
    sd, meta = read_lora(env["loras"] / trained["name"])
    losses = json.loads(meta["tcd.losses"])
    validation = json.loads(meta["tcd.validation_losses"])
    print("per-step loss:", [round(v, 4) for v in losses])
    print("loss on the fixed validation draws [step, loss]:", validation)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert [s for s, _ in validation] == [0, 10, 20, 30]
    assert validation[-1][1] < validation[0][1]       # fixed draws: no sampling noise, any fall is training
    assert trained["curve"].shape == (1, 320, 512, 3)
    assert trained["images"].shape == (1, 64, 64, 3)          # no VAE connected: the grey placeholder
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.steps"] == "30"


def test_saved_lora_is_canonical_and_core_loraloader_applies_every_layer(env, trained):
    import nodes
    sd, _ = read_lora(env["loras"] / trained["name"])
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert all(b.startswith("lora_unet_") for b in bases)
    assert any("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in b for b in bases)
    assert len(bases) == 50                        # every >= 2-D UNet weight but conv_in/out and time embedding
    assert len(sd) == 3 * len(bases)
    lora_model, _ = nodes.LoraLoader().load_lora(env["model"], env["clip"], trained["name"], 1.0, 0.0)
    assert len(lora_model.patches) == len(bases)   # every layer of the file applied by core's loader
    cond = env["conds"][0]
    base_out, core_out, node_out = ksample(env["model"], cond), ksample(lora_model, cond), ksample(trained["model"],
                                                                                                    cond)
    print("max |LoRA - base| of a 4-step TCD sample:", float((core_out - base_out).abs().max()))
    assert float((core_out - base_out).abs().max()) > 1e-3
    assert torch.allclose(node_out, core_out, atol=1e-5)       # the node's MODEL output is the saved LoRA
    if "TCD_LoraLoader" in nodes.NODE_CLASS_MAPPINGS:
        m, _, info, _ = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]().load_lora(env["model"], trained["name"], 1.0)
        print(info)
        assert len(m.patches) == len(bases)
        assert torch.allclose(ksample(m, cond), core_out, atol=1e-5)


def test_cancel_then_resume_equals_uninterrupted_run(env):
    """Cancel through ComfyUI's own interrupt flag (what /interrupt sets) at step 3 of 7 or the first progress
    report after it (newer hosts throttle ProgressBar hooks to one per 100 ms, so not every step reaches the hook),
    then resume."""
    import comfy.model_management as mm
    import comfy.utils
    settings = dict(steps=7, save_every=2, ema_decay=0.9)
    run_node(env, "ref", **settings)
    ref, ref_meta = read_lora(env["loras"] / "ref.safetensors")

    cancelled_at = []

    def cancel_at_3(value, total, preview=None, node_id=None):
        if value >= 3 and not cancelled_at:
            cancelled_at.append(value)
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(cancel_at_3)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(env, "cut", **settings)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    state = torch.load(env["out"] / "tcd_train" / "cut.state.pt", weights_only=True)
    assert cancelled_at and 3 <= cancelled_at[0] < 7
    assert state["step"] == cancelled_at[0] and len(state["losses"]) == cancelled_at[0]

    run_node(env, "cut", **dict(settings, resume=True))
    cut, cut_meta = read_lora(env["loras"] / "cut.safetensors")
    assert json.loads(cut_meta["tcd.losses"]) == json.loads(ref_meta["tcd.losses"])
    worst = max(float((cut[k] - ref[k]).abs().max()) for k in ref)
    print("resumed vs uninterrupted: max |dLoRA| =", worst, "losses identical:", json.loads(cut_meta["tcd.losses"]))
    assert set(cut) == set(ref) and worst <= 1e-6
    # a changed setting is refused with the list of differences instead of silently mixing two runs
    with pytest.raises(ValueError, match="learning_rate"):
        run_node(env, "cut", **dict(settings, resume=True, steps=9, learning_rate=2e-3))


def test_bad_inputs_give_clear_errors(env, tmp_path):
    from PIL import Image
    with pytest.raises(ValueError, match="4 latent samples but 3 conditionings"):
        run_node(env, "bad", conds=env["conds"][:3])
    with pytest.raises(ValueError, match="steps=0"):
        run_node(env, "bad", steps=0)
    with pytest.raises(ValueError, match="no training latents"):
        run_node(env, "bad", latents=[], conds=[])
    folder_args = dict(latents=[], conds=[], vae=env["vae"], clip=env["clip"], resolution=64)
    with pytest.raises(ValueError, match="does not exist"):
        run_node(env, "bad", image_folder=str(tmp_path / "missing"), **folder_args)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        run_node(env, "bad", image_folder=str(empty), **folder_args)
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    with pytest.raises(ValueError, match=r"no caption file: \['a.png'\]"):
        run_node(env, "bad", image_folder=str(folder), **folder_args)
    (folder / "a.txt").write_text("a red square")
    (folder / "b.png").write_bytes(b"not a png at all")
    (folder / "b.txt").write_text("broken")
    with pytest.raises(ValueError, match="cannot read training image 'b.png'"):
        run_node(env, "bad", image_folder=str(folder), **folder_args)
    with pytest.raises(ValueError, match="outside the loras folders"):
        run_node(env, "../escape", steps=1)
    assert not list(env["loras"].glob("bad*")) and not list(env["loras"].glob("*.tmp"))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(env):
    """A far too high learning rate (1.0, the node's maximum) makes the model overflow after a few steps."""
    import re
    with pytest.raises(ValueError, match="became (nan|inf)") as err:
        run_node(env, "nan", learning_rate=1.0, steps=10, save_every=1)
    message = str(err.value)
    print(message)
    step = int(re.search(r"at step (\d+)", message).group(1))
    assert step >= 2 and "learning rate" in message
    state = torch.load(env["out"] / "tcd_train" / "nan.state.pt", weights_only=True)
    assert state["step"] == step - 1 and all(math.isfinite(v) for v in state["losses"])
    assert all(torch.isfinite(layer["up"]).all() for layer in state["lora"].values())
    # the shared model is left clean: it still samples as before
    assert torch.isfinite(ksample(env["model"], env["conds"][0])).all()


def test_image_folder_is_encoded_once_and_cached(env, tmp_path):
    from PIL import Image
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (80, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPTS[i])
    args = dict(latents=[], conds=[], negative=None, image_folder=str(folder), vae=env["vae"], clip=env["clip"],
                resolution=64, steps=2, validation_every=2, validation_draws=1, save_every=0)
    cache_dir = env["out"] / "tcd_train" / "cache"
    before = set(cache_dir.glob("*.safetensors"))
    _, name, _, images = run_node(env, "folder", **args)
    cache = set(cache_dir.glob("*.safetensors")) - before
    assert len(cache) == 2
    assert images.shape == (2, 64, 64, 3) and images.std() > 0    # before training + at the end, TCD sampler
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    run_node(env, "folder2", **args)
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps       # read back, not re-encoded
    assert set(cache_dir.glob("*.safetensors")) - before == cache


def test_gradient_checkpointing_gives_the_same_lora_and_variants_run(env):
    """Recomputing blocks in the backward pass changes memory, not numbers; the other options train too."""
    run_node(env, "v_plain", steps=2)
    run_node(env, "v_ckpt", steps=2, gradient_checkpointing=True)
    plain, plain_meta = read_lora(env["loras"] / "v_plain.safetensors")
    ckpt, ckpt_meta = read_lora(env["loras"] / "v_ckpt.safetensors")
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) <= 1e-6
    assert json.loads(plain_meta["tcd.losses"]) == pytest.approx(json.loads(ckpt_meta["tcd.losses"]), rel=1e-6)
    for name, variant in {"v_order2": dict(tcf_order=2), "v_lcm": dict(objective="lcm"),
                          "v_online": dict(ema_decay=0.0), "v_bf16": dict(training_dtype="bf16"),
                          "v_fp16file": dict(save_dtype="fp16")}.items():
        run_node(env, name, steps=1, **variant)
        sd, meta = read_lora(env["loras"] / f"{name}.safetensors")
        assert all(math.isfinite(v) for v in json.loads(meta["tcd.losses"])), name
        assert all(torch.isfinite(t).all() for t in sd.values()), name
    # one LATENT batch with one shared CONDITIONING, and no negative (teacher without guidance)
    batch = {"samples": torch.cat([x["samples"] for x in env["latents"]])}
    run_node(env, "v_batch", steps=1, latents=[batch], conds=[env["conds"][0]], negative=None)
    assert json.loads(read_lora(env["loras"] / "v_batch.safetensors")[1]["tcd.data"].split()[0]) == 4
    up_key = next(k for k in plain if k.endswith("lora_up.weight"))
    assert read_lora(env["loras"] / "v_fp16file.safetensors")[0][up_key].dtype == torch.float16
    assert read_lora(env["loras"] / "v_lcm.safetensors")[1]["tcd.family"] == "LCM LoRA"


@pytest.mark.parametrize("recipe", ["recommended", "paper", "custom"])
def test_recipe_input_sets_the_objective_and_the_file_records_it(env, recipe):
    """recipe = recommended / paper takes tcd.losses.RECIPES (whatever the custom widgets say); custom takes the
    widgets; graphs without the input keep their widgets' meaning (tested by every other run here)."""
    recipes = importlib.import_module(env["loop"].__name__.rsplit(".", 2)[0] + ".tcd.losses").RECIPES
    name = f"recipe_{recipe}"
    run_node(env, name, steps=2, recipe=recipe, rho=0.75, loss="l2", tcf_order=2)
    _, meta = read_lora(env["loras"] / f"{name}.safetensors")
    config = json.loads(meta["tcd.config"])
    expected = recipes[recipe] if recipe != "custom" else {"rho": 0.75, "loss": "l2", "tcf_order": 2}
    assert {k: config[k] for k in ("rho", "loss", "tcf_order")} == expected


# ------------------------------------------------------------------------------------------------ host hygiene
def test_training_leaves_the_servers_rng_and_the_shared_models_flags_as_they_were(env):
    """The model is shared with every other node of the graph and the global RNG with every other prompt: a run
    (here with validation and the largest seed the node accepts, whose derived seeds wrap modulo 2^64) must give
    both back unchanged."""
    base = env["model"].model                            # the BaseModel every clone of this patcher shares
    flags_before = [p.requires_grad for p in base.parameters()]
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    run_node(env, "inproc_hygiene", steps=2, seed=2 ** 64 - 1, validation_every=1, validation_draws=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [p.requires_grad for p in base.parameters()] == flags_before


def test_validation_passes_are_no_larger_than_training_passes(env):
    """Validation draws batches of the training size (more of them), so it needs no memory beyond training's."""
    net = env["backend"].diffusion_model_of(env["model"])
    seen = {"phase": "train", "train": 0, "validation": 0}
    def record(_module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        seen[seen["phase"]] = max(seen[seen["phase"]], x.shape[0])

    handle = net.register_forward_pre_hook(record, with_kwargs=True)
    try:
        # The first run's largest pass is its validation's (at step 0 and 1, 8 samples per draw before); the
        # second run has no validation.
        seen["phase"] = "validation"
        run_node(env, "inproc_valbatch_v", steps=1, batch_size=1, validation_every=1, validation_draws=1)
        seen["phase"] = "train"
        run_node(env, "inproc_valbatch_t", steps=1, batch_size=1, validation_every=0)
    finally:
        handle.remove()
    assert env["loop"].VALIDATION_MIN_SAMPLES > 1   # validation still averages several samples per draw
    assert 0 < seen["validation"] <= seen["train"], seen


def test_training_batches_leave_the_dataset_in_system_memory(env):
    """Only the drawn batch goes to the compute device; the dataset (latents and conditions) stays on the CPU.
    Checked with torch's meta device as the compute device: every stored tensor must still be a CPU tensor and
    every drawn one a meta tensor."""
    loop = env["loop"]
    from importlib import import_module
    dataset = import_module(env["loop"].__name__.rsplit(".", 1)[0] + ".dataset")
    data = dataset.from_latents_and_conditioning(env["latents"], env["conds"], env["uncond"])
    batches = loop.Batches(data, env["model"], torch.device("meta"))
    assert all(x.device.type == "cpu" for x in batches.x0)
    stored = [getattr(v, "cond", v) for item in batches.conds for v in item.values()]   # CONDRegular.cond
    stored = [t for t in stored if isinstance(t, torch.Tensor)]
    assert stored and all(t.device.type == "cpu" for t in stored)
    _, x0, cond, uncond = batches.draw(2, torch.Generator().manual_seed(0))
    assert x0.device.type == "meta" and x0.shape[0] == 2
    drawn = [v for v in list(cond.values()) + list(uncond.values()) if isinstance(v, torch.Tensor)]
    assert drawn and all(v.device.type == "meta" for v in drawn)
