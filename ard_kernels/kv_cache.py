"""History KV cache for ARD sampling: ``K_l[:, :, 0:len] = [k_l(block 0) | … | k_l(block k−1)]``.

At step k only block k's tokens run; the lower ("history") layers attend to the keys/values of
every earlier block. Instead of growing the history with ``torch.cat`` (a full copy per step),
:class:`HistoryKVCache` preallocates (B, H, max_blocks·block_size, D) per history layer and writes
each step's keys/values in place: with the CUDA extension in one launch per layer, straight from
the QKV projection's output.

Use (what the sampler does)::

    cache = HistoryKVCache(num_layers=6, batch_size=B, num_heads=16, head_dim=72, block_size=256,
                           max_blocks=4, dtype=torch.bfloat16, device="cuda")
    cache.reset()
    for step in range(K):
        for layer in range(6):  # history layers only; upper layers use no cache
            q, k_all, v_all = cache.append_qkv(layer, qkv)   # k_all: (B, H, cache.length + n, D)
            ...
        cache.advance(n)  # after every layer appended this step's n tokens

Every layer of a step writes at the same position ``cache.length``; :meth:`advance` then moves
it, so the layers never need to agree on anything else.

Backends: "cuda" (the compiled kernels, torch.ops.ard_kernels), "torch" (slice copies, any
device), "auto" = cuda when the cache is on a CUDA device and the extension is built. The choice
is logged once per process and readable as ``cache.backend``.

Bounds: an append past the capacity raises ValueError and writes nothing. By default the check
is made on the host from ``cache.length`` (no sync), so the writes stay capturable in a CUDA graph
whose write positions are those at capture time: :mod:`ard_kernels.sampling` captures all K steps,
reset included, as one graph this way. With ``device_offset=True`` the write position lives in the
int64 device tensor ``cache.offset`` instead, moved by :meth:`advance` on the device, so ONE
captured single-step graph can be replayed for every step; the kernels then check the bounds on
the device, write nothing on overflow and set ``cache.status``, which :meth:`check` reads (one
sync) and turns into the ValueError. The "torch" backend does the same without a sync (an
``index_copy_`` at device-computed positions, redirected onto the old values when it would
overflow), so it is capturable too. The views returned by the writes (``length + n`` tokens)
follow the host ``length`` in both modes: a graph that serves every step must read a fixed-size
view (e.g. the whole capacity, masked) instead.

The storage is allocated outside ``torch.inference_mode`` even when the cache is built inside it:
an inference tensor refuses in-place writes once the mode is left, and a cache kept between
sampling calls (as a captured graph keeps it) is written under whichever mode the caller uses.
"""

from __future__ import annotations

import logging

import torch

from . import _ext, reference
from ._backends import log_once

BACKENDS = ("auto", "cuda", "torch")


def _resolve_backend(backend: str, device: torch.device, head_dim: int) -> str:
    """The backend a cache on ``device`` with head dim ``head_dim`` uses: "cuda" or "torch" (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    ext = device.type == "cuda" and _ext.extension_available()
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs a CUDA device, got {device}")
        if not ext:
            raise RuntimeError(
                f"backend: 'cuda' needs the compiled extension ard_kernels._C ({_ext.extension_error()})")
        if head_dim % 8:
            raise ValueError(f"head_dim: the CUDA backend needs a multiple of 8, got {head_dim}")
        return "cuda"
    return "cuda" if ext and head_dim % 8 == 0 else "torch"


class HistoryKVCache:
    """Preallocated keys/values of the history layers: ``k[layer]``, ``v[layer]`` (B, H, capacity, D).

    Args:
        num_layers: number of history layers cached (layer indices 0 … num_layers−1).
        batch_size, num_heads, head_dim: B, H, D (D a multiple of 8 for the CUDA backend).
        block_size, max_blocks: capacity = block_size · max_blocks tokens.
        dtype: bf16, fp16 or fp32. device: where the caches live.
        backend: "auto" | "cuda" | "torch" (see the module docstring).
        device_offset: keep the write position on the device (one CUDA graph for all steps).
        fill: the storage's initial value (0.0), or None to leave it unwritten: nothing reads past the valid
            prefix (appends write it, views end at it), and a fill is a pass over the whole cache (for
            DiT-XL/2's 6 history layers at B=64, 1.8 GB) that an eager sampler would pay at every call.

    Attributes:
        k, v: (num_layers, B, H, capacity, D) storage. length: valid tokens (host int).
        offset: int64 (1,) device tensor, the write position when ``device_offset``.
        status: int32 (1,) device tensor, set to 1 by a kernel that refused to overflow.
    """

    def __init__(self, num_layers, batch_size, num_heads, head_dim, block_size, max_blocks,
                 dtype=torch.bfloat16, device="cpu", backend="auto", device_offset=False, fill=0.0):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("block_size", block_size), ("max_blocks", max_blocks)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
        self.backend = _resolve_backend(backend, device, head_dim)
        # A CUDA cache on the PyTorch path by "auto" (no extension, or D not a multiple of 8) is worth a warning.
        fallback = device.type == "cuda" and self.backend == "torch" and backend == "auto"
        why = f"head_dim {head_dim} is not a multiple of 8" if head_dim % 8 else \
            f"CUDA extension unavailable: {_ext.extension_error()}"
        log_once(f"kv_cache:{self.backend}:{device.type}",
                 f"ard_kernels: HistoryKVCache on {device.type} uses the {self.backend!r} backend"
                 + (f" ({why})" if fallback else ""),
                 logging.WARNING if fallback else logging.INFO)
        self.num_layers, self.batch_size, self.num_heads, self.head_dim = num_layers, batch_size, num_heads, head_dim
        self.block_size, self.max_blocks = block_size, max_blocks
        self.capacity = block_size * max_blocks
        self.dtype, self.device, self.device_offset, self.fill = dtype, device, device_offset, fill
        shape = (num_layers, batch_size, num_heads, self.capacity, head_dim)
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode
            make = (lambda: torch.empty(shape, dtype=dtype, device=device)) if fill is None else \
                (lambda: torch.full(shape, fill, dtype=dtype, device=device))
            self.k, self.v = make(), make()
            self.offset = torch.zeros(1, dtype=torch.int64, device=device)
            self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.length = 0

    def __repr__(self):
        return (f"HistoryKVCache(layers={self.num_layers}, B={self.batch_size}, H={self.num_heads}, "
                f"D={self.head_dim}, length={self.length}/{self.capacity}, dtype={self.dtype}, "
                f"device={self.device}, backend={self.backend!r}, device_offset={self.device_offset})")

    # ------------------------------------------------------------------------------- state
    def reset(self):
        """Empty the cache (length 0, device offset 0, status cleared); the storage is kept."""
        self.length = 0
        if self.device_offset:
            self.offset.zero_()
        self.status.zero_()

    def advance(self, n: int):
        """Move the write position by ``n`` tokens, once per step, after every layer has appended."""
        n = int(n)
        if n < 0 or self.length + n > self.capacity:
            raise ValueError(f"n: advancing {n} tokens from {self.length} overflows the capacity {self.capacity}")
        self.length += n
        if self.device_offset:
            self.offset.add_(n)

    def check(self):
        """Raise ValueError if a device-side bounds check refused an append (reads ``status``: one sync)."""
        _ext.check_status(self.status, "HistoryKVCache")

    def views(self, layer: int, n: int = 0):
        """``(k[layer][:, :, :length + n], v[layer][:, :, :length + n])``: the valid prefix (views)."""
        end = min(self.length + n, self.capacity)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # ------------------------------------------------------------------------------- writes
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """``K[layer][:, :, length:length+n] = k`` (same for v); returns the views including them.

        Args:
            layer: history layer index. k, v: (B, H, n, D), the cache's dtype and device.

        Returns:
            (k_all, v_all): (B, H, length + n, D) views of the cache.
        """
        self._check_layer(layer)
        expected = (self.batch_size, self.num_heads, k.shape[2] if k.dim() == 4 else -1, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape (B, H, n, D) = {expected}, got {tuple(t.shape)}")
            self._check_tensor(name, t)
        n = k.shape[2]
        pos = self._position(n)
        kc, vc = self.k[layer], self.v[layer]
        if self.backend == "cuda":
            torch.ops.ard_kernels.kv_append(kc, vc, k.contiguous(), v.contiguous(), *pos, self.status,
                                            _ext.current_stream(self.device))
        else:
            self._write_torch(kc, vc, k, v, pos, n)
        return self.views(layer, n)

    def split_append(self, layer: int, qkv: torch.Tensor):
        """``q, k, v = qkv.reshape(B, n, 3, H, D).permute(2, 0, 3, 1, 4)``; k, v appended; returns q too.

        Args:
            layer: history layer index. qkv: (B, n, 3·H·D), the output of DiT's qkv Linear.

        Returns:
            (q, k_all, v_all): q (B, H, n, D) contiguous; k_all, v_all (B, H, length + n, D) views.
        """
        return self._qkv_write(layer, qkv, copy_q=True)

    def append_qkv(self, layer: int, qkv: torch.Tensor):
        """:meth:`split_append` without copying q: k, v of ``qkv`` appended; q returned as a view of ``qkv``.

        What the sampler's history layers call: the attention reads q where the qkv Linear wrote it (its
        kernels take any strides), so the append moves 2/3 of the bytes of :meth:`split_append`.

        Args:
            layer: history layer index. qkv: (B, n, 3·H·D), the output of DiT's qkv Linear.

        Returns:
            (q, k_all, v_all): q (B, H, n, D), a strided view of qkv (of a contiguous copy when qkv is not
            contiguous); k_all, v_all (B, H, length + n, D) views of the cache.
        """
        return self._qkv_write(layer, qkv, copy_q=False)

    def _qkv_write(self, layer: int, qkv: torch.Tensor, copy_q: bool):
        """:meth:`split_append` (``copy_q``: q contiguous, written by the same kernel) or :meth:`append_qkv`."""
        self._check_layer(layer)
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        if qkv.dim() != 3 or qkv.shape[0] != b or qkv.shape[2] != 3 * h * d:
            raise ValueError(f"qkv: expected shape (B, n, 3·H·D) = ({b}, n, {3 * h * d}), got {tuple(qkv.shape)}")
        self._check_tensor("qkv", qkv)
        n = qkv.shape[1]
        pos = self._position(n)
        kc, vc = self.k[layer], self.v[layer]
        qkv = qkv.contiguous()  # the kernels' layout; a no-op for a Linear's output
        q, k, v = reference.split_qkv(qkv, h)
        stream = _ext.current_stream(self.device) if self.backend == "cuda" else None
        if self.backend == "cuda" and copy_q:
            q = torch.ops.ard_kernels.qkv_split_append(qkv, kc, vc, *pos, self.status, h, stream)
        elif self.backend == "cuda":
            torch.ops.ard_kernels.qkv_append(qkv, kc, vc, *pos, self.status, h, stream)
        else:
            q = q.contiguous() if copy_q else q
            self._write_torch(kc, vc, k, v, pos, n)
        return (q, *self.views(layer, n))

    # ------------------------------------------------------------------------------- helpers
    def _check_layer(self, layer):
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")

    def _check_tensor(self, name, t):
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(f"{name}: expected {self.dtype} on {self.device}, got {t.dtype} on {t.device}")

    def _position(self, n):
        """(device offset or None, host offset) for the ops; host mode raises here on overflow (no sync)."""
        if self.device_offset:
            return self.offset, 0
        if self.length + n > self.capacity:
            raise ValueError(f"appending {n} tokens at length {self.length} overflows the cache capacity "
                             f"{self.capacity} (= block_size {self.block_size} × max_blocks {self.max_blocks})")
        return None, self.length

    def _write_torch(self, kc, vc, k, v, pos, n):
        """The "torch" backend's write of k, v (B, H, n, D) at ``pos``, never reading the device offset on the host.

        Host offset: slice copies (bounds already checked by :meth:`_position`). Device offset:
        ``index_copy_`` at ``offset + [0, n)``, clamped into the cache; when the append would overflow,
        the positions get their own old values back (nothing changes) and ``status`` is set, as the
        kernels do. No ``.item()``: the step stays capturable in a CUDA graph.
        """
        dev, start = pos
        if dev is None:
            kc[:, :, start:start + n].copy_(k)
            vc[:, :, start:start + n].copy_(v)
            return
        fits = (dev >= 0) & (dev + n <= self.capacity)  # (1,) bool, on the device
        idx = (dev + torch.arange(n, device=dev.device)).clamp_(0, self.capacity - 1)
        for cache, new in ((kc, k), (vc, v)):
            cache.index_copy_(2, idx, torch.where(fits, new, cache.index_select(2, idx)))
        self.status.bitwise_or_((~fits).to(self.status.dtype))
