"""An SD3 LoRA trained by the accelerate CLI (train.accelerate_tcd on a diffusers StableDiffusion3Pipeline folder),
loaded in a real ComfyUI 0.3.75 (in-process) through the pack's TCD LoRA Loader and through core's loader: every
layer of the file patched, each ComfyUI weight changed by exactly the file's B @ A (split q / k / v placed on their
rows of the fused qkv), and the patched ComfyUI model computing what diffusers computes with the same LoRA loaded.

The model both sides read is one file: the tiny diffusers SD3 transformer (tests/support/tiny_diffusers.py,
SD3_TRANSFORMER: hidden 128 = 64 x depth 2, the size ComfyUI's MMDiT detection reads back), which ComfyUI loads with
comfy.sd.load_diffusion_model_state_dict (diffusers MMDiT keys are converted by
model_detection.convert_diffusers_mmdit).
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import flow_lora_files as flf
from support import tiny_diffusers as td
from support.comfy_folders import loras_folder

REPO = Path(__file__).resolve().parents[2]
LORA_NAME = "cli_sd3_tcd_lora.safetensors"


@pytest.fixture(scope="module")
def trained(pack, tmp_path_factory):
    """2 optimizer steps of the CLI on the tiny SD3 folder, LoRA rank 4, alpha 8 (folded into the file)."""
    work = tmp_path_factory.mktemp("cli_sd3_comfy")
    folder = td.make_pipeline_folder(work / "tiny_sd3", "sd3")
    data = td.make_caption_folder(work / "data", n=4, size=64)
    out = work / "out"
    cmd = [sys.executable, "-m", "train.accelerate_tcd", "--cpu", "--pretrained_model", str(folder),
           "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "2",
           "--train_batch_size", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
           "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--lora_name", LORA_NAME]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "sd3: 4 images" in proc.stdout + proc.stderr
    return folder, out / LORA_NAME


@pytest.fixture(scope="module")
def loras_dir(pack, trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    (d / LORA_NAME).write_bytes(trained[1].read_bytes())
    with loras_folder(d):
        yield d


@pytest.fixture(scope="module")
def comfy_sd3(pack, trained):
    """The CLI's base transformer (diffusers keys) as a ComfyUI SD3 model."""
    import comfy.sd
    folder, _ = trained
    model = comfy.sd.load_diffusion_model_state_dict(
        load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")))
    assert model is not None and type(model.model.model_config).__name__ == "SD3"
    cfg = model.model.model_config.unet_config
    assert cfg["depth"] == 2 and cfg["x_block_self_attn_layers"] == [0]
    return model


def expected_deltas(lora: dict, depth: int, hidden: int) -> dict:
    """`diffusion_model.<ldm>.weight` -> the full-weight change the file must make: B @ A of each diffusers layer
    (scale 1: no alpha in the file) placed on its rows of the ComfyUI weight (flow_lora_files.SD3_TO_LDM, written
    from the model layouts, independently of ComfyUI's key map)."""
    deltas = {}
    for key in (k for k in lora if ".lora_A." in k):
        module = key[len("transformer."):-len(".lora_A.weight")]
        ldm, rows, swap = flf.ldm_target("sd3", module, hidden, depth)
        assert not swap
        delta = lora[key.replace(".lora_A.", ".lora_B.")].float() @ lora[key].float()
        deltas.setdefault(ldm, []).append((rows, delta))
    return deltas


def check_patched(patcher, base_model, deltas: dict, label: str) -> int:
    """Every expected ComfyUI weight carries patches that change it by exactly the file's deltas; returns how many
    weights were checked. No other weight is patched."""
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


def x0_of(patcher, x, sigma, cond):
    """ComfyUI's denoised output (CONST: x - sigma v) of the (patched) model."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond["embeds"], y=cond["pooled"]).float()


def test_cli_sd3_lora_patches_every_layer_in_comfyui_like_diffusers(pack, trained, loras_dir, comfy_sd3):
    import nodes
    from diffusers import StableDiffusion3Pipeline
    from tcd import backend
    from train import accelerate_flow as flow
    from train import accelerate_tcd as cli
    folder, path = trained
    lora = load_file(str(path))
    n_layers = sum(".lora_A." in k for k in lora)
    assert n_layers == 25 and all(k.startswith("transformer.") for k in lora)
    deltas = expected_deltas(lora, depth=2, hidden=128)

    # The pack's loader: every layer of the file, exactly its deltas.
    loader = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()
    pack_model, _, info, _ = loader.load_lora(comfy_sd3, LORA_NAME, 1.0)
    print(info)
    assert "model: SD3" in info
    assert f"transformer layers patched: {n_layers}/{n_layers}" in info
    assert "family: TCD (SD3 / SD3.5 / FLUX.1, trained with this pack)" in info     # the flow preset, not SD's
    n_pack = check_patched(pack_model, comfy_sd3, deltas, "pack loader")

    # Core's loader (LoraLoader / load_lora_for_models) on the same file.
    core_model, _, n_core, _ = backend.apply_lora(comfy_sd3, None, lora, 1.0, 0.0)
    assert n_core == n_layers
    n_core_weights = check_patched(core_model, comfy_sd3, deltas, "core loader")
    print(f"CLI SD3 LoRA: {n_layers} layers in the file -> {n_pack} ComfyUI weights (q/k/v fused); pack loader "
          f"{n_layers}/{n_layers} layers, {n_pack} weights exact; core loader {n_core}/{n_layers} layers, "
          f"{n_core_weights} weights exact")

    # The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets: the node
    # through ComfyUI's ldm -> diffusers table, the CLI through PEFT on diffusers names).
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    parts = backend.flow_ldm_to_diffusers(comfy_sd3)
    node_targets = {p for ldm in loop.lora_target_names(comfy_sd3) for p in parts[ldm]}
    cli_targets = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if ".lora_A." in k}
    assert node_targets == cli_targets, (sorted(node_targets - cli_targets), sorted(cli_targets - node_targets))

    # The same computation as diffusers with the same LoRA: x0 = x - sigma v, at timestep sigma * 1000 (both sides).
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
    cond, _ = flow.SD3Conditioner(pipe, "cpu")(["a red square"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    call = flow.TransformerCall(1000)
    with torch.no_grad():
        v_base = cli.call_model(pipe.transformer, call, x, sigma, cond)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        v_lora = cli.call_model(pipe.transformer, call, x, sigma, cond)
    comfy_base = x0_of(comfy_sd3, x, sigma, cond)
    comfy_pack = x0_of(pack_model, x, sigma, cond)
    comfy_core = x0_of(core_model, x, sigma, cond)
    # Two float32 implementations of one network (ComfyUI's MMDiT with fused qkv, diffusers' SD3 transformer):
    # equal to 1e-4 of the output's scale (the DESIGN parity tolerance), far below what the LoRA changes.
    tol = 1e-4 * float((x - sigma * v_base).abs().max())
    torch.testing.assert_close(comfy_base, x - sigma * v_base, rtol=0, atol=tol)
    torch.testing.assert_close(comfy_pack, x - sigma * v_lora, rtol=0, atol=tol)
    torch.testing.assert_close(comfy_core, comfy_pack, rtol=0, atol=tol)
    change = float((comfy_pack - comfy_base).abs().max())
    print(f"ComfyUI x0 with the CLI LoRA differs from the base by {change:.3g}; from diffusers' x0 with the same "
          f"LoRA by {float((comfy_pack - (x - sigma * v_lora)).abs().max()):.2g} (tolerance {tol:.2g})")
    assert change > 10 * tol          # the comparison above would see a LoRA that was not applied
