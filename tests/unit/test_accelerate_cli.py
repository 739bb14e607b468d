"""train.accelerate_tcd: the accelerate CLI on tiny real diffusers pipelines built from configs (CPU, no download).

- argument validation: every bad input stops with its message before any model is loaded;
- the data stream and the per-sample loss draws do not depend on how a global batch is split;
- a 2-process run (accelerate's CPU multi-process mode, gloo) equals a 1-process run with the same global batch;
- resuming from a checkpoint gives the uninterrupted run's LoRA;
- the saved LoRA loads in diffusers (every layer, alpha folded in) and changes the output; SDXL runs with its
  micro-conditioning and validation images.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support import tiny_diffusers as td
from support.accelerate_runs import (ENV, LORA, LORA_EMA, REPO, args_for, assert_refused, check_resume_matches,
                                     check_two_processes_match_one, launch, losses_of, one_process_run,
                                     relative_delta_difference, training_state)
from train import accelerate_tcd as cli

# The runs compared (support.accelerate_runs.TRAIN): 4 optimizer steps of a global batch of 4, a warmup schedule and
# an EMA target, so a resume that lost the scheduler, optimizer or EMA state would show. The 2-process run may
# differ from the 1-process run only by float reduction order, to REDUCTION_NOISE_FACTOR (10) times a reference
# measured in the same run (support.accelerate_runs explains it).


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


@pytest.fixture(scope="module")
def one_process(sd_folder, data, work):
    """1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return one_process_run(sd_folder, data, work)


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
        assert_refused(args_for(over.get("model", sd_folder), over.get("data", data),
                                over.get("out", work / "out_bad"), *extra), fragment, name)


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
    two = check_two_processes_match_one(sd_folder, data, work, one_process, "SD")
    ema_vs_online = relative_delta_difference(one_process / LORA, one_process / LORA_EMA)
    assert ema_vs_online > 0.05                               # the EMA file really holds the EMA
    state = training_state(two)
    assert (state["num_processes"], state["global_batch"]) == (2, 4)


def test_resume_reaches_the_uninterrupted_lora(sd_folder, data, work, one_process):
    """Resumed from checkpoint-2: the uninterrupted run's LoRA and EMA to 1e-7, the same losses at steps 3 and 4."""
    check_resume_matches(sd_folder, data, work, one_process, "SD", exact=False)


def test_saved_lora_loads_in_diffusers_on_every_layer_and_changes_the_output(sd_folder, one_process):
    from diffusers import StableDiffusionPipeline, TCDScheduler
    from peft.tuners.tuners_utils import BaseTunerLayer
    path = one_process / LORA
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
    pipe.load_lora_weights(str(one_process), weight_name=LORA)
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
    pipe.load_lora_weights(str(out), weight_name=LORA)
    n_layers = sum(".lora_A." in k for k in load_file(str(out / LORA)))
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_layers
    assert float((pipe(generator=torch.Generator().manual_seed(0), **kw).images - base).abs().max()) > 1e-4


def test_sdxl_time_ids_follow_the_sdxl_micro_conditioning_layout():
    """original (h, w) + crop top-left (y, x) + target (h, w) per sample, the layout of SDXL's add_time_ids."""
    ids = cli.sdxl_time_ids([(768, 1024), (512, 512)], [(0, 128), (3, 4)], (512, 512), torch.float16)
    assert ids.dtype == torch.float16
    assert ids.tolist() == [[768, 1024, 0, 128, 512, 512], [512, 512, 3, 4, 512, 512]]
