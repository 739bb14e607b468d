"""tcd.lora on SD3 / Flux LoRA key formats without ComfyUI: parsing every spelling to one canonical name per
layer, architecture from layer names, and validation against weight slices."""
import pytest
import torch

from tcd import lora as tl

R = 4
FLUX_Q = "transformer_blocks.0.attn.to_q"
FLUX_SINGLE = "single_transformer_blocks.1.proj_mlp"


def _pair(sd, base, up_suffix, down_suffix, out, inn, alpha=None):
    sd[base + up_suffix] = torch.randn(out, R)
    sd[base + down_suffix] = torch.randn(R, inn)
    if alpha is not None:
        sd[base + ".alpha"] = torch.tensor(float(alpha))
    return sd


def flux_lora(fmt):
    """Two diffusers-named Flux layers (a q slice, a single-block MLP slice) or two ldm-named ones."""
    sd = {}
    if fmt in ("peft", "peft-base", "peft-bare"):
        prefix = {"peft": "transformer.", "peft-base": "base_model.model.", "peft-bare": ""}[fmt]
        _pair(sd, prefix + FLUX_Q, ".lora_B.weight", ".lora_A.weight", 64, 64)
        _pair(sd, prefix + FLUX_SINGLE, ".lora_B.weight", ".lora_A.weight", 256, 64)
    elif fmt == "onetrainer":
        _pair(sd, "lora_transformer_" + FLUX_Q.replace(".", "_"), ".lora_up.weight", ".lora_down.weight", 64, 64, 2)
        _pair(sd, "lora_transformer_" + FLUX_SINGLE.replace(".", "_"), ".lora_up.weight", ".lora_down.weight",
              256, 64, 2)
    elif fmt == "kohya":
        _pair(sd, "lora_unet_double_blocks_0_img_attn_qkv", ".lora_up.weight", ".lora_down.weight", 192, 64, 2)
        _pair(sd, "lora_unet_single_blocks_1_linear1", ".lora_up.weight", ".lora_down.weight", 448, 64, 2)
    elif fmt == "native":
        _pair(sd, "diffusion_model.double_blocks.0.img_attn.qkv", ".lora_up.weight", ".lora_down.weight", 192, 64, 2)
        _pair(sd, "diffusion_model.single_blocks.1.linear1", ".lora_up.weight", ".lora_down.weight", 448, 64, 2)
    return sd


# What tcd.backend.lora_target_shapes reports for a Flux model with hidden 64: whole ldm weights and diffusers
# modules, a q slice being 64 rows of the 192-row qkv, proj_mlp the 256 rows after q/k/v in linear1.
TARGETS = {"lora_unet_double_blocks_0_img_attn_qkv": (192, 64), "lora_unet_single_blocks_1_linear1": (448, 64),
           f"transformer.{FLUX_Q}": (64, 64), f"transformer.{FLUX_SINGLE}": (256, 64)}


@pytest.mark.parametrize("fmt,canonical,label", [
    ("peft", {f"transformer.{FLUX_Q}", f"transformer.{FLUX_SINGLE}"}, "peft"),
    ("peft-base", {f"transformer.{FLUX_Q}", f"transformer.{FLUX_SINGLE}"}, "peft (keys under 'base_model.model.')"),
    ("peft-bare", {f"transformer.{FLUX_Q}", f"transformer.{FLUX_SINGLE}"}, "peft"),
    ("onetrainer", {f"transformer.{FLUX_Q}", f"transformer.{FLUX_SINGLE}"}, "onetrainer"),
    ("kohya", {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"}, "kohya"),
    ("native", {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"}, "comfyui-native"),
])
def test_every_flux_spelling_gets_one_canonical_name_per_layer(fmt, canonical, label):
    plan = tl.plan_lora(flux_lora(fmt), {}, "x.safetensors", tl.ARCH_FLUX, {}, TARGETS, False)
    assert plan.format == label
    assert set(tl.layer_bases(plan.state_dict)) == canonical
    assert plan.unet_layers == 2 and not plan.validation.unmatched
    alpha = float(plan.state_dict[sorted(canonical)[0] + ".alpha"])
    assert alpha == (2.0 if fmt in ("onetrainer", "kohya", "native") else R)   # no alpha: scale 1 (alpha = rank)


@pytest.mark.parametrize("fmt", ["peft", "onetrainer", "kohya", "native"])
def test_flux_names_are_read_as_flux(fmt):
    found = tl.detect_architecture(tl.parse_lora(flux_lora(fmt)))
    assert found.name == tl.ARCH_FLUX, found


def test_sd3_names_are_read_as_sd3_and_shared_names_stay_open():
    sd3 = _pair({}, "lora_unet_joint_blocks_0_x_block_attn_qkv", ".lora_up.weight", ".lora_down.weight", 384, 128)
    assert tl.detect_architecture(tl.parse_lora(sd3)).name == tl.ARCH_SD3
    patch = _pair({}, "transformer.pos_embed.proj", ".lora_B.weight", ".lora_A.weight", 128, 64)
    assert tl.detect_architecture(tl.parse_lora(patch)).name == tl.ARCH_SD3
    # SD3's cross-attention-free attn2 (dual attention) is not a UNet cross-attention context
    attn2 = _pair({}, "transformer.transformer_blocks.0.attn2.to_k", ".lora_B.weight", ".lora_A.weight", 128, 128)
    shared = tl.detect_architecture(tl.parse_lora(attn2))
    assert shared.name == tl.ARCH_UNKNOWN and "SD3 and Flux share" in shared.evidence
    tl.check_architecture(shared, tl.ARCH_SD3)   # names and shapes decide later
    tl.check_architecture(shared, tl.ARCH_FLUX)


def test_flow_and_unet_loras_are_refused_on_each_others_models():
    flux = tl.detect_architecture(tl.parse_lora(flux_lora("kohya")))
    with pytest.raises(ValueError, match="is for Flux .* but the model is SDXL"):
        tl.check_architecture(flux, tl.ARCH_SDXL)
    with pytest.raises(ValueError, match="is for Flux .* but the model is SD3"):
        tl.check_architecture(flux, tl.ARCH_SD3)
    unet = _pair({}, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", ".lora_up.weight",
                 ".lora_down.weight", 320, 2048)
    with pytest.raises(ValueError, match="is for SDXL .* but the model is Flux"):
        tl.check_architecture(tl.detect_architecture(tl.parse_lora(unet)), tl.ARCH_FLUX)
    mixed = {**flux_lora("kohya"), **unet}
    assert tl.detect_architecture(tl.parse_lora(mixed)).evidence.startswith("conflicting")


def test_a_slice_of_the_wrong_size_and_unknown_modules_are_unmatched():
    targets = dict(TARGETS)
    targets[f"transformer.{FLUX_Q}"] = (128, 64)          # a model with hidden 128
    sd = flux_lora("peft")
    _pair(sd, "transformer.transformer_blocks.7.attn.to_q", ".lora_B.weight", ".lora_A.weight", 64, 64)
    with pytest.raises(ValueError) as e:
        tl.plan_lora(sd, {}, "x.safetensors", tl.ARCH_FLUX, {}, targets, False)
    msg = str(e.value)
    assert "2 of 3 layers" in msg and "shape mismatch" in msg and "transformer_blocks.7.attn.to_q" in msg
    onetrainer = _pair({}, "lora_transformer_transformer_blocks_9_attn_to_q", ".lora_up.weight", ".lora_down.weight",
                       64, 64)
    with pytest.raises(ValueError, match="no transformer module named 'transformer_blocks_9_attn_to_q'"):
        tl.plan_lora(onetrainer, {}, "x.safetensors", tl.ARCH_FLUX, {}, TARGETS, False)


def test_t5_layers_are_named_not_dropped():
    sd = {**flux_lora("kohya"), "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(8, 4),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="T5-XXL text-encoder layer"):
        tl.plan_lora(sd, {}, "x.safetensors", tl.ARCH_FLUX, {}, TARGETS, False)
    plan = tl.plan_lora(sd, {}, "x.safetensors", tl.ARCH_FLUX, {}, TARGETS, False, "warn")
    assert plan.unet_layers == 2 and len(plan.validation.unmatched) == 2
