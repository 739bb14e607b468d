"""tcd.lora and tcd.files without ComfyUI: key formats, architecture, canonical form, validation, bad files, and
the canonical form loaded by diffusers' own load_lora_weights into tiny pipelines built from configs."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tcd import lora as tl
from tcd.files import resolve_inside, save_safetensors_atomic

R = 4


def _layer(sd, prefix, up_suffix, down_suffix, out, inn, alpha=None, k=None, alpha_key=None):
    down = torch.randn(R, inn) if k is None else torch.randn(R, inn, k, k)
    up = torch.randn(out, R) if k is None else torch.randn(out, R, 1, 1)
    sd[prefix + up_suffix] = up
    sd[prefix + down_suffix] = down
    if alpha is not None:
        sd[alpha_key or (prefix + ".alpha")] = torch.tensor(float(alpha))
    return sd


ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
CONV = "down_blocks.0.resnets.0.conv1"


def sd15_like(fmt, context=768):
    """Four layers (attn1.to_q, attn2.to_k, to_out.0, a 3x3 conv) in one key format."""
    sd = {}
    layers = [(f"{ATTN}.attn1.to_q", 320, 320, None), (f"{ATTN}.attn2.to_k", 320, context, None),
              (f"{ATTN}.attn1.to_out.0", 320, 320, None), (CONV, 320, 320, 3)]
    for module, out, inn, k in layers:
        if fmt == "kohya":
            _layer(sd, "lora_unet_" + module.replace(".", "_"), ".lora_up.weight", ".lora_down.weight", out, inn,
                   alpha=2, k=k)
        elif fmt == "diffusers":
            _layer(sd, "unet." + module, ".lora.up.weight", ".lora.down.weight", out, inn, k=k)
        elif fmt == "diffusers-old":
            head, _, last = module.rpartition(".")
            if module.endswith("to_out.0"):
                head, last = module[:-len(".to_out.0")], "to_out"
            name = f"unet.{head}.processor.{last}_lora" if last.startswith("to_") else f"unet.{module}.lora"
            _layer(sd, name, ".up.weight", ".down.weight", out, inn, k=k)
        elif fmt.startswith("peft"):
            prefix = {"peft": "unet.", "peft-base": "base_model.model.", "peft-bare": ""}[fmt]
            _layer(sd, prefix + module, ".lora_B.weight", ".lora_A.weight", out, inn, k=k)
    return sd


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt,label", [
    ("kohya", "kohya"), ("diffusers", "diffusers"), ("diffusers-old", "diffusers + diffusers-old"),
    ("peft", "peft"), ("peft-base", "peft (keys under 'base_model.model.')"), ("peft-bare", "peft")])
def test_every_format_parses_to_the_same_four_diffusers_modules(fmt, label):
    parsed = tl.parse_lora(sd15_like(fmt))
    assert parsed.format == label
    assert not parsed.unrecognised
    conv = tl.to_canonical(parsed, tl.ARCH_SD1)
    assert not conv.unconverted
    assert sorted(conv.layer_sources) == sorted([
        f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q", f"lora_unet_{ATTN.replace('.', '_')}_attn2_to_k",
        f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_out_0", f"lora_unet_{CONV.replace('.', '_')}"])


def test_missing_alpha_means_scale_one_and_alpha_is_kept_when_present():
    conv = tl.to_canonical(tl.parse_lora(sd15_like("peft")), tl.ARCH_SD1)
    alphas = {k: v for k, v in conv.state_dict.items() if k.endswith(".alpha")}
    assert all(v.dtype == torch.float32 and v.ndim == 0 and float(v) == R for v in alphas.values())
    conv = tl.to_canonical(tl.parse_lora(sd15_like("kohya")), tl.ARCH_SD1)
    assert all(float(v) == 2.0 for k, v in conv.state_dict.items() if k.endswith(".alpha"))


def test_peft_alpha_from_diffusers_adapter_metadata():
    parsed = tl.parse_lora(sd15_like("peft"))
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": R,
                                                 "unet.alpha_pattern": {"attn2.to_k": 1}})}
    tl.apply_peft_metadata_alphas(parsed, meta)
    conv = tl.to_canonical(parsed, tl.ARCH_SD1)
    alpha = {k.rsplit("_", 2)[-1].split(".")[0]: float(v) for k, v in conv.state_dict.items() if k.endswith("alpha")}
    assert alpha["q"] == 8 and alpha["k"] == 1 and parsed.alpha_source.startswith("lora_adapter_metadata")


def test_text_encoder_keys_in_every_spelling_map_to_lora_te():
    sd = {}
    _layer(sd, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora.up.weight", ".lora.down.weight",
           768, 768)
    _layer(sd, "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora", ".up.weight", ".down.weight", 768, 768)
    _layer(sd, "text_encoder.text_model.encoder.layers.0.mlp.fc1", ".lora_linear_layer.up.weight",
           ".lora_linear_layer.down.weight", 3072, 768)
    _layer(sd, "lora_te_text_model_encoder_layers_0_mlp_fc2", ".lora_up.weight", ".lora_down.weight", 768, 3072, 1)
    _layer(sd, "text_model.encoder.layers.0.self_attn.v_proj", ".lora_B.weight", ".lora_A.weight", 768, 768)
    conv = tl.to_canonical(tl.parse_lora(sd), tl.ARCH_SD1)
    assert not conv.unconverted
    assert sorted(conv.layer_sources) == sorted(f"lora_te_text_model_encoder_layers_0_{m}" for m in
                                                ("self_attn_q_proj", "self_attn_k_proj", "mlp_fc1", "mlp_fc2",
                                                 "self_attn_v_proj"))


def test_sdxl_text_encoders_become_te1_and_te2_and_add_embedding_keeps_its_ldm_name():
    sd = {}
    _layer(sd, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_B.weight", ".lora_A.weight",
           768, 768)
    _layer(sd, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", ".lora_B.weight", ".lora_A.weight",
           1280, 1280)
    _layer(sd, "unet.add_embedding.linear_1", ".lora_B.weight", ".lora_A.weight", 1280, 2816)
    _layer(sd, "lora_unet_add_embedding_linear_2", ".lora_up.weight", ".lora_down.weight", 1280, 1280, 1)
    parsed = tl.parse_lora(sd)
    assert tl.detect_architecture(parsed).name == tl.ARCH_SDXL
    conv = tl.to_canonical(parsed, tl.ARCH_SDXL)
    assert sorted(conv.layer_sources) == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                                          "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"]


def test_ldm_named_kohya_and_native_need_the_models_table():
    table = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": f"{ATTN}.attn1.to_q",
             "input_blocks.1.0.in_layers.2": CONV}
    sd = {}
    _layer(sd, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", ".lora_up.weight", ".lora_down.weight",
           320, 320, 1)
    _layer(sd, "diffusion_model.input_blocks.1.0.in_layers.2", ".lora_up.weight", ".lora_down.weight", 320, 320 * 9, 1)
    parsed = tl.parse_lora(sd)
    assert parsed.format == "comfyui-native + kohya"
    assert len(tl.to_canonical(parsed, tl.ARCH_SD1).unconverted) == 2        # no table: reported, not guessed
    conv = tl.to_canonical(parsed, tl.ARCH_SD1, table)
    assert sorted(conv.layer_sources) == sorted([f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q",
                                                 f"lora_unet_{CONV.replace('.', '_')}"])


def test_comfy_native_to_canonical_reshapes_convs_and_refuses_other_keys():
    table = {"input_blocks.1.0.in_layers.2": CONV, "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"}
    shapes = {"input_blocks.1.0.in_layers.2": (320, 320, 3, 3), "input_blocks.1.1.proj_in": (320, 320)}
    native = {
        "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight": torch.randn(320, R),
        "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight": torch.randn(R, 320 * 9),
        "diffusion_model.input_blocks.1.0.in_layers.2.alpha": torch.tensor(1.0),
        "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(320, R),
        "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.randn(R, 320),
        "diffusion_model.input_blocks.1.1.proj_in.alpha": torch.tensor(1.0),
    }
    out = tl.comfy_native_to_canonical(native, table, shapes)
    conv = "lora_unet_" + CONV.replace(".", "_")
    assert out[conv + ".lora_down.weight"].shape == (R, 320, 3, 3)
    assert out[conv + ".lora_up.weight"].shape == (320, R, 1, 1)
    assert torch.equal(out[conv + ".lora_down.weight"].flatten(1), native[
        "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight"])
    assert out["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (R, 320)
    assert float(out[conv + ".alpha"]) == 1.0
    with pytest.raises(ValueError, match=r"\.diff_b.*have no place"):
        tl.comfy_native_to_canonical({**native, "diffusion_model.out.2.diff_b": torch.zeros(4)}, table)
    with pytest.raises(ValueError, match="model has no UNet layer"):
        tl.comfy_native_to_canonical(native, {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"})


# ------------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("context,arch", [(768, tl.ARCH_SD1), (1024, tl.ARCH_SD2), (2048, tl.ARCH_SDXL)])
def test_architecture_from_cross_attention_width(context, arch):
    found = tl.detect_architecture(tl.parse_lora(sd15_like("peft", context=context)))
    assert found.name == arch and str(context) in found.evidence


def test_sdxl_lora_on_sd15_model_is_refused_with_both_widths_named():
    found = tl.detect_architecture(tl.parse_lora(sd15_like("kohya", context=2048)))
    with pytest.raises(ValueError) as e:
        tl.check_architecture(found, tl.ARCH_SD1, "'x.safetensors'")
    msg = str(e.value)
    assert "is for SDXL" in msg and "2048" in msg and "model is SD1.x" in msg and "Load an SDXL checkpoint" in msg


def test_conflicting_or_missing_evidence_is_unknown():
    sd = sd15_like("peft", context=768)
    _layer(sd, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", ".lora_B.weight", ".lora_A.weight",
           1280, 1280)
    found = tl.detect_architecture(tl.parse_lora(sd))
    assert found.name == tl.ARCH_UNKNOWN and found.evidence.startswith("conflicting")
    with pytest.raises(ValueError, match="cannot tell which base model"):
        tl.check_architecture(found, tl.ARCH_SD1)
    only_conv = {k: v for k, v in sd15_like("kohya").items() if "resnets" in k}
    assert tl.detect_architecture(tl.parse_lora(only_conv)).name == tl.ARCH_UNKNOWN
    tl.check_architecture(tl.detect_architecture(tl.parse_lora(only_conv)), tl.ARCH_SD1)  # shapes decide later


# ------------------------------------------------------------------------------------------------ validation, plan
def _targets():
    a = ATTN.replace(".", "_")
    return {f"lora_unet_{a}_attn1_to_q": (320, 320), f"lora_unet_{a}_attn2_to_k": (320, 768),
            f"lora_unet_{a}_attn1_to_out_0": (320, 320), "lora_unet_" + CONV.replace(".", "_"): (320, 320, 3, 3)}


def test_plan_matches_every_layer_and_reports_counts():
    plan = tl.plan_lora(sd15_like("peft-base"), {}, "tcd_sd15.safetensors", tl.ARCH_SD1, {}, _targets(), False)
    assert plan.unet_layers == 4 and plan.validation.total == 4 and not plan.validation.unmatched
    assert len(plan.state_dict) == 12 and plan.family.key == "tcd"
    assert plan.format == "peft (keys under 'base_model.model.')" and plan.te_layers == 0


def test_unmatched_layers_are_an_error_listing_them_or_dropped_with_warn():
    targets = _targets()
    targets.pop("lora_unet_" + CONV.replace(".", "_"))
    targets[f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"] = (640, 320)      # shape mismatch
    with pytest.raises(ValueError) as e:
        tl.plan_lora(sd15_like("kohya"), {}, "x.safetensors", tl.ARCH_SD1, {}, targets, False)
    msg = str(e.value)
    assert "2 of 4 layers" in msg and "resnets_0_conv1" in msg and "shape mismatch" in msg and "'warn'" in msg
    plan = tl.plan_lora(sd15_like("kohya"), {}, "x.safetensors", tl.ARCH_SD1, {}, targets, False, "warn")
    assert plan.unet_layers == 2 and len(plan.validation.unmatched) == 2 and plan.validation.total == 4


def test_nan_layers_and_half_layers_are_unmatched():
    sd = sd15_like("kohya")
    key = next(k for k in sd if k.endswith("attn1_to_q.lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    sd.pop(next(k for k in sd if k.endswith("attn2_to_k.lora_down.weight")))
    with pytest.raises(ValueError) as e:
        tl.plan_lora(sd, {}, "x.safetensors", tl.ARCH_SD1, {}, _targets(), False)
    assert "NaN" in str(e.value) and "no down weight" in str(e.value)


def test_not_a_lora_and_other_adapters_are_named():
    ckpt = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1)}
    with pytest.raises(ValueError, match="is not a LoRA.*full checkpoint"):
        tl.plan_lora(ckpt, {}, "ckpt.safetensors", tl.ARCH_SD1, {}, {}, False)
    loha = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="is not a LoRA.*LyCORIS LoHa weights.*core LoraLoader"):
        tl.plan_lora(loha, {}, "loha.safetensors", tl.ARCH_SD1, {}, {}, False)
    diffs = {"diffusion_model.out.2.diff": torch.zeros(4, 4), "diffusion_model.out.2.diff_b": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"bias difference \(.diff_b\), full weight difference"):
        tl.plan_lora(diffs, {}, "diffs.safetensors", tl.ARCH_SD1, {}, {}, False)
    mixed = {**sd15_like("kohya"), "lora_unet_x.dora_scale": torch.ones(320)}
    with pytest.raises(ValueError, match="DoRA"):
        tl.plan_lora(mixed, {}, "x.safetensors", tl.ARCH_SD1, {}, _targets(), False)
    with pytest.raises(ValueError, match="on_unmatched='ignore'.*error, warn"):
        tl.plan_lora(mixed, {}, "x.safetensors", tl.ARCH_SD1, {}, _targets(), False, "ignore")


# ------------------------------------------------------------------------------------------------ files
def test_read_lora_file_refuses_bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(2, 2)}, str(good), metadata={"k": "v"})
    tensors, meta = tl.read_lora_file(good)
    assert list(tensors) == ["lora_unet_a.lora_up.weight"] and meta == {"k": "v"}
    cases = {}
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty.safetensors"] = "empty (0 bytes)"
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-3])
    cases["trunc.safetensors"] = "truncated"
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    cases["short.safetensors"] = "truncated"
    (tmp_path / "garbage.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    cases["garbage.safetensors"] = "not valid JSON"
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")
    cases["huge.safetensors"] = "truncated or not safetensors"
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.ckpt")
    cases["model.ckpt"] = "pickle-based file"
    torch.save({"a": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    cases["renamed.safetensors"] = "pickle/zip"
    cases["missing.safetensors"] = "does not exist"
    (tmp_path / "notes.txt").write_text("hi")
    cases["notes.txt"] = "not a .safetensors file"
    for name, expected in cases.items():
        with pytest.raises(ValueError, match="(?s)" + expected.replace("(", r"\(").replace(")", r"\)")):
            tl.read_lora_file(tmp_path / name)


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """The 8-byte little-endian header length may begin with 0x80 (pickle's opcode) or 'PK' (zip)."""
    for low in (0x80, 0x50):
        for pad in range(0, 600):
            path = tmp_path / f"h{low}.safetensors"
            save_file({"lora_unet_a.lora_up.weight": torch.ones(2, 2)}, str(path), metadata={"p": "x" * pad})
            if path.read_bytes()[0] == low:
                break
        else:
            pytest.fail("no padding gives that first byte")
        assert torch.equal(tl.read_lora_file(path)[0]["lora_unet_a.lora_up.weight"], torch.ones(2, 2))


def test_save_safetensors_atomic_replaces_whole_files_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors_atomic({"x": torch.ones(3)}, path, {"tcd.family": "TCD LoRA"})
    save_safetensors_atomic({"x": torch.full((3,), 2.0)}, path)
    tensors, _ = tl.read_lora_file(path)
    assert torch.equal(tensors["x"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="metadata must map str to str"):
        save_safetensors_atomic({"x": torch.zeros(1)}, path, {"steps": 3})
    with pytest.raises(ValueError, match="torch.Tensor"):
        save_safetensors_atomic({"x": 1.0}, path)
    with pytest.raises(ValueError, match="does not exist"):
        save_safetensors_atomic({"x": torch.zeros(1)}, tmp_path / "nope" / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert torch.equal(tl.read_lora_file(path)[0]["x"], torch.full((3,), 2.0))   # failed saves kept the old file


def test_names_that_escape_the_folder_are_refused(tmp_path):
    root = tmp_path / "loras"
    (root / "sub").mkdir(parents=True)
    assert resolve_inside([root], "sub/x.safetensors") == str(root / "sub" / "x.safetensors")
    assert resolve_inside([root], str(root / "x.safetensors")) == str(root / "x.safetensors")
    for bad in ("../x.safetensors", "sub/../../x.safetensors", "/etc/passwd", str(tmp_path / "x.safetensors"),
                "..\\x.safetensors", "C:\\x.safetensors", "", "a\x00b"):
        with pytest.raises(ValueError, match="outside the loras folders|invalid"):
            resolve_inside([root], bad, kind="LoRA", folder_label="loras")


# ------------------------------------------------------------------------------------------------ diffusers
def _canonical_for(modules, component_base, rank=2, alpha=1.0, seed=0):
    """Canonical LoRA layers for (name, weight) pairs, plus the expected weight deltas (alpha/rank * up @ down)."""
    g = torch.Generator().manual_seed(seed)
    sd, delta = {}, {}
    for name, w in modules:
        base = component_base(name)
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], rank, generator=g) * 0.2
        sd[base + ".lora_down.weight"] = down
        sd[base + ".lora_up.weight"] = up.reshape(*up.shape, 1, 1) if w.ndim == 4 else up
        sd[base + ".alpha"] = torch.tensor(alpha)
        delta[name] = (alpha / rank) * (up @ down.flatten(1)).reshape(w.shape)
    return sd, delta


def _lora_targets(model):
    return [(n, m.weight.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (".layers." in n or not n.startswith("text"))]


def _check_fused(model, expected, before):
    """After pipe.fuse_lora(), each weight must equal base + the expected delta."""
    worst = 0.0
    for name, delta in expected.items():
        mod = model.get_submodule(name)
        w = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight.detach()
        worst = max(worst, float((w - before[name] - delta).abs().max()))
    return worst


def _peft_layers(model):
    import peft
    return sum(1 for _, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def test_canonical_form_loads_fully_in_diffusers_sd15(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                                             scheduler=diffusers.TCDScheduler(steps_offset=1), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    unet_mods, te_mods = _lora_targets(unet), _lora_targets(te)
    sd_u, delta_u = _canonical_for(unet_mods, tl.canonical_unet_base, alpha=1.0)
    sd_t, delta_t = _canonical_for(te_mods, lambda n: tl.canonical_te_base("te", n), alpha=4.0, seed=1)
    path = tmp_path / "canonical.safetensors"
    save_safetensors_atomic({**sd_u, **sd_t}, path)

    ids = torch.arange(1, 9)[None]

    def run():
        emb = pipe.text_encoder(ids)[0]
        out = pipe(prompt_embeds=emb, num_inference_steps=2, guidance_scale=0.0, height=16, width=16,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
        return out

    base_out = run()
    before_u = {n: w for n, w in unet_mods}
    before_t = {n: w for n, w in te_mods}
    pipe.load_lora_weights(str(path))
    assert (_peft_layers(unet), _peft_layers(te)) == (len(unet_mods), len(te_mods))
    lora_out = run()
    assert (lora_out - base_out).abs().max() > 1e-3
    pipe.fuse_lora()
    assert _check_fused(unet, delta_u, before_u) < 1e-5      # names, shapes and alpha/rank scale all right
    assert _check_fused(te, delta_t, before_t) < 1e-5


def test_canonical_form_loads_fully_in_diffusers_sdxl(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True)
    cfg = dict(intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
               max_position_embeddings=77)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **cfg))
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                               tokenizer_2=None, unet=unet,
                                               scheduler=diffusers.TCDScheduler(steps_offset=1))
    mods = {"unet": _lora_targets(unet), "te1": _lora_targets(te1), "te2": _lora_targets(te2)}
    assert any(n == "add_embedding.linear_1" for n, _ in mods["unet"])
    sd_u, delta_u = _canonical_for(mods["unet"], tl.canonical_unet_base, alpha=1.0)
    sd_1, delta_1 = _canonical_for(mods["te1"], lambda n: tl.canonical_te_base("te1", n), seed=1)
    sd_2, delta_2 = _canonical_for(mods["te2"], lambda n: tl.canonical_te_base("te2", n), seed=2)
    path = tmp_path / "canonical_xl.safetensors"
    save_safetensors_atomic({**sd_u, **sd_1, **sd_2}, path)
    before = {k: {n: w for n, w in v} for k, v in mods.items()}
    pipe.load_lora_weights(str(path))
    assert (_peft_layers(unet), _peft_layers(te1), _peft_layers(te2)) == tuple(len(v) for v in mods.values())
    pipe.fuse_lora()
    assert _check_fused(unet, delta_u, before["unet"]) < 1e-5
    assert _check_fused(te1, delta_1, before["te1"]) < 1e-5
    assert _check_fused(te2, delta_2, before["te2"]) < 1e-5


def test_sdxl_add_embedding_under_its_diffusers_name_would_be_lost_by_diffusers():
    """Why the canonical form keeps label_emb for SDXL's add_embedding (module docstring)."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    sd = {}
    _layer(sd, "lora_unet_add_embedding_linear_1", ".lora_up.weight", ".lora_down.weight", 8, 8, 1)
    _layer(sd, "lora_unet_label_emb_0_0", ".lora_up.weight", ".lora_down.weight", 8, 8, 1)
    out, _ = conv._convert_non_diffusers_lora_to_diffusers(dict(sd))
    names = sorted(k for k in out if k.endswith("down.weight"))
    assert names == ["unet.add.embedding.linear.lora.down.weight", "unet.add_embedding.linear_1.lora.down.weight"]
