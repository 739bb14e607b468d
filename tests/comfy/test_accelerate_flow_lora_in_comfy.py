"""An SD3 LoRA trained by the accelerate CLI (train.accelerate_tcd on a diffusers StableDiffusion3Pipeline folder),
loaded in a real ComfyUI 0.3.75 (in-process) through the pack's TCD LoRA Loader and through core's loader: every
layer of the file patched, each ComfyUI weight changed by exactly the file's B @ A (split q / k / v placed on their
rows of the fused qkv), and the patched ComfyUI model computing what diffusers computes with the same LoRA loaded.

The model both sides read is one file: the tiny diffusers SD3 transformer (tests/support/tiny_diffusers.py,
SD3_TRANSFORMER: hidden 128 = 64 x depth 2, the size ComfyUI's MMDiT detection reads back), which ComfyUI loads with
comfy.sd.load_diffusion_model_state_dict (diffusers MMDiT keys are converted by
model_detection.convert_diffusers_mmdit).
"""
import pytest
import torch
from safetensors.torch import load_file

from support.accelerate_runs import (check_node_targets_are_the_clis, check_patched, flow_expected_deltas,
                                     installed_lora, load_with_pack_loader, train_flow_comfy_lora)

LORA_NAME = "cli_sd3_tcd_lora.safetensors"


@pytest.fixture(scope="module")
def trained(pack, tmp_path_factory):
    """2 optimizer steps of the CLI on the tiny SD3 folder, LoRA rank 4, alpha 8 (folded into the file)."""
    return train_flow_comfy_lora(tmp_path_factory, "sd3", LORA_NAME)


@pytest.fixture(scope="module")
def loras_dir(pack, trained, tmp_path_factory):
    with installed_lora(tmp_path_factory, trained[1], LORA_NAME) as d:
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


def x0_of(patcher, x, sigma, cond):
    """ComfyUI's denoised output (CONST: x - sigma v) of the (patched) model."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond["embeds"], y=cond["pooled"]).float()


def test_cli_sd3_lora_patches_every_layer_in_comfyui_like_diffusers(pack, trained, loras_dir, comfy_sd3):
    from diffusers import StableDiffusion3Pipeline
    from tcd import backend
    from train import accelerate_flow as flow
    from train import accelerate_tcd as cli
    folder, path = trained
    lora = load_file(str(path))
    n_layers = sum(".lora_A." in k for k in lora)
    assert n_layers == 25 and all(k.startswith("transformer.") for k in lora)
    # B @ A of each layer (scale 1: no alpha in the file) placed on its rows of the ComfyUI weight.
    deltas = flow_expected_deltas(lora, "sd3", hidden=128, depth=2)

    # The pack's loader: every layer of the file (the flow preset, not SD's), exactly its deltas.
    pack_model = load_with_pack_loader(comfy_sd3, LORA_NAME, n_layers, "SD3")
    n_pack = check_patched(pack_model, comfy_sd3, deltas, "pack loader")

    # Core's loader (LoraLoader / load_lora_for_models) on the same file.
    core_model, _, n_core, _ = backend.apply_lora(comfy_sd3, None, lora, 1.0, 0.0)
    assert n_core == n_layers
    n_core_weights = check_patched(core_model, comfy_sd3, deltas, "core loader")
    print(f"CLI SD3 LoRA: {n_layers} layers in the file -> {n_pack} ComfyUI weights (q/k/v fused); pack loader "
          f"{n_layers}/{n_layers} layers, {n_pack} weights exact; core loader {n_core}/{n_layers} layers, "
          f"{n_core_weights} weights exact")

    # The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets).
    check_node_targets_are_the_clis(pack, comfy_sd3, lora)

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
