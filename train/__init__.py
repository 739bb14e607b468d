"""Training loops and their IO around `tcd.losses`.

* `comfy_loop`: TCD / LCM distillation of a LoRA on a ComfyUI ModelPatcher (one model copy: the teacher is the
  base weights with the LoRA bypassed), with progress, Cancel, checkpoints and exact resume;
* `dataset`: LATENT + CONDITIONING lists or a folder of captioned images (encoded once, cached);
* `checkpoint`: resumable training state, written atomically;
* `plot`: the loss curve as an IMAGE;
* `accelerate_tcd`: the same objective on diffusers models under HF accelerate (multi-GPU CLI).
"""
