"""Few-step LoRA families as data: the settings each one's authors publish, expressed as TCD sampler settings, with
the source of every number; and the detection of a family from a LoRA file's metadata, name and architecture.

Why the TCD sampler covers them all. With x = a(t) x0 + b(t) eps (discrete models: a = 1, b = sigma; flow models:
a = 1 - sigma, b = sigma), one TCD step is the first-order TCF jump to s <= t_next followed by the forward kernel
s -> t_next (tcd.sampling). So:

* gamma = 0 (s = t_next) is DDIM with eta 0, which in sigma space is the Euler step of the probability-flow ODE
  (diffusers DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler);
* gamma = 1 re-noises the prediction to t_next as LCM does. On flow models s = 0 exactly, so this is LCM's step.
  On discrete models s = floor(0 * t_next) = 0 is the table's first entry (sigma_0 = 0.029, diffusers' TCDScheduler
  semantics), so each jump keeps 0.029 eps_hat, about 0.2% of the result. The LCM-sampled families (LCM-LoRA, DMD2)
  therefore use ComfyUI's own `lcm` sampler, which is diffusers' LCMScheduler step (x0, then the forward kernel
  to t_next) up to LCM's boundary scaling c_skip = 0.25 / ((10 t)^2 + 0.25) <= 7e-6 at t >= 19;
* any gamma in between is TCD's strategic stochastic sampling (TCDScheduler's eta).

Timesteps: `original_steps` = 50 is the TCD / LCM skipping grid (TCDScheduler and LCMScheduler defaults, 4 steps ->
999/759/499/259); 1000 uses every timestep, which gives 999/749/499/249 for 4 steps: DDIM / Euler "trailing"
spacing (round(arange(T, 0, -T/N)) - 1) and DMD2's training timesteps. The two equal each other whenever N divides
1000 evenly enough (1, 2, 4, 5, 8, 10); for other N some trailing timesteps are 1 larger. On flow models the same
indices pick entries of the model's own shifted sigma table (docs/flow_models.md). The final step: "x0" returns the
clean prediction (Euler to sigma 0, LCM); "diffusers" keeps TCDScheduler's last latent sqrt(abar_0) x_s, which is
also DDIM's with set_alpha_to_one=False (what the SD1.5 and SDXL scheduler configs set).

Pure data and string matching; the UI text built from it lives in nodes/presets.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .lora import ARCH_FLUX, ARCH_SD1, ARCH_SD2, ARCH_SD3, ARCH_SDXL, ARCHITECTURES, METADATA_FAMILY_KEY, TCD_FAMILY

# The values the pack's trainers write under METADATA_FAMILY_KEY, so their LoRAs are recognised without guessing;
# on SD3 / Flux (architecture read from the shapes) the same families have their flow presets.
TRAINER_FAMILIES = {TCD_FAMILY.lower(): "tcd", "lcm lora": "lcm"}
FLOW_ARCHITECTURES = (ARCH_SD3, ARCH_FLUX)
FLOW_VERSIONS = {"tcd": "tcd-flow", "lcm": "lcm-flow"}

# Sources (model cards / repositories) the numbers below are taken from.
SRC_TCD = "h1t/TCD-SD15-LoRA and h1t/TCD-SDXL-LoRA model cards (https://huggingface.co/h1t/TCD-SDXL-LoRA)"
SRC_HYPER = "ByteDance/Hyper-SD model card (https://huggingface.co/ByteDance/Hyper-SD)"
SRC_PCM = "wangfuyun/PCM_Weights model card (https://huggingface.co/wangfuyun/PCM_Weights)"
SRC_TDD = ("RED-AIGC/TDD model card and RedAIGC/Target-Driven-Distillation README "
           "(https://huggingface.co/RED-AIGC/TDD)")
SRC_LCM = "latent-consistency/lcm-lora-sdxl model card (https://huggingface.co/latent-consistency/lcm-lora-sdxl)"
SRC_DMD2 = "tianweiy/DMD2 model card (https://huggingface.co/tianweiy/DMD2)"
SRC_LIGHTNING = "ByteDance/SDXL-Lightning model card (https://huggingface.co/ByteDance/SDXL-Lightning)"
PACK = "this pack's choice (not from a source)"


@dataclass(frozen=True)
class Preset:
    """One family's recommended settings in TCD terms. `sources` maps each setting to where its value comes from
    (a model card quote, or PACK where no source states a number)."""
    key: str
    name: str                       # shown in the Few-step Preset node
    bases: tuple                    # architectures the family's LoRAs exist for
    steps: int                      # default steps (a file name's "Nstep" overrides it)
    steps_range: tuple
    gamma: float
    original_steps: int             # 50: TCD/LCM skipping grid; 1000: every timestep ("trailing")
    final_step: str                 # "diffusers" or "x0" (tcd.sampling.FINAL_STEP_MODES)
    cfg: float                      # ComfyUI cfg; 1.0 = no CFG (diffusers guidance_scale <= 1)
    lora_strength: float
    original_sampler: str           # what the source runs
    equivalence: str                # how exactly the TCD settings reproduce it
    sources: dict = field(default_factory=dict)
    cfg_by_steps: tuple = ()        # ((steps, cfg), ...) where the source gives a cfg per step count
    flux_guidance: float | None = None   # FluxGuidance value (Flux's distilled guidance), Flux only
    sampler: str = "tcd"            # "tcd": the TCD sampler; "lcm": ComfyUI's lcm sampler (see LCM below)

    def cfg_for(self, steps: int) -> float:
        return dict(self.cfg_by_steps).get(int(steps), self.cfg)


def _pcm_sources(cfg_source: str) -> dict:
    """The PCM card's sources, shared by its small- and normal-CFG LoRAs; only the cfg quote differs."""
    return {"steps": SRC_PCM + ": 'The name of each LoRA weights indicates how many inference steps'",
            "gamma": SRC_PCM + ": 'Use DDIM or Euler instead of LCM ... timestep_spacing=\"trailing\"'",
            "final_step": SRC_PCM + ": 'set_alpha_to_one = False'",
            "cfg": cfg_source,
            "lora_strength": PACK + ": 1.0 (the card gives no scale)"}


PRESETS = (
    Preset("tcd", "TCD (SD1.5 / SD2.1 / SDXL)", (ARCH_SD1, ARCH_SD2, ARCH_SDXL), 4, (4, 8), 0.3, 50, "diffusers",
           1.0, 1.0, "diffusers TCDScheduler, eta 0.3", "exact (diffusers parity, tests/comfy/test_sampler_inproc.py)",
           {"steps": SRC_TCD + ": num_inference_steps=4", "gamma": SRC_TCD + ": eta=0.3 ('often yields good "
            "results'; 'a higher eta when increasing the number of inference steps')",
            "cfg": SRC_TCD + ": guidance_scale=0", "lora_strength": SRC_TCD + ": pipe.fuse_lora() (scale 1.0)"}),
    Preset("tcd-flow", "TCD (SD3 / SD3.5 / FLUX.1, trained with this pack)", (ARCH_SD3, ARCH_FLUX), 4, (4, 8), 0.3,
           50, "x0", 1.0, 1.0, "this pack's TCD sampler on the flow path (docs/flow_distillation.md)",
           "exact (the sampler the LoRA is distilled for; flow parity: docs/flow_models.md)",
           {"steps": PACK + ": 4, as TCD's SD cards; measured at 2/4/8 on a small trained SD3-class teacher "
                     "(README, end to end on a flow model)",
            "gamma": PACK + ": 0.3, TCD's default eta (" + SRC_TCD + "), the gamma that measurement used",
            "cfg": PACK + ": 1.0 (the teacher's guidance is distilled into the LoRA, as for TCD-SD cards)",
            "flux_guidance": PACK + ": 3.5, FLUX.1-dev's default; any value in the w range the LoRA was trained on",
            "lora_strength": PACK + ": 1.0 (the trainer's alpha / rank scaling is in the file)"},
           flux_guidance=3.5),
    Preset("lcm-flow", "LCM baseline (SD3 / SD3.5 / FLUX.1, trained with this pack)", (ARCH_SD3, ARCH_FLUX), 4,
           (2, 8), 1.0, 50, "x0", 1.0, 1.0, "LCM's multistep sampling on the flow path: x0, re-noise to the next sigma",
           "exact: gamma 1 on a flow model is LCM's step (s = 0; docs/flow_models.md)",
           {"steps": PACK + ": 4, as LCM-LoRA's card", "gamma": PACK + ": 1, LCM's step",
            "cfg": PACK + ": 1.0", "flux_guidance": PACK + ": 3.5, FLUX.1-dev's default",
            "lora_strength": PACK + ": 1.0"},
           flux_guidance=3.5),
    Preset("hyper-sd-unified", "Hyper-SD 1-step unified (SD1.5 / SDXL)", (ARCH_SD1, ARCH_SDXL), 1, (1, 8), 1.0, 50,
           "diffusers", 1.0, 1.0, "diffusers TCDScheduler, eta 1.0 at 1 step", "exact (diffusers TCDScheduler)",
           {"steps": SRC_HYPER + ": 'Unified LoRA (support 1 to 8 steps inference)', num_inference_steps=1",
            "gamma": SRC_HYPER + ": eta=1.0 with 1 step; 'lower eta results in more detail' (no value given for more "
                     "steps: lower gamma by hand, e.g. with the TCD Sampler's gamma_schedule)",
            "cfg": SRC_HYPER + ": guidance_scale=0", "lora_strength": SRC_HYPER + ": pipe.fuse_lora() (scale 1.0)"}),
    Preset("hyper-sd-nstep", "Hyper-SD N-step (SD1.5 / SDXL, 2/4/8-step)", (ARCH_SD1, ARCH_SDXL), 4, (2, 8), 0.0,
           1000, "diffusers", 1.0, 1.0, "diffusers DDIMScheduler(timestep_spacing='trailing')",
           "exact for 2/4/8 steps (gamma 0 = DDIM eta 0; every-timestep grid = trailing spacing)",
           {"steps": SRC_HYPER + ": one LoRA per step count ('Hyper-SDXL-Nstep-lora')",
            "gamma": SRC_HYPER + ": DDIMScheduler (eta 0) with timestep_spacing='trailing'",
            "cfg": SRC_HYPER + ": guidance_scale=0", "lora_strength": SRC_HYPER + ": pipe.fuse_lora() (scale 1.0)",
            "final_step": "DDIMScheduler.from_config of the SD1.5 and SDXL scheduler configs, which set "
                          "set_alpha_to_one=False: the last latent keeps the sqrt(abar_0) scaling"}),
    Preset("hyper-sd-cfg", "Hyper-SD CFG-preserved (SD1.5 / SDXL, 8/12-step)", (ARCH_SD1, ARCH_SDXL), 8, (8, 12),
           0.0, 1000, "diffusers", 5.0, 1.0, "diffusers DDIMScheduler(timestep_spacing='trailing') with CFG",
           "exact for 8 steps; 12 steps: trailing timesteps differ by at most 1",
           {"steps": SRC_HYPER + ": 8-steps and 12-steps CFG-Preserved LoRAs",
            "cfg": SRC_HYPER + ": 'support 5~8 guidance scales' (5.0, the low end)",
            "gamma": SRC_HYPER + ": DDIMScheduler, timestep_spacing='trailing'",
            "lora_strength": SRC_HYPER + ": pipe.fuse_lora() (scale 1.0)",
            "final_step": "DDIMScheduler.from_config of the SD1.5 / SDXL configs (set_alpha_to_one=False)"}),
    Preset("hyper-sd3", "Hyper-SD3 CFG (SD3, 4/8/16-step)", (ARCH_SD3,), 8, (4, 16), 0.0, 1000, "x0", 5.0, 0.125,
           "diffusers StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler, shift 3)",
           "same sampler (gamma 0 = flow Euler); timesteps: uniform 'trailing' grid on the model's shifted table "
           "instead of diffusers' linspace to 0.003 (docs/flow_models.md)",
           {"steps": SRC_HYPER + ": 4/8/16-steps SD3 CFG LoRAs ('8-steps and 16-steps LoRA can also inference on "
                     "... 6-steps and 12-steps')",
            "cfg": SRC_HYPER + ": 'guidance scale to 3.0/5.0/7.0 at 4/8/16-steps'",
            "lora_strength": SRC_HYPER + ": 'fuse lora with a relatively small scale (e.g. 0.125)'",
            "gamma": "the SD3 pipeline's default FlowMatchEulerDiscreteScheduler (deterministic Euler)"},
           cfg_by_steps=((4, 3.0), (8, 5.0), (16, 7.0))),
    Preset("hyper-flux", "Hyper-FLUX (FLUX.1-dev, 8/16-step)", (ARCH_FLUX,), 8, (8, 16), 0.0, 1000, "x0", 1.0, 0.125,
           "diffusers FluxPipeline (FlowMatchEulerDiscreteScheduler), guidance 3.5",
           "same sampler (gamma 0 = flow Euler); timesteps: trailing grid on the model's shifted table",
           {"steps": SRC_HYPER + ": 8-steps and 16-steps FLUX.1-dev LoRAs",
            "lora_strength": SRC_HYPER + ": 'LoRA scales around 0.125'",
            "flux_guidance": SRC_HYPER + ": 'guidance scale could be kept on 3.5' (FLUX.1-dev's distilled guidance: "
                             "FluxGuidance, with cfg 1)",
            "gamma": "FluxPipeline's default FlowMatchEulerDiscreteScheduler (deterministic Euler)"},
           flux_guidance=3.5),
    Preset("pcm-smallcfg", "PCM small-CFG (SD1.5 / SDXL, 2/4/8/16-step)", (ARCH_SD1, ARCH_SDXL), 4, (2, 16), 0.0,
           1000, "diffusers", 1.0, 1.0,
           "diffusers DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=False) or Euler",
           "exact for 2/4/8 steps; 16 steps: trailing timesteps differ by at most 1",
           _pcm_sources(SRC_PCM + ": 'SmallCFG ... CFG value 1-2' (1.0, the low end: no CFG)")),
    Preset("pcm-normalcfg", "PCM normal-CFG (SD1.5 / SDXL, 2/4/8/16-step)", (ARCH_SD1, ARCH_SDXL), 8, (2, 16), 0.0,
           1000, "diffusers", 4.5, 1.0,
           "diffusers DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=False) with CFG",
           "exact for 2/4/8 steps; 16 steps: trailing timesteps differ by at most 1",
           _pcm_sources(SRC_PCM + ": 'CFG 2.5 - 3.5 with 4 four steps and ... CFG 3 - 6 with 8 steps' (midpoints "
                        "3.0 / 4.5; other step counts use 4.5)"),
           cfg_by_steps=((4, 3.0), (8, 4.5))),
    Preset("pcm-sd3", "PCM SD3 deterministic (2/4-step)", (ARCH_SD3,), 4, (2, 4), 0.0, 1000, "x0", 1.0, 1.0,
           "PCM's SD3 code (Euler, shift 1 or 3 as the file name says)",
           "gamma 0 = flow Euler; set ModelSamplingSD3's shift to the file name's shift",
           {"steps": SRC_PCM + ": pcm_deterministic_2step_shift1 / 4step_shift1 / 4step_shift3",
            "gamma": SRC_PCM + ": 'deterministic' LoRAs, 'Use DDIM or Euler'",
            "cfg": PACK + ": 1.0 (unverified: the card points to PCM's GitHub code for SD3 settings)",
            "lora_strength": PACK + ": 1.0 (unverified)"}),
    Preset("tdd", "TDD (SDXL)", (ARCH_SDXL,), 4, (4, 8), 0.2, 1000, "x0", 1.7, 1.0,
           "TDDScheduler (gamma-sampling with a single-step DPM-Solver++ update, timesteps linspace(0, 999, N+1))",
           "approximate: same gamma re-noising, but TCD's first-order jump instead of TDD's solver update, and "
           "999/749/499/249 instead of TDD's 999/749/500/250",
           {"steps": SRC_TDD + ": num_inference_steps=4 ('only 4--8 steps')",
            "gamma": SRC_TDD + ": eta=0.2", "cfg": SRC_TDD + ": guidance_scale=1.7",
            "lora_strength": SRC_TDD + ": pipe.fuse_lora() (scale 1.0)"}),
    Preset("tdd-flux", "TDD (FLUX.1-dev)", (ARCH_FLUX,), 8, (4, 8), 0.0, 1000, "x0", 1.0, 0.125,
           "diffusers FluxPipeline (FlowMatchEulerDiscreteScheduler), guidance 2.0",
           "same sampler (gamma 0 = flow Euler); timesteps: trailing grid on the model's shifted table",
           {"steps": SRC_TDD + ": num_inference_steps=8", "lora_strength": SRC_TDD + ": fuse_lora(lora_scale=0.125)",
            "flux_guidance": SRC_TDD + ": guidance_scale=2.0 (FluxGuidance, with cfg 1)",
            "gamma": "FluxPipeline's default FlowMatchEulerDiscreteScheduler (deterministic Euler)"},
           flux_guidance=2.0),
    Preset("lcm", "LCM-LoRA (SD1.5 / SDXL)", (ARCH_SD1, ARCH_SD2, ARCH_SDXL), 4, (2, 8), 1.0, 50, "x0", 1.0, 1.0,
           "diffusers LCMScheduler (50-step skipping grid)",
           "exact up to LCM's boundary scaling (c_skip <= 7e-6 at t >= 19): ComfyUI's lcm sampler on the TCD "
           "Scheduler's 50-step grid",
           {"steps": SRC_LCM + ": 'reduce the number of inference steps to just 2 to 8 steps' (4)",
            "gamma": SRC_LCM + ": LCMScheduler (predict x0, re-noise to the next timestep = gamma 1)",
            "cfg": SRC_LCM + ": 'either disable guidance_scale or use values between 1.0 and 2.0' (1.0: disabled)",
            "lora_strength": SRC_LCM + ": pipe.load_lora_weights (scale 1.0)"},
           sampler="lcm"),
    Preset("dmd2", "DMD2 (SDXL, 4-step)", (ARCH_SDXL,), 4, (4, 4), 1.0, 1000, "x0", 1.0, 1.0,
           "diffusers LCMScheduler with timesteps=[999, 749, 499, 249]",
           "exact: ComfyUI's lcm sampler on the every-timestep grid (999/749/499/249)",
           {"steps": SRC_DMD2 + ": 4-step LoRA", "gamma": SRC_DMD2 + ": LCMScheduler",
            "original_steps": SRC_DMD2 + ": timesteps=[999, 749, 499, 249] ('LCMScheduler's default timesteps are "
                              "different from the one we used for training')",
            "cfg": SRC_DMD2 + ": guidance_scale=0",
            "lora_strength": SRC_DMD2 + ": pipe.fuse_lora(lora_scale=1.0)"},
           sampler="lcm"),
    Preset("lightning", "SDXL-Lightning (2/4/8-step)", (ARCH_SDXL,), 4, (2, 8), 0.0, 1000, "x0", 1.0, 1.0,
           "diffusers EulerDiscreteScheduler(timestep_spacing='trailing'); ComfyUI: euler + sgm_uniform",
           "exact for 2/4/8 steps (gamma 0 = Euler; every-timestep grid = trailing spacing)",
           {"steps": SRC_LIGHTNING + ": 'sdxl_lightning_Nstep_lora' for 2/4/8 steps",
            "gamma": SRC_LIGHTNING + ": EulerDiscreteScheduler, timestep_spacing='trailing'",
            "cfg": SRC_LIGHTNING + ": guidance_scale=0",
            "lora_strength": SRC_LIGHTNING + ": pipe.fuse_lora() (scale 1.0)"}),
)
BY_KEY = {p.key: p for p in PRESETS}


def preset(key: str) -> Preset:
    if key not in BY_KEY:
        raise ValueError(f"few-step preset {key!r} is unknown; allowed: {', '.join(BY_KEY)}")
    return BY_KEY[key]


# ------------------------------------------------------------------------------------------------ detection
@dataclass
class Detection:
    """What a LoRA file says about its family. key: a PRESETS key or None; steps: the step count its name states
    (an N-step LoRA's N), or None; evidence: where the answer came from (or why there is none)."""
    key: str | None
    steps: int | None
    evidence: str

    @property
    def preset(self) -> Preset | None:
        return BY_KEY.get(self.key) if self.key else None


_STEPS = re.compile(r"(?:^|[^0-9a-z])(\d{1,2})[-_ ]?steps?(?:[^a-z]|$)")
_SHIFT = re.compile(r"shift[-_ ]?(\d+(?:\.\d+)?)")


def _word(text: str, word: str) -> bool:
    return re.search(rf"(^|[^a-z0-9]){word}([^a-z]|$)", text) is not None


def _family_from_text(low: str, architecture: str | None) -> str | None:
    """The preset a name / title text points to; the architecture (from the LoRA's shapes) picks between a
    family's SD, SD3 and Flux versions."""
    if "hyper" in low:
        if architecture == ARCH_FLUX or "flux" in low:
            return "hyper-flux"
        if architecture == ARCH_SD3 or _word(low, "sd3"):
            return "hyper-sd3"
        if "unified" in low or re.search(r"(^|[^0-9])1[-_ ]?steps?([^a-z]|$)", low):
            return "hyper-sd-unified"
        if _word(low, "cfg"):
            return "hyper-sd-cfg"
        if _STEPS.search(low):
            return "hyper-sd-nstep"
        return None
    if _word(low, "pcm") or _word(low, "pdm"):
        if architecture == ARCH_SD3 or "shift" in low:
            return "pcm-sd3"
        if "lcmlike" in low or "lcm_like" in low or "lcm-like" in low:
            return "lcm"
        return "pcm-normalcfg" if "normalcfg" in low else "pcm-smallcfg"
    if _word(low, "tdd"):
        return "tdd-flux" if architecture == ARCH_FLUX or "flux" in low else "tdd"
    if "dmd2" in low:
        return "dmd2"
    if "lightning" in low:
        return "lightning"
    if _word(low, "tcd"):
        return "tcd-flow" if architecture in FLOW_ARCHITECTURES else "tcd"
    if _word(low, "lcm"):
        return "lcm-flow" if architecture in FLOW_ARCHITECTURES else "lcm"
    return None


def detect_family(metadata: dict | None, filename: str, architecture: str | None = None) -> Detection:
    """The few-step family of a LoRA from the pack's own metadata key, then other metadata text (kohya
    ss_output_name, modelspec title/description, training comment), then the file name; the architecture read
    from its shapes separates a family's SD1.5/SDXL, SD3 and Flux versions. Shapes alone cannot tell these
    families apart (TCD, LCM, Hyper-SD, PCM ... are all plain LoRAs over the same layers), so no evidence means
    "unknown" and the preset is picked by hand."""
    metadata = metadata or {}
    declared = str(metadata.get(METADATA_FAMILY_KEY, "")).strip().lower()
    name = Path(filename).name
    steps_text = name.lower()
    if declared in TRAINER_FAMILIES or declared in BY_KEY:
        key = TRAINER_FAMILIES.get(declared, declared)
        return Detection(FLOW_VERSIONS.get(key, key) if architecture in FLOW_ARCHITECTURES else key, None,
                         f"metadata {METADATA_FAMILY_KEY}={metadata[METADATA_FAMILY_KEY]!r}")
    sources = [(f"metadata {k}", str(metadata[k])) for k in ("ss_output_name", "modelspec.title",
                                                            "modelspec.description", "ss_training_comment")
               if k in metadata]
    sources.append(("file name", name))
    for where, text in sources:
        key = _family_from_text(text.lower(), architecture)
        if key is not None:
            found = _STEPS.search(text.lower()) or _STEPS.search(steps_text)
            steps = int(found.group(1)) if found else None
            p = BY_KEY[key]
            if architecture in ARCHITECTURES and architecture not in p.bases:
                return Detection(None, steps, f"{where} {text[:60]!r} names {p.name}, which has no {architecture} "
                                              f"LoRA; pick the preset by hand")
            return Detection(key, steps, f"{where} {text[:60]!r}")
    return Detection(None, None, "no family named in metadata or file name")


def shift_in_name(filename: str) -> float | None:
    """A flow LoRA's sampling shift stated in its file name (PCM SD3: 'pcm_deterministic_4step_shift3')."""
    found = _SHIFT.search(Path(filename).name.lower())
    return float(found.group(1)) if found else None
