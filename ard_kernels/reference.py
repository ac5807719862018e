"""Pure-PyTorch references: the semantics of every op, the oracle of the tests, the CPU path.

Each function is written for clarity, not speed: math in fp32 (fp64 inputs stay fp64),
results cast back to the input dtype. The fast backends (Triton, CUDA, SDPA, FlexAttention) must agree with these.
Inputs are assumed valid here; the public functions in :mod:`ard_kernels.api` validate.
"""

from __future__ import annotations

import math

import torch

from . import masks


def _acc(t):
    """The accumulation dtype: fp32 for low-precision inputs, fp64 kept as is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def block_attention_ref(q, k, v, block_size, pattern="causal", scale=None, return_lse=False):
    """``O = softmax(Q·Kᵀ·scale + log M)·V`` with a block mask ``M`` from ``pattern``.

    Token ``j`` of the Lk-token key sequence belongs to block ``j // block_size``; the queries
    are the last Lq tokens of that sequence, so query row ``r`` is in block
    ``(Lk - Lq + r) // block_size``. ``M[r, j] = table[block(r), block(j)]`` with ``table``
    from :func:`ard_kernels.masks.pattern_table`.

    Args:
        q: (B, H, Lq, D); k, v: (B, H, Lk, D), Lq <= Lk; any float dtype, same for all three.
        block_size: tokens per block (the last block may be partial).
        pattern: "causal" | "diagonal" | "window" | "first" | bool tensor (nb, nb).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return ``lse[b, h, r] = log Σ_j exp(s[r, j])`` over allowed keys.

    Returns:
        O (B, H, Lq, D) in q's dtype, and with ``return_lse`` also lse (B, H, Lq) fp32.
    """
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = masks.dense_mask(pattern, lq, lk, block_size, device=q.device)
    s = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, _acc(v)).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def timestep_embedding_ref(t, dim, max_period=10000):
    """``emb = [cos(t·f_i), sin(t·f_i)]``, ``f_i = exp(−ln(max_period)·i/half)``, i < half = dim // 2.

    DiT's sinusoidal timestep embedding (cos half first, then sin half). Fractional t allowed;
    an odd ``dim`` gets a trailing zero column.

    Args:
        t: any shape, any real dtype (math in fp32).
        dim: embedding width.

    Returns:
        (*t.shape, dim) fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(*emb.shape[:-1], 1)], dim=-1)
    return emb


def _per_token(cond, n, block_size):
    """Expand per-block conditioning (B, nb, C) to per-token (B, n, C) by block index."""
    idx = torch.div(torch.arange(n, device=cond.device), block_size, rounding_mode="floor")
    return cond[:, idx]


def modulated_layer_norm_ref(x, shift, scale, block_size, eps=1e-6, out_dtype=None):
    """``y[b, n] = LN(x[b, n])·(1 + scale[b, n // block_size]) + shift[b, n // block_size]``.

    LayerNorm without affine parameters (biased variance, ``eps`` inside the root), then
    adaLN modulation with conditioning per (sample, block), never repeated per token.

    Args:
        x: (B, N, C); shift, scale: (B, nb, C), nb = ceil(N / block_size); same dtype.

    Returns:
        (B, N, C) in ``out_dtype`` (default x's dtype).
    """
    n = x.shape[1]
    xf = _acc(x)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    xhat = (xf - mean) * torch.rsqrt(var + eps)
    y = xhat * (1 + _per_token(_acc(scale), n, block_size)) + _per_token(_acc(shift), n, block_size)
    return y.to(out_dtype or x.dtype)


def gated_residual_ref(x, y, gate, block_size):
    """``out[b, n] = x[b, n] + gate[b, n // block_size]·y[b, n]``.

    Args:
        x, y: (B, N, C); gate: (B, nb, C), nb = ceil(N / block_size); same dtype.

    Returns:
        (B, N, C) in x's dtype.
    """
    n = x.shape[1]
    out = _acc(x) + _per_token(_acc(gate), n, block_size) * _acc(y)
    return out.to(x.dtype)


def gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, block_size, eps=1e-6, out_dtype=None):
    """``out = x + gate·y``, then ``h = LN(out)·(1 + scale) + shift``, conditioning per block.

    The two ops of a DiT block's middle, as :func:`gated_residual_ref` followed by
    :func:`modulated_layer_norm_ref` of ``out`` (stored in x's dtype, then normalised).

    Args:
        x, y: (B, N, C); gate, shift, scale: (B, nb, C), nb = ceil(N / block_size).

    Returns:
        (out, h), (B, N, C) each: out in x's dtype, h in ``out_dtype`` (default x's dtype).
    """
    out = gated_residual_ref(x, y, gate, block_size)
    return out, modulated_layer_norm_ref(out, shift, scale, block_size, eps, out_dtype)


def kv_append_ref(k_cache, v_cache, k, v, offset):
    """``k_cache[:, :, offset:offset+n] = k``; ``v_cache[:, :, offset:offset+n] = v``, in place.

    Args:
        k_cache, v_cache: (B, H, capacity, D); k, v: (B, H, n, D), same dtype and device.
        offset: token offset (int) where the new tokens go.

    Returns:
        The new valid length ``offset + n``.

    Raises:
        ValueError: if ``offset + n`` exceeds the capacity (nothing is written then).
    """
    n, capacity = k.shape[2], k_cache.shape[2]
    if offset < 0 or offset + n > capacity:
        raise ValueError(
            f"offset: appending {n} tokens at offset {offset} overflows the cache capacity {capacity}"
        )
    k_cache[:, :, offset:offset + n].copy_(k)
    v_cache[:, :, offset:offset + n].copy_(v)
    return offset + n


def split_qkv(qkv, num_heads):
    """(q, k, v), each (B, H, n, D), as views of a QKV projection qkv (B, n, 3·H·D).

    The last axis holds [q | k | v], each (H, D) head-major, as DiT's ``qkv`` Linear lays it out
    (``reshape(B, n, 3, H, D)``). Views, not copies: their strides are qkv's.
    """
    b, n, width = qkv.shape
    return qkv.reshape(b, n, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def qkv_split_append_ref(qkv, k_cache, v_cache, offset, num_heads):
    """Split a QKV projection and append its k, v to the caches: returns q (B, H, n, D).

    ``qkv`` (B, n, 3·H·D) holds [q | k | v] along the last axis, each (H, D) head-major, as
    DiT's ``qkv`` Linear lays it out (``reshape(B, n, 3, H, D)``).
    """
    q, k, v = split_qkv(qkv, num_heads)
    kv_append_ref(k_cache, v_cache, k, v, offset)
    return q.contiguous()


def linear_ref(x, weight, bias=None, gelu: bool = False):
    """``y = act(x·Wᵀ + b)``: ``F.linear``, then DiT's tanh-approximate GELU when ``gelu``.

    x: (..., K), weight: (N, K), bias: (N,) or None; returns (..., N).
    """
    y = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y
