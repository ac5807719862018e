"""The compiled CUDA extension ``ard_kernels._C`` (csrc/): loaded once, optional, never an import error.

It registers three ops under ``torch.ops.ard_kernels`` (write position ``pos = offset_host + offset[0]``,
or ``offset_host`` alone when ``offset`` is None):

* ``kv_append(k_cache!, v_cache!, k, v, offset?, offset_host, status!, stream)``:
  ``k_cache[:, :, pos:pos+n] = k``, ``v_cache[:, :, pos:pos+n] = v``;
* ``qkv_split_append(qkv, k_cache!, v_cache!, offset?, offset_host, status!, num_heads, stream) -> q``:
  ``q, k, v = qkv.reshape(B, n, 3, H, D).permute(2, 0, 3, 1, 4)``, k and v appended as above, q
  returned contiguous (B, H, n, D);
* ``qkv_append(qkv, k_cache!, v_cache!, offset?, offset_host, status!, num_heads, stream)``: the same without
  q (its k and v parts appended, 2/3 of the bytes), for callers that read q in place in qkv.

Caches (B, H, capacity, D), k, v (B, H, n, D), qkv (B, n, 3·H·D): CUDA, contiguous, one dtype of
bf16/fp16/fp32, D a multiple of 8. ``status`` is an int32 CUDA tensor: when ``pos < 0`` or
``pos + n > capacity`` the kernels write nothing into the caches and set ``status[0] = 1``.
``stream`` is ``torch.cuda.current_stream().cuda_stream`` (or -1: torch's current stream, looked up
by the op): the extension is built without c10/cuda so that it also compiles against a CPU-only torch.

The wrappers :func:`kv_append`, :func:`qkv_split_append` and :func:`qkv_append` below fill in the stream and the
status and raise on overflow: before the launch when the offset is a host int (no sync), after
it, by reading ``status`` (one sync), when the offset is a device tensor and ``check=True``.
``check=False`` is the sync-free mode for CUDA-graph capture: read ``status`` yourself later.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from ._validation import check_same_device, check_shape, check_tensor

logger = logging.getLogger("ard_kernels")

_error = None


@functools.cache
def load():
    """Import ``ard_kernels._C`` once; returns the module, or None (with one warning) if it is missing.

    ARD_KERNELS_BUILD_CUDA=0 means the extension was deliberately not built: no warning then.
    """
    global _error
    try:
        module = importlib.import_module("ard_kernels._C")
        if not hasattr(torch.ops.ard_kernels, "qkv_append"):  # built from an older csrc/: one op short
            raise ImportError("ard_kernels._C predates torch.ops.ard_kernels.qkv_append (a stale build): rebuild it")
    except ImportError as exc:  # not built, built against another torch, or stale
        _error = exc
        if os.environ.get("ARD_KERNELS_BUILD_CUDA", "").strip() != "0":
            warnings.warn(
                f"ard_kernels: CUDA extension not available ({exc}){torch_mismatch(build_info())}; the KV cache "
                "uses the PyTorch path. Build it with `pip install --no-build-isolation -e .` where nvcc is "
                "installed.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    _register_fakes()
    logger.debug("ard_kernels: loaded CUDA extension from %s (built with %s)", getattr(module, "__file__", "?"),
                 build_info())
    return module


def build_info():
    """What the compiled extension was built against: ``_C.build.json`` beside it (torch, torch_cuda, archs,
    cxx11_abi, python; written by setup.py), or None where there is none."""
    try:
        return json.loads(Path(__file__).with_name("_C.build.json").read_text())
    except (OSError, ValueError):
        return None


def torch_mismatch(info, version: str = torch.__version__) -> str:
    """``"; it was built against torch X, this is torch Y"`` when ``info`` names another torch than ``version``
    (the extension's C++ ABI is that torch's), else ``""``."""
    built = (info or {}).get("torch")
    if not built or built == version:
        return ""
    return f"; it was built against torch {built}, this is torch {version}: rebuild it against this one"


def extension_available() -> bool:
    """True when ``torch.ops.ard_kernels.kv_append``, ``qkv_split_append`` and ``qkv_append`` exist (compiled
    extension)."""
    return load() is not None


def extension_error():
    """Why the extension did not load (an ImportError), or None."""
    load()
    return _error


def _register_fakes():
    """Shape-only (meta / FakeTensor) implementations, so the ops trace under torch.compile and export."""

    @torch.library.register_fake("ard_kernels::kv_append")
    def _kv_append_fake(k_cache, v_cache, k, v, offset, offset_host, status, stream):
        return None

    @torch.library.register_fake("ard_kernels::qkv_split_append")
    def _qkv_split_append_fake(qkv, k_cache, v_cache, offset, offset_host, status, num_heads, stream):
        b, n, _ = qkv.shape
        return qkv.new_empty((b, num_heads, n, k_cache.shape[-1]))

    @torch.library.register_fake("ard_kernels::qkv_append")
    def _qkv_append_fake(qkv, k_cache, v_cache, offset, offset_host, status, num_heads, stream):
        return None


def current_stream(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of the current stream on ``device``, as the ops expect it.

    While torch.compile traces, -1 instead: the op then asks torch for its current stream at run
    time, so no stream of the tracing moment is baked into the graph.
    """
    if torch.compiler.is_compiling():
        return -1
    return torch.cuda.current_stream(device).cuda_stream


def _position(offset, n, capacity):
    """Split ``offset`` into (device tensor or None, host int); a host int is bounds-checked here."""
    if isinstance(offset, torch.Tensor):
        return offset, 0
    offset = int(offset)
    if offset < 0 or offset + n > capacity:
        raise ValueError(f"offset: appending {n} tokens at offset {offset} overflows the cache capacity {capacity}")
    return None, offset


def _status_and_stream(k_cache: torch.Tensor, status):
    """The ops' overflow flag (``status``, or a fresh zeroed int32 (1,) on the cache's device) and stream."""
    if status is None:
        status = torch.zeros(1, dtype=torch.int32, device=k_cache.device)
    return status, (current_stream(k_cache.device) if k_cache.is_cuda else 0)


def check_status(status: torch.Tensor, what: str = "KV cache append") -> None:
    """Raise ValueError if a kernel flagged an overflow in ``status`` (reads it: one sync); resets it."""
    if int(status[0].item()) != 0:
        status.zero_()
        raise ValueError(f"{what}: the write position plus the new tokens exceeded the cache capacity; "
                         "nothing was written")


def _check_append_args(k_cache, v_cache, status, offset, **inputs) -> None:
    """Everything the ops' bindings check, checked here first, with errors naming the argument.

    ``inputs``: the other tensors (k and v, or qkv); the caller has checked their shapes and k_cache's
    rank. Shapes, dtypes and layouts come before devices (so the CPU tests reach every message). The
    bindings check again (they are callable directly), but the wrappers never rely on a C++ error path:
    one crashed a GPU image (csrc/kv_cache_ops.cpp says how).
    """
    check_tensor("v_cache", v_cache, 4)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[3] % 8:
        raise ValueError(f"k_cache: head dim D must be a multiple of 8, got {k_cache.shape[3]}")
    tensors = {"k_cache": k_cache, "v_cache": v_cache, **inputs}
    for name, t in tensors.items():
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{name}: expected dtype {k_cache.dtype} (as k_cache), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got shape {tuple(t.shape)} and strides "
                             f"{t.stride()}")
    if status is not None:
        if not isinstance(status, torch.Tensor):
            raise TypeError(f"status: expected a torch.Tensor or None, got {type(status).__name__}")
        if status.dtype != torch.int32 or status.numel() < 1 or not status.is_contiguous():
            raise ValueError(f"status: expected a contiguous int32 tensor of at least 1 element, got "
                             f"{status.dtype} of shape {tuple(status.shape)}")
        tensors["status"] = status
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.numel() != 1:
            raise ValueError(f"offset: expected an int64 tensor of 1 element, got {offset.dtype} of shape "
                             f"{tuple(offset.shape)}")
        tensors["offset"] = offset
    for name, t in tensors.items():
        if not t.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor (the kernels' path; the PyTorch path is "
                             f"HistoryKVCache(backend='torch')), got device {t.device}")
    check_same_device("k_cache", k_cache, **{n: t for n, t in tensors.items() if n != "k_cache"})


def kv_append(k_cache, v_cache, k, v, offset, status=None, check=True):
    """``k_cache[:, :, o:o+n] = k``, ``v_cache[:, :, o:o+n] = v`` in place with the CUDA kernel.

    Args:
        k_cache, v_cache: (B, H, capacity, D) CUDA; k, v: (B, H, n, D), same dtype (bf16/fp16/fp32).
        offset: host int (checked before the launch) or int64 CUDA tensor of 1 element (checked on the
            device; see ``check``).
        status: int32 CUDA tensor (1,) for the overflow flag; None allocates one.
        check: with a tensor offset, read ``status`` after the launch and raise on overflow (a sync);
            False leaves that to the caller (sync-free, CUDA-graph capturable).

    Returns:
        None. Raises ValueError on overflow, with the caches untouched, and TypeError or ValueError
        naming the argument on a bad one (before anything is launched).
    """
    check_tensor("k_cache", k_cache, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    b, h, _, d = k_cache.shape
    check_shape("k", k, (b, h, k.shape[2], d))
    check_shape("v", v, tuple(k.shape))
    _check_append_args(k_cache, v_cache, status, offset, k=k, v=v)
    dev_offset, host_offset = _position(offset, k.shape[2], k_cache.shape[2])
    status, stream = _status_and_stream(k_cache, status)
    torch.ops.ard_kernels.kv_append(k_cache, v_cache, k, v, dev_offset, host_offset, status, stream)
    if check and dev_offset is not None:
        check_status(status, "kv_append")


def qkv_split_append(qkv, k_cache, v_cache, offset, num_heads, status=None, check=True):
    """``q, k, v = split(qkv)``; k, v appended to the caches at ``offset``; returns q (B, H, n, D).

    One pass over ``qkv`` (B, n, 3·H·D) laid out as DiT's qkv Linear output (``reshape(B, n, 3, H, D)``).
    Arguments as for :func:`kv_append`.
    """
    return _qkv_op("qkv_split_append", qkv, k_cache, v_cache, offset, num_heads, status, check)


def qkv_append(qkv, k_cache, v_cache, offset, num_heads, status=None, check=True):
    """:func:`qkv_split_append` without q: the k and v parts of ``qkv`` appended to the caches at ``offset``
    (one pass over 2/3 of qkv's bytes; q is read where it lies, a view of qkv). Returns None."""
    return _qkv_op("qkv_append", qkv, k_cache, v_cache, offset, num_heads, status, check)


def _qkv_op(name, qkv, k_cache, v_cache, offset, num_heads, status, check):
    """Validate and run ``torch.ops.ard_kernels.<name>`` (qkv_split_append or qkv_append)."""
    check_tensor("k_cache", k_cache, 4)
    check_tensor("qkv", qkv, 3)
    b, h, _, d = k_cache.shape
    if num_heads != h:
        raise ValueError(f"num_heads: expected the cache's H = {h}, got {num_heads}")
    check_shape("qkv", qkv, (b, qkv.shape[1], 3 * h * d))
    _check_append_args(k_cache, v_cache, status, offset, qkv=qkv)
    dev_offset, host_offset = _position(offset, qkv.shape[1], k_cache.shape[2])
    status, stream = _status_and_stream(k_cache, status)
    out = getattr(torch.ops.ard_kernels, name)(qkv, k_cache, v_cache, dev_offset, host_offset, status, num_heads,
                                               stream)
    if check and dev_offset is not None:
        check_status(status, name)
    return out
