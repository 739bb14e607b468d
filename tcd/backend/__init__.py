"""The one door to ComfyUI's internals. Nothing else in the pack names a `comfy` module, class or attribute.

Every import of `comfy` is lazy, inside a function, so `tcd` stays importable without ComfyUI. Modules:
  host      devices, Cancel, progress, folders;
  sampling  model sampling objects, KSampler's sampler / scheduler lists, sampling through a guider;
  lora      UNet name table, LoRA key maps, applying a LoRA, the loras folders;
  training  the clone a trainer patches, weight wrappers, model calls, conditions, gradient checkpointing.

Tested on ComfyUI 0.3.75 (the test host) and 0.33.0. Internal symbols used, each once here:
  comfy.model_management: get_torch_device, intermediate_device, throw_exception_if_processing_interrupted,
      InterruptProcessingException, should_use_bf16, load_models_gpu, in_training (0.12+; optional)
  comfy.utils: ProgressBar, unet_to_diffusers, mmdit_to_diffusers (SD3), flux_to_diffusers (Flux)
  folder_paths: get_output_directory, get_input_directory, get_folder_paths, get_filename_list, get_full_path
  comfy.samplers: KSAMPLER, ksampler, KSampler.SAMPLERS, SCHEDULER_HANDLERS, SchedulerHandler, SCHEDULER_NAMES,
      CFGGuider (set_conds, set_cfg, sample), encode_model_conds, cond_cat
  comfy.k_diffusion.sampling: sample_<name> (how KSampler resolves a sampler name)
  comfy.sample.prepare_noise; comfy.sampler_helpers.convert_cond; CONDRegular.process_cond
  comfy.lora: model_lora_keys_unet, model_lora_keys_clip; comfy.sd.load_lora_for_models
  comfy.weight_adapter.lora.LoRAAdapter: create_train, lora_up, lora_down
  ModelPatcher: clone (disable_dynamic, where is_dynamic exists), get_model_object("model_sampling"),
      set_model_compute_dtype, add_weight_wrapper, weight_wrapper_patches, patches, model_options, model
  torch modules under a ModelPatcher: weight_function, bias_function (where the wrappers live once loaded; a module
      without them is a plain torch module whose inference-tensor parameters the trainer copies); LayerNorm /
      *RMSNorm modules (forward pre-hooks: Flux blocks' in-place residual adds, ComfyUI 0.3.x)
  BaseModel: apply_model (and its `guidance` keyword, from Flux's extra_conds), process_latent_in, diffusion_model,
      extra_conds, model_sampling, model_config.unet_config
  diffusion models: params.guidance_embed (Flux: the guidance embedding), patch_size (SD3 / Flux)
  model sampling classes by name: ModelSamplingDiscreteDistilled, LCM, CONST, ModelSamplingContinuousEDM,
      ModelSamplingAdvanced, ModelSamplingDiscreteFlow, ModelSamplingFlux; attributes sigmas, sigma_min,
      sigma_max, shift; method percent_to_sigma
  sampler wrappers: KSamplerX0Inpaint.inner_model / latent_image, CFGGuider.inner_model
  comfy.sd.VAE.first_stage_model, VAE.decode; comfy.sd.CLIP.cond_stage_model (.transformer), CLIP.patcher
"""
from .host import (Progress, has_comfy, input_directory, intermediate_device, is_interrupt, output_directory,
                   throw_if_interrupted, torch_device)
from .lora import (FLOW_MODEL_CLASSES, apply_lora, flow_ldm_to_diffusers, lora_folders, lora_names, lora_path,
                   lora_target_shapes, model_architecture, patched_since, unet_ldm_to_diffusers, unet_weight_shapes)
from .sampling import (CONTINUOUS_SAMPLING, FLOW_SAMPLING, flow_sigma_of_time, inpaint_latent_of,
                       is_flow_sampling, lcm_ksampler, make_ksampler, model_sampling_of,
                       register_sampler_function, register_scheduler_function, registered_sampler,
                       registered_scheduler, sample_latent, schedule_for, sigma_table)
from .training import (TRAINING_DTYPES, add_weight_wrapper, apply_model, batch_model_conds, clip_weights_module,
                       copy_inference_parameters, copy_norm_inputs, create_lora_adapter, detach_weight_wrappers,
                       diffusion_model_of, disable_gradient_checkpointing, enable_gradient_checkpointing, freeze_model,
                       latent_patch_size, load_for_training, lora_adapter_weights, model_class_name, model_cond_item,
                       model_sampling_object, move_model_conds, process_latent_in, remove_hooks,
                       restore_inference_parameters, set_compute_dtype, takes_guidance_input, thaw_model,
                       training_clone, training_dtype, training_mode, transformer_options_of, unet_state_dict,
                       vae_weights_module, weight_wrappers, with_guidance)
