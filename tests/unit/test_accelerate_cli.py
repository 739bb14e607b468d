"""train.accelerate_tcd: the accelerate CLI on tiny real diffusers pipelines built from configs (CPU, no download).

- argument validation: every bad input stops with its message before any model is loaded;
- the data stream and the per-sample loss draws do not depend on how a global batch is split;
- a 2-process run (accelerate's CPU multi-process mode, gloo) equals a 1-process run with the same global batch;
- resuming from a checkpoint gives the uninterrupted run's LoRA;
- the saved LoRA loads in diffusers (every layer, alpha folded in) and changes the output; SDXL runs with its
  micro-conditioning and validation images.
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
from safetensors.torch import load_file, save_file

from support import tiny_diffusers as td
from train import accelerate_tcd as cli

REPO = Path(__file__).resolve().parents[2]
# One OpenMP thread per process: on a small shared CPU, torch's default pool makes tiny convolutions ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The runs compared below: 4 optimizer steps of a global batch of 4, a warmup schedule and an EMA target, so a
# resume that lost the scheduler, optimizer or EMA state would show.
TRAIN = ["--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
         "--lora_rank", "4", "--dataloader_num_workers", "0", "--ema_decay", "0.5", "--lr_scheduler",
         "constant_with_warmup", "--lr_warmup_steps", "3", "--seed", "0", "--cpu"]
# The 2-process run may differ from the 1-process run only by float reduction order (batch 2 vs batch 1 forwards,
# gloo all-reduce), which Adam's normalised steps amplify. The reference for that noise is measured in the same run:
# the 1-process run repeated with batch 1 x 4 accumulation instead of 2 x 2 (the same samples and draws, another
# reduction order). The split may be at most REDUCTION_NOISE_FACTOR times that, an order of magnitude; a different
# seed or data split moves the LoRA by O(1).
REDUCTION_NOISE_FACTOR = 10.0


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def sd_folder(work):
    return td.make_pipeline_folder(work / "tiny_sd", "sd")


@pytest.fixture(scope="module")
def data(work):
    return td.make_caption_folder(work / "data", n=8, size=64)


def args_for(model, data, out, *extra):
    return cli.parse_args(["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                           *extra])


def launch(argv, processes=1, timeout=300):
    """`python -m train.accelerate_tcd` (1 process) or `accelerate launch --multi_gpu --num_processes N -m ...`
    (CPU processes over gloo with --cpu), from the repository root as a user runs it."""
    if processes == 1:
        cmd = [sys.executable, "-m", "train.accelerate_tcd", *argv]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "train.accelerate_tcd", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_run(sd_folder, data, out, *extra, processes=1):
    launch(["--pretrained_model", str(sd_folder), "--train_data_dir", str(data), "--output_dir", str(out),
            *TRAIN, *extra], processes)
    return out


def losses_of(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / cli.LOG_FILE).read_text().splitlines())}


def lora_deltas(path):
    """{layer: B @ A} of a saved LoRA (conv weights flattened): the weight change it applies."""
    sd = load_file(str(path))
    return {k: sd[k.replace(".lora_A.", ".lora_B.")].flatten(1) @ sd[k].flatten(1) for k in sd if ".lora_A." in k}


def relative_delta_difference(a, b):
    da, db = lora_deltas(a), lora_deltas(b)
    assert da.keys() == db.keys()
    num = sum((da[k] - db[k]).pow(2).sum() for k in da).sqrt()
    return float(num / sum(v.pow(2).sum() for v in da.values()).sqrt())


@pytest.fixture(scope="module")
def one_process(sd_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return train_run(sd_folder, data, work / "one", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--validation_prompts", "a red square", "--validation_steps", "4",
                     "--validation_inference_steps", "2")


# ------------------------------------------------------------------------------------------------ validation
def test_valid_command_gives_a_plan(sd_folder, data, work):
    plan = cli.validate_args(args_for(sd_folder, data, work / "ok"))
    assert (plan.arch, plan.single_file, plan.resolution, len(plan.items)) == ("sd", False, 512, 8)
    assert plan.items == sorted(plan.items)


def _bad_cases(sd_folder, data, work):
    """(name, argv extras / model / data overrides, expected message fragment)."""
    no_index = work / "no_index"
    (no_index / "unet").mkdir(parents=True, exist_ok=True)
    unknown = work / "pixart"
    unknown.mkdir(exist_ok=True)
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    lora_file = work / "a_lora.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 16)}, str(lora_file))
    ckpt = work / "model.ckpt"
    ckpt.write_bytes(b"not a pickle")
    empty = work / "empty_data"
    empty.mkdir(exist_ok=True)
    uncaptioned = work / "uncaptioned"
    shutil.copytree(data, uncaptioned, dirs_exist_ok=True)
    (uncaptioned / "img_003.txt").unlink(missing_ok=True)
    no_state = work / "resume_out" / "checkpoint-2"
    no_state.mkdir(parents=True, exist_ok=True)
    (no_state / "optimizer.bin").write_bytes(b"")
    done = work / "done_out" / "checkpoint-8"
    done.mkdir(parents=True, exist_ok=True)
    for f in cli.STATE_FILES:
        (done / f).write_text(json.dumps({"global_step": 8}))
    other_rank = work / "rank_out" / "checkpoint-2"
    other_rank.mkdir(parents=True, exist_ok=True)
    for f in cli.STATE_FILES:
        (other_rank / f).write_text(json.dumps({"global_step": 2, "arch": "sd", "lora_rank": 16}))
    return [
        ("missing model", dict(model=work / "nope"), [], "does not exist"),
        ("folder without model_index", dict(model=no_index), [], "without model_index.json"),
        ("unknown pipeline", dict(model=unknown), [], "unknown architecture"),
        ("lora file as model", dict(model=lora_file), [], "unknown architecture"),
        ("pickle checkpoint", dict(model=ckpt), [], "must be .safetensors"),
        ("arch mismatch", {}, ["--arch", "sdxl"], "does not match"),
        ("missing data folder", dict(data=work / "no_data"), [], "is not a folder"),
        ("empty dataset", dict(data=empty), [], "no images in"),
        ("image without caption", dict(data=uncaptioned), [], "have no caption file"),
        ("resolution not divisible by 8", {}, ["--resolution", "500"], "not a positive multiple of 8"),
        ("resume latest without checkpoints", {}, ["--resume_from_checkpoint", "latest"],
         "no checkpoint with saved training state"),
        ("resume folder without state", dict(out=work / "resume_out"), ["--resume_from_checkpoint", "checkpoint-2"],
         "holds no training state (missing training_state.json, lora_state.safetensors)"),
        ("resume latest, only stateless folders", dict(out=work / "resume_out"),
         ["--resume_from_checkpoint", "latest"], "found checkpoint-2 without the saved state files"),
        ("resume past the end", dict(out=work / "done_out"), ["--resume_from_checkpoint", "latest",
                                                              "--max_train_steps", "8"], "already reaches"),
        ("resume with another rank", dict(out=work / "rank_out"), ["--resume_from_checkpoint", "latest"],
         "was trained with lora_rank=16, this command has 64"),
        ("guidance range", {}, ["--w_min", "5", "--w_max", "2"], "w_min=5.0, w_max=2.0"),
        ("validation without prompts", {}, ["--validation_steps", "10"], "no --validation_prompts"),
        ("lora name with folder", {}, ["--lora_name", "../x.safetensors"], "plain file name"),
        ("zero steps", {}, ["--max_train_steps", "0"], "--max_train_steps 0 must be >= 1"),
        ("model_config for a folder", {}, ["--model_config", str(sd_folder)], "only for single-file"),
    ]


def test_bad_inputs_get_clear_messages(sd_folder, data, work):
    for name, over, extra, fragment in _bad_cases(sd_folder, data, work):
        args = args_for(over.get("model", sd_folder), over.get("data", data), over.get("out", work / "out_bad"),
                        *extra)
        with pytest.raises(cli.ConfigError) as e:
            cli.validate_args(args)
        assert fragment in str(e.value), f"{name}: {e.value}"


@pytest.mark.skipif(cli._importable("bitsandbytes"), reason="bitsandbytes is installed here")
def test_8bit_adam_without_bitsandbytes_is_refused(sd_folder, data, work):
    with pytest.raises(cli.ConfigError, match="needs the bitsandbytes package"):
        cli.validate_args(args_for(sd_folder, data, work / "o", "--use_8bit_adam"))


def test_single_file_architecture_from_tensor_names(work):
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    cases = {"sd15": ({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, "sd"),
             "sd2": ({"cond_stage_model.model.x": torch.zeros(1)}, "sd"),
             "sdxl": ({"conditioner.embedders.0.transformer.x": torch.zeros(1),
                       "conditioner.embedders.1.model.x": torch.zeros(1)}, "sdxl")}
    for name, (extra, arch) in cases.items():
        save_file({**unet, **extra}, str(work / f"{name}.safetensors"))
        assert cli.detect_architecture(work / f"{name}.safetensors") == arch
    save_file({**unet, "conditioner.embedders.0.model.x": torch.zeros(1)}, str(work / "refiner.safetensors"))
    with pytest.raises(cli.ConfigError, match="refiner"):
        cli.detect_architecture(work / "refiner.safetensors")
    (work / "truncated.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(cli.ConfigError, match="truncated, corrupt or not a checkpoint"):
        cli.detect_architecture(work / "truncated.safetensors")


def test_bad_input_stops_before_any_model_library_is_imported(work, data):
    code = ("import sys; from train import accelerate_tcd as m; "
            f"rc = m.main(['--pretrained_model', {str(work / 'nope')!r}, '--train_data_dir', {str(data)!r}, "
            f"'--output_dir', {str(work / 'o')!r}]); "
            "print('loaded:', [k for k in ('diffusers', 'peft', 'accelerate', 'transformers') if k in sys.modules]); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: --pretrained_model" in proc.stderr and "does not exist" in proc.stderr
    assert "loaded: []" in proc.stdout


# ------------------------------------------------------------------------------------------------ split invariance
SPLITS = [(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1), (2, 1, 2), (4, 1, 1)]   # (processes, batch, accumulation)


def test_global_batches_do_not_depend_on_the_split():
    for step in range(3):
        for nproc, batch, accum in SPLITS:
            got = sorted(p for proc in range(nproc) for micro in range(accum)
                         for p in cli.batch_positions(step, micro, proc, batch, nproc, accum))
            assert got == list(range(4 * step, 4 * step + 4)), (nproc, batch, accum)


def test_stream_order_is_a_seeded_permutation_per_epoch():
    order = cli.StreamOrder(5, seed=3)
    epochs = [[order.index(p) for p in range(5 * e, 5 * e + 5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert [cli.StreamOrder(5, seed=3).index(p) for p in range(15)] == sum(epochs, [])


def test_per_sample_draws_equal_whatever_the_batch():
    from tcd.schedule import vp_alphas_cumprod
    args = cli.parse_args(["--pretrained_model", "x", "--train_data_dir", "x", "--output_dir", "x"])
    objective = cli._make_objective(args, vp_alphas_cumprod(), "epsilon")
    x0 = torch.zeros(4, 4, 8, 8)
    whole = objective.draw(x0, [cli.sample_generator(0, p) for p in range(4)])
    halves = [objective.draw(x0[:2], [cli.sample_generator(0, p) for p in (0, 1)]),
              objective.draw(x0[2:], [cli.sample_generator(0, p) for p in (2, 3)])]
    for w, a, b in zip(whole, *halves):
        assert torch.equal(w, torch.cat([a, b]))
    other = objective.draw(x0, [cli.sample_generator(1, p) for p in range(4)])
    assert not torch.equal(whole[2], other[2])                 # the seed matters


# ------------------------------------------------------------------------------------------------ training runs
def test_two_processes_match_one_process(sd_folder, data, work, one_process):
    """Global batch 4 both ways: 1 process x 2 x 2 accumulation vs 2 processes (DDP, gloo) x 1 x 2 accumulation
    with gradient checkpointing (recomputation must not change the gradients)."""
    two = train_run(sd_folder, data, work / "two", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                    "--gradient_checkpointing", processes=2)
    l1, l2 = losses_of(one_process), losses_of(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-4 * abs(l1[step]), (step, l1[step], l2[step])
    rel = relative_delta_difference(one_process / "pytorch_lora_weights.safetensors",
                                    two / "pytorch_lora_weights.safetensors")
    rel_ema = relative_delta_difference(one_process / "pytorch_lora_weights_ema.safetensors",
                                        two / "pytorch_lora_weights_ema.safetensors")
    micro = train_run(sd_folder, data, work / "one_micro", "--train_batch_size", "1",
                      "--gradient_accumulation_steps", "4")
    noise = relative_delta_difference(one_process / "pytorch_lora_weights.safetensors",
                                      micro / "pytorch_lora_weights.safetensors")
    print(f"1 vs 2 processes: losses {l1} vs {l2}; relative LoRA delta difference {rel:.2e} (EMA {rel_ema:.2e}); "
          f"reduction-order reference (1 process, batch 2x2 vs 1x4) {noise:.2e}")
    assert 0 < noise < 0.1                                    # a float-noise reference, not a different run
    assert rel <= REDUCTION_NOISE_FACTOR * noise and rel_ema <= REDUCTION_NOISE_FACTOR * noise
    ema_vs_online = relative_delta_difference(one_process / "pytorch_lora_weights.safetensors",
                                              one_process / "pytorch_lora_weights_ema.safetensors")
    assert ema_vs_online > 0.05                               # the EMA file really holds the EMA
    state = json.loads((two / "checkpoint-4" / "training_state.json").read_text())
    assert (state["num_processes"], state["global_batch"]) == (2, 4)


def test_resume_reaches_the_uninterrupted_lora(sd_folder, data, work, one_process):
    resumed = work / "resumed"
    resumed.mkdir()
    shutil.copytree(one_process / "checkpoint-2", resumed / "checkpoint-2")
    train_run(sd_folder, data, resumed, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--resume_from_checkpoint", "latest")
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(str(one_process / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"resume {name}: max abs difference {worst:.3g}")
        assert worst <= 1e-7
    full, tail = losses_of(one_process), losses_of(resumed)
    assert tail == {3: full[3], 4: full[4]}


def test_saved_lora_loads_in_diffusers_on_every_layer_and_changes_the_output(sd_folder, one_process):
    from diffusers import StableDiffusionPipeline, TCDScheduler
    from peft.tuners.tuners_utils import BaseTunerLayer
    path = one_process / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.base_architecture"] == "sd"
    assert all(k.startswith("unet.") for k in keys)
    n_layers = sum(".lora_A." in k for k in keys)
    assert n_layers == sum(".lora_B." in k for k in keys) > 50

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red square", num_inference_steps=2, guidance_scale=0.0, eta=0.3, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = image()
    pipe.load_lora_weights(str(one_process), weight_name="pytorch_lora_weights.safetensors")
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_layers
    with_lora = image()
    diff = float((with_lora - base).abs().max())
    print(f"diffusers image with the trained LoRA differs from the base by {diff:.3g} (max abs, [0, 1] pixels)")
    assert diff > 1e-3
    # Also the validation images were written with diffusers' TCDScheduler at the last step.
    assert (one_process / "validation" / "step-000004-0.png").is_file()


def test_alpha_is_folded_so_diffusers_reproduces_the_trained_unet(sd_folder, work):
    """rank 4, alpha 8 (scale 2): the file has no alpha, yet diffusers' load gives the trained UNet's output."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    unet = pipe.unet
    torch.manual_seed(0)
    trainable = cli.add_lora(unet, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in trainable:
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=emb).sample
    out = work / "alpha"
    out.mkdir()
    cli.save_lora(StableDiffusionPipeline, cli.lora_state_dict(unet, 4, 8.0), out, "a.safetensors", {"k": "v"})
    assert not list(out.glob("*.tmp*")), "temporary files left behind"
    fresh = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=emb).sample
    fresh.load_lora_weights(str(out), weight_name="a.safetensors")
    with torch.no_grad():
        loaded = fresh.unet(x, t, encoder_hidden_states=emb).sample
    assert float((trained - base).abs().max()) > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


def test_sdxl_run_with_micro_conditioning_second_order_tcf_and_validation(work, data):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    folder = td.make_pipeline_folder(work / "tiny_sdxl", "sdxl")
    out = work / "sdxl_out"
    launch(["--pretrained_model", str(folder), "--train_data_dir", str(data), "--output_dir", str(out), "--cpu",
            "--resolution", "64", "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--lora_rank", "4", "--dataloader_num_workers", "1", "--tcf_order", "2", "--random_crop", "--random_flip",
            "--checkpointing_steps", "0", "--validation_prompts", "a red square", "--validation_steps", "2",
            "--validation_inference_steps", "2"])
    assert sorted(losses_of(out)) == [1, 2]
    assert (out / "validation" / "step-000002-0.png").is_file()
    assert (out / "checkpoint-2" / "training_state.json").is_file()   # the final state, for a later extension
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red square", num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
              output_type="pt")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    n_layers = sum(".lora_A." in k for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_layers
    assert float((pipe(generator=torch.Generator().manual_seed(0), **kw).images - base).abs().max()) > 1e-4


def test_sdxl_time_ids_follow_the_sdxl_micro_conditioning_layout():
    """original (h, w) + crop top-left (y, x) + target (h, w) per sample, the layout of SDXL's add_time_ids."""
    ids = cli.sdxl_time_ids([(768, 1024), (512, 512)], [(0, 128), (3, 4)], (512, 512), torch.float16)
    assert ids.dtype == torch.float16
    assert ids.tolist() == [[768, 1024, 0, 128, 512, 512], [512, 512, 3, 4, 512, 512]]
