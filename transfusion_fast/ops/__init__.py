"""The public ops. Each validates its inputs, then runs the implementation the backend switch picks."""
from .attention import attention, attention_reference, attention_tile_sizes
from .flow import (flow_inference_timesteps, flow_interpolate, flow_interpolate_reference, flow_target,
                   sample_flow_timesteps, shift_timesteps)
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .noise import (add_noise, add_noise_reference, diffusion_target, philox_normal_reference, predicted_eps,
                    predicted_x0)
from .patchify import (patchify, patchify_packed, patchify_packed_reference, patchify_reference, unpatchify,
                       unpatchify_packed, unpatchify_packed_reference, unpatchify_reference)
from .sampler import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference, euler_step,
                      euler_step_reference, heun_step, heun_step_reference, inference_timesteps)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference
from .swiglu import swiglu, swiglu_fused, swiglu_reference

__all__ = ["attention", "attention_reference", "attention_tile_sizes", "add_noise", "add_noise_reference", "patchify",
           "patchify_reference", "unpatchify", "unpatchify_reference", "rms_norm",
           "rms_norm_reference", "apply_rope", "apply_rope_reference", "swiglu", "swiglu_fused",
           "swiglu_reference", "diffusion_target", "predicted_x0", "predicted_eps", "philox_normal_reference",
           "ddpm_step", "ddpm_step_reference", "ddim_step", "ddim_step_reference", "inference_timesteps",
           "patchify_packed", "patchify_packed_reference", "unpatchify_packed", "unpatchify_packed_reference",
           "euler_step", "euler_step_reference", "heun_step", "heun_step_reference", "flow_interpolate",
           "flow_interpolate_reference", "flow_target", "sample_flow_timesteps", "shift_timesteps",
           "flow_inference_timesteps", "linear_cross_entropy", "linear_cross_entropy_reference"]
