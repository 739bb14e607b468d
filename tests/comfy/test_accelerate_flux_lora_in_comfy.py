"""A FLUX.1-dev LoRA trained by the accelerate CLI (train.accelerate_tcd on a diffusers FluxPipeline folder), loaded in
a real ComfyUI 0.3.75 (in-process) through the pack's TCD LoRA Loader and through core's loader: every layer of the
file patched, each ComfyUI weight changed by exactly the file's B @ A placed on its rows (q / k / v of the double
blocks' fused qkv; q / k / v and proj_mlp of the single blocks' linear1).

ComfyUI's detection builds Flux only at full width (scripts/make_tiny_flow.py), so the ComfyUI side is the tiny Flux
built in-process from ComfyUI's own classes (tiny_model_patcher) at the diffusers tiny model's shapes
(tests/support/tiny_diffusers.py FLUX_TRANSFORMER: hidden 32 = 2 heads x 16, rotary axes 4 + 6 + 6, one double and
one single block, T5 / CLIP widths 32); its weights are its own, so the check is on the patches, not the outputs.
"""
import pytest
from safetensors.torch import load_file

import make_tiny_flow as mtf
from support import tiny_diffusers as td
from support.accelerate_runs import (check_node_targets_are_the_clis, check_patched, flow_expected_deltas,
                                     installed_lora, load_with_pack_loader, train_flow_comfy_lora)

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
    return train_flow_comfy_lora(tmp_path_factory, "flux", LORA_NAME)


@pytest.fixture(scope="module")
def loras_dir(pack, trained, tmp_path_factory):
    with installed_lora(tmp_path_factory, trained[1], LORA_NAME) as d:
        yield d


@pytest.fixture(scope="module")
def comfy_flux(pack):
    model = mtf.tiny_model_patcher("flux", **COMFY_TINY_FLUX)
    assert type(model.model.model_config).__name__ == "Flux"
    return model


def test_cli_flux_lora_patches_every_layer_in_comfyui(pack, trained, loras_dir, comfy_flux):
    from tcd import backend
    _, path = trained
    lora = load_file(str(path))
    n_layers = sum(".lora_A." in k for k in lora)
    assert n_layers == 17 and all(k.startswith("transformer.") for k in lora)
    # B @ A of each layer (scale 1) placed on its rows of the ComfyUI weight (flow_lora_files.FLUX_TO_LDM).
    deltas = flow_expected_deltas(lora, "flux", HIDDEN, td.FLUX_TRANSFORMER["num_layers"])

    pack_model = load_with_pack_loader(comfy_flux, LORA_NAME, n_layers, "Flux")
    n_pack = check_patched(pack_model, comfy_flux, deltas, "pack loader")

    core_model, _, n_core, _ = backend.apply_lora(comfy_flux, None, lora, 1.0, 0.0)
    n_core_weights = check_patched(core_model, comfy_flux, deltas, "core loader")
    print(f"CLI Flux LoRA: {n_layers} layers in the file -> {n_pack} ComfyUI weights (qkv / linear1 fused); pack "
          f"loader {n_layers}/{n_layers} layers, {n_pack} weights exact; core loader {n_core} patches, "
          f"{n_core_weights} weights exact")

    # The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets).
    check_node_targets_are_the_clis(pack, comfy_flux, lora)
