"""Which backends this machine can run, how "auto" chooses, and the one-time fallback log.

Backends:
  reference  pure PyTorch (ard_kernels.reference), every device, the oracle;
  sdpa       torch's scaled_dot_product_attention with a dense bool mask (attention only);
  flex       FlexAttention with a BlockMask (attention only; compiled on CUDA);
  triton     our Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

Nothing here queries a device at import time.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger("ard_kernels")

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton")
_ATTENTION_ONLY = ("sdpa", "flex")
_logged: set = set()


def log_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time ``key`` is seen in this process (no silent fallbacks)."""
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


# Whether Triton runs as its interpreter: read once, when this module is imported, as Triton decides it when
# the kernels are defined (TRITON_INTERPRET must be set before either). Every op asks at every call, and an
# environment lookup per call was a few µs of each small launch's host time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpreted() -> bool:
    return _INTERPRET


# Plain module constants, not cached functions: torch.compile traces resolve() inside the model
# and warns on cached functions. Looking a package up is no device query.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _has_triton() -> bool:
    return _HAS_TRITON


def _has_flex() -> bool:
    return _HAS_FLEX


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only through its interpreter."""
    if not _has_triton():
        return False
    if device.type == "cuda":
        return not triton_interpreted()
    return device.type == "cpu" and triton_interpreted()


def available_backends(device: "torch.device | str | None" = None) -> list:
    """Backends that can run on ``device`` here (default: CUDA if this machine has it, else CPU).

    >>> "reference" in available_backends("cpu")
    True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = ["reference", "sdpa"]
    if _has_flex():
        names.append("flex")
    if triton_runs_on(device):
        names.append("triton")
    return names


def resolve(backend: str, op: str, device: torch.device) -> str:
    """Map ``backend`` (possibly "auto") to a concrete backend for ``op`` on ``device``.

    "auto" on CUDA picks Triton (the fast path) and logs once if it has to fall back; on the
    CPU it picks the fastest eager path (SDPA for attention, the reference elsewhere), since
    the Triton interpreter is a correctness tool, not a fast path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    attention = op == "block_attention"
    if backend == "auto":
        if device.type == "cuda":
            if triton_runs_on(device):
                return "triton"
            fallback = "sdpa" if attention else "reference"
            log_once(f"auto-{op}", f"ard_kernels.{op}: Triton unavailable on {device}; falling back to '{fallback}'")
            return fallback
        return "sdpa" if attention else "reference"
    if backend in _ATTENTION_ONLY and not attention:
        raise ValueError(f"backend: {backend!r} serves block_attention only; {op} takes 'reference' or 'triton'")
    if backend == "flex" and not _has_flex():
        raise RuntimeError("backend: 'flex' needs torch.nn.attention.flex_attention, which this torch lacks")
    if backend == "triton" and not triton_runs_on(device):
        if not _has_triton():
            raise RuntimeError("backend: 'triton' requested but triton is not installed")
        if device.type == "cpu":
            raise RuntimeError(
                "backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before ard_kernels is imported"
            )
        raise RuntimeError(f"backend: 'triton' cannot run on device {device}")
    return backend
