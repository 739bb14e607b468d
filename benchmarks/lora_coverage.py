"""Format x architecture -> LoRA layers patched by the TCD LoRA Loader vs by core ComfyUI's LoraLoader.

The same random LoRA layers (every >= 2-D UNet weight, and every CLIP attention/MLP weight) are written in each key
format for the tiny SD1.5 checkpoint and an in-process tiny SDXL (real comfy.model_base.SDXL; its CLIP-L/bigG are
ComfyUI's real classes, used only for the key map and patch counting). Flow transformers: the tiny SD3-class and
Flux-class models of scripts/make_tiny_flow.py, with layers over every ComfyUI weight (ldm-named formats) or every
Linear / Conv2d of the same-shaped diffusers transformer (diffusers-named formats, split q/k/v included; see
tests/support/flow_lora_files.py). Core = comfy.sd.load_lora_for_models on the file as it is (what LoraLoader
does); this loader = tcd.lora conversion, then the same function. Counts are the patches added (ModelPatcher.patches
of the model / the CLIP's patcher): one per LoRA layer, also where split q/k/v layers patch slices of one weight.

    source scripts/host/env.sh && $HOST_PY benchmarks/lora_coverage.py
Writes benchmarks/results/lora_coverage.json and .md.
"""
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
import comfyhost  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def coverage(arch, model, clip, layers, lf, backend, tl):
    rows = []
    for fmt in lf.FORMATS:
        sd = lf.write_format(fmt, layers)
        total_u, total_t = lf.n_layers(fmt, layers, "unet"), lf.n_layers(fmt, layers, "te")
        plan = tl.plan_lora(sd, {}, f"{fmt}.safetensors", backend.model_architecture(model),
                            backend.unet_ldm_to_diffusers(model), backend.lora_target_shapes(model, clip), True)
        ours = backend.apply_lora(model, clip, plan.state_dict, 1.0, 1.0)[2:]
        core = backend.apply_lora(model, clip, sd, 1.0, 1.0)[2:]
        rows.append({"format": fmt, "detected_format": plan.format, "architecture": arch,
                     "unet_layers": total_u, "te_layers": total_t,
                     "this_loader_unet": ours[0], "this_loader_te": ours[1],
                     "core_unet": core[0], "core_te": core[1]})
    return rows


def flow_coverage(arch, model, kind, flf, backend, tl):
    rows = []
    layers = {naming: flf.make_layers(kind, model, naming) for naming in ("ldm", "diffusers")}
    for fmt, (_, naming) in flf.FORMATS.items():
        sd = flf.write_format(fmt, layers[naming])
        plan = tl.plan_lora(sd, {}, f"{fmt}.safetensors", backend.model_architecture(model),
                            backend.unet_ldm_to_diffusers(model), backend.lora_target_shapes(model), False)
        ours = backend.apply_lora(model, None, plan.state_dict, 1.0, 0.0)[2]
        core = backend.apply_lora(model, None, sd, 1.0, 0.0)[2]
        rows.append({"format": fmt, "detected_format": plan.format, "architecture": arch,
                     "unet_layers": len(layers[naming]), "te_layers": 0, "this_loader_unet": ours,
                     "this_loader_te": 0, "core_unet": core, "core_te": 0})
    return rows


def main():
    t0 = time.time()
    comfyui_dir = Path(os.environ["COMFYUI_DIR"])
    comfyhost.comfy_in_process(comfyui_dir)
    logging.getLogger().setLevel(logging.ERROR)     # core logs every key it drops; the table counts them
    import comfy.sd
    import comfy.supported_models as sm
    from support import lora_files as lf
    from tcd import backend
    from tcd import lora as tl
    ckpt = Path(os.environ.get("TINY_CKPT") or REPO / ".cache" / "tiny_sd15.safetensors")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    comfyhost.make_tiny_checkpoint(comfyui_dir, ckpt)
    model, clip = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:2]
    rows = coverage("SD1.5 (tiny)", model, clip, lf.make_layers(lf.unet_targets(model), lf.te_targets(clip)),
                    lf, backend, tl)
    xl = lf.tiny_sdxl_patcher()
    xl_clip = comfy.sd.CLIP(target=sm.SDXL(dict(lf.TINY_SDXL_UNET)).clip_target(), parameters=0)
    rows += coverage("SDXL (tiny)", xl, xl_clip, lf.make_layers(lf.unet_targets(xl), lf.te_targets(xl_clip)),
                     lf, backend, tl)

    import make_tiny_flow
    from support import flow_lora_files as flf
    for kind, arch in (("sd3", "SD3 (tiny)"), ("flux", "Flux (tiny)")):
        rows += flow_coverage(arch, make_tiny_flow.tiny_model_patcher(kind), kind, flf, backend, tl)

    import comfyui_version
    meta = {"comfyui": comfyui_version.__version__, "python": platform.python_version(),
            "seconds": round(time.time() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# LoRA layers patched: TCD LoRA Loader vs core LoraLoader (ComfyUI {meta['comfyui']})", "",
             "UNet / transformer and text-encoder layers that received a patch, out of the layers in the file "
             "(bold: layers lost).", "",
             "| format | architecture | model: this loader | model: core | text enc.: this loader | text enc.: core |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        te = (lambda n: f"{n}/{r['te_layers']}") if r["te_layers"] else (lambda n: "-")
        mark = (lambda a, b: f"**{a}/{b}**" if a < b else f"{a}/{b}")
        lines.append(f"| {r['format']} | {r['architecture']} | {r['this_loader_unet']}/{r['unet_layers']} | "
                     f"{mark(r['core_unet'], r['unet_layers'])} | {te(r['this_loader_te'])} | "
                     f"{mark(r['core_te'], r['te_layers']) if r['te_layers'] else '-'} |")
    (RESULTS / "lora_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
