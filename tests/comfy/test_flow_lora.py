"""TCD LoRA Loader on flow transformers inside a real ComfyUI 0.3.75: the tiny SD3 checkpoint (loaded through
ComfyUI's detection, with its CLIP-L) and the tiny in-process Flux, every key format (kohya Flux / SD3 names,
ComfyUI-native, diffusers / PEFT under `transformer.`, `base_model.model.` or no prefix, OneTrainer, with and without
alpha): every layer applied (N/N, counted as patches: split q / k / v land on slices of one fused weight), the model
output equal to the hand-placed weight deltas (tests/support/flow_lora_files.py), core's count beside it."""
import logging

import pytest
import torch

import make_tiny_flow as mtf
from support import flow_lora_files as flf
from support.comfy_folders import loras_folder
from support import lora_files as lf
from tcd.files import save_safetensors_atomic

KINDS = ("sd3", "flux")
ARCH = {"sd3": "SD3", "flux": "Flux"}


@pytest.fixture(scope="module")
def loras_dir(pack, tmp_path_factory):
    with loras_folder(tmp_path_factory.mktemp("flow_loras")) as d:
        yield d


@pytest.fixture(scope="module")
def node(pack):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["TCD_LoraLoader"]()


@pytest.fixture(scope="module")
def flow(pack, tiny_flow_models):
    """SD3 from the tiny checkpoint file (ComfyUI's detection, CLIP-L included); Flux built in-process (detection
    refuses tiny Flux files, test_flow_sampling.py)."""
    import comfy.sd
    sd3, clip = comfy.sd.load_checkpoint_guess_config(str(tiny_flow_models["sd3_checkpoint"]))[:2]
    out = {"sd3": {"model": sd3, "clip": clip}, "flux": {"model": mtf.tiny_model_patcher("flux"), "clip": None}}
    for kind, env in out.items():
        env["cond"] = mtf.conditioning(kind)
        env["base"] = sample(env["model"], env["cond"])
        env["layers"] = {naming: flf.make_layers(kind, env["model"], naming) for naming in ("ldm", "diffusers")}
    return out


def sample(patcher, cond, seed=0):
    """Two Euler steps of the flow model on a fixed latent: the model's output, through ComfyUI's sampling."""
    import comfy.sample
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, 2, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True)


def reference(env, fmt, naming, strength=1.0):
    from tcd import backend
    model = env["model"].clone()
    model.add_patches(flf.reference_patches(fmt, env["layers"][naming], backend.unet_weight_shapes(model),
                                            strength), 1.0)
    return sample(model, env["cond"])


def write(loras_dir, name, sd):
    save_safetensors_atomic(sd, loras_dir / name)
    return name


def info_count(info, label):
    line = next(ln for ln in info.splitlines() if ln.startswith(label))
    done, total = line.split(": ", 1)[1].split(" ", 1)[0].split("/")
    return int(done), int(total)


@pytest.mark.parametrize("fmt", list(flf.FORMATS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_flow_format_patches_every_layer_and_matches_the_reference(kind, fmt, node, flow, loras_dir, caplog):
    from tcd import backend
    env = flow[kind]
    naming = flf.FORMATS[fmt][1]
    layers = env["layers"][naming]
    sd = flf.write_format(fmt, layers)
    name = write(loras_dir, f"{kind}_{fmt.replace(' ', '_').replace('.', '')}.safetensors", sd)
    new_model, _, info, family = node.load_lora(env["model"], name, 1.0)
    assert f"model: {ARCH[kind]}" in info
    assert info_count(info, "transformer layers patched") == (len(layers), len(layers))
    with caplog.at_level(logging.WARNING):
        core = backend.apply_lora(env["model"], None, sd, 1.0, 0.0)[2]       # core LoraLoader on the same file
    print(f"\n{kind} {fmt}: this loader {len(layers)}/{len(layers)}, core {core}/{len(layers)}")
    import comfyui_version
    if comfyui_version.__version__ == "0.3.75":
        assert (core < len(layers)) == (fmt in flf.CORE_LOSES[ARCH[kind]]), (core, len(layers))
    out = sample(new_model, env["cond"])
    assert float((out - reference(env, fmt, naming)).abs().max()) <= 1e-5
    assert float((out - env["base"]).abs().max()) > 1e-2


def test_diffusers_layers_cover_every_comfyui_weight(flow):
    """The diffusers-named layers (split q/k/v included) patch every >= 2-D weight of both tiny models."""
    from tcd import backend
    for kind, env in flow.items():
        patched = {ly.ldm for ly in env["layers"]["diffusers"]}
        assert patched == set(backend.unet_weight_shapes(env["model"])), kind


@pytest.mark.parametrize("kind", KINDS)
def test_flow_lora_strength_scales_the_deltas(kind, node, flow, loras_dir):
    """Hyper-SD3 / Hyper-FLUX run at strength 0.125: the patched model equals the deltas scaled by 0.125."""
    env = flow[kind]
    name = write(loras_dir, f"{kind}_strength.safetensors",
                 flf.write_format("peft transformer.", env["layers"]["diffusers"]))
    out = sample(node.load_lora(env["model"], name, 0.125)[0], env["cond"])
    assert float((out - reference(env, "peft transformer.", "diffusers", 0.125)).abs().max()) <= 1e-5


def test_sd3_text_encoder_layers_are_applied(node, flow, loras_dir):
    """CLIP-L layers of an SD3 LoRA (kohya lora_te_ / diffusers text_encoder.) reach the checkpoint's CLIP."""
    env = flow["sd3"]
    te = lf.make_layers([], lf.te_targets(env["clip"], layers_limit=1))
    te_sd = lf.write_format("kohya", te)
    sd = {**flf.write_format("kohya", env["layers"]["ldm"]), **te_sd}
    name = write(loras_dir, "sd3_with_te.safetensors", sd)
    _, new_clip, info, _ = node.load_lora(env["model"], name, 1.0, env["clip"], 1.0)
    assert info_count(info, "text encoder layers patched") == (len(te), len(te)) == (6, 6)
    tokens = env["clip"].tokenize("a photo of a cat")
    core_clip = lf_core_clip(env["clip"], te_sd)
    got, want = new_clip.encode_from_tokens(tokens), core_clip.encode_from_tokens(tokens)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((got - env["clip"].encode_from_tokens(tokens)).abs().max()) > 1e-3


def lf_core_clip(clip, te_sd):
    """Core's LoraLoader applying the kohya text-encoder keys (lora_te_* maps to CLIP-L): the reference."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(None, clip, te_sd, 0.0, 1.0)[1]


def test_flow_loras_on_the_wrong_model_are_refused(node, flow, loras_dir):
    flux_lora = write(loras_dir, "flux_on_sd3.safetensors", flf.write_format("kohya", flow["flux"]["layers"]["ldm"]))
    with pytest.raises(ValueError, match=r"is for Flux .*double/single stream.* but the model is SD3"):
        node.load_lora(flow["sd3"]["model"], flux_lora, 1.0)
    sd3_lora = write(loras_dir, "sd3_on_flux.safetensors", flf.write_format("peft transformer.",
                                                                             flow["sd3"]["layers"]["diffusers"]))
    with pytest.raises(ValueError, match=r"is for SD3 .* but the model is Flux"):
        node.load_lora(flow["flux"]["model"], sd3_lora, 1.0)


def test_shared_transformer_names_are_decided_by_shape(node, flow, loras_dir):
    """Only `transformer_blocks.N.attn.to_q` layers (both SD3 and Flux have them): the model's shapes decide."""
    sd3_layers = [ly for ly in flow["sd3"]["layers"]["diffusers"]
                  if ly.diffusers.startswith("transformer_blocks.0.attn.to_")]
    name = write(loras_dir, "shared_names.safetensors", flf.write_format("peft transformer.", sd3_layers))
    info = node.load_lora(flow["sd3"]["model"], name, 1.0)[2]
    assert "flow transformer layers that SD3 and Flux share" in info
    with pytest.raises(ValueError, match=r"do not match the Flux model.*shape mismatch"):
        node.load_lora(flow["flux"]["model"], name, 1.0)


def test_flux_family_and_preset_are_named(node, flow, loras_dir):
    name = write(loras_dir, "Hyper-FLUX.1-dev-8steps-lora.safetensors",
                 flf.write_format("peft transformer.", flow["flux"]["layers"]["diffusers"]))
    _, _, info, family = node.load_lora(flow["flux"]["model"], name, 1.0)
    assert "family: Hyper-FLUX" in info and "LoRA strength 0.125" in info and "FluxGuidance 3.5" in info
    assert "note: strength_model 1 differs from the family's 0.125" in info
    assert family["key"] == "hyper-flux" and family["steps"] == 8
