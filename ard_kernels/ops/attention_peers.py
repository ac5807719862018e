"""Block attention through PyTorch's own kernels: SDPA with a dense mask, and FlexAttention.

These are the "use what torch has" backends of :func:`ard_kernels.block_attention`, and the
peers the Triton kernel is measured against. Inputs are validated by the caller.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import masks


def _visible_key_rows(table: torch.Tensor, lq: int, lk: int, block_size: int) -> torch.Tensor:
    """(nb_q_seen, nb) rows of the table for the query blocks that actually hold queries."""
    first = (lk - lq) // block_size
    last = (lk - 1) // block_size
    return table[first:last + 1]


def block_attention_sdpa(q, k, v, block_size, table, scale):
    """``softmax(Q·Kᵀ·scale + log M)·V`` via ``F.scaled_dot_product_attention``.

    Two shapes skip the dense mask so SDPA can take its flash/efficient paths: every query
    block seeing every key (a KV-cached causal step), and the block-diagonal pattern with whole
    blocks (folded into the batch: each block is an independent sequence).
    q: (B, H, Lq, D); k, v: (B, H, Lk, D); table: CPU bool (nb, nb). Returns (B, H, Lq, D).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    nb = table.shape[0]
    rows = _visible_key_rows(table, lq, lk, block_size)
    if bool(rows.all()):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if (
        lq == lk
        and lk % block_size == 0
        and torch.equal(table, torch.eye(nb, dtype=torch.bool))
    ):
        b, h, _, d = q.shape

        def fold(t):
            return t.reshape(b, h, nb, block_size, d).reshape(b, h * nb, block_size, d)

        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), scale=scale)
        return out.reshape(b, h, lq, d)
    mask = masks.dense_mask(table, lq, lk, block_size, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@functools.lru_cache(maxsize=64)
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
