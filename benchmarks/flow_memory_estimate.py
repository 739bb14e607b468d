"""Estimated GPU memory of TCD LoRA training on full-size SD3.5 and FLUX.1 transformers (no GPU measured).

What is counted, per model (diffusers' own classes with the published configs, built on the meta device, so no
weights are needed):
* weights: every transformer parameter in bf16 (2 bytes); one copy, since teacher, student and target share it;
* LoRA training state: the rank-64 LoRA on the layers `tcd.lora_targets.is_flow_lora_target` selects, at 20 bytes
  per LoRA parameter (float32 weights, gradients, AdamW's two moments, the EMA target copy);
* activations per image for the student's forward + backward at 1024 x 1024 (SD3: 4096 image + 333 text tokens;
  Flux: 4096 + 512), measured on the CPU: one real-size block of each kind (random weights, bf16, the LoRA attached
  with PEFT) runs forward with torch's saved-tensor hooks counting the distinct tensors autograd keeps for backward
  (parameters and attention-probability matrices excluded: a GPU's flash / memory-efficient attention keeps only
  O(tokens) per head). Each block is measured at two small token counts and extrapolated linearly in tokens, which
  is exact when attention keeps O(tokens); the fit's two points are in the results. With gradient checkpointing
  only each block's inputs stay, plus one block's activations while it is recomputed.

The teacher's passes and the target's pass run without gradients: they hold one block's activations at a time and
add nothing to the student's peak. Text encoders, the VAE and the CUDA context are not included (the node receives
ready conditioning and latents; the CLI's encoders are listed in the README).

    source scripts/host/env.sh && $HOST_PY benchmarks/flow_memory_estimate.py
Writes benchmarks/results/flow_memory_estimate.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tcd.lora_targets import is_flow_lora_target  # noqa: E402

RANK = 64
LORA_BYTES_PER_PARAM = 20
GIB = 2 ** 30
# Published configs (the transformer/config.json of each release).
MODELS = {
    "SD3.5 Medium": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), 4096, 333),
    "SD3.5 Large": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                                qk_norm="rms_norm"), 4096, 333),
    "FLUX.1-dev": ("flux", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                   4096, 512),
}
PROBE_TOKENS = ((128, 32), (256, 64))          # (image, text) token counts of the two measurements


def build_on_meta(kind: str, config: dict):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        return cls(**config)


def lora_parameter_count(model) -> tuple[int, int]:
    layers = params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_flow_lora_target(name):
            layers += 1
            params += RANK * (module.in_features + module.out_features)
    return layers, params


def real_block(block, prefix: str):
    """A meta block made real (random bf16 weights) with a rank-64 PEFT LoRA on its target layers."""
    from peft import LoraConfig, inject_adapter_in_model
    block = block.to_empty(device="cpu")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block = block.to(torch.bfloat16)
    targets = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and
               is_flow_lora_target(f"{prefix}.0.{n}")]
    block = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    return block


def saved_bytes(run, params: set, attention_sizes: set) -> int:
    """Bytes of the distinct tensors autograd saves during run() (parameters and attention matrices, i.e. tensors
    whose last two sizes are a token count twice, excluded)."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        is_attention = t.ndim >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in attention_sizes
        if ptr not in params and not is_attention:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def block_runner(kind: str, block, block_kind: str, model, img: int, txt: int):
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    x = torch.randn(1, img, hidden, dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(1, txt, hidden, dtype=torch.bfloat16, requires_grad=True)
    temb = torch.randn(1, hidden, dtype=torch.bfloat16)
    total = img + txt
    attention_sizes = {img, txt, total}
    if kind == "sd3":
        return (lambda: block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)), attention_sizes
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    rope = FluxPosEmbed(theta=10000, axes_dim=list(model.config.axes_dims_rope))
    cos, sin = rope(torch.zeros(total, 3))
    rotary = (cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    return (lambda: block(hidden_states=x, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rotary)), \
        attention_sizes


def block_kinds(kind: str, model) -> list[tuple[str, str, int, object]]:
    """(label, diffusers prefix, how many, one block) for each distinct block kind."""
    if kind == "flux":
        return [("double", "transformer_blocks", len(model.transformer_blocks), model.transformer_blocks[0]),
                ("single", "single_transformer_blocks", len(model.single_transformer_blocks),
                 model.single_transformer_blocks[0])]
    blocks = model.transformer_blocks
    dual = [b for b in blocks if getattr(b, "use_dual_attention", False)]
    plain = [b for b in blocks[:-1] if not getattr(b, "use_dual_attention", False)]
    out = []
    if dual:
        out.append(("joint + attn2", "transformer_blocks", len(dual), dual[0]))
    if plain:
        out.append(("joint", "transformer_blocks", len(plain), plain[0]))
    out.append(("joint (last, context pre-only)", "transformer_blocks", 1, blocks[-1]))
    return out


def estimate(name: str, kind: str, config: dict, img_tokens: int, txt_tokens: int) -> dict:
    model = build_on_meta(kind, config)
    base = sum(p.numel() for p in model.parameters())
    layers, lora = lora_parameter_count(model)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    full_act = ckpt_inputs = max_block = 0
    kinds = []
    for label, prefix, count, meta_block in block_kinds(kind, model):
        block = real_block(meta_block, prefix)
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        points = []
        for img, txt in PROBE_TOKENS:
            run, attn = block_runner(kind, block, label, model, img, txt)
            points.append((img + txt, saved_bytes(run, params, attn)))
        (n0, b0), (n1, b1) = points
        per_token = (b1 - b0) / (n1 - n0)
        at_size = b0 + per_token * (img_tokens + txt_tokens - n0)
        kinds.append({"block": label, "count": count, "probe_points": points,
                      "bytes_per_image_1024px": at_size})
        full_act += count * at_size
        # checkpointing keeps each block's inputs (image + text streams, bf16)
        ckpt_inputs += count * (img_tokens + txt_tokens) * hidden * 2
        max_block = max(max_block, at_size)
        del block
    weights = base * 2
    lora_state = lora * LORA_BYTES_PER_PARAM
    return {
        "model": name, "transformer_parameters": base, "lora_layers": layers, "lora_parameters": lora,
        "weights_bf16_gib": weights / GIB, "lora_training_state_gib": lora_state / GIB,
        "activations_per_image_gib": full_act / GIB,
        "activations_per_image_checkpointing_gib": (ckpt_inputs + max_block) / GIB,
        "tokens": [img_tokens, txt_tokens], "blocks": kinds,
    }


def main() -> None:
    torch.manual_seed(0)
    results = [estimate(name, *spec) for name, spec in MODELS.items()]
    for r in results:
        print(f"{r['model']}: {r['transformer_parameters'] / 1e9:.2f} B params, weights {r['weights_bf16_gib']:.1f} "
              f"GiB, LoRA {r['lora_layers']} layers {r['lora_parameters'] / 1e6:.0f} M params -> "
              f"{r['lora_training_state_gib']:.1f} GiB, activations/image {r['activations_per_image_gib']:.1f} GiB "
              f"({r['activations_per_image_checkpointing_gib']:.2f} GiB with checkpointing)")
    out = REPO / "benchmarks" / "results" / "flow_memory_estimate.json"
    payload = {"measured_on": "CPU (estimate; no GPU)", "rank": RANK, "resolution": 1024,
               "lora_bytes_per_parameter": LORA_BYTES_PER_PARAM, "models": results}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
