"""DiT model sizes: the original DiT-{S,B,L,XL}/{2,4,8} family plus a tiny one for tests.

``DiT-XL/2``: depth 28, hidden 1152, 16 heads (head_dim 72), patch 2, MLP ratio 4: the
teacher of ARD. ``DiT-tiny/2`` (depth 4, hidden 64, 4 heads of 16) keeps CPU tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class DiTConfig:
    """Transformer shape of a DiT: ``depth`` blocks of width ``hidden_size`` in ``num_heads`` heads."""

    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self):
        for name in ("depth", "hidden_size", "patch_size", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of hidden_size {self.hidden_size}, got {self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected a positive number, got {self.mlp_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# (depth, hidden, heads) of each size, as in the DiT paper (Table 1).
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

CONFIGS = {
    f"DiT-{size}/{patch}": DiTConfig(depth, hidden, patch, heads)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
CONFIGS["DiT-tiny/2"] = DiTConfig(depth=4, hidden_size=64, patch_size=2, num_heads=4)
CONFIGS["DiT-tiny/4"] = DiTConfig(depth=4, hidden_size=64, patch_size=4, num_heads=4)


def get_config(config: Union[str, DiTConfig]) -> DiTConfig:
    """Return the :class:`DiTConfig` named ``config`` ("DiT-XL/2", "DiT-XL-2", ...) or ``config`` itself."""
    if isinstance(config, DiTConfig):
        return config
    if not isinstance(config, str):
        raise TypeError(f"config: expected a DiTConfig or one of {sorted(CONFIGS)}, got {type(config).__name__}")
    name = config
    if name not in CONFIGS and name.count("-") == 2:  # checkpoint spelling "DiT-XL-2"
        head, _, patch = name.rpartition("-")
        name = f"{head}/{patch}"
    if name not in CONFIGS:
        raise ValueError(f"config: expected one of {sorted(CONFIGS)}, got {config!r}")
    return CONFIGS[name]


def heads_for_width(hidden_size: int) -> int:
    """Head count of the standard config of width ``hidden_size`` (shapes alone do not tell it)."""
    for cfg in CONFIGS.values():
        if cfg.hidden_size == hidden_size:
            return cfg.num_heads
    raise ValueError(
        f"hidden_size: no standard DiT config has width {hidden_size}; pass config= explicitly"
    )
