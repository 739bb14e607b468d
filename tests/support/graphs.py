"""API-format graphs used by the server tests and the demo (node ids are strings, links are [id, slot])."""


def txt2img(ckpt="tiny_sd15.safetensors", steps=4, size=64, sampler="tcd", scheduler="tcd", seed=1, cfg=1.0,
            denoise=1.0, prefix="tcd_test", prompt="a photo of a cat"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": denoise, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }


def tcd_custom_advanced(ckpt="tiny_sd15.safetensors", steps=4, size=64, gamma=0.3, seed=1, cfg=1.0,
                        denoise=1.0, original_steps=50, gamma_schedule="", prefix="tcd_adv", tcf_order=1):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "TCD_Sampler", "inputs": {"gamma": gamma, "gamma_schedule": gamma_schedule,
                                                       "final_step": "diffusers", "tcf_order": tcf_order}},
        "11": {"class_type": "TCD_Scheduler", "inputs": {"model": ["1", 0], "steps": steps, "denoise": denoise,
                                                         "original_steps": original_steps,
                                                         "denoise_mode": "comfyui"}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                     "negative": ["3", 0], "cfg": cfg}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["12", 0], "guider": ["13", 0],
                                                                 "sampler": ["10", 0], "sigmas": ["11", 0],
                                                                 "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }
