"""The thin model: DiT (teacher) and ARDiT (ARD student), sizes, checkpoint conversion."""

from .ardit import ARDiT
from .configs import CONFIGS, DiTConfig, get_config
from .convert import diffusers_to_dit, dit_from_diffusers, infer_dit_kwargs, read_state_dict
from .dit import DiT, sincos_pos_embed_2d

__all__ = [
    "ARDiT",
    "CONFIGS",
    "DiT",
    "DiTConfig",
    "diffusers_to_dit",
    "dit_from_diffusers",
    "get_config",
    "infer_dit_kwargs",
    "read_state_dict",
    "sincos_pos_embed_2d",
]
