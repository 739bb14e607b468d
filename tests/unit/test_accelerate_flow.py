"""train.accelerate_tcd on SD3 (train.accelerate_flow): a tiny real StableDiffusion3Pipeline built from diffusers'
own classes (tests/support/tiny_diffusers.py, no T5), CPU, no download.

- bad input: incomplete SD3 folders, a VP scheduler in an SD3 folder, half a T5, a shift kind it does
  not know, a resolution the patch size does not divide, a VAE that does not fit -> a clear message;
- the objective sits on the model's own path: FlowMatchEuler's shift (or dynamic mu), velocity outputs, timestep =
  sigma * num_train_timesteps as diffusers' SD3 pipeline calls the transformer, uncond = the empty prompt;
- a short run trains and saves exactly the is_flow_lora_target layers under `transformer.` (and validation images
  from the pack's TCD sampler);
- 2 processes equal 1 process with the same global batch (to a same-run float-reduction reference);
- resuming from a checkpoint gives the uninterrupted run's LoRA exactly;
- StableDiffusion3Pipeline.load_lora_weights changes every targeted weight by exactly up @ down (alpha folded).
"""
import json
import shutil

import pytest
import torch

from support import tiny_diffusers as td
from support.accelerate_runs import (TRAIN_ALPHA8, args_for, assert_refused, check_flow_targets_saved,
                                     check_fused_deltas, check_resume_matches, check_two_processes_match_one,
                                     one_process_run, training_state)
from tcd.paths import FlowPath
from train import accelerate_flow as flow
from train import accelerate_tcd as cli

# As tests/unit/test_accelerate_cli.py: 4 optimizer steps of a global batch of 4 with a warmup schedule and an EMA
# target (a resume that lost scheduler, optimizer or EMA state shows), alpha 8 at rank 4 (the fold of alpha / rank
# into the saved lora_B is exercised by every load check). 2 processes may differ from 1 only by float reduction
# order, to 10x a reference measured in the same session (support.accelerate_runs).
TRAIN = TRAIN_ALPHA8


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("flow_cli")


@pytest.fixture(scope="module")
def sd3_folder(work):
    return td.make_pipeline_folder(work / "tiny_sd3", "sd3")


@pytest.fixture(scope="module")
def data(work):
    return td.make_caption_folder(work / "data", n=8, size=64)


def load_sd3(folder):
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def one_process(sd3_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return one_process_run(sd3_folder, data, work, TRAIN)


# ------------------------------------------------------------------------------------------------ bad input
def _copy(folder, dest):
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest)
    return dest


def _bad_folders(sd3_folder, work):
    no_te2 = _copy(sd3_folder, work / "no_te2")
    shutil.rmtree(no_te2 / "text_encoder_2")
    vp_sched = _copy(sd3_folder, work / "vp_sched")
    (vp_sched / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", **td.SCHEDULER_CONFIG}))
    half_t5 = _copy(sd3_folder, work / "half_t5")
    index = json.loads((half_t5 / "model_index.json").read_text())
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    (half_t5 / "model_index.json").write_text(json.dumps(index))
    (half_t5 / "text_encoder_3").mkdir()
    linear_shift = _copy(sd3_folder, work / "linear_shift")
    cfg = json.loads((linear_shift / "scheduler" / "scheduler_config.json").read_text())
    cfg.update(use_dynamic_shifting=True, time_shift_type="linear")
    (linear_shift / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return [
        ("missing text encoder", no_te2, [], "folder without text_encoder_2"),
        ("VP scheduler", vp_sched, [], "is a DDPMScheduler (prediction type 'epsilon')"),
        ("T5 without its tokenizer", half_t5, [], "has text_encoder_3 but no tokenizer_3"),
        ("linear dynamic shift", linear_shift, [], "time_shift_type='linear'"),
        ("resolution not a multiple of 16", sd3_folder, ["--resolution", "72"],
         "--resolution 72 is not a multiple of 16"),
        ("arch mismatch", sd3_folder, ["--arch", "sdxl"], "is 'sd3'"),
        ("grid too fine for a flow path", sd3_folder, ["--original_steps", "2000"],
         "original_steps=2000 must be in 1..1000"),
        ("guidance range", sd3_folder, ["--w_min", "5", "--w_max", "2"], "w_min=5.0, w_max=2.0"),
        ("Flux's validation guidance on SD3", sd3_folder, ["--validation_guidance", "3.5"],
         "--validation_guidance is for guidance-distilled models (flux)"),
    ]


def test_bad_sd3_inputs_get_clear_messages(sd3_folder, data, work):
    for name, model, extra, fragment in _bad_folders(sd3_folder, work):
        assert_refused(args_for(model, data, work / "out_bad", *extra), fragment, name)


def test_valid_sd3_command_gives_a_flow_plan(sd3_folder, data, work):
    args = args_for(sd3_folder, data, work / "ok")
    plan = cli.validate_args(args)
    assert (plan.arch, plan.is_flow, plan.resolution, len(plan.items)) == ("sd3", True, 1024, 8)
    assert (args.w_min, args.w_max) == (3.0, 15.0)            # CFG scales (Flux: guidance values 2..5)
    assert plan.flow_configs["scheduler"]["shift"] == 3.0


def test_a_vae_that_does_not_fit_is_refused_at_load(sd3_folder, data, work, capsys):
    """--vae_path with a 4-channel (SD1.x) VAE: the CLI stops with a message once the models are loaded (exit 2)."""
    vae_dir = work / "vae4"
    td._tiny_vae().save_pretrained(vae_dir)
    rc = cli.main(["--pretrained_model", str(sd3_folder), "--train_data_dir", str(data), "--output_dir",
                   str(work / "vae_out"), "--vae_path", str(vae_dir), *TRAIN])
    assert rc == 2
    assert "error: the VAE gives 4-channel latents but the transformer takes 16" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ model conventions
def test_the_flow_path_is_the_schedulers():
    """FlowMatchEulerDiscreteScheduler shifts a time t in [0, 1] to the sigma of FlowPath.shifted(shift), and with
    dynamic shifting to FlowPath.flux(mu) with the pipelines' calculate_shift mu; its timesteps are sigma * 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
    t = [1.0, 0.9, 0.75, 0.5, 0.3, 0.1, 0.02]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # The training table (diffusers' SD3 scripts index it): unshifted t = k / 1000 -> shifted sigma.
    k = torch.tensor([1000, 750, 400, 100, 1])
    path = flow.flow_path(dict(sched.config), 4096)
    torch.testing.assert_close(sched.sigmas[1000 - k].double(),
                               torch.tensor([path.sigma_of_time(float(v) / 1000) for v in k], dtype=torch.float64))
    torch.testing.assert_close(sched.timesteps.double(), sched.sigmas.double() * 1000)
    sched.set_timesteps(sigmas=t)
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.tensor([path.sigma_of_time(v) for v in t],
                                                                       dtype=torch.float64))
    torch.testing.assert_close(sched.timesteps.double(), sched.sigmas[:-1].double() * 1000)
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    assert flow.calculate_shift(1024, 256, 4096, 0.5, 1.15) == pytest.approx(mu, rel=1e-12)
    dyn.set_timesteps(sigmas=t, mu=mu)
    dyn_path = flow.flow_path(dict(dyn.config), 1024)
    assert dyn_path.name == f"flux mu {mu:g}"
    torch.testing.assert_close(dyn.sigmas[:-1].double(), torch.tensor([dyn_path.sigma_of_time(v) for v in t],
                                                                     dtype=torch.float64))


def test_validation_sigmas_are_tcds_timesteps_on_the_training_grid():
    """4 of 50: TCDScheduler's timesteps 999, 759, 499, 259 -> grid points 50, 38, 25, 13 of the flow path the LoRA
    was trained on (unshifted time (t + 1) / 1000), then the clean end."""
    from tcd.schedule import time_shift
    path = FlowPath.shifted(3.0)
    sigmas = flow.validation_sigmas(path, 4, 50)
    expected = [time_shift(3.0, t) for t in (1.0, 0.76, 0.5, 0.26)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected))
    grid = path.grid(50)
    assert all(float((grid - s).abs().min()) < 1e-6 for s in sigmas)


def test_transformer_is_called_as_the_sd3_pipeline_calls_it(sd3_folder):
    """One Euler step of diffusers' own SD3 sampling loop (FlowMatchEulerDiscreteScheduler.step with the pipeline's
    transformer call) equals x + (sigma_next - sigma) * the CLI's velocity."""
    pipe = load_sd3(sd3_folder)
    cond, _ = flow.SD3Conditioner(pipe, "cpu")(["a red square"])
    sched = pipe.scheduler
    sched.set_timesteps(4)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[1]
    with torch.no_grad():
        v_pipe = pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=cond["embeds"],
                                  pooled_projections=cond["pooled"], return_dict=False)[0]
        sched._step_index = 1
        x_next = sched.step(v_pipe, t, x).prev_sample
        v_cli = cli.call_model(pipe.transformer, flow.TransformerCall(1000), x, sched.sigmas[1].expand(1), cond)
    torch.testing.assert_close(v_cli, v_pipe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x + (sched.sigmas[2] - sched.sigmas[1]) * v_cli, x_next, rtol=1e-5, atol=1e-6)


def test_uncond_is_the_empty_prompt_as_the_pipeline_guides(sd3_folder):
    pipe = load_sd3(sd3_folder)
    cond, uncond = flow.SD3Conditioner(pipe, "cpu")(["a red square", "green stripes"])
    _, neg, _, neg_pooled = pipe.encode_prompt("a red square", None, None, device="cpu",
                                               do_classifier_free_guidance=True, negative_prompt="")
    assert uncond["embeds"].shape == cond["embeds"].shape and uncond["pooled"].shape == cond["pooled"].shape
    for i in range(2):
        torch.testing.assert_close(uncond["embeds"][i], neg[0])
        torch.testing.assert_close(uncond["pooled"][i], neg_pooled[0])


# ------------------------------------------------------------------------------------------------ training runs
def test_sd3_run_trains_and_saves_the_flow_targets(sd3_folder, one_process):
    """4 finite losses; exactly the is_flow_lora_target layers under `transformer.`, all trained but one; the final
    state, the pack's TCD sampler's validation image (flow form) and the EMA file written."""
    transformer = load_sd3(sd3_folder).transformer
    trained, sd = check_flow_targets_saved(one_process, transformer, "sd3")
    assert len(trained) == 25
    assert any(".attn2." in n for n in trained) and any(".ff_context." in n for n in trained)
    # Every layer trained, but one: the last block's context stream is pre-only (diffusers' context_pre_only), its
    # attention output for the text tokens is discarded, so the text queries (add_q_proj) get an exactly zero
    # gradient and that LoRA's B stays at its zero init (harmless; the layer is kept so the CLI's target set stays
    # the node's, where add_q_proj is a slice of the fused context qkv).
    dead = {f"transformer_blocks.{transformer.config.num_layers - 1}.attn.add_q_proj"}
    assert {n for n in trained if float(sd[f"transformer.{n}.lora_B.weight"].abs().max()) == 0} == dead


def test_two_processes_match_one_process(sd3_folder, data, work, one_process):
    """Global batch 4 both ways: 1 process x 2 x 2 accumulation vs 2 processes (DDP, gloo) x 1 x 2 accumulation
    with gradient checkpointing."""
    two = check_two_processes_match_one(sd3_folder, data, work, one_process, "SD3", TRAIN)
    state = training_state(two)
    assert (state["num_processes"], state["global_batch"]) == (2, 4)


def test_resume_reaches_the_uninterrupted_lora_exactly(sd3_folder, data, work, one_process):
    """Resumed from checkpoint-2: the uninterrupted run's LoRA and EMA bit for bit, the same losses at steps 3, 4."""
    check_resume_matches(sd3_folder, data, work, one_process, "SD3", exact=True, settings=TRAIN)


def test_diffusers_load_lora_weights_adds_up_at_down_on_every_layer(sd3_folder, one_process):
    """StableDiffusion3Pipeline.load_lora_weights + fuse_lora changes each targeted weight by exactly B @ A of the
    file (scale 1: the file carries no alpha; alpha / rank is folded into B) and no other weight."""
    n_layers, changed, visible = check_fused_deltas(load_sd3(sd3_folder), one_process)
    # all but the last block's add_q_proj, whose B is exactly zero (test_sd3_run_trains_and_saves_the_flow_targets)
    assert len(visible) == n_layers - 1
    print(f"diffusers: {len(changed)}/{n_layers} layers of the file loaded and fused as exactly B @ A "
          f"({len(visible)} with a non-zero delta)")


def test_alpha_is_folded_so_diffusers_reproduces_the_trained_transformer(sd3_folder, work):
    """rank 4, alpha 8 (scale 2): the saved file loads in diffusers to the trained transformer's output."""
    from diffusers import StableDiffusion3Pipeline
    pipe = load_sd3(sd3_folder)
    cond, _ = flow.SD3Conditioner(pipe, "cpu")(["a blue circle"])
    transformer = pipe.transformer
    targets = flow.lora_target_names(transformer)
    trainable = cli.add_lora(transformer, rank=4, alpha=8.0, target_modules=targets)
    cli._check_lora_covers(transformer, targets)
    with torch.no_grad():
        for name, p in trainable:
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    call = flow.TransformerCall(1000)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        trained = cli.call_model(transformer, call, x, sigma, cond)
    out = work / "alpha"
    out.mkdir()
    cli.save_lora(StableDiffusion3Pipeline, cli.lora_state_dict(transformer, 4, 8.0), out, "a.safetensors",
                  {"k": "v"}, "transformer")
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    fresh = load_sd3(sd3_folder)
    with torch.no_grad():
        base = cli.call_model(fresh.transformer, call, x, sigma, cond)
    fresh.load_lora_weights(str(out), weight_name="a.safetensors")
    with torch.no_grad():
        loaded = cli.call_model(fresh.transformer, call, x, sigma, cond)
    assert float((trained - base).abs().max()) > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


def test_flow_objective_is_built_on_the_flow_path(sd3_folder, data, work):
    args = args_for(sd3_folder, data, work / "o", "--resolution", "64")
    plan = cli.validate_args(args)
    objective = flow.make_objective(args, plan.flow_configs, 64, cli._make_objective)
    assert isinstance(objective.path, FlowPath) and objective.prediction_type == "flow"
    assert objective.guidance == "cfg"              # SD3 is guided by a second, empty-prompt pass
    assert objective.path.name == "shift 3"
    assert objective.grid[0] == 0.0 and objective.grid[-1] == 1.0
