"""A LoRA trained by the accelerate CLI (train.accelerate_tcd) on a single-file SD1.5 checkpoint, loaded in a real
ComfyUI 0.3.75 (in-process) through the pack's TCD LoRA Loader: every layer applied, exactly the trained delta.

The model both sides read is one file: a tiny SD1.5 checkpoint written by ComfyUI's own classes
(scripts/make_tiny_sd15.py --middle attn --vae kl: 320 channels, one level, full-size CLIP-L and SD VAE), which
diffusers reads with `from_single_file(ckpt, config=<folder of configs>)`. (The default tiny checkpoint cannot be
used: its middle block is two ResBlocks, which diffusers' UNet2DConditionModel cannot express, and its TAESD VAE
is not an AutoencoderKL.)
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfyhost
from support import lora_files as lf
from support import tiny_diffusers as td
from support.accelerate_runs import REPO, installed_lora, train_comfy_lora

LORA_NAME = "cli_tcd_lora.safetensors"


@pytest.fixture(scope="module")
def kl_ckpt(pack):
    """The tiny SD1.5 checkpoint with an attention middle block and the SD (KL) VAE, generated once per host."""
    cache = Path(os.environ["TINY_CKPT"]).parent if os.environ.get("TINY_CKPT") else REPO / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    return comfyhost.make_tiny_checkpoint(Path(os.environ["COMFYUI_DIR"]), cache / "tiny_sd15_attnmid_kl.safetensors",
                                          python=sys.executable, extra=("--middle", "attn", "--vae", "kl"))


@pytest.fixture(scope="module")
def trained(kl_ckpt, tmp_path_factory):
    """2 optimizer steps of the CLI on the single file (its CLIP-L, VAE and UNet), LoRA rank 4."""
    work = tmp_path_factory.mktemp("cli_comfy")
    config = td.write_comfy_sd15_config_folder(work / "config")
    data = td.make_caption_folder(work / "data", n=4, size=64)
    return train_comfy_lora(kl_ckpt, data, work / "out", LORA_NAME, "sd", "--model_config", str(config),
                            "--train_batch_size", "1")


@pytest.fixture(scope="module")
def loras_dir(pack, trained, tmp_path_factory):
    with installed_lora(tmp_path_factory, trained, LORA_NAME) as d:
        yield d


def test_cli_lora_applies_every_layer_in_comfyui(pack, kl_ckpt, trained, loras_dir):
    import comfy.lora
    import comfy.sd
    import nodes
    from tcd import backend

    model, clip = comfy.sd.load_checkpoint_guess_config(str(kl_ckpt))[:2]
    lora = load_file(str(trained))
    n_layers = sum(".lora_A." in k for k in lora)
    assert n_layers > 30

    loader = nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()
    new_model, _, info, _ = loader.load_lora(model, LORA_NAME, 1.0, clip=clip)
    print(info)
    assert f"UNet layers patched: {n_layers}/{n_layers}" in info
    assert f"layers matched: {n_layers}/{n_layers}" in info
    assert "family: TCD (SD1.5" in info
    assert "architecture: SD1" in info

    # Exactly the trained weight change B @ A on every layer (diffusers applies the same: scale 1, no alpha).
    diffusers_to_ldm = {d: l for l, d in backend.unet_ldm_to_diffusers(model).items()}
    unet_sd = model.model.diffusion_model.state_dict()
    for key in (k for k in lora if ".lora_A." in k):
        module = key[len("unet."):-len(".lora_A.weight")]
        ldm_key = f"diffusion_model.{diffusers_to_ldm[module]}.weight"
        base = unet_sd[ldm_key[len("diffusion_model."):]].float()
        patched = comfy.lora.calculate_weight(new_model.patches[ldm_key], base.clone(), ldm_key)
        up, down = lora[key.replace(".lora_A.", ".lora_B.")].float(), lora[key].float()
        expected = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        # W + delta - W in float32 is exact to a few ulps of W, not of delta.
        atol = 4 * torch.finfo(torch.float32).eps * float(base.abs().max())
        torch.testing.assert_close(patched - base, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{module}: {m}")

    # The node's trainer targets exactly the layers the CLI trained (one definition, tcd.lora_targets; the node
    # reaches it through ComfyUI's ldm -> diffusers table, the CLI through PEFT's target_modules on diffusers).
    import importlib
    loop = importlib.import_module(pack.__name__ + ".train.comfy_loop")
    ldm_to_diffusers = backend.unet_ldm_to_diffusers(model)
    node_targets = {ldm_to_diffusers[n] for n in loop.lora_target_names(model)
                    if f"{n}.weight" in unet_sd and unet_sd[f"{n}.weight"].ndim >= 2}
    cli_targets = {k[len("unet."):-len(".lora_A.weight")] for k in lora if ".lora_A." in k}
    assert node_targets == cli_targets, (sorted(node_targets - cli_targets), sorted(cli_targets - node_targets))

    # For the record (not this pack's behaviour): core's loader on the same file, as users of LoraLoader get it.
    core_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    n_core = sum(len(v) > len(model.patches.get(k, [])) for k, v in core_model.patches.items())
    print(f"core load_lora_for_models patches {n_core}/{n_layers} layers of this file; the TCD LoRA Loader "
          f"{n_layers}/{n_layers}")

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red square"))
    base_out, lora_out = lf.sample(model, cond), lf.sample(new_model, cond)
    diff = float((lora_out - base_out).abs().max())
    print(f"ComfyUI output with the CLI LoRA differs from the base by {diff:.3g} (max abs, latent)")
    assert diff > 1e-4
