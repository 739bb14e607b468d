"""Runs of the accelerate CLI (train.accelerate_tcd) and the checks on what they write, shared by its tests:
tests/unit/test_accelerate_cli.py (SD / SDXL), test_accelerate_flow.py (SD3), test_accelerate_flux.py (FLUX.1-dev)
and tests/comfy/test_accelerate_*lora_in_comfy.py (the saved LoRA loaded in ComfyUI).

- `launch` / `train_run`: the CLI as a user runs it, 1 process or `accelerate launch` with N CPU processes (gloo);
- `check_two_processes_match_one`: a 2-process run against the 1-process run with the same global batch, to a
  float-reduction reference measured in the same session;
- `check_resume_matches`: a run resumed from the 1-process run's checkpoint-2 against the uninterrupted run;
- `check_flow_targets_saved` / `check_fused_deltas`: a flow (SD3 / Flux) LoRA file and its diffusers load;
- `train_comfy_lora`, `check_patched`, ...: the ComfyUI side (comfy imports stay inside the functions, so the unit
  tests import this module without a ComfyUI host).
"""
from __future__ import annotations

import contextlib
import importlib
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

from support.comfy_folders import loras_folder
from tcd.lora_targets import is_flow_lora_target
from train import accelerate_tcd as cli

REPO = Path(__file__).resolve().parents[2]
# One OpenMP thread per process: on a small shared CPU, torch's default pool makes tiny convolutions ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LORA = "pytorch_lora_weights.safetensors"
LORA_EMA = "pytorch_lora_weights_ema.safetensors"
# The runs compared: 4 optimizer steps of a global batch of 4, a warmup schedule and an EMA target, so a resume that
# lost the scheduler, optimizer or EMA state would show.
TRAIN = ["--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
         "--lora_rank", "4", "--dataloader_num_workers", "0", "--ema_decay", "0.5", "--lr_scheduler",
         "constant_with_warmup", "--lr_warmup_steps", "3", "--seed", "0", "--cpu"]
# The flow (SD3 / Flux) runs add alpha 8 at rank 4: the fold of alpha / rank into the saved lora_B is exercised by
# every load check.
TRAIN_ALPHA8 = [*TRAIN, "--lora_alpha", "8"]
# The 2-process run may differ from the 1-process run only by float reduction order (batch 2 vs batch 1 forwards,
# gloo all-reduce), which Adam's normalised steps amplify. The reference for that noise is measured in the same run:
# the 1-process run repeated with batch 1 x 4 accumulation instead of 2 x 2 (the same samples and draws, another
# reduction order). The split may be at most REDUCTION_NOISE_FACTOR times that, an order of magnitude; a different
# seed or data split moves the LoRA by O(1).
REDUCTION_NOISE_FACTOR = 10.0


# ------------------------------------------------------------------------------------------------ running the CLI
def args_for(model, data, out, *extra):
    return cli.parse_args(["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                           *extra])


def assert_refused(args_or_argv, fragment, label):
    """validate_args stops with a ConfigError whose message holds `fragment`."""
    with pytest.raises(cli.ConfigError) as e:
        cli.validate_args(args_or_argv)
    assert fragment in str(e.value), f"{label}: {e.value}"


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


def train_run(folder, data, out, *extra, processes=1, settings=TRAIN):
    launch(["--pretrained_model", str(folder), "--train_data_dir", str(data), "--output_dir", str(out), *settings,
            *extra], processes)
    return out


def one_process_run(folder, data, work, settings=TRAIN):
    """The reference run: 1 process x batch 2 x 2 accumulation steps, validation images at the end."""
    return train_run(folder, data, work / "one", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--validation_prompts", "a red square", "--validation_steps", "4",
                     "--validation_inference_steps", "2", settings=settings)


# ------------------------------------------------------------------------------------------------ reading the outputs
def losses_of(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / cli.LOG_FILE).read_text().splitlines())}


def training_state(out, step=4):
    return json.loads((out / f"checkpoint-{step}" / "training_state.json").read_text())


def lora_deltas(path):
    """{layer: B @ A} of a saved LoRA (conv weights flattened): the weight change it applies."""
    sd = load_file(str(path))
    return {k: sd[k.replace(".lora_A.", ".lora_B.")].flatten(1) @ sd[k].flatten(1) for k in sd if ".lora_A." in k}


def relative_delta_difference(a, b):
    """|delta_a - delta_b| / |delta_a| over all layers of two LoRA files (Frobenius norms)."""
    da, db = lora_deltas(a), lora_deltas(b)
    assert da.keys() == db.keys()
    num = sum((da[k] - db[k]).pow(2).sum() for k in da).sqrt()
    return float(num / sum(v.pow(2).sum() for v in da.values()).sqrt())


def max_abs_difference(a, b):
    """The largest |a - b| over the tensors of two LoRA files with the same keys, and both files' tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta), ta, tb


# ------------------------------------------------------------------------------------------------ run comparisons
def check_two_processes_match_one(folder, data, work, one_process, label, settings=TRAIN):
    """Global batch 4 both ways: `one_process` (1 process x 2 x 2 accumulation) vs 2 processes (DDP, gloo) x 1 x 2
    accumulation with gradient checkpointing (recomputation must not change the gradients). Per-step losses to
    1e-4 relative; the LoRA and its EMA to REDUCTION_NOISE_FACTOR times the same-run reduction-order reference.
    Returns the 2-process output folder."""
    two = train_run(folder, data, work / "two", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                    "--gradient_checkpointing", processes=2, settings=settings)
    l1, l2 = losses_of(one_process), losses_of(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-4 * abs(l1[step]), (step, l1[step], l2[step])
    rel = relative_delta_difference(one_process / LORA, two / LORA)
    rel_ema = relative_delta_difference(one_process / LORA_EMA, two / LORA_EMA)
    max_abs = max_abs_difference(one_process / LORA, two / LORA)[0]
    micro = train_run(folder, data, work / "one_micro", "--train_batch_size", "1", "--gradient_accumulation_steps",
                      "4", settings=settings)
    noise = relative_delta_difference(one_process / LORA, micro / LORA)
    noise_abs = max_abs_difference(one_process / LORA, micro / LORA)[0]
    print(f"{label} 1 vs 2 processes: losses {l1} vs {l2}; relative LoRA delta difference {rel:.2e} (EMA "
          f"{rel_ema:.2e}), max |diff| of the file's tensors {max_abs:.2e}; reduction-order reference (1 process, "
          f"batch 2x2 vs 1x4) {noise:.2e}, max |diff| {noise_abs:.2e}")
    assert 0 < noise < 0.1                                    # a float-noise reference, not a different run
    assert rel <= REDUCTION_NOISE_FACTOR * noise and rel_ema <= REDUCTION_NOISE_FACTOR * noise
    return two


def check_resume_matches(folder, data, work, one_process, label, exact, settings=TRAIN):
    """Resume from `one_process`'s checkpoint-2 with the same layout: the LoRA and its EMA equal the uninterrupted
    run's (bit-identical where `exact`, else to 1e-7), and the resumed steps log the same losses."""
    resumed = work / "resumed"
    resumed.mkdir()
    shutil.copytree(one_process / "checkpoint-2", resumed / "checkpoint-2")
    train_run(folder, data, resumed, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--resume_from_checkpoint", "latest", settings=settings)
    for name in (LORA, LORA_EMA):
        worst, a, b = max_abs_difference(one_process / name, resumed / name)
        print(f"{label} resume {name}: max abs difference {worst:.3g}")
        if exact:
            # The same process layout, the same ops in the same order on the same restored state: bit-identical.
            assert all(torch.equal(a[k], b[k]) for k in a), worst
        else:
            assert worst <= 1e-7
    full, tail = losses_of(one_process), losses_of(resumed)
    assert tail == {3: full[3], 4: full[4]}


# ------------------------------------------------------------------------------------------------ flow LoRA files
def module_of(key, prefix="transformer."):
    """`<prefix><module>.lora_A.weight` -> `<module>`."""
    return key[len(prefix):-len(".lora_A.weight")]


def check_flow_targets_saved(one_process, transformer, arch):
    """The 1-process flow run: 4 finite losses; the file's metadata names `arch`; it holds exactly the
    is_flow_lora_target Linear layers of `transformer`, under `transformer.`; the final training state, the
    validation image of the pack's TCD sampler and an EMA file that really holds the EMA were written.
    Returns (trained module names, the file's tensors)."""
    losses = losses_of(one_process)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    path = one_process / LORA
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["tcd.family"] == "TCD LoRA" and meta["tcd.base_architecture"] == arch
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    trained = {module_of(k) for k in keys if ".lora_A." in k}
    expected = {n for n, m in transformer.named_modules()
                if isinstance(m, torch.nn.Linear) and is_flow_lora_target(n)}
    assert trained == expected
    state = training_state(one_process)
    assert (state["arch"], state["global_batch"]) == (arch, 4)
    assert (one_process / "validation" / "step-000004-0.png").is_file()
    assert relative_delta_difference(path, one_process / LORA_EMA) > 0.05     # the EMA file holds the EMA
    return trained, load_file(str(path))


def check_fused_deltas(pipe, one_process):
    """pipe.load_lora_weights + fuse_lora(1.0) of the 1-process LoRA changes each targeted transformer weight by
    exactly B @ A of the file (scale 1: the file carries no alpha; alpha / rank is folded into B) and no other
    weight; every layer of the file becomes a PEFT layer first. Returns (layers in the file, weights changed,
    weights whose delta is well above float noise)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    lora = load_file(str(one_process / LORA))
    n_layers = sum(".lora_A." in k for k in lora)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(one_process), weight_name=LORA)
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules()) == n_layers
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()                      # the fused weights stay, the PEFT layers go
    fused = pipe.transformer.state_dict()
    assert fused.keys() == base.keys()
    changed, visible = set(), set()
    for key in (k for k in lora if ".lora_A." in k):
        w = f"{module_of(key)}.weight"
        expected = lora[key.replace(".lora_A.", ".lora_B.")] @ lora[key]
        # W + delta - W in float32 is exact to a few ulps of W.
        atol = 4 * torch.finfo(torch.float32).eps * float(base[w].abs().max())
        torch.testing.assert_close(fused[w] - base[w], expected, rtol=1e-4, atol=atol, msg=lambda m: f"{w}: {m}")
        changed.add(w)
        if float(expected.abs().max()) > 10 * atol:
            visible.add(w)
    others = [k for k in base if k not in changed and not torch.equal(base[k], fused[k])]
    assert not others, others[:5]
    return n_layers, changed, visible


# ------------------------------------------------------------------------------------------------ ComfyUI side
def train_comfy_lora(model, data, out, lora_name, arch, *extra):
    """2 optimizer steps of the CLI (rank 4, lr 1e-2, no checkpoints) writing `out / lora_name`; the CLI reports
    the 4 images of `data` under `arch`."""
    proc = launch(["--cpu", "--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                   "--resolution", "64", "--max_train_steps", "2", "--lora_rank", "4", "--learning_rate", "1e-2",
                   "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--lora_name", lora_name, *extra],
                  timeout=600)
    assert f"{arch}: 4 images" in proc.stdout + proc.stderr
    return out / lora_name


def train_flow_comfy_lora(tmp_path_factory, arch, lora_name):
    """`train_comfy_lora` on a fresh tiny diffusers `arch` (sd3 / flux) folder, 4 captioned images, batch 2, alpha 8
    at rank 4 (folded into the file). Returns (the pipeline folder, the LoRA file)."""
    from support import tiny_diffusers as td
    work = tmp_path_factory.mktemp(f"cli_{arch}_comfy")
    folder = td.make_pipeline_folder(work / f"tiny_{arch}", arch)
    data = td.make_caption_folder(work / "data", n=4, size=64)
    return folder, train_comfy_lora(folder, data, work / "out", lora_name, arch, "--train_batch_size", "2",
                                    "--lora_alpha", "8")


@contextlib.contextmanager
def installed_lora(tmp_path_factory, path, lora_name):
    """A copy of `path` as `lora_name` in a fresh folder registered with ComfyUI as a loras folder."""
    d = tmp_path_factory.mktemp("loras")
    (d / lora_name).write_bytes(Path(path).read_bytes())
    with loras_folder(d):
        yield d


def flow_expected_deltas(lora: dict, arch: str, hidden: int, depth: int) -> dict:
    """`<ldm>` -> [(rows, B @ A)] of each diffusers layer of the file (scale 1: no alpha in the file), placed by
    flow_lora_files.ldm_target (SD3_TO_LDM / FLUX_TO_LDM, written from the model layouts, independently of
    ComfyUI's key map)."""
    from support import flow_lora_files as flf
    deltas = {}
    for key in (k for k in lora if ".lora_A." in k):
        ldm, rows, swap = flf.ldm_target(arch, module_of(key), hidden, depth)
        assert not swap
        deltas.setdefault(ldm, []).append((rows, lora[key.replace(".lora_A.", ".lora_B.")].float()
                                           @ lora[key].float()))
    return deltas


def check_patched(patcher, base_model, deltas: dict, label: str) -> int:
    """Every expected ComfyUI weight carries patches that change it by exactly the file's deltas (each on its rows
    of a fused weight), no other weight is patched; returns how many weights were checked."""
    import comfy.lora
    sd = base_model.model.diffusion_model.state_dict()
    keys = {f"diffusion_model.{ldm}.weight" for ldm in deltas}
    new = {k for k, v in patcher.patches.items() if len(v) > len(base_model.patches.get(k, []))}
    assert new == keys, (label, sorted(new ^ keys)[:6])
    for ldm, parts in deltas.items():
        key = f"diffusion_model.{ldm}.weight"
        base = sd[f"{ldm}.weight"].float()
        expected = torch.zeros_like(base)
        for rows, delta in parts:
            offset, size = rows if rows is not None else (0, base.shape[0])
            expected[offset:offset + size] += delta
        patched = comfy.lora.calculate_weight(patcher.patches[key], base.clone(), key)
        atol = 4 * torch.finfo(torch.float32).eps * float(base.abs().max())
        torch.testing.assert_close(patched - base, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{label} {ldm}: {m}")
    return len(keys)


def load_with_pack_loader(comfy_model, lora_name, n_layers, model_name):
    """The pack's TCD LoRA Loader on a flow model: it reports the model, every transformer layer of the file
    patched, and the flow preset's family (not SD's). Returns the patched model."""
    import nodes
    loader = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()
    pack_model, _, info, _ = loader.load_lora(comfy_model, lora_name, 1.0)
    print(info)
    assert f"model: {model_name}" in info
    assert f"transformer layers patched: {n_layers}/{n_layers}" in info
    assert "family: TCD (SD3 / SD3.5 / FLUX.1, trained with this pack)" in info
    return pack_model


def check_node_targets_are_the_clis(pack, comfy_model, lora):
    """The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets: the node
    through ComfyUI's ldm -> diffusers table, the CLI through PEFT on diffusers names)."""
    from tcd import backend
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    parts = backend.flow_ldm_to_diffusers(comfy_model)
    node_targets = {p for ldm in loop.lora_target_names(comfy_model) for p in parts[ldm]}
    cli_targets = {module_of(k) for k in lora if ".lora_A." in k}
    assert node_targets == cli_targets, (sorted(node_targets - cli_targets), sorted(cli_targets - node_targets))
