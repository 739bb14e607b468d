"""TCD distillation of a LoRA for diffusers SD1.x/SD2.x/SDXL, SD3 and FLUX.1-dev under HF accelerate (multi-GPU,
multi-node).

    accelerate launch -m train.accelerate_tcd --pretrained_model <diffusers folder | .safetensors> \
        --train_data_dir <images + .txt captions> --output_dir <out> [options]
    python -m train.accelerate_tcd ...            (one device, same options)

The structure is diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sdxl.py` with
the LCM objective replaced by `tcd.losses.TCDLoss` (no math here): PEFT LoRA on the LCM-LoRA recipe's target
modules; teacher = the same UNet with its adapters disabled (one model copy); target = the online LoRA under
no_grad, or an EMA of it (`--ema_decay`). The saved LoRA is what `StableDiffusion[XL]Pipeline.save_lora_weights`
writes, so diffusers' `load_lora_weights` and the pack's TCD LoRA Loader read it.

SD3 (a StableDiffusion3Pipeline folder) trains the same way on its transformer (train.accelerate_flow): the objective
on the model's rectified-flow path with velocity outputs, PEFT LoRA on the DiT blocks' attention and MLP linears
(tcd.lora_targets.is_flow_lora_target), saved as StableDiffusion3Pipeline.save_lora_weights writes it
("transformer." + PEFT names). FLUX.1-dev (a FluxPipeline folder) likewise, with its guidance scale as the
transformer's guidance input (embedded guidance: no unconditional pass; --w_min/--w_max default to 2 / 5, guidance
values as FluxPipeline's guidance_scale, not CFG scales), saved as FluxPipeline.save_lora_weights writes it.

Results do not depend on how a global batch is split: the sample at global stream position p (a fixed,
seeded permutation of the sorted dataset per epoch) is processed with its own generator seeded from (seed, p),
which draws its VAE latent sample and the loss's timesteps, target time, noise and guidance scale. So 1 process x
batch 8, 2 processes x batch 4 and 1 process x batch 4 x 2 accumulation steps train the same LoRA (up to float
reduction order), and a resumed run continues the exact stream of an uninterrupted one.

Every argument is checked by `validate_args` before any model is loaded: a bad path, an unknown architecture, an
empty dataset, a resolution not divisible by 8 or a resume folder without state stop with a clear message.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The pack is a package inside ComfyUI (`<pack>.train`), where the core is the sibling package `..tcd`. Run from
# the repository root (`python -m train.accelerate_tcd`, `accelerate launch -m ...`), `train` is a top-level
# package, the relative import climbs past it (ImportError) and the core is the top-level `tcd` instead.
try:
    from ..tcd import lora as tcd_lora
    from ..tcd import losses as tcd_losses
    from ..tcd.files import save_safetensors_atomic
    from ..tcd.lora_targets import LORA_TARGET_MODULES
except ImportError:
    from tcd import lora as tcd_lora
    from tcd import losses as tcd_losses
    from tcd.files import save_safetensors_atomic
    from tcd.lora_targets import LORA_TARGET_MODULES
from . import accelerate_flow as flow
from . import images as training_images

ARCHITECTURES = ("sd", "sdxl") + flow.FLOW_ARCHITECTURES
PIPELINE_CLASS_TO_ARCH = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                          **{cls: arch for arch, cls in flow.PIPELINE_CLASS.items()}}
DEFAULT_RESOLUTION = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
# Default teacher guidance ranges: CFG scales for the classifier-free-guided models (the LCM/TCD scripts' [3, 15]);
# for FLUX.1-dev the guidance value its guidance embedding takes (FluxPipeline's guidance_scale, default 3.5).
DEFAULT_W_RANGE = {"cfg": (3.0, 15.0), "embedded": (2.0, 5.0)}
# Above this an embedded-guidance w_max is most likely a CFG scale given by habit (as the node warns).
EMBEDDED_GUIDANCE_USUAL_MAX = 10.0
FLUX_VALIDATION_GUIDANCE = 3.5        # FluxPipeline's default guidance_scale
STATE_FILES = ("training_state.json", "lora_state.safetensors", "optimizer.bin")
LOG_FILE = "train_log.jsonl"
# Independent random streams derived from (seed, stream, index): see sample_seed().
STREAM_EPOCH_ORDER, STREAM_AUGMENT, STREAM_DRAWS = 0, 1, 2


class ConfigError(ValueError):
    """A bad command line, reported before any model work starts."""


# ================================================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.accelerate_tcd",
        description="Distil a TCD LoRA (Trajectory Consistency Distillation, arXiv 2402.19159) from a diffusers "
                    "SD1.x/SD2.x/SDXL, SD3 or FLUX.1-dev model. Launch with `accelerate launch -m "
                    "train.accelerate_tcd` for several GPUs/nodes (DDP, DeepSpeed, FSDP through accelerate's config).")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model", required=True,
                   help="local diffusers pipeline folder (model_index.json) or single-file checkpoint (.safetensors)")
    g.add_argument("--model_config", default=None,
                   help="for a single-file checkpoint: a local diffusers folder (model_index.json + component configs "
                        "+ tokenizer) or hub id giving the configs; without it diffusers fetches the default ones")
    g.add_argument("--arch", choices=("auto",) + ARCHITECTURES, default="auto",
                   help="sd = SD1.x/SD2.x (StableDiffusionPipeline), sdxl = SDXL base, sd3 = SD3/SD3.5 "
                        "(StableDiffusion3Pipeline folder, T5 optional), flux = FLUX.1-dev (FluxPipeline folder, "
                        "guidance-distilled); auto detects it")
    g.add_argument("--vae_path", default=None,
                   help="optional replacement VAE (diffusers folder or .safetensors), e.g. an fp16-safe SDXL VAE")
    g.add_argument("--variant", default=None, help="weights variant of a diffusers folder (e.g. fp16)")
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", required=True,
                   help="folder of images (.png/.jpg/.jpeg/.webp/.bmp, sub-folders included), each with a .txt "
                        "caption of the same name")
    g.add_argument("--resolution", type=int, default=None,
                   help="square training size in pixels (default 512 for sd, 1024 for sdxl, sd3 and flux); must be "
                        "divisible by 8 (sd3: by 16, the VAE's 8 x the patch size; flux: by 16, the VAE's 8 x the 2x2 "
                        "packing)")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crop")
    g.add_argument("--random_flip", action="store_true", help="horizontal flip with probability 0.5")
    g.add_argument("--dataloader_num_workers", type=int, default=2)
    g = p.add_argument_group("distillation (tcd.losses)")
    g.add_argument("--objective", choices=tcd_losses.OBJECTIVES, default="tcd", help="tcd, or the lcm baseline")
    g.add_argument("--original_steps", type=int, default=50, help="skipping grid N (teacher jump k = T // N)")
    g.add_argument("--w_min", type=float, default=None,
                   help="guidance scale range of the teacher (w ~ U[w_min, w_max]). sd/sdxl/sd3: classifier-free "
                        "guidance scales, default 3 and 15. flux (FLUX.1-dev, guidance-distilled): the guidance "
                        "value fed to the transformer (FluxPipeline's guidance_scale, usually 2-5), default 2 and 5; "
                        "the LoRA is then sampled at a guidance value in that range")
    g.add_argument("--w_max", type=float, default=None, help="see --w_min (default 15; flux: 5)")
    g.add_argument("--recipe", choices=tuple(tcd_losses.RECIPES), default="recommended",
                   help="objective settings (rho, loss, tcf_order) as a set: 'recommended' (measured best against "
                        "LCM, docs/recipe.md) or 'paper' (the TCD paper's); --rho/--loss/--tcf_order override")
    g.add_argument("--rho", type=float, default=None,
                   help="probability that the target time s is 0 (0 = the paper's uniform s <= t_n)")
    g.add_argument("--loss", choices=tcd_losses.LOSS_TYPES, default=None,
                   help="huber (elementwise pseudo-Huber, c = --huber_c), l2, or huber_sample (iCT's per-sample "
                        "pseudo-Huber, c = 0.00054 sqrt(d))")
    g.add_argument("--huber_c", type=float, default=0.001)
    g.add_argument("--tcf_order", type=int, choices=(1, 2), default=None,
                   help="1 = DDIM form, 2 = DPM-Solver++(2S) midpoint (two student passes)")
    g.add_argument("--ema_decay", type=float, default=0.95,
                   help="target network: EMA of the LoRA with this decay (0.95, the LCM/TCD full-model scripts' and "
                        "the node's default, the setting of the toy study); 0 = the online LoRA under no_grad "
                        "(diffusers' LCM-LoRA script)")
    g = p.add_argument_group("LoRA and optimisation")
    g.add_argument("--lora_rank", type=int, default=64)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial"))
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (bitsandbytes required)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--train_batch_size", type=int, default=4, help="per device, per accumulation step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--vae_batch_size", type=int, default=2,
                   help="images per VAE encoder pass (a float32 SD/SDXL VAE holds ~2.6 GB per 1024 px image)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: accelerate's config / launch flag; frozen weights are stored in this dtype, "
                        "the LoRA and its optimizer state stay float32")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--cpu", action="store_true",
                   help="train on the CPU even where a GPU exists; with `accelerate launch --multi_gpu "
                        "--num_processes N` this runs N CPU processes (gloo), e.g. for tests")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output, checkpoints, validation")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--lora_name", default="pytorch_lora_weights.safetensors",
                   help="file name of the final LoRA in --output_dir")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable state every N steps "
                                                                          "(0: only at the end)")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (newest checkpoint-<step> in --output_dir) or a checkpoint folder")
    g.add_argument("--validation_prompts", nargs="*", default=[])
    g.add_argument("--validation_steps", type=int, default=0, help="sample the validation prompts every N steps "
                                                                     "with diffusers' TCDScheduler (sd3, flux: the "
                                                                     "pack's TCD sampler) (0: off)")
    g.add_argument("--validation_inference_steps", type=int, default=4)
    g.add_argument("--validation_gamma", type=float, default=0.3, help="TCDScheduler eta (gamma)")
    g.add_argument("--validation_guidance", type=float, default=None,
                   help=f"flux only: the guidance value the validation images are sampled at (default "
                        f"{FLUX_VALIDATION_GUIDANCE}, FluxPipeline's default); the other models sample with guidance "
                        f"0")
    g.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto",
                   help="auto: TensorBoard when the tensorboard package is installed")
    return p


@dataclass
class Plan:
    """What validate_args found: everything later steps need without re-reading the file system."""
    arch: str
    single_file: bool
    items: list                                # [(image path, caption text)], sorted
    resolution: int
    num_train_timesteps: int = 1000
    resume_dir: Path | None = None
    resume_step: int = 0
    report_to: str | None = None
    flow_configs: dict | None = None            # a flow model's scheduler and transformer configs (accelerate_flow)

    @property
    def is_flow(self) -> bool:
        return self.arch in flow.FLOW_ARCHITECTURES


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    apply_recipe(args)
    return args


def validate_args(args: argparse.Namespace) -> Plan:
    """Check the whole command line against the file system; raise ConfigError (what was given, what is allowed,
    what to do) before any model is loaded."""
    model = Path(args.pretrained_model).expanduser()
    if not model.exists():
        raise ConfigError(f"--pretrained_model {str(model)!r} does not exist. Give a local diffusers pipeline folder "
                          f"(with model_index.json) or a single-file checkpoint (.safetensors); hub ids are not "
                          f"fetched here: download the model first (e.g. `huggingface-cli download <id> "
                          f"--local-dir <folder>`).")
    single_file = model.is_file()
    detected = detect_architecture(model)
    if args.arch != "auto" and args.arch != detected:
        raise ConfigError(f"--arch {args.arch} does not match the model: {str(model)!r} is {detected!r}. "
                          f"Use --arch auto or {detected}.")
    arch = detected
    flow_configs = None
    if arch in flow.FLOW_ARCHITECTURES:
        try:
            flow_configs = flow.check_folder(model, arch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.model_config is not None:
        if not single_file:
            raise ConfigError("--model_config is only for single-file checkpoints; a diffusers folder carries "
                              "its own configs. Remove --model_config.")
        cfg = Path(args.model_config).expanduser()
        # An existing path must be a config folder; anything else that looks like a path is a typo; the rest
        # ("org/name") is a hub id that diffusers resolves.
        if cfg.exists() or args.model_config.startswith((".", "/", "~")):
            if not (cfg / "model_index.json").is_file():
                raise ConfigError(f"--model_config {args.model_config!r} is not a diffusers folder with a "
                                  f"model_index.json. Give the folder that holds model_index.json and the "
                                  f"component configs (unet/config.json, ...) for this checkpoint.")
    if args.vae_path is not None and not Path(args.vae_path).expanduser().exists():
        raise ConfigError(f"--vae_path {args.vae_path!r} does not exist; give a diffusers AutoencoderKL folder or "
                          f"a .safetensors VAE, or leave it out to use the model's own VAE.")

    resolution = args.resolution if args.resolution is not None else DEFAULT_RESOLUTION[arch]
    if resolution <= 0 or resolution % 8:
        raise ConfigError(f"--resolution {resolution} is not a positive multiple of 8 (the VAE downsamples by 8); "
                          f"use e.g. {max(8, (max(resolution, 8) // 8) * 8)} or {DEFAULT_RESOLUTION[arch]}.")
    if flow_configs is not None and resolution % flow.resolution_step(flow_configs):
        step = flow.resolution_step(flow_configs)
        raise ConfigError(f"--resolution {resolution} is not a multiple of {step}: the {arch} transformer cuts the "
                          f"latent (1/8 of the image) into patches of {step // 8} x {step // 8}; use e.g. "
                          f"{max(step, (resolution // step) * step)} or {DEFAULT_RESOLUTION[arch]}.")
    for name, low in (("train_batch_size", 1), ("gradient_accumulation_steps", 1), ("max_train_steps", 1),
                      ("lora_rank", 1), ("original_steps", 1), ("checkpointing_steps", 0),
                      ("validation_steps", 0), ("validation_inference_steps", 1), ("dataloader_num_workers", 0),
                      ("vae_batch_size", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} {getattr(args, name)} must be >= {low}.")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning_rate {args.learning_rate} must be > 0 (LCM-LoRA recipes use 1e-6 .. 1e-4).")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ConfigError(f"--lora_alpha {args.lora_alpha} must be > 0 (default: the rank).")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ConfigError(f"--ema_decay {args.ema_decay} must be in [0, 1): 0 uses the online LoRA as the target, "
                          f"e.g. 0.95 an EMA of it.")
    if not 0.0 <= args.validation_gamma <= 1.0:
        raise ConfigError(f"--validation_gamma {args.validation_gamma} must be in [0, 1] (TCDScheduler eta).")
    if args.validation_steps and not args.validation_prompts:
        raise ConfigError("--validation_steps is set but no --validation_prompts were given; add prompts or set "
                          "--validation_steps 0.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ConfigError(f"--checkpoints_total_limit {args.checkpoints_total_limit} must be >= 1 (or left out).")
    if "/" in args.lora_name or "\\" in args.lora_name or not args.lora_name.endswith(".safetensors"):
        raise ConfigError(f"--lora_name {args.lora_name!r} must be a plain file name ending in .safetensors "
                          f"(it is written inside --output_dir).")
    apply_recipe(args)     # (idempotent) for namespaces built without parse_args
    guidance = flow.GUIDANCE[arch] if arch in flow.FLOW_ARCHITECTURES else "cfg"
    apply_guidance_defaults(args, guidance)
    if args.validation_guidance is not None:
        if guidance != "embedded":
            raise ConfigError(f"--validation_guidance is for guidance-distilled models (flux); {arch} validation "
                              f"images are sampled with guidance 0. Drop the flag.")
        if not args.validation_guidance >= 0:
            raise ConfigError(f"--validation_guidance {args.validation_guidance} must be >= 0 (FLUX.1-dev: e.g. "
                              f"3.5, inside the trained --w_min..--w_max).")
    num_train_timesteps = _num_train_timesteps(model if not single_file else
                                               (Path(args.model_config) if args.model_config else None))
    # Everything else about the loss (w range, loss type, huber_c, grid) is checked by tcd.losses itself.
    try:
        if flow_configs is not None:
            flow.make_objective(args, flow_configs, resolution, _make_objective)
        else:
            _make_objective(args, torch.linspace(0.9991, 0.0047, num_train_timesteps), "epsilon")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.use_8bit_adam and not _importable("bitsandbytes"):
        raise ConfigError("--use_8bit_adam needs the bitsandbytes package, which is not installed; install it "
                          "(pip install bitsandbytes) or drop the flag to use torch AdamW.")
    report_to = None
    if args.report_to == "tensorboard" and not _importable("tensorboard"):
        raise ConfigError("--report_to tensorboard needs the tensorboard package (pip install tensorboard); use "
                          "--report_to none or auto.")
    if args.report_to in ("auto", "tensorboard") and _importable("tensorboard"):
        report_to = "tensorboard"
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        raise ConfigError("--mixed_precision fp16 needs a CUDA device; on a CPU use no (or bf16, slow).")

    items = find_captioned_images(Path(args.train_data_dir).expanduser())

    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {str(out)!r} exists and is not a folder.")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), None)
    if probe is None or not os.access(probe, os.W_OK):
        raise ConfigError(f"--output_dir {str(out)!r} cannot be created or written (no write permission on "
                          f"{str(probe)!r}); choose a writable folder.")

    plan = Plan(arch=arch, single_file=single_file, items=items, resolution=resolution,
                num_train_timesteps=num_train_timesteps, report_to=report_to, flow_configs=flow_configs)
    if args.resume_from_checkpoint:
        plan.resume_dir, plan.resume_step = resolve_resume(args.resume_from_checkpoint, out)
        if plan.resume_step >= args.max_train_steps:
            raise ConfigError(f"{str(plan.resume_dir)!r} is at step {plan.resume_step}, which already reaches "
                              f"--max_train_steps {args.max_train_steps}; raise --max_train_steps to train on.")
        saved = json.loads((plan.resume_dir / "training_state.json").read_text())
        for key, now in (("arch", arch), ("lora_rank", args.lora_rank), ("objective", args.objective)):
            if key in saved and saved[key] != now:
                raise ConfigError(f"{str(plan.resume_dir)!r} was trained with {key}={saved[key]!r}, this command "
                                  f"has {now!r}; resume with the same setting or start a new --output_dir.")
    return plan


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _num_train_timesteps(folder: Path | None) -> int:
    cfg = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if cfg is not None and cfg.is_file():
        return int(json.loads(cfg.read_text()).get("num_train_timesteps", 1000))
    return 1000


def detect_architecture(model: Path) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux' from a diffusers folder's model_index.json or a single file's tensor names (header
    only; single files are SD1.x/SD2.x/SDXL)."""
    if model.is_dir():
        index = model / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"{str(model)!r} is a folder without model_index.json, so it is not a diffusers "
                              f"pipeline folder. Give the pipeline's root folder (the one with model_index.json, "
                              f"unet/, vae/, text_encoder/) or a single-file .safetensors checkpoint.")
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {str(index)!r}: {e}") from None
        if cls in flow.REFUSED_PIPELINES:
            raise ConfigError(f"unknown architecture for this CLI: {str(index)!r} names {cls!r}. "
                              f"{flow.REFUSED_PIPELINES[cls]}")
        if cls not in PIPELINE_CLASS_TO_ARCH:
            raise ConfigError(f"unknown architecture: {str(index)!r} names {cls!r}; supported are "
                              f"{sorted(PIPELINE_CLASS_TO_ARCH)} (SD1.x/SD2.x and SDXL base UNets, SD3 and "
                              f"FLUX.1-dev transformers).")
        return PIPELINE_CLASS_TO_ARCH[cls]
    if model.suffix.lower() != ".safetensors":
        raise ConfigError(f"{model.name!r}: single-file checkpoints must be .safetensors (pickled .ckpt/.pt files "
                          f"can run code when loaded and are refused). Convert it, or use a diffusers folder.")
    try:
        from safetensors import safe_open
        with safe_open(str(model), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise ConfigError(f"cannot read {str(model)!r} as safetensors ({type(e).__name__}: {e}); the file is "
                          f"truncated, corrupt or not a checkpoint.") from None
    if not any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        raise ConfigError(f"unknown architecture: {model.name!r} has no SD-style UNet "
                          f"(model.diffusion_model.input_blocks.*); supported are SD1.x/SD2.x and SDXL base "
                          f"single-file checkpoints (SD3, Flux, a bare UNet or a LoRA file are not).")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.") for k in keys):
        raise ConfigError(f"unknown architecture: {model.name!r} looks like an SDXL refiner (one OpenCLIP text "
                          f"encoder); only SDXL base is supported.")
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd"
    raise ConfigError(f"unknown architecture: {model.name!r} has a UNet but no text encoder "
                      f"(cond_stage_model.* / conditioner.*); use a full checkpoint or a diffusers folder.")


def find_captioned_images(folder: Path) -> list:
    """Sorted (image, caption text) pairs (train.images, shared with the node); a clear error for a missing or
    empty folder, images without captions or captions that are not UTF-8."""
    if not folder.is_dir():
        raise ConfigError(f"--train_data_dir {str(folder)!r} is not a folder; give a folder of images with a "
                          f".txt caption each (img_001.png + img_001.txt).")
    try:
        return training_images.list_captioned_images(folder)
    except ValueError as e:
        raise ConfigError(f"--train_data_dir: {e}") from None


def resolve_resume(value: str, output_dir: Path) -> tuple[Path, int]:
    """The checkpoint folder and its step for --resume_from_checkpoint ('latest' or a folder)."""
    if value == "latest":
        found = sorted(_checkpoints(output_dir), key=lambda p: p[1])
        complete = [(d, s) for d, s in found if _has_state(d)]
        if not complete:
            extra = (f" (found {', '.join(d.name for d, _ in found)} without the saved state files "
                     f"{', '.join(STATE_FILES)})" if found else "")
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint with saved training state in "
                              f"{str(output_dir)!r}{extra}. Drop the flag to start a new run, or give a "
                              f"checkpoint-<step> folder.")
        return complete[-1]
    d = Path(value).expanduser()
    if not d.is_absolute() and not d.exists():
        d = output_dir / value
    if not d.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {value!r} is not a folder (looked in {str(d)!r}); give "
                          f"'latest' or a checkpoint-<step> folder written by this trainer.")
    if not _has_state(d):
        absent = [f for f in STATE_FILES if not (d / f).is_file()]
        raise ConfigError(f"--resume_from_checkpoint {str(d)!r} holds no training state (missing "
                          f"{', '.join(absent)}); give a checkpoint-<step> folder written by this trainer.")
    state = json.loads((d / "training_state.json").read_text())
    return d, int(state["global_step"])


def _checkpoints(output_dir: Path):
    if not output_dir.is_dir():
        return []
    out = []
    for d in output_dir.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and d.name[len("checkpoint-"):].isdigit():
            out.append((d, int(d.name[len("checkpoint-"):])))
    return out


def _has_state(d: Path) -> bool:
    return all((d / f).is_file() for f in STATE_FILES)


# ================================================================================================ data
def sample_seed(seed: int, stream: int, index: int) -> int:
    """A 64-bit seed for (run seed, stream, index) from numpy's SeedSequence (well-mixed, no overlap)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, int(index)]).generate_state(1, np.uint64)[0])


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The CPU generator of the sample at global stream position `position` (latent sample + loss draws)."""
    return torch.Generator("cpu").manual_seed(sample_seed(seed, STREAM_DRAWS, position))


class StreamOrder:
    """Global stream position p -> dataset index: epoch e = p // N walks a seeded permutation of the N items."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed = num_items, seed
        self._epoch, self._perm = None, None

    def index(self, position: int) -> int:
        epoch = position // self.num_items
        if epoch != self._epoch:
            g = torch.Generator("cpu").manual_seed(sample_seed(self.seed, STREAM_EPOCH_ORDER, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=g).tolist()
        return self._perm[position % self.num_items]


def batch_positions(step: int, micro: int, process: int, batch: int, num_processes: int, accumulation: int):
    """Global stream positions of one process's micro-batch: step-major, then accumulation step, then process.

    The global batch of optimizer step k is positions [k G, (k+1) G), G = batch x processes x accumulation, for
    every split of G, so the set of samples (and each one's generator) per step is independent of the split.
    """
    base = step * batch * num_processes * accumulation + micro * batch * num_processes + process * batch
    return list(range(base, base + batch))


class PositionSampler:
    """Batch sampler over global positions for this process, from `start_step` to `max_steps`."""

    def __init__(self, start_step, max_steps, batch, process, num_processes, accumulation):
        self.args = (start_step, max_steps, batch, process, num_processes, accumulation)

    def __iter__(self):
        start, stop, batch, process, nproc, accum = self.args
        for step in range(start, stop):
            for micro in range(accum):
                yield batch_positions(step, micro, process, batch, nproc, accum)

    def __len__(self):
        start, stop, _, _, _, accum = self.args
        return (stop - start) * accum


class CaptionedImages(torch.utils.data.Dataset):
    """Indexed by global stream position: resize (shorter side), crop, optional flip, [-1, 1] CHW float tensor.

    Also returns SDXL's micro-conditioning inputs as diffusers' SDXL scripts compute them: the original (h, w)
    and the crop's top-left (y, x) after resizing (x mirrored when flipped).
    """

    def __init__(self, items, resolution: int, seed: int, random_crop=False, random_flip=False):
        self.items, self.resolution, self.seed = items, resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        self.order = StreamOrder(len(items), seed)

    def __len__(self):  # positions are unbounded; the sampler decides which are read
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        from PIL import Image
        image_path, caption = self.items[self.order.index(position)]
        image = training_images.open_rgb(image_path)
        rng = np.random.default_rng(sample_seed(self.seed, STREAM_AUGMENT, position))
        original_size = (image.height, image.width)
        res = self.resolution
        image = training_images.resize_shorter_side(image, res)
        w, h = image.size
        y, x = (training_images.random_crop_origin(w, h, res, rng) if self.random_crop
                else training_images.centre_crop_origin(w, h, res))
        image = training_images.crop_square(image, y, x, res)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            x = w - x - res
        pixels = torch.from_numpy(training_images.as_array(image)).permute(2, 0, 1) * 2.0 - 1.0
        return {"pixels": pixels, "caption": caption, "original_size": original_size, "crop_top_left": (y, x),
                "position": position}


def collate(samples: list) -> dict:
    return {"pixels": torch.stack([s["pixels"] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "original_sizes": [s["original_size"] for s in samples],
            "crop_top_lefts": [s["crop_top_left"] for s in samples],
            "positions": [s["position"] for s in samples]}


# ================================================================================================ objective
def apply_recipe(args) -> None:
    """Fill --rho / --loss / --tcf_order that were not given from --recipe (the same table the node uses)."""
    for key, value in tcd_losses.RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def apply_guidance_defaults(args, guidance: str) -> None:
    """Fill --w_min / --w_max that were not given with the model's kind of guidance's defaults (DEFAULT_W_RANGE)."""
    for key, value in zip(("w_min", "w_max"), DEFAULT_W_RANGE[guidance]):
        if getattr(args, key) is None:
            setattr(args, key, value)


def _make_objective(args, path, prediction_type, guidance="cfg"):
    """tcd.losses.make_objective, as the node builds it, on `path` (an abar table for the VP models, a
    tcd.paths.FlowPath for flow models); it takes one generator per sample (a list), so the draws never depend on how
    a batch is split."""
    apply_guidance_defaults(args, guidance)
    return tcd_losses.make_objective(args.objective, path, original_steps=args.original_steps,
                                     w_min=args.w_min, w_max=args.w_max, loss=args.loss, huber_c=args.huber_c,
                                     prediction_type=prediction_type, tcf_order=args.tcf_order, rho=args.rho,
                                     guidance=guidance)


# ================================================================================================ models
def load_pipeline(args, plan: Plan):
    """The diffusers pipeline (float32, CPU) from a folder or a single file; SD gets no safety checker."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if plan.is_flow:
        pipe = flow.load_pipeline(args.pretrained_model, plan.arch, args.variant)
        if args.vae_path:
            pipe.vae = _load_vae(args.vae_path)
        return pipe
    cls = StableDiffusionXLPipeline if plan.arch == "sdxl" else StableDiffusionPipeline
    extra = {} if plan.arch == "sdxl" else dict(safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    if plan.single_file:
        local_cfg = args.model_config is not None and Path(args.model_config).expanduser().is_dir()
        pipe = cls.from_single_file(str(args.pretrained_model), config=args.model_config,
                                    local_files_only=local_cfg, dtype=torch.float32, **extra)
    else:
        pipe = cls.from_pretrained(str(args.pretrained_model), dtype=torch.float32, variant=args.variant,
                                   **extra)
    if args.vae_path:
        pipe.vae = _load_vae(args.vae_path)
    return pipe


def _load_vae(path):
    from diffusers import AutoencoderKL
    vae_path = Path(path).expanduser()
    return (AutoencoderKL.from_single_file(str(vae_path), dtype=torch.float32) if vae_path.is_file()
            else AutoencoderKL.from_pretrained(str(vae_path), dtype=torch.float32))


def add_lora(model, rank: int, alpha: float, target_modules=None):
    """PEFT LoRA on `target_modules` (default: the LCM-LoRA recipe's UNet targets; a flow transformer passes its
    exact module names); returns the (name, parameter) list it trains."""
    from peft import LoraConfig
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                 target_modules=list(target_modules or LORA_TARGET_MODULES)))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the LoRA matched no module of this model")
    for _, p in trainable:                     # LoRA and its optimizer state in float32 (mixed precision or not)
        p.data = p.data.float()
    return trainable


def unet_call(x, t, cond):
    """model(x_t, t, cond) of a diffusers UNet as (args, kwargs) of its forward (see call_model)."""
    return (x, t), {"encoder_hidden_states": cond["embeds"], "added_cond_kwargs": cond.get("added"),
                    "return_dict": False}


def call_model(model, call, x, t, cond, *guidance, params=None):
    """The raw output of `model` (a UNet / transformer, its DDP wrapper) at (x_t, t, cond) (and the guidance input w
    of an embedded-guidance model); with `params` (the EMA LoRA) the module runs with those parameters in place of its
    own (torch.func.functional_call). A call with `finish` (Flux: unpack the tokens) maps the output back to x's
    layout."""
    args, kwargs = call(x, t, cond, *guidance)
    if params is not None:
        out = torch.func.functional_call(model, params, args, kwargs, strict=False)[0]
    else:
        out = model(*args, **kwargs)[0]
    finish = getattr(call, "finish", None)
    return finish(out, x) if finish is not None else out


class Student:
    """f_theta's model: the first call of a micro-step goes through the DDP wrapper (which arms the gradient
    all-reduce), later calls (the 2nd-order TCF midpoint) use the module itself; their gradients reach the same
    parameters, so DDP reduces the summed gradient once."""

    def __init__(self, wrapped, module, call=unet_call):
        self.wrapped, self.module, self.call, self.calls = wrapped, module, call, 0

    def __call__(self, x, t, cond, *guidance):
        model = self.wrapped if self.calls == 0 else self.module
        self.calls += 1
        return call_model(model, self.call, x, t, cond, *guidance)


class LoraEMA:
    """theta^- as an exponential moving average of the LoRA parameters (diffusers' LCM `update_ema`)."""

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params):
        for n, p in named_params:
            tcd_losses.ema_update_(self.shadow[n], p.detach(), self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


# ================================================================================================ conditioning
def sdxl_time_ids(original_sizes, crop_top_lefts, target_size, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per sample: original (h, w) + crop top-left (y, x) + target (h, w), as
    diffusers' StableDiffusionXLPipeline builds add_time_ids (SDXL paper, section 2.2)."""
    return torch.tensor([list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crop_top_lefts)],
                        dtype=dtype)


def make_conditioner(pipe, plan: Plan, device):
    """Captions -> (cond, uncond) for the model's call: the UNet's (Conditioner) or SD3's / Flux's (accelerate_flow;
    Flux: uncond None, its guidance is an input)."""
    if plan.is_flow:
        return flow.make_conditioner(pipe, device)
    return Conditioner(pipe, plan.arch, plan.resolution, device)


class Conditioner:
    """Caption -> UNet conditioning through the pipeline's own `encode_prompt` (the inference path), plus SDXL's
    pooled embeddings and time ids (original size, crop top-left, target size)."""

    def __init__(self, pipe, arch: str, resolution: int, device):
        self.pipe, self.arch, self.resolution, self.device = pipe, arch, resolution, device
        self._uncond = None

    def _check_time_ids(self, time_ids: torch.Tensor) -> None:
        """The UNet's added-condition MLP must take the pooled text embedding plus one Fourier embedding per time id
        (the shape check diffusers' pipeline makes), else the UNet config does not match this text encoder."""
        unet, proj_dim = self.pipe.unet, self.pipe.text_encoder_2.config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        got = unet.config.addition_time_embed_dim * time_ids.shape[1] + proj_dim
        if got != expected:
            raise ValueError(f"the SDXL UNet's add_embedding takes {expected} features but this text encoder and "
                             f"{time_ids.shape[1]} time ids give {got}: the UNet and text_encoder_2 come from "
                             f"different models; use one model's folder or file")

    @torch.no_grad()
    def __call__(self, captions, original_sizes=None, crop_top_lefts=None) -> tuple[dict, dict]:
        if self.arch == "sd":
            embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
            return {"embeds": embeds}, {"embeds": self._sd_uncond(len(captions))}
        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        target = (self.resolution, self.resolution)
        time_ids = sdxl_time_ids(original_sizes, crop_top_lefts, target, embeds.dtype).to(self.device)
        self._check_time_ids(time_ids)
        cond = {"embeds": embeds, "added": {"text_embeds": pooled, "time_ids": time_ids}}
        # SDXL's unconditional branch: zeros when the pipeline forces zeros for an empty prompt (SDXL base's
        # config, and diffusers' LCM-LoRA SDXL script), else the empty prompt's embeddings.
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", True):
            u_embeds, u_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            u_embeds, _, u_pooled, _ = self.pipe.encode_prompt([""] * len(captions), device=self.device,
                                                               num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
        return cond, {"embeds": u_embeds, "added": {"text_embeds": u_pooled, "time_ids": time_ids}}

    def _sd_uncond(self, n):
        # The SD LCM-LoRA script's uncond: the empty prompt's embeddings.
        if self._uncond is None:
            self._uncond, _ = self.pipe.encode_prompt([""], self.device, 1, False)
        return self._uncond.expand(n, -1, -1)


# ================================================================================================ saving
def lora_state_dict(unet, rank: int, alpha: float, shadow: dict | None = None) -> dict:
    """The PEFT LoRA state dict (what diffusers' scripts pass to save_lora_weights), float32, with the LoRA
    scale alpha / rank folded into lora_B so the file needs no alpha (loaders then use scale 1 = alpha = rank)."""
    from peft.utils import get_peft_model_state_dict
    sd = get_peft_model_state_dict(unet)
    if shadow is not None:   # the EMA weights under the same PEFT names
        by_param = {n.replace(".default.", "."): t for n, t in shadow.items()}
        missing = [k for k in sd if k not in by_param]
        if missing:
            raise RuntimeError(f"EMA weights missing for {missing[:3]}")
        sd = {k: by_param[k] for k in sd}
    scale = alpha / rank
    return {k: (v.detach().float() * scale if ".lora_B." in k and scale != 1 else v.detach().float()).cpu()
            for k, v in sd.items()}


def save_lora(pipe_cls, state_dict: dict, output_dir: Path, name: str, metadata: dict,
              component: str = "unet") -> Path:
    """diffusers' `save_lora_weights` (its key layout, "unet." / "transformer." + PEFT names) into a temporary
    folder, then the file re-written atomically as `output_dir/name` with the pack's metadata added: `tcd.family` lets
    the TCD LoRA Loader show TCD's presets; diffusers ignores metadata it does not know."""
    from safetensors import safe_open
    tmp = output_dir / f".{name}.tmpdir"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe_cls.save_lora_weights(str(tmp), weight_name=name, **{f"{component}_lora_layers": state_dict})
        with safe_open(str(tmp / name), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            written = dict(f.metadata() or {})
        return save_safetensors_atomic(tensors, output_dir / name, {**written, **metadata})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lora_metadata(args, plan: Plan, step: int) -> dict:
    family = tcd_lora.TCD_FAMILY if args.objective == "tcd" else "LCM LoRA"
    return {tcd_lora.METADATA_FAMILY_KEY: family, "tcd.base_architecture": plan.arch, "tcd.steps": str(step),
            "tcd.objective": args.objective, "tcd.lora_rank": str(args.lora_rank),
            "tcd.original_steps": str(args.original_steps), "tcd.tcf_order": str(args.tcf_order),
            "tcd.rho": str(args.rho), "tcd.loss": str(args.loss)}


# ================================================================================================ validation
@torch.no_grad()
def run_validation(pipe, args, plan: Plan, accelerator, step: int, output_dir: Path):
    """Sample each validation prompt with diffusers' TCDScheduler (guidance 0, eta = gamma), or for a flow model
    with the pack's TCD sampler (accelerate_flow.sample_image), and save PNGs."""
    if plan.is_flow:
        return _flow_validation(pipe, args, plan, accelerator, step, output_dir)
    from diffusers import TCDScheduler
    original = pipe.scheduler
    pipe.scheduler = TCDScheduler.from_config(original.config)
    pipe.set_progress_bar_config(disable=True)
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    try:
        with accelerator.autocast():
            for i, prompt in enumerate(args.validation_prompts):
                g = torch.Generator("cpu").manual_seed(args.seed + i)
                image = pipe(prompt, num_inference_steps=args.validation_inference_steps, guidance_scale=0.0,
                             eta=args.validation_gamma, generator=g, height=plan.resolution,
                             width=plan.resolution).images[0]
                image.save(folder / f"step-{step:06d}-{i}.png")
                images.append(np.asarray(image))
    finally:
        pipe.scheduler = original
    _log_images(accelerator, images, step)
    return images


def _flow_validation(pipe, args, plan: Plan, accelerator, step: int, output_dir: Path):
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with accelerator.autocast():
        for i, prompt in enumerate(args.validation_prompts):
            guidance = args.validation_guidance if args.validation_guidance is not None else FLUX_VALIDATION_GUIDANCE
            image = flow.sample_image(pipe, prompt, args.validation_inference_steps, args.validation_gamma,
                                      args.original_steps, plan.resolution, args.seed + i, accelerator.device,
                                      guidance)
            image.save(folder / f"step-{step:06d}-{i}.png")
            images.append(np.asarray(image))
    _log_images(accelerator, images, step)
    return images


def _log_images(accelerator, images: list, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")


# ================================================================================================ training
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = validate_args(args)
        # (train raises ConfigError too, for what only the loaded models show: a VAE or text encoder that does not
        # fit the SD3 / Flux transformer)
        train(args, plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@dataclass
class Run:
    """What the phases of one CLI run share: the accelerator, the models, the LoRA and its optimizer."""
    args: argparse.Namespace
    plan: Plan
    accelerator: object
    output_dir: Path
    pipe: object = None
    denoiser: object = None                     # the UNet or the flow transformer
    call: object = None                         # model(x_t, t, cond) as the denoiser's (args, kwargs)
    vae: object = None
    objective: object = None
    rank: int = 0
    alpha: float = 0.0
    named_trainable: list = None
    ema: object = None
    optimizer: object = None
    lr_scheduler: object = None
    wrapped: object = None                      # the denoiser as accelerate prepared it (DDP on several processes)
    module: object = None                       # the plain denoiser with its PEFT adapter
    start_step: int = 0
    t0: float = 0.0                             # wall clock at the first optimizer step of this run

    def log(self, msg: str) -> None:
        self.accelerator.print(f"[tcd] {msg}")

    @property
    def global_batch(self) -> int:
        return self.args.train_batch_size * self.accelerator.num_processes * self.args.gradient_accumulation_steps


def train(args, plan: Plan) -> Path:
    run = start_run(args, plan)
    load_models(run)
    attach_lora_and_optimizer(run)
    register_lora_checkpointing(run)
    resume(run)
    step = train_steps(run)
    return finish(run, step)


def start_run(args, plan: Plan) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    output_dir = Path(args.output_dir).expanduser()
    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=plan.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return Run(args, plan, accelerator, output_dir)


def load_models(run: Run) -> None:
    """Frozen weights in the mixed-precision dtype (the VAE in float32 where its config asks to upcast, as SDXL's),
    and the objective on the pipeline's own noise schedule and prediction type (SD3: its flow path, velocity)."""
    from diffusers import DDPMScheduler
    device = run.accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(run.accelerator.mixed_precision,
                                                                        torch.float32)
    plan = run.plan
    pipe = load_pipeline(run.args, plan)
    if plan.is_flow:
        try:
            flow.check_components(pipe)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        denoiser, text_encoders = flow.denoiser_of(pipe), flow.text_encoders_of(pipe)
    else:
        denoiser = pipe.unet
        text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    vae = pipe.vae
    for m in [vae, *text_encoders]:
        m.requires_grad_(False)
    vae.to(device, dtype=torch.float32 if getattr(vae.config, "force_upcast", False) else weight_dtype)
    for m in text_encoders:
        m.to(device, dtype=weight_dtype)
    denoiser.to(device, dtype=weight_dtype)
    sched_cfg = pipe.scheduler.config
    run.pipe, run.denoiser, run.vae = pipe, denoiser, vae
    if plan.is_flow:
        run.call = flow.make_call(pipe)
        run.objective = flow.make_objective(run.args, flow.folder_configs_of(pipe), plan.resolution,
                                            _make_objective)
        if run.objective.guidance == "embedded" and run.args.w_max > EMBEDDED_GUIDANCE_USUAL_MAX:
            run.log(f"warning: w_max={run.args.w_max:g} is fed to this guidance-distilled model as its guidance "
                    f"value; FLUX.1-dev is used at 2-5 (3-15 are CFG scales for UNets)")
    else:
        run.call = unet_call
        alphas_cumprod = DDPMScheduler.from_config(sched_cfg).alphas_cumprod.float()
        run.objective = _make_objective(run.args, alphas_cumprod, sched_cfg.get("prediction_type", "epsilon"))


def attach_lora_and_optimizer(run: Run) -> None:
    """The LoRA (the same initial weights on every process: seeded before creation; DDP also broadcasts rank 0's),
    its EMA, the optimizer and the learning-rate schedule, prepared by accelerate."""
    from diffusers.optimization import get_scheduler
    args = run.args
    run.rank, run.alpha = args.lora_rank, float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank)
    torch.manual_seed(args.seed)
    targets = flow.lora_target_names(run.denoiser) if run.plan.is_flow else None
    run.named_trainable = add_lora(run.denoiser, run.rank, run.alpha, targets)
    if targets is not None:
        _check_lora_covers(run.denoiser, targets)
    params = [p for _, p in run.named_trainable]
    if args.gradient_checkpointing:
        run.denoiser.enable_gradient_checkpointing()
    run.ema = LoraEMA(run.named_trainable, args.ema_decay) if args.ema_decay > 0 else None
    if args.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Stepped once per optimizer step by this loop (not by accelerate, which steps prepared schedulers once per
    # process), so the schedule does not depend on the number of processes.
    run.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                     num_training_steps=args.max_train_steps)
    run.wrapped, run.optimizer = run.accelerator.prepare(run.denoiser, optimizer)
    run.module = run.accelerator.unwrap_model(run.wrapped)
    run.accelerator.register_for_checkpointing(run.lr_scheduler)
    if run.ema is not None:
        run.accelerator.register_for_checkpointing(run.ema)


def _check_lora_covers(model, targets) -> None:
    """PEFT put a LoRA on exactly the named modules (exact names in target_modules can still match by suffix)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    got = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if got != set(targets):
        raise RuntimeError(f"the LoRA landed on {sorted(got ^ set(targets))[:5]} (expected exactly the "
                           f"{len(targets)} target modules)")


def register_lora_checkpointing(run: Run) -> None:
    """Checkpoints hold the LoRA only (not the frozen UNet / transformer): accelerate's save/load hooks, as
    diffusers' scripts."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    accelerator, module = run.accelerator, run.module

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_safetensors_atomic({k: v.float() for k, v in get_peft_model_state_dict(module).items()},
                                    Path(folder) / "lora_state.safetensors")
        while weights:
            weights.pop()

    def load_hook(models, folder):
        state = load_file(str(Path(folder) / "lora_state.safetensors"))
        result = set_peft_model_state_dict(module, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint LoRA does not fit this model: {result.unexpected_keys[:5]}")
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume(run: Run) -> None:
    plan, accelerator = run.plan, run.accelerator
    if plan.resume_dir is not None:
        saved = json.loads((plan.resume_dir / "training_state.json").read_text())
        if saved.get("global_batch") != run.global_batch:
            run.log(f"warning: the checkpoint was trained with global batch {saved.get('global_batch')}, this run "
                    f"uses {run.global_batch}; the data stream continues at a different position than an "
                    f"uninterrupted run")
        accelerator.load_state(str(plan.resume_dir))
        accelerator.step = 0          # accumulation counter: checkpoints are written at optimizer-step boundaries
        run.start_step = plan.resume_step
        run.log(f"resumed from {plan.resume_dir} at step {run.start_step}")
    if accelerator.is_main_process:
        _truncate_log(run.output_dir / LOG_FILE, run.start_step)


def data_loader(run: Run):
    """This process's share of each global batch (no accelerate sharding: positions are global)."""
    args, plan, accelerator = run.args, run.plan, run.accelerator
    dataset = CaptionedImages(plan.items, plan.resolution, args.seed, args.random_crop, args.random_flip)
    sampler = PositionSampler(run.start_step, args.max_train_steps, args.train_batch_size,
                              accelerator.process_index, accelerator.num_processes, args.gradient_accumulation_steps)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=args.dataloader_num_workers,
                                       persistent_workers=args.dataloader_num_workers > 0)


def tcd_models(run: Run):
    """The three models of tcd.losses, all on the one UNet / transformer: student (LoRA, trained), teacher
    (adapters off, as diffusers' SDXL LCM-LoRA script), target (the EMA LoRA, or the online one). With embedded
    guidance (Flux) each is called model(x, t, cond, w) and passes w on as the transformer's guidance input."""
    module, ema, call = run.module, run.ema, run.call
    student = Student(run.wrapped, module, call)

    def teacher(x, t, cond, *guidance):
        module.disable_adapters()
        try:
            return call_model(module, call, x, t, cond, *guidance)
        finally:
            module.enable_adapters()

    def target(x, t, cond, *guidance):
        return call_model(module, call, x, t, cond, *guidance, params=None if ema is None else ema.shadow)
    return student, teacher, target


def encode_latents(run: Run, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    """VAE latents in the denoiser's space ((z - shift_factor) * scaling_factor; SD1.x/SDXL have no shift), each
    sample's posterior drawn from its own generator; in chunks: a float32
    VAE encoder holds ~0.6 GB of activations per 512 px image, ~2.6 GB at 1024 px."""
    vae, chunk = run.vae, run.args.vae_batch_size
    with torch.no_grad():
        pixels = pixels.to(run.accelerator.device, dtype=vae.dtype)
        latents = torch.cat([vae.encode(pixels[i:i + chunk]).latent_dist.sample(generator=generators[i:i + chunk])
                             for i in range(0, len(generators), chunk)])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()


def train_steps(run: Run) -> int:
    """The optimizer steps from run.start_step to --max_train_steps: loss log, checkpoints, validation."""
    from tqdm.auto import tqdm
    args, plan, accelerator = run.args, run.plan, run.accelerator
    loader = data_loader(run)
    conditioner = make_conditioner(run.pipe, plan, accelerator.device)
    if accelerator.is_main_process and plan.report_to:
        accelerator.init_trackers("tcd-lora", config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
    run.log(f"{plan.arch}: {len(plan.items)} images, {accelerator.num_processes} process(es) x batch "
            f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation = global batch "
            f"{run.global_batch}; LoRA rank {run.rank} on {len(run.named_trainable) // 2} layers; steps "
            f"{run.start_step} -> {args.max_train_steps}")
    student, teacher, target = tcd_models(run)
    params = [p for _, p in run.named_trainable]

    def micro_step(batch) -> torch.Tensor:
        generators = [sample_generator(args.seed, p) for p in batch["positions"]]
        latents = encode_latents(run, batch["pixels"], generators)
        cond, uncond = conditioner(batch["captions"], batch["original_sizes"], batch["crop_top_lefts"])
        student.calls = 0
        with accelerator.autocast():
            return run.objective(student, target, teacher, latents, cond, uncond, generator=generators)

    progress = tqdm(total=args.max_train_steps, initial=run.start_step, desc="TCD LoRA",
                    disable=not accelerator.is_local_main_process)
    run.wrapped.train()
    batches = iter(loader)
    step = run.start_step
    run.t0 = time.time()
    while step < args.max_train_steps:
        micro_losses = []
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(run.wrapped):
                loss = micro_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at step {step + 1}; lower --learning_rate "
                                             f"or use --mixed_precision bf16/no (last checkpoint is kept)")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with the optimizer steps")
        lr = run.lr_scheduler.get_last_lr()[0]          # the rate this step used
        run.lr_scheduler.step()
        if run.ema is not None:
            run.ema.update(run.named_trainable)
        step += 1
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr:.3g}")
        if accelerator.is_main_process:
            with open(run.output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps({"step": step, "loss": step_loss, "lr": lr}) + "\n")
        accelerator.log({"loss": step_loss, "lr": lr}, step=step)
        if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or step == args.max_train_steps:
            save_checkpoint(accelerator, args, run.output_dir, step, run.global_batch, plan)
        if args.validation_steps and step % args.validation_steps == 0:
            if accelerator.is_main_process:
                run_validation(run.pipe, args, plan, accelerator, step, run.output_dir)
            accelerator.wait_for_everyone()
    progress.close()
    return step


def finish(run: Run, step: int) -> Path:
    """The LoRA in diffusers' load_lora_weights format (and the EMA one beside it), and the last validation."""
    import diffusers
    args, plan, accelerator = run.args, run.plan, run.accelerator
    pipe_cls = type(run.pipe) if plan.is_flow else (diffusers.StableDiffusionXLPipeline if plan.arch == "sdxl"
                                                     else diffusers.StableDiffusionPipeline)
    component = "transformer" if plan.is_flow else "unet"
    accelerator.wait_for_everyone()
    final = run.output_dir / args.lora_name
    if accelerator.is_main_process:
        meta = lora_metadata(args, plan, step)
        save_lora(pipe_cls, lora_state_dict(run.module, run.rank, run.alpha), run.output_dir, args.lora_name, meta,
                  component)
        if run.ema is not None:
            save_lora(pipe_cls, lora_state_dict(run.module, run.rank, run.alpha, run.ema.shadow), run.output_dir,
                      args.lora_name.replace(".safetensors", "_ema.safetensors"), meta, component)
        run.log(f"saved {final} ({time.time() - run.t0:.1f} s for {args.max_train_steps - run.start_step} steps)")
        if args.validation_prompts and not (args.validation_steps and step % args.validation_steps == 0):
            run_validation(run.pipe, args, plan, accelerator, step, run.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def save_checkpoint(accelerator, args, output_dir: Path, step: int, global_batch: int, plan: Plan) -> Path:
    """accelerate's save_state into checkpoint-<step>.tmp, the run's state beside it, then a rename."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": step, "global_batch": global_batch, "num_processes": accelerator.num_processes,
                 "seed": args.seed, "arch": plan.arch, "lora_rank": args.lora_rank, "objective": args.objective}
        (tmp / "training_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            old = sorted(_checkpoints(output_dir), key=lambda p: p[1])[:-args.checkpoints_total_limit]
            for d, _ in old:
                shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the loss log's lines up to the resumed step (a crashed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    if last_step == 0:
        path.unlink()
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in lines))


if __name__ == "__main__":
    sys.exit(main())
