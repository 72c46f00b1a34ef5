"""corept-kernels: Triton kernels with forward and backward passes for LLM fine-tuning.

Every public function is differentiable and has a pure-torch reference twin in
:mod:`corept_kernels.torch_ref`; :mod:`corept_kernels.capabilities` picks one of the two per call
(:func:`dispatch`, with the reason for a twin) and says which can run where (:func:`can_run`).
Within :func:`reference_only` every call runs the twin.
This package depends on torch and triton only (bitsandbytes lazily, for NF4 LoRA bases) and never
imports transformers.

On CPU, Triton kernels run only through the interpreter: set ``TRITON_INTERPRET=1`` *before*
importing this package.
"""
from corept_kernels.capabilities import (KernelInfo, all_kernels, can_run, dispatch, interpreter_active,
                                         reference_only)
from corept_kernels.norms import layer_norm, rms_norm
from corept_kernels.rope import rope
from corept_kernels.glu import geglu, swiglu
from corept_kernels.cross_entropy import cross_entropy
from corept_kernels.fused_linear_ce import fused_linear_cross_entropy
from corept_kernels.attention import varlen_attention
from corept_kernels.lora import LoraWeights, lora_mlp, lora_o, lora_qkv, lora_fast_path_reason
from corept_kernels.ops.experts import expert_linear
from corept_kernels import ops  # noqa: F401  (registers the custom operators)

__version__ = "0.1.0"

__all__ = [
    "KernelInfo", "all_kernels", "can_run", "dispatch", "interpreter_active", "reference_only",
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu",
    "cross_entropy", "fused_linear_cross_entropy", "varlen_attention",
    "LoraWeights", "lora_mlp", "lora_qkv", "lora_o", "lora_fast_path_reason", "expert_linear",
]
