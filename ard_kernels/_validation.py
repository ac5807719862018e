"""Input checks shared by the public ops: each error names the argument, the expected and the actual."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {t.dtype}")


def check_out_dtype(name: str, dtype) -> None:
    """``dtype`` is None (the input's) or one of the float dtypes the kernels write."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: expected None or a dtype in ({names}), got {dtype!r}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """All tensors share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if t.shape != tuple(expected):  # torch.Size is a tuple: compared as it is
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
