"""train.accelerate_tcd on FLUX.1-dev (train.accelerate_flow): a tiny real FluxPipeline built from diffusers' own
classes (tests/support/tiny_diffusers.py: guidance embedding, dynamic shifting, CLIP pooled + T5), CPU, no download.

- bad input: a Flux transformer without a guidance embedding (schnell), a folder without T5, a resolution the 2x2
  packing does not divide -> a clear message; guidance defaults are guidance values (2..5), not CFG scales;
- the transformer is called exactly as FluxPipeline calls it: packed 2x2 tokens, img_ids / txt_ids, timestep =
  sigma (the pipeline's t / 1000), guidance a float32 [B] tensor;
- teacher, target and student all receive the objective's drawn guidance w (a forward hook on the transformer);
- a short run trains and saves exactly the is_flow_lora_target layers under `transformer.`, with validation images;
- 2 processes equal 1 process with the same global batch (to a same-run float-reduction reference);
- resuming from a checkpoint gives the uninterrupted run's LoRA exactly;
- FluxPipeline.load_lora_weights changes every targeted weight by exactly up @ down (alpha folded).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from support import tiny_diffusers as td
from tcd.lora_targets import is_flow_lora_target
from train import accelerate_flow as flow
from train import accelerate_tcd as cli

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The SD3 test's run (tests/unit/test_accelerate_flow.py): 4 optimizer steps of a global batch of 4, warmup and an
# EMA target (a resume that lost scheduler, optimizer or EMA state shows), alpha 8 at rank 4 (folded into B).
TRAIN = ["--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
         "--lora_rank", "4", "--lora_alpha", "8", "--dataloader_num_workers", "0", "--ema_decay", "0.5",
         "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--seed", "0", "--cpu"]
# 2 processes may differ from 1 only by float reduction order, measured in the same session against the 1-process
# run repeated with batch 1 x 4 accumulation (same samples and draws, another order); allowed: 10x that.
REDUCTION_NOISE_FACTOR = 10.0
LORA = "pytorch_lora_weights.safetensors"
LORA_EMA = "pytorch_lora_weights_ema.safetensors"


def args_for(model, data, out, *extra):
    return cli.parse_args(["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                           *extra])


def launch(argv, processes=1, timeout=300):
    if processes == 1:
        cmd = [sys.executable, "-m", "train.accelerate_tcd", *argv]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "train.accelerate_tcd", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses_of(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / cli.LOG_FILE).read_text().splitlines())}


def relative_delta_difference(a, b):
    def deltas(path):
        sd = load_file(str(path))
        return {k: sd[k.replace(".lora_A.", ".lora_B.")] @ sd[k] for k in sd if ".lora_A." in k}
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    num = sum((da[k] - db[k]).pow(2).sum() for k in da).sqrt()
    return float(num / sum(v.pow(2).sum() for v in da.values()).sqrt())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("flux_cli")


@pytest.fixture(scope="module")
def flux_folder(work):
    return td.make_pipeline_folder(work / "tiny_flux", "flux")


@pytest.fixture(scope="module")
def data(work):
    return td.make_caption_folder(work / "data", n=8, size=64)


def train_run(folder, data, out, *extra, processes=1):
    launch(["--pretrained_model", str(folder), "--train_data_dir", str(data), "--output_dir", str(out), *TRAIN,
            *extra], processes)
    return out


def load_flux(folder):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def one_process(flux_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return train_run(flux_folder, data, work / "one", "--train_batch_size", "2", "--gradient_accumulation_steps",
                     "2", "--validation_prompts", "a red square", "--validation_steps", "4",
                     "--validation_inference_steps", "2")


# ------------------------------------------------------------------------------------------------ bad input
def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_bad_flux_inputs_get_clear_messages(flux_folder, data, work):
    schnell = work / "schnell"
    shutil.copytree(flux_folder, schnell)
    _edit_json(schnell / "transformer" / "config.json", guidance_embeds=False)
    no_t5 = work / "no_t5"
    shutil.copytree(flux_folder, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")
    cases = [(schnell, [], "without a guidance embedding (guidance_embeds false: FLUX.1-schnell"),
             (no_t5, [], "is a FluxPipeline folder without text_encoder_2"),
             (flux_folder, ["--resolution", "72"], "--resolution 72 is not a multiple of 16"),
             (flux_folder, ["--w_min", "5", "--w_max", "2"], "w_min=5.0, w_max=2.0"),
             (flux_folder, ["--validation_guidance", "-1"], "--validation_guidance -1.0 must be >= 0")]
    for model, extra, fragment in cases:
        with pytest.raises(cli.ConfigError) as e:
            cli.validate_args(args_for(model, data, work / "out_bad", *extra))
        assert fragment in str(e.value), f"{model.name} {extra}: {e.value}"


def test_valid_flux_command_gives_an_embedded_guidance_plan(flux_folder, data, work):
    """Guidance values 2..5 by default (FluxPipeline's guidance_scale is 3.5), the path shifted by FluxPipeline's
    calculate_shift mu at (64 / 16)^2 = 16 packed tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    args = args_for(flux_folder, data, work / "ok", "--resolution", "64")
    plan = cli.validate_args(args)
    assert (plan.arch, plan.is_flow, plan.resolution) == ("flux", True, 64)
    assert (args.w_min, args.w_max) == (2.0, 5.0)
    objective = flow.make_objective(args, plan.flow_configs, 64, cli._make_objective)
    assert (objective.guidance, objective.prediction_type) == ("embedded", "flow")
    assert objective.path.name == f"flux mu {calculate_shift(16, 256, 4096, 0.5, 1.15):g}"
    given = args_for(flux_folder, data, work / "ok", "--w_min", "1", "--w_max", "4")
    cli.validate_args(given)
    assert (given.w_min, given.w_max) == (1.0, 4.0)


# ------------------------------------------------------------------------------------------------ model conventions
def test_transformer_is_called_as_the_flux_pipeline_calls_it(flux_folder):
    """The pipeline's own pack / ids / timestep / guidance (pipeline_flux.py __call__) give the CLI's velocity; one
    FlowMatchEuler step of the pipeline equals x + (sigma_next - sigma) v on the unpacked latents."""
    pipe = load_flux(flux_folder)
    cond, uncond = flow.FluxConditioner(pipe, "cpu")(["a red square"])
    assert uncond is None
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt("a red square", device="cpu")
    torch.testing.assert_close(cond["embeds"], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=1e-6, atol=1e-6)
    assert embeds.shape[1] == flow.FLUX_MAX_SEQUENCE_LENGTH and not text_ids.any()
    x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(x, 2, 16, 8, 6)
    assert torch.equal(flow.pack_latents(x), packed) and torch.equal(flow.unpack_latents(packed, 8, 6), x)
    assert torch.equal(flow.latent_image_ids(8, 6, "cpu", torch.float32),
                       pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    sched = pipe.scheduler
    sched.set_timesteps(4, mu=0.7)
    t = sched.timesteps[1]
    cond2 = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    w = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        guidance = torch.full([1], 3.5, dtype=torch.float32).expand(2)
        v_pipe = pipe.transformer(hidden_states=packed, timestep=t.expand(2) / 1000, guidance=guidance,
                                  pooled_projections=cond2["pooled"], encoder_hidden_states=cond2["embeds"],
                                  txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(2, 4, 3, "cpu",
                                                                                           torch.float32),
                                  return_dict=False)[0]
        sched._step_index = 1
        x_next = sched.step(v_pipe, t, packed).prev_sample
        v_cli = cli.call_model(pipe.transformer, flow.FluxTransformerCall(), x, sched.sigmas[1].expand(2), cond2, w)
        other = cli.call_model(pipe.transformer, flow.FluxTransformerCall(), x, sched.sigmas[1].expand(2), cond2,
                               torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(v_cli, flow.unpack_latents(v_pipe, 8, 6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x + (sched.sigmas[2] - sched.sigmas[1]) * v_cli, flow.unpack_latents(x_next, 8, 6),
                               rtol=1e-5, atol=1e-6)
    assert float((other - v_cli).abs().amax(dim=(1, 2, 3)).min()) > 1e-6      # w reaches the model, per row


def test_teacher_target_and_student_receive_the_drawn_guidance(flux_folder, data, work):
    """One micro-step of the CLI's objective with its three models (2nd-order TCF: 5 transformer passes): every
    pass gets guidance == objective.last_stats['w'], drawn per sample in [w_min, w_max]."""
    args = args_for(flux_folder, data, work / "hook", *TRAIN, "--tcf_order", "2", "--train_batch_size", "3")
    plan = cli.validate_args(args)
    run = cli.start_run(args, plan)
    cli.load_models(run)
    cli.attach_lora_and_optimizer(run)
    student, teacher, target = cli.tcd_models(run)
    seen = []
    handle = run.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"].detach().clone()),
                                                  with_kwargs=True)
    try:
        generators = [cli.sample_generator(0, p) for p in range(3)]
        pixels = torch.stack([cli.CaptionedImages(plan.items, 64, 0)[p]["pixels"] for p in range(3)])
        latents = cli.encode_latents(run, pixels, generators)
        cond, uncond = cli.make_conditioner(run.pipe, plan, "cpu")(["a red square", "green stripes", "a blue circle"])
        loss = run.objective(student, target, teacher, latents, cond, uncond, generator=generators)
    finally:
        handle.remove()
    w = run.objective.last_stats["w"]
    assert torch.isfinite(loss) and w.dtype == torch.float32 and w.shape == (3,)
    assert bool(((w >= 2.0) & (w <= 5.0)).all()) and len(set(w.tolist())) == 3
    assert len(seen) == 5                    # teacher 1 + target 2 + student 2 (midpoint TCF)
    for g in seen:
        assert torch.equal(g, w), (g, w)


# ------------------------------------------------------------------------------------------------ training runs
def test_flux_run_trains_and_saves_the_flow_targets(flux_folder, one_process):
    losses = losses_of(one_process)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    path = one_process / LORA
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.base_architecture"] == "flux"
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    trained = {k[len("transformer."):-len(".lora_A.weight")] for k in keys if ".lora_A." in k}
    transformer = load_flux(flux_folder).transformer
    expected = {n for n, m in transformer.named_modules()
                if isinstance(m, torch.nn.Linear) and is_flow_lora_target(n)}
    # 1 double block: q/k/v/out + add_q/k/v + to_add_out + ff (2) + ff_context (2) = 12; 1 single block: q/k/v,
    # proj_mlp, proj_out = 5
    assert trained == expected and len(trained) == 17
    sd = load_file(str(path))
    # Flux's double block keeps its text stream (single blocks follow), so every LoRA B left its zero init.
    assert all(float(sd[f"transformer.{n}.lora_B.weight"].abs().max()) > 0 for n in trained)
    state = json.loads((one_process / "checkpoint-4" / "training_state.json").read_text())
    assert (state["arch"], state["global_batch"]) == ("flux", 4)
    assert (one_process / "validation" / "step-000004-0.png").is_file()      # the pack's TCD sampler, guidance 3.5
    assert relative_delta_difference(path, one_process / LORA_EMA) > 0.05


def test_two_processes_match_one_process(flux_folder, data, work, one_process):
    two = train_run(flux_folder, data, work / "two", "--train_batch_size", "1", "--gradient_accumulation_steps",
                    "2", "--gradient_checkpointing", processes=2)
    l1, l2 = losses_of(one_process), losses_of(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-4 * abs(l1[step]), (step, l1[step], l2[step])
    rel = relative_delta_difference(one_process / LORA, two / LORA)
    rel_ema = relative_delta_difference(one_process / LORA_EMA, two / LORA_EMA)
    micro = train_run(flux_folder, data, work / "one_micro", "--train_batch_size", "1",
                      "--gradient_accumulation_steps", "4")
    noise = relative_delta_difference(one_process / LORA, micro / LORA)
    print(f"Flux 1 vs 2 processes: losses {l1} vs {l2}; relative LoRA delta difference {rel:.2e} (EMA "
          f"{rel_ema:.2e}); reduction-order reference (1 process, batch 2x2 vs 1x4) {noise:.2e}")
    assert 0 < noise < 0.1
    assert rel <= REDUCTION_NOISE_FACTOR * noise and rel_ema <= REDUCTION_NOISE_FACTOR * noise


def test_resume_reaches_the_uninterrupted_lora_exactly(flux_folder, data, work, one_process):
    resumed = work / "resumed"
    resumed.mkdir()
    shutil.copytree(one_process / "checkpoint-2", resumed / "checkpoint-2")
    train_run(flux_folder, data, resumed, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--resume_from_checkpoint", "latest")
    for name in (LORA, LORA_EMA):
        a, b = load_file(str(one_process / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"Flux resume {name}: max abs difference {worst:.3g}")
        assert all(torch.equal(a[k], b[k]) for k in a), worst
    full, tail = losses_of(one_process), losses_of(resumed)
    assert tail == {3: full[3], 4: full[4]}


def test_diffusers_load_lora_weights_adds_up_at_down_on_every_layer(flux_folder, one_process):
    """FluxPipeline.load_lora_weights + fuse_lora changes each targeted weight by exactly B @ A of the file (scale 1:
    alpha / rank is folded into B) and no other weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    lora = load_file(str(one_process / LORA))
    n_layers = sum(".lora_A." in k for k in lora)
    pipe = load_flux(flux_folder)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(one_process), weight_name=LORA)
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules()) == n_layers
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    assert fused.keys() == base.keys()
    visible = set()
    for key in (k for k in lora if ".lora_A." in k):
        w = f"{key[len('transformer.'):-len('.lora_A.weight')]}.weight"
        expected = lora[key.replace(".lora_A.", ".lora_B.")] @ lora[key]
        atol = 4 * torch.finfo(torch.float32).eps * float(base[w].abs().max())
        torch.testing.assert_close(fused[w] - base[w], expected, rtol=1e-4, atol=atol, msg=lambda m: f"{w}: {m}")
        if float(expected.abs().max()) > 10 * atol:
            visible.add(w)
    changed = {f"{k[len('transformer.'):-len('.lora_A.weight')]}.weight" for k in lora if ".lora_A." in k}
    others = [k for k in base if k not in changed and not torch.equal(base[k], fused[k])]
    assert not others, others[:5]
    assert len(visible) == n_layers == 17
    print(f"diffusers Flux: {len(changed)}/{n_layers} layers of the file loaded and fused as exactly B @ A")
