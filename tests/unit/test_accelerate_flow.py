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
from tcd.paths import FlowPath
from train import accelerate_flow as flow
from train import accelerate_tcd as cli

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# As tests/unit/test_accelerate_cli.py: 4 optimizer steps of a global batch of 4 with a warmup schedule and an EMA
# target (a resume that lost scheduler, optimizer or EMA state shows), alpha 8 at rank 4 (the fold of alpha / rank
# into the saved lora_B is exercised by every load check).
TRAIN = ["--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
         "--lora_rank", "4", "--lora_alpha", "8", "--dataloader_num_workers", "0", "--ema_decay", "0.5",
         "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--seed", "0", "--cpu"]
# 2 processes may differ from 1 only by float reduction order; the reference for that noise is measured in the same
# session: the 1-process run repeated with batch 1 x 4 accumulation instead of 2 x 2 (same samples and draws, another
# reduction order). Allowed: an order of magnitude above it (test_accelerate_cli.py's reasoning).
REDUCTION_NOISE_FACTOR = 10.0
LORA = "pytorch_lora_weights.safetensors"
LORA_EMA = "pytorch_lora_weights_ema.safetensors"


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


def train_run(folder, data, out, *extra, processes=1):
    launch(["--pretrained_model", str(folder), "--train_data_dir", str(data), "--output_dir", str(out), *TRAIN,
            *extra], processes)
    return out


def losses_of(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / cli.LOG_FILE).read_text().splitlines())}


def lora_deltas(path):
    sd = load_file(str(path))
    return {k: sd[k.replace(".lora_A.", ".lora_B.")] @ sd[k] for k in sd if ".lora_A." in k}


def relative_delta_difference(a, b):
    da, db = lora_deltas(a), lora_deltas(b)
    assert da.keys() == db.keys()
    num = sum((da[k] - db[k]).pow(2).sum() for k in da).sqrt()
    return float(num / sum(v.pow(2).sum() for v in da.values()).sqrt())


def load_sd3(folder):
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def one_process(sd3_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return train_run(sd3_folder, data, work / "one", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--validation_prompts", "a red square", "--validation_steps", "4",
                     "--validation_inference_steps", "2")


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
        with pytest.raises(cli.ConfigError) as e:
            cli.validate_args(args_for(model, data, work / "out_bad", *extra))
        assert fragment in str(e.value), f"{name}: {e.value}"


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
    losses = losses_of(one_process)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    path = one_process / LORA
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.base_architecture"] == "sd3"
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    trained = {k[len("transformer."):-len(".lora_A.weight")] for k in keys if ".lora_A." in k}
    transformer = load_sd3(sd3_folder).transformer
    expected = {n for n, m in transformer.named_modules()
                if isinstance(m, torch.nn.Linear) and is_flow_lora_target(n)}
    assert trained == expected and len(trained) == 25
    assert any(".attn2." in n for n in trained) and any(".ff_context." in n for n in trained)
    # Every layer trained, but one: the last block's context stream is pre-only (diffusers' context_pre_only), its
    # attention output for the text tokens is discarded, so the text queries (add_q_proj) get an exactly zero
    # gradient and that LoRA's B stays at its zero init (harmless; the layer is kept so the CLI's target set stays
    # the node's, where add_q_proj is a slice of the fused context qkv).
    sd = load_file(str(path))
    dead = {f"transformer_blocks.{transformer.config.num_layers - 1}.attn.add_q_proj"}
    assert {n for n in trained if float(sd[f"transformer.{n}.lora_B.weight"].abs().max()) == 0} == dead
    state = json.loads((one_process / "checkpoint-4" / "training_state.json").read_text())
    assert (state["arch"], state["global_batch"]) == ("sd3", 4)
    assert (one_process / "validation" / "step-000004-0.png").is_file()      # the pack's TCD sampler, flow form
    assert relative_delta_difference(path, one_process / LORA_EMA) > 0.05     # the EMA file holds the EMA


def test_two_processes_match_one_process(sd3_folder, data, work, one_process):
    """Global batch 4 both ways: 1 process x 2 x 2 accumulation vs 2 processes (DDP, gloo) x 1 x 2 accumulation
    with gradient checkpointing."""
    two = train_run(sd3_folder, data, work / "two", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                    "--gradient_checkpointing", processes=2)
    l1, l2 = losses_of(one_process), losses_of(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-4 * abs(l1[step]), (step, l1[step], l2[step])
    rel = relative_delta_difference(one_process / LORA, two / LORA)
    rel_ema = relative_delta_difference(one_process / LORA_EMA, two / LORA_EMA)
    a, b = load_file(str(one_process / LORA)), load_file(str(two / LORA))
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    micro = train_run(sd3_folder, data, work / "one_micro", "--train_batch_size", "1",
                      "--gradient_accumulation_steps", "4")
    noise = relative_delta_difference(one_process / LORA, micro / LORA)
    c = load_file(str(micro / LORA))
    noise_abs = max(float((a[k] - c[k]).abs().max()) for k in a)
    print(f"SD3 1 vs 2 processes: losses {l1} vs {l2}; relative LoRA delta difference {rel:.2e} (EMA "
          f"{rel_ema:.2e}), max |diff| of the file's tensors {max_abs:.2e}; reduction-order reference (1 process, "
          f"batch 2x2 vs 1x4) {noise:.2e}, max |diff| {noise_abs:.2e}")
    assert 0 < noise < 0.1
    assert rel <= REDUCTION_NOISE_FACTOR * noise and rel_ema <= REDUCTION_NOISE_FACTOR * noise
    state = json.loads((two / "checkpoint-4" / "training_state.json").read_text())
    assert (state["num_processes"], state["global_batch"]) == (2, 4)


def test_resume_reaches_the_uninterrupted_lora_exactly(sd3_folder, data, work, one_process):
    resumed = work / "resumed"
    resumed.mkdir()
    shutil.copytree(one_process / "checkpoint-2", resumed / "checkpoint-2")
    train_run(sd3_folder, data, resumed, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--resume_from_checkpoint", "latest")
    for name in (LORA, LORA_EMA):
        a, b = load_file(str(one_process / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"SD3 resume {name}: max abs difference {worst:.3g}")
        # The same process layout, the same ops in the same order on the same restored state: bit-identical.
        assert all(torch.equal(a[k], b[k]) for k in a), worst
    full, tail = losses_of(one_process), losses_of(resumed)
    assert tail == {3: full[3], 4: full[4]}


def test_diffusers_load_lora_weights_adds_up_at_down_on_every_layer(sd3_folder, one_process):
    """StableDiffusion3Pipeline.load_lora_weights + fuse_lora changes each targeted weight by exactly B @ A of the
    file (scale 1: the file carries no alpha; alpha / rank is folded into B) and no other weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    lora = load_file(str(one_process / LORA))
    n_layers = sum(".lora_A." in k for k in lora)
    pipe = load_sd3(sd3_folder)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(one_process), weight_name=LORA)
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules()) == n_layers
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()                      # the fused weights stay, the PEFT layers go
    fused = pipe.transformer.state_dict()
    assert fused.keys() == base.keys()
    changed, visible = set(), set()
    for key in (k for k in lora if ".lora_A." in k):
        module = key[len("transformer."):-len(".lora_A.weight")]
        w = f"{module}.weight"
        expected = lora[key.replace(".lora_A.", ".lora_B.")] @ lora[key]
        # W + delta - W in float32 is exact to a few ulps of W.
        atol = 4 * torch.finfo(torch.float32).eps * float(base[w].abs().max())
        torch.testing.assert_close(fused[w] - base[w], expected, rtol=1e-4, atol=atol, msg=lambda m: f"{w}: {m}")
        changed.add(w)
        if float(expected.abs().max()) > 10 * atol:
            visible.add(w)
    others = [k for k in base if k not in changed and not torch.equal(base[k], fused[k])]
    assert not others, others[:5]
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
