"""Write docs/presets.md from tcd/presets.py, so the table users read is the data the Few-step Preset node uses
(tests/unit/test_presets.py checks the file is up to date).

    source scripts/host/env.sh && $HOST_PY scripts/presets_doc.py       (writes docs/presets.md)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "presets.md"

HEADER = """# Few-step LoRA presets

The Few-step Preset node (and the TCD LoRA Loader's info) use these settings. Each row is one family as its authors
publish it, expressed as TCD sampler settings: gamma 0 is DDIM / Euler, gamma 1 re-noises the x0 prediction as LCM
does, anything between is TCD's strategic stochastic sampling. Timesteps: "50" is the TCD / LCM skipping grid
(4 steps: 999/759/499/259), "1000" uses every timestep (4 steps: 999/749/499/249 = DDIM / Euler "trailing" and
DMD2's training timesteps); on flow models the same picks index the model's own shifted sigma table
([flow_models.md](flow_models.md)). cfg 1 means no CFG (diffusers guidance_scale 0 or 1). The *how exact* column
says how closely the settings reproduce the source's own sampler; the "exact" claims are tested against diffusers'
schedulers (tests/unit/test_presets.py, tests/comfy/test_presets_inproc.py).

Generated from `tcd/presets.py` by `scripts/presets_doc.py`.

"""


def render() -> str:
    sys.path.insert(0, str(REPO))
    from tcd import presets as tp
    lines = [HEADER.rstrip("\n"), "",
             "| preset | base | steps | sampler / gamma | timesteps | final step | cfg | FluxGuidance | LoRA strength "
             "| source sampler | how exact |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in tp.PRESETS:
        lo, hi = p.steps_range
        cfg = ", ".join(f"{c:g} at {n}" for n, c in p.cfg_by_steps) if p.cfg_by_steps else f"{p.cfg:g}"
        sampler = "lcm (gamma 1)" if p.sampler == "lcm" else f"tcd, gamma {p.gamma:g}"
        guidance = f"{p.flux_guidance:g}" if p.flux_guidance is not None else "-"
        lines.append(f"| {p.name} | {', '.join(p.bases)} | {p.steps} ({lo}-{hi}) | {sampler} | {p.original_steps} | "
                     f"{p.final_step} | {cfg} | {guidance} | {p.lora_strength:g} | {p.original_sampler} | "
                     f"{p.equivalence} |")
    lines += ["", "## Sources", "",
              "Where a number is not stated by a source, the entry says so (\"this pack's choice\", \"unverified\")."]
    for p in tp.PRESETS:
        lines += ["", f"**{p.name}**", ""]
        lines += [f"- {k}: {v}" for k, v in p.sources.items()]
    lines += ["", "## Detection", "",
              "The loader names a family from, in order: the pack's own metadata key `tcd.family` (written by its "
              "trainers), kohya / modelspec metadata (ss_output_name, modelspec.title, modelspec.description, "
              "ss_training_comment), then the file name (e.g. `Hyper-SDXL-8steps-lora`, `pcm_sdxl_smallcfg_4step`, "
              "`sdxl_lightning_4step_lora`). The architecture read from the LoRA's shapes and names picks a "
              "family's SD1.5 / SDXL, SD3 or Flux version (Hyper-SD3 vs Hyper-FLUX vs Hyper-SDXL), and a name "
              "that points to a family without a version for that architecture is not trusted. Shapes alone "
              "cannot tell these families apart (all are plain LoRAs over the same layers), so without metadata "
              "or a telling name the family is unknown and the preset is picked by hand. The step count in the "
              "name (`8steps`) sets the default steps of N-step LoRAs.", ""]
    return "\n".join(lines)


def main():
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(render())
    os.replace(tmp, DOC)
    print(DOC)


if __name__ == "__main__":
    main()
