"""Does the product work end to end? The TCD Distill LoRA node on a trained teacher that lives in ComfyUI's classes.

A small SD1.5-family teacher (ComfyUI's SD15 model config with a smaller UNet, ComfyUI's CLIP text encoder at a tiny
size) is trained on scikit-learn's digits, the TCD Distill LoRA node turns it into TCD and LCM LoRAs, and ComfyUI's
samplers draw from all of them; the digits are scored in a digit classifier's feature space. Run it with
`python -m benchmarks.efficacy.run` from the repository root (or `make bench`).
"""
