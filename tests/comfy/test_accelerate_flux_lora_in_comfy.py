"""A FLUX.1-dev LoRA trained by the accelerate CLI (train.accelerate_tcd on a diffusers FluxPipeline folder), loaded in
a real ComfyUI 0.3.75 (in-process) through the pack's TCD LoRA Loader and through core's loader: every layer of the
file patched, each ComfyUI weight changed by exactly the file's B @ A placed on its rows (q / k / v of the double
blocks' fused qkv; q / k / v and proj_mlp of the single blocks' linear1).

ComfyUI's detection builds Flux only at full width (scripts/make_tiny_flow.py), so the ComfyUI side is the tiny Flux
built in-process from ComfyUI's own classes (tiny_model_patcher) at the diffusers tiny model's shapes
(tests/support/tiny_diffusers.py FLUX_TRANSFORMER: hidden 32 = 2 heads x 16, rotary axes 4 + 6 + 6, one double and
one single block, T5 / CLIP widths 32); its weights are its own, so the check is on the patches, not the outputs.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import make_tiny_flow as mtf
from support import flow_lora_files as flf
from support import tiny_diffusers as td
from support.comfy_folders import loras_folder

REPO = Path(__file__).resolve().parents[2]
LORA_NAME = "cli_flux_tcd_lora.safetensors"
HIDDEN = td.FLUX_TRANSFORMER["num_attention_heads"] * td.FLUX_TRANSFORMER["attention_head_dim"]
COMFY_TINY_FLUX = dict(hidden_size=HIDDEN, num_heads=td.FLUX_TRANSFORMER["num_attention_heads"],
                       axes_dim=list(td.FLUX_TRANSFORMER["axes_dims_rope"]),
                       depth=td.FLUX_TRANSFORMER["num_layers"],
                       depth_single_blocks=td.FLUX_TRANSFORMER["num_single_layers"],
                       context_in_dim=td.FLUX_TRANSFORMER["joint_attention_dim"],
                       vec_in_dim=td.FLUX_TRANSFORMER["pooled_projection_dim"])


@pytest.fixture(scope="module")
def trained(pack, tmp_path_factory):
    """2 optimizer steps of the CLI on the tiny Flux folder, LoRA rank 4, alpha 8 (folded into the file)."""
    work = tmp_path_factory.mktemp("cli_flux_comfy")
    folder = td.make_pipeline_folder(work / "tiny_flux", "flux")
    data = td.make_caption_folder(work / "data", n=4, size=64)
    out = work / "out"
    cmd = [sys.executable, "-m", "train.accelerate_tcd", "--cpu", "--pretrained_model", str(folder),
           "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "2",
           "--train_batch_size", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
           "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--lora_name", LORA_NAME]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "flux: 4 images" in proc.stdout + proc.stderr
    return folder, out / LORA_NAME


@pytest.fixture(scope="module")
def loras_dir(pack, trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    (d / LORA_NAME).write_bytes(trained[1].read_bytes())
    with loras_folder(d):
        yield d


@pytest.fixture(scope="module")
def comfy_flux(pack):
    model = mtf.tiny_model_patcher("flux", **COMFY_TINY_FLUX)
    assert type(model.model.model_config).__name__ == "Flux"
    return model


def expected_deltas(lora: dict) -> dict:
    """`<ldm>` -> [(rows, B @ A)] of each diffusers layer of the file (scale 1), from flow_lora_files.FLUX_TO_LDM
    (written from the model layouts, independently of ComfyUI's key map)."""
    deltas = {}
    for key in (k for k in lora if ".lora_A." in k):
        module = key[len("transformer."):-len(".lora_A.weight")]
        ldm, rows, swap = flf.ldm_target("flux", module, HIDDEN, td.FLUX_TRANSFORMER["num_layers"])
        assert not swap
        deltas.setdefault(ldm, []).append((rows, lora[key.replace(".lora_A.", ".lora_B.")].float()
                                           @ lora[key].float()))
    return deltas


def check_patched(patcher, base_model, deltas: dict, label: str) -> int:
    """Every expected ComfyUI weight carries patches that change it by exactly the file's deltas, no other weight
    is patched; returns how many weights were checked."""
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


def test_cli_flux_lora_patches_every_layer_in_comfyui(pack, trained, loras_dir, comfy_flux):
    import nodes
    from tcd import backend
    _, path = trained
    lora = load_file(str(path))
    n_layers = sum(".lora_A." in k for k in lora)
    assert n_layers == 17 and all(k.startswith("transformer.") for k in lora)
    deltas = expected_deltas(lora)

    loader = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()
    pack_model, _, info, _ = loader.load_lora(comfy_flux, LORA_NAME, 1.0)
    print(info)
    assert "model: Flux" in info
    assert f"transformer layers patched: {n_layers}/{n_layers}" in info
    assert "family: TCD (SD3 / SD3.5 / FLUX.1, trained with this pack)" in info
    n_pack = check_patched(pack_model, comfy_flux, deltas, "pack loader")

    core_model, _, n_core, _ = backend.apply_lora(comfy_flux, None, lora, 1.0, 0.0)
    n_core_weights = check_patched(core_model, comfy_flux, deltas, "core loader")
    print(f"CLI Flux LoRA: {n_layers} layers in the file -> {n_pack} ComfyUI weights (qkv / linear1 fused); pack "
          f"loader {n_layers}/{n_layers} layers, {n_pack} weights exact; core loader {n_core} patches, "
          f"{n_core_weights} weights exact")

    # The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets).
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    parts = backend.flow_ldm_to_diffusers(comfy_flux)
    node_targets = {p for ldm in loop.lora_target_names(comfy_flux) for p in parts[ldm]}
    cli_targets = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if ".lora_A." in k}
    assert node_targets == cli_targets, (sorted(node_targets - cli_targets), sorted(cli_targets - node_targets))
