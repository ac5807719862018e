"""The public ops: validate inputs first, then dispatch on ``backend=``.

``backend`` is one of "auto", "reference", "sdpa", "flex" (attention only) or "triton";
:func:`ard_kernels.available_backends` says which run here. "auto" picks the fastest one for
the tensors' device (Triton on CUDA; eager PyTorch on the CPU) and logs once when it has to
fall back to a slower path.
"""

from __future__ import annotations

import math

import torch

from . import masks, reference
from ._backends import log_once, resolve
from ._validation import (
    check_block_size,
    check_int,
    check_out_dtype,
    check_positive,
    check_same,
    check_same_device,
    check_shape,
    check_tensor,
)

TRITON_HEAD_DIMS = range(16, 257, 8)


def _attention_args(lq, lk, d, block_size, pattern, scale):
    """Validate the block layout, pattern and scale of an attention call: returns (pattern, scale).

    A named pattern stays a name for the backends that take one (reference, sdpa, triton): their
    choices are then plain Python, and under torch.compile no CPU table tensor enters the graph. A
    user table is validated and copied to the CPU once here. ``scale`` defaults to 1/sqrt(D).
    """
    check_block_size(block_size)
    masks.check_lengths(lq, lk, block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        check_positive("scale", scale)
    if isinstance(pattern, str):
        if pattern not in masks.PATTERNS:
            raise ValueError(f"pattern: expected one of {masks.PATTERNS} or a bool tensor (nb, nb), got {pattern!r}")
        return pattern, scale
    return masks.pattern_table(pattern, masks.num_blocks(lk, block_size)), scale


def block_attention(q, k, v, block_size, pattern="causal", scale=None, return_lse=False, backend="auto"):
    """``O = softmax(Q·Kᵀ·scale + log M)·V``, M the block mask of ``pattern``.

    Key token ``j`` is in block ``j // block_size``; the queries are the last Lq tokens of the
    key sequence (Lq = Lk in training, one block at a KV-cached step). See
    :func:`ard_kernels.reference.block_attention_ref` for the exact semantics and
    :mod:`ard_kernels.masks` for the patterns.

    Args:
        q: (B, H, Lq, D); k, v: (B, H, Lk, D); fp16, bf16 or fp32, one dtype and device. Any
            strides: a (B, N, H, D) tensor viewed as (B, H, N, D) by ``transpose(1, 2)`` is fine.
        block_size: tokens per block, >= 1 (the last block may be partial).
        pattern: "causal" (M4), "diagonal" (M1), "window" (M2), "first" (M3), or a bool table
            (nb, nb), nb = ceil(Lk / block_size), with no empty row.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the fp32 log-sum-exp (B, H, Lq) of each query row.
        backend: "auto" | "reference" | "sdpa" | "flex" | "triton".

    Returns:
        O (B, H, Lq, D) in q's dtype (from the Triton backend laid out (B, Lq, H, D) in memory, so
        ``O.transpose(1, 2).reshape(B, Lq, H·D)`` is a view); with ``return_lse`` the tuple (O, lse).
    """
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_same("q", q, k=k, v=v)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    check_shape("k", k, (b, h, lk, d))
    check_shape("v", v, (b, h, lk, d))
    pattern, scale = _attention_args(lq, lk, d, block_size, pattern, scale)
    nb = masks.num_blocks(lk, block_size)

    chosen = resolve(backend, "block_attention", q.device)
    if chosen == "triton" and d not in TRITON_HEAD_DIMS:
        if backend == "triton":
            raise ValueError(f"q: backend 'triton' takes head dims that are multiples of 8 in [16, 256], got D={d}")
        log_once(f"attention-head-dim-{d}", f"ard_kernels.block_attention: head dim {d} is outside the Triton "
                 "kernel's range (multiples of 8 in [16, 256]); using 'sdpa'")
        chosen = "sdpa"
    if chosen == "sdpa" and return_lse:
        if backend == "sdpa":
            raise ValueError(
                "return_lse: SDPA does not expose the log-sum-exp; use backend 'reference', 'flex' or 'triton'"
            )
        chosen = "reference"
    if chosen == "reference":
        return reference.block_attention_ref(q, k, v, block_size, pattern, scale, return_lse)
    if chosen == "sdpa":
        from .ops.attention_peers import block_attention_sdpa

        return block_attention_sdpa(q, k, v, block_size, pattern, scale)
    if chosen == "flex":
        from .ops.attention_peers import block_attention_flex

        return block_attention_flex(q, k, v, block_size, masks.pattern_table(pattern, nb), scale, return_lse)
    from .ops.block_attention import block_attention_triton

    # The op takes the pattern as plain-int constants (a user table is read with tolist(): under
    # torch.compile that is a graph break, named patterns compile without one).
    return block_attention_triton(q, k, v, block_size, pattern, scale, return_lse)


def block_attention_qkv(qkv, num_heads, block_size, pattern="causal", scale=None, backend="auto"):
    """:func:`block_attention` on a packed QKV projection, all N tokens attending: (B, N, 3·H·D) → (B, N, H·D).

    ``qkv`` holds [q | k | v] × (H, D) along its last axis, as DiT's (timm's) ``attn.qkv`` Linear
    writes it; the result is the attention projection's input, ``O.transpose(1, 2).reshape(B, N, H·D)``.
    With the Triton backend nothing is copied: q, k, v are strided views of qkv, O is written in
    the (B, N, H·D) layout, and the backward writes dq, dk, dv into one (B, N, 3·H·D) gradient
    (unpacked, the caller's permute of O and autograd's stack of dq, dk, dv each cost a pass).

    Args:
        qkv: (B, N, 3·H·D); fp16, bf16 or fp32.
        num_heads: H, an int >= 1 dividing the last axis into 3·H heads.
        block_size, pattern, scale, backend: as for :func:`block_attention` (Lq = Lk = N).

    Returns:
        (B, N, H·D) in qkv's dtype, differentiable w.r.t. qkv.
    """
    check_tensor("qkv", qkv, 3)
    check_int("num_heads", num_heads)
    b, n, width = qkv.shape
    if width == 0 or width % (3 * num_heads):
        raise ValueError(f"qkv: expected a last axis of 3·num_heads·D = a positive multiple of {3 * num_heads}, "
                         f"got shape {tuple(qkv.shape)}")
    d = width // (3 * num_heads)
    chosen = resolve(backend, "block_attention", qkv.device)
    if chosen == "triton" and d in TRITON_HEAD_DIMS:
        pattern, scale = _attention_args(n, n, d, block_size, pattern, scale)
        from .ops.block_attention import block_attention_qkv_triton

        return block_attention_qkv_triton(qkv, num_heads, block_size, pattern, scale)
    # Every other case (and its checks, fallbacks and logs) is block_attention's on the three views.
    out = block_attention(*reference.split_qkv(qkv, num_heads), block_size, pattern, scale, backend=backend)
    return out.transpose(1, 2).reshape(b, n, num_heads * d)


def _check_conditioning(x, block_size, **conds):
    """x (B, N, C) and each conditioning tensor (B, nb, C), nb = ceil(N / block_size).

    The conditioning may have another float dtype than x: under autocast the adaLN Linear gives
    bf16 while the residual stream stays fp32. The math is fp32 either way, the result is in x's dtype.
    """
    check_tensor("x", x, 3)
    check_block_size(block_size)
    b, n, c = x.shape
    if n < 1 or c < 1:
        raise ValueError(f"x: expected non-empty (B, N, C), got shape {tuple(x.shape)}")
    nb = masks.num_blocks(n, block_size)
    for name, t in conds.items():
        check_tensor(name, t, 3)
        check_shape(name, t, (b, nb, c))
    check_same_device("x", x, **conds)


def modulated_layer_norm(x, shift, scale, block_size, eps=1e-6, out_dtype=None, backend="auto"):
    """``y[b, n] = LN(x[b, n])·(1 + scale[b, n // block_size]) + shift[b, n // block_size]``.

    LayerNorm without affine (DiT's ``norm1``/``norm2``) fused with adaLN modulation whose
    conditioning is kept per (sample, block).

    Args:
        x: (B, N, C); shift, scale: (B, nb, C), nb = ceil(N / block_size); one device, float
            dtypes (the conditioning may differ from x, e.g. bf16 under autocast with fp32 x).
        eps: added to the variance, > 0.
        out_dtype: y's dtype, default x's. Under autocast, the autocast dtype when y feeds a
            Linear (which would cast it anyway): the same values, without the cast's pass.

    Returns:
        (B, N, C) in ``out_dtype``; differentiable in x, shift and scale.
    """
    _check_conditioning(x, block_size, shift=shift, scale=scale)
    check_positive("eps", eps)
    check_out_dtype("out_dtype", out_dtype)
    out_dtype = out_dtype or x.dtype
    chosen = resolve(backend, "modulated_layer_norm", x.device)
    if chosen == "reference":
        return reference.modulated_layer_norm_ref(x, shift, scale, block_size, eps, out_dtype)
    from .ops.modulated_layer_norm import modulated_layer_norm_triton

    return modulated_layer_norm_triton(x, shift, scale, block_size, eps, out_dtype)


def gated_residual(x, y, gate, block_size, inplace=False, backend="auto"):
    """``out[b, n] = x[b, n] + gate[b, n // block_size]·y[b, n]``.

    Args:
        x, y: (B, N, C); gate: (B, nb, C), nb = ceil(N / block_size); one device, float dtypes
            (y and gate may differ from x, e.g. bf16 under autocast with an fp32 residual stream).
        inplace: write the result into ``x`` (inference only: refused when grad is needed).

    Returns:
        (B, N, C) in x's dtype (``x`` itself when ``inplace``).
    """
    _check_conditioning(x, block_size, gate=gate)
    check_tensor("y", y, 3)
    check_shape("y", y, tuple(x.shape))
    check_same_device("x", x, y=y)
    if inplace and torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, gate)):
        raise RuntimeError("inplace: gated_residual(inplace=True) is for inference; a tensor here requires grad")
    chosen = resolve(backend, "gated_residual", x.device)
    if chosen == "reference":
        out = reference.gated_residual_ref(x, y, gate, block_size)
        return x.copy_(out) if inplace else out
    from .ops.gated_residual import gated_residual_triton

    return gated_residual_triton(x, y, gate, block_size, inplace)


def gated_residual_modulated_layer_norm(x, y, gate, shift, scale, block_size, eps=1e-6, inplace=False,
                                        out_dtype=None, backend="auto"):
    """``out = x + gate·y`` and ``h = LN(out)·(1 + scale) + shift``, conditioning per block, fused.

    :func:`gated_residual` followed by :func:`modulated_layer_norm` of its result (a DiT block's
    attention residual and the MLP's input) in one pass over the tokens: row n of sample b uses
    ``gate``/``shift``/``scale[b, n // block_size]``.

    Args:
        x, y: (B, N, C); gate, shift, scale: (B, nb, C), nb = ceil(N / block_size); one device,
            float dtypes (y and the conditioning may differ from x, e.g. bf16 under autocast).
        eps: LayerNorm epsilon, > 0.
        inplace: write ``out`` into ``x`` (inference only: refused when grad is needed).
        out_dtype: h's dtype, default x's (as for :func:`modulated_layer_norm`); ``out`` stays in x's.

    Returns:
        (out, h), (B, N, C) each, out in x's dtype (``x`` itself when ``inplace``), h in
        ``out_dtype``; differentiable in x, y, gate, shift and scale.
    """
    _check_conditioning(x, block_size, gate=gate, shift=shift, scale=scale)
    check_tensor("y", y, 3)
    check_shape("y", y, tuple(x.shape))
    check_same_device("x", x, y=y)
    check_positive("eps", eps)
    check_out_dtype("out_dtype", out_dtype)
    out_dtype = out_dtype or x.dtype
    if inplace and torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, gate, shift, scale)):
        raise RuntimeError("inplace: gated_residual_modulated_layer_norm(inplace=True) is for inference; "
                           "a tensor here requires grad")
    chosen = resolve(backend, "gated_residual_modulated_layer_norm", x.device)
    if chosen == "reference":
        out, h = reference.gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, block_size, eps,
                                                                   out_dtype)
        return (x.copy_(out), h) if inplace else (out, h)
    from .ops.gated_residual_modulated_layer_norm import gated_residual_modulated_layer_norm_triton

    return gated_residual_modulated_layer_norm_triton(x, y, gate, shift, scale, block_size, eps, inplace, out_dtype)


def timestep_embedding(t, dim, max_period=10000, backend="auto"):
    """``emb = [cos(t·f_i), sin(t·f_i)]``, ``f_i = exp(−ln(max_period)·i/(dim//2))``: DiT's embedding.

    Args:
        t: tensor of any shape (fractional timesteps allowed); math in fp32.
        dim: embedding width >= 1 (odd widths get a trailing zero column).

    Returns:
        (*t.shape, dim) fp32.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t: expected a real dtype, got {t.dtype}")
    check_int("dim", dim, 1)
    check_positive("max_period", max_period)
    chosen = resolve(backend, "timestep_embedding", t.device)
    if chosen == "reference":
        return reference.timestep_embedding_ref(t, dim, max_period)
    from .ops.timestep_embedding import timestep_embedding_triton

    return timestep_embedding_triton(t, dim, max_period)
