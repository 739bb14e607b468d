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
import shutil

import pytest
import torch

from support import tiny_diffusers as td
from support.accelerate_runs import (TRAIN_ALPHA8, args_for, assert_refused, check_flow_targets_saved,
                                     check_fused_deltas, check_resume_matches, check_two_processes_match_one,
                                     one_process_run)
from train import accelerate_flow as flow
from train import accelerate_tcd as cli

# The SD3 test's run (tests/unit/test_accelerate_flow.py): 4 optimizer steps of a global batch of 4, warmup and an
# EMA target (a resume that lost scheduler, optimizer or EMA state shows), alpha 8 at rank 4 (folded into B).
# 2 processes may differ from 1 only by float reduction order, to 10x a reference measured in the same session.
TRAIN = TRAIN_ALPHA8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("flux_cli")


@pytest.fixture(scope="module")
def flux_folder(work):
    return td.make_pipeline_folder(work / "tiny_flux", "flux")


@pytest.fixture(scope="module")
def data(work):
    return td.make_caption_folder(work / "data", n=8, size=64)


def load_flux(folder):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def one_process(flux_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return one_process_run(flux_folder, data, work, TRAIN)


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
        assert_refused(args_for(model, data, work / "out_bad", *extra), fragment, f"{model.name} {extra}")


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
    """4 finite losses; exactly the is_flow_lora_target layers under `transformer.`, every one trained; the final
    state, the pack's TCD sampler's validation image (guidance 3.5) and the EMA file written."""
    trained, sd = check_flow_targets_saved(one_process, load_flux(flux_folder).transformer, "flux")
    # 1 double block: q/k/v/out + add_q/k/v + to_add_out + ff (2) + ff_context (2) = 12; 1 single block: q/k/v,
    # proj_mlp, proj_out = 5
    assert len(trained) == 17
    # Flux's double block keeps its text stream (single blocks follow), so every LoRA B left its zero init.
    assert all(float(sd[f"transformer.{n}.lora_B.weight"].abs().max()) > 0 for n in trained)


def test_two_processes_match_one_process(flux_folder, data, work, one_process):
    """Global batch 4 both ways: 1 process x 2 x 2 accumulation vs 2 processes (DDP, gloo) x 1 x 2 accumulation
    with gradient checkpointing."""
    check_two_processes_match_one(flux_folder, data, work, one_process, "Flux", TRAIN)


def test_resume_reaches_the_uninterrupted_lora_exactly(flux_folder, data, work, one_process):
    """Resumed from checkpoint-2: the uninterrupted run's LoRA and EMA bit for bit, the same losses at steps 3, 4."""
    check_resume_matches(flux_folder, data, work, one_process, "Flux", exact=True, settings=TRAIN)


def test_diffusers_load_lora_weights_adds_up_at_down_on_every_layer(flux_folder, one_process):
    """FluxPipeline.load_lora_weights + fuse_lora changes each targeted weight by exactly B @ A of the file (scale 1:
    alpha / rank is folded into B) and no other weight."""
    n_layers, changed, visible = check_fused_deltas(load_flux(flux_folder), one_process)
    assert len(visible) == n_layers == 17
    print(f"diffusers Flux: {len(changed)}/{n_layers} layers of the file loaded and fused as exactly B @ A")
