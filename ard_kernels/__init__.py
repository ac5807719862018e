"""ard_kernels: fast kernels and a thin model for AutoRegressive Distillation of diffusion transformers.

Public ops (each with ``backend=``): :func:`block_attention` (and :func:`block_attention_qkv` on a
packed QKV projection), :func:`modulated_layer_norm`,
:func:`gated_residual`, :func:`gated_residual_modulated_layer_norm` (the two fused),
:func:`timestep_embedding`; :func:`available_backends` says what runs here.
Importing the package does no device work and never fails for want of the compiled extension.
"""

from ._backends import available_backends
from .api import (
    block_attention,
    block_attention_qkv,
    gated_residual,
    gated_residual_modulated_layer_norm,
    modulated_layer_norm,
    timestep_embedding,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "block_attention",
    "block_attention_qkv",
    "gated_residual",
    "gated_residual_modulated_layer_norm",
    "modulated_layer_norm",
    "timestep_embedding",
    "__version__",
]
