"""Does the TCD Distill LoRA node work on a flow model? The efficacy benchmark (benchmarks/efficacy) on an SD3-class
teacher.

A small SD3-class MMDiT (ComfyUI's `comfy.supported_models.SD3` config, `comfy.model_base.SD3` around
`comfy.ldm.modules.diffusionmodules.mmdit.MMDiT`, ModelSamplingDiscreteFlow with SD3's shift 3) is trained with the
rectified-flow objective on scikit-learn's digits, conditioned on the digit through fixed per-class text embeddings;
the TCD Distill LoRA node turns it into TCD and LCM LoRAs, and ComfyUI's samplers draw from all of them; the digits
are scored with the VP benchmark's metrics. Run it with `python -m benchmarks.efficacy_flow.run` from the
repository root.
"""
