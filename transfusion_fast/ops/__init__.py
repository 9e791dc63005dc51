"""The public ops. Each validates its inputs, then runs the implementation the backend switch picks."""
from .attention import attention, attention_reference
from .noise import add_noise, add_noise_reference
from .patchify import patchify, patchify_reference, unpatchify, unpatchify_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference
from .swiglu import swiglu, swiglu_fused, swiglu_reference

__all__ = ["attention", "attention_reference", "add_noise", "add_noise_reference", "patchify",
           "patchify_reference", "unpatchify", "unpatchify_reference", "rms_norm",
           "rms_norm_reference", "apply_rope", "apply_rope_reference", "swiglu", "swiglu_fused",
           "swiglu_reference"]
