"""Block attention through PyTorch's own kernels: SDPA with a dense mask, and FlexAttention.

These are the "use what torch has" backends of :func:`ard_kernels.block_attention`, and the
peers the Triton kernel is measured against. Inputs are validated by the caller.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import masks


def block_attention_sdpa(q, k, v, block_size, pattern, scale):
    """``softmax(Q·Kᵀ·scale + log M)·V`` via ``F.scaled_dot_product_attention``.

    Two shapes skip the dense mask so SDPA can take its flash/efficient paths: every query
    block seeing every key (a KV-cached causal step), and the block-diagonal pattern with whole
    blocks (folded into the batch: each block is an independent sequence). The choice is made in
    plain Python (:func:`masks.block_visible`), so ``torch.compile`` traces it without guards on
    tensor data. q: (B, H, Lq, D); k, v: (B, H, Lk, D); pattern: a name or a validated CPU bool
    table (nb, nb). Returns (B, H, Lq, D).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    nb = masks.num_blocks(lk, block_size)
    first, last = (lk - lq) // block_size, (lk - 1) // block_size
    if all(masks.block_visible(pattern, i, j) for i in range(first, last + 1) for j in range(nb)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    diagonal = all(masks.block_visible(pattern, i, j) == (i == j) for i in range(nb) for j in range(nb))
    if lq == lk and lk % block_size == 0 and diagonal:
        b, h, _, d = q.shape

        def fold(t):
            return t.reshape(b, h, nb, block_size, d).reshape(b, h * nb, block_size, d)

        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), scale=scale)
        return out.reshape(b, h, lq, d)
    mask = masks.dense_mask(pattern, lq, lk, block_size, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# Never evicted, as the Triton schedules: a CUDA graph captured with the "flex" backend reads the
# block mask's index tensors (and the mask_mod's table) by address, and only this cache keeps them alive.
@functools.cache
def _block_mask(table_bytes: bytes, nb: int, lq: int, lk: int, block_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    table = torch.frombuffer(bytearray(table_bytes), dtype=torch.bool).reshape(nb, nb)
    mask_mod = masks.flex_mask_mod(table, lq, lk, block_size, device=device)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_attention_flex(q, k, v, block_size, table, scale, return_lse=False):
    """Block attention via FlexAttention with a cached ``BlockMask``.

    Compiled on CUDA (its fast path); on the CPU the eager, unfused implementation (a
    correctness peer). Returns (B, H, Lq, D) and with ``return_lse`` the fp32 lse (B, H, Lq).
    """
    from torch.nn.attention.flex_attention import flex_attention

    lq, lk = q.shape[-2], k.shape[-2]
    block_mask = _block_mask(table.numpy().tobytes(), table.shape[0], lq, lk, block_size, str(q.device))
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    if not return_lse:
        return fn(q, k, v, block_mask=block_mask, scale=scale)
    try:  # torch >= 2.9 asks for the lse through AuxRequest; return_lse is deprecated there
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    else:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    return out, lse.float()
