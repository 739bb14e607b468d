"""ComfyUI node classes of the pack (V1 API). Each module is a thin adapter over tcd/ and train/."""
from .lora import TCDLoraLoader
from .presets import FewStepPreset
from .sampling import TCDSampler, TCDScheduler
from .train import TCDDistillLoRA

NODE_CLASS_MAPPINGS = {
    "TCD_Sampler": TCDSampler,
    "TCD_Scheduler": TCDScheduler,
    "TCD_LoraLoader": TCDLoraLoader,
    "TCD_DistillLoRA": TCDDistillLoRA,
    "TCD_FewStepPreset": FewStepPreset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TCD_Sampler": "TCD Sampler",
    "TCD_Scheduler": "TCD Scheduler",
    "TCD_LoraLoader": "TCD LoRA Loader",
    "TCD_DistillLoRA": "TCD Distill LoRA",
    "TCD_FewStepPreset": "Few-step Preset (TCD)",
}
