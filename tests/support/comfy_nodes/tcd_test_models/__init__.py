"""Test-only ComfyUI node: loads the tiny Flux-class model of scripts/make_tiny_flow.py for headless workflow runs.

ComfyUI 0.3.75's detection builds every Flux file with 24 heads of width 128 (hidden 3072), so a tiny Flux file
cannot go through UNETLoader. The tiny file carries its unet_config in its metadata; this node builds the model
from it with ComfyUI's own classes (comfy.supported_models.Flux -> model_base.Flux -> ModelPatcher), which is what
UNETLoader does after detection. The example workflows' UNETLoader is replaced by this node only in the tests
(tests/support/workflows.py); nothing else in a graph changes.
"""
import json

FLUX_CONFIG_KEY = "tcd_test.flux_unet_config"


class TinyFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, unet_name):
        import torch
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models as sm
        import comfy.utils
        import folder_paths
        sd, metadata = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name),
                                                   return_metadata=True)
        if not metadata or FLUX_CONFIG_KEY not in metadata:
            raise ValueError(f"{unet_name!r} has no {FLUX_CONFIG_KEY} metadata: not a tiny test Flux")
        cfg = sm.Flux(json.loads(metadata[FLUX_CONFIG_KEY]))
        cfg.set_inference_dtype(torch.float32, None)
        model = cfg.get_model({}, device="cpu")
        model.load_model_weights({"diffusion_model." + k: v for k, v in sd.items()}, "diffusion_model.")
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


NODE_CLASS_MAPPINGS = {"TCDTest_TinyFluxLoader": TinyFluxLoader}
