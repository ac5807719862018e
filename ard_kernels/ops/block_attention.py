"""Block-sparse attention in Triton: ``O = softmax(Q·Kᵀ·scale + log M)·V``, forward and backward.

``M`` is a block mask: query token ``r`` (the queries are the last Lq of Lk tokens) sees key token
``c`` when ``table[(Lk - Lq + r) // block_size, c // block_size]``. The kernels only visit the
(query tile, key tile) pairs the table allows, from a schedule built on the host
(:mod:`ard_kernels.ops.block_schedule`, which documents its layout):

* per query tile, the key tiles wholly inside allowed blocks ("full": no per-element mask) and
  the key tiles that straddle a block boundary or the sequence end ("masked": the block table is
  looked up per element, as row bit masks up to 32 blocks); tiles of disallowed blocks are never
  loaded, so the time scales with the number of allowed block pairs;
* the transpose (per key tile, the query tiles that see it) for the dK/dV pass.

Schedules are cached per (table, Lq, Lk, block_size, tiles) and copied to the device once, so a
launch never reads device memory on the host (no syncs; capturable in a CUDA graph once warm).
The head dim is split into a power-of-two main part and a power-of-two remainder (72 = 64 + 8,
the 8 padded to a 16-wide masked tile) and every product runs as two dots accumulating into the
same tile, instead of padding 72 to 128.

Backward (FlashAttention-2 style): ``delta = rowsum(dO ∘ O) − dlse``; a dK/dV kernel iterates over
the query tiles that see each key tile, a dQ kernel over the key tiles each query tile sees.
Exposed as torch custom ops ``ard_kernels::block_attention_fwd`` / ``block_attention_bwd`` with
fake implementations and registered autograd, so ``torch.compile`` traces them without breaks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import block_schedule

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _allowed(S, tab_off, nb, block_size, q_off, rows, cols, Lq, Lk, SMALL_NB: tl.constexpr):
    """The table entry of each (query row, key column) pair; False outside [0, Lq) × [0, Lk).

    ``rows`` and ``cols`` come pre-shaped ([M, 1] and [1, N], or the transpose), so the dK/dV pass
    builds its transposed mask directly instead of transposing a bool tile. With at most 32 blocks
    each table row is one int32 bit mask: a gather per row and a shift per element, instead of a
    2-D gather whose 64-bit addresses would cost two registers per element of the tile.
    """
    valid = (rows < Lq) & (cols < Lk)
    qb = (q_off + rows) // block_size
    kb = cols // block_size
    if SMALL_NB:
        bits = tl.load(S + tab_off + qb, mask=rows < Lq, other=0)
        return (((bits >> kb) & 1) != 0) & valid
    else:
        return tl.load(S + tab_off + qb * nb + kb, mask=valid, other=0) != 0


@triton.jit
def _program_tile(L, H, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
    """(tile, bh = batch·H + head, batch b and head h as int64) of this program.

    Programs run over the BLOCK-row tiles of L rows fastest, then heads, then batch; with
    LAST_FIRST the tiles of each head run from the last one down.
    """
    num = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    if LAST_FIRST:
        tile = num - 1 - pid % num
    else:
        tile = pid % num
    bh = pid // num
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return tile, bh, b, h


@triton.jit
def _tile_lists(S, tile, DIRECTION: tl.constexpr, SLOT: tl.constexpr):
    """Where ``tile``'s lists lie in the schedule ``S`` (layout: :mod:`.block_schedule`).

    Returns the table's offset, then the bounds of the tile's full list ``[full_lo, mask_lo)``
    and masked list ``[mask_lo, mask_hi)``: key tiles of a query tile (DIRECTION 0: forward, dQ)
    or query tiles of a key tile (DIRECTION 1: dK/dV), for the tiling of autotune slot SLOT.
    """
    sched = tl.load(S + 1 + DIRECTION + 2 * SLOT)
    tab_off = tl.load(S)
    full_lo = tl.load(S + sched + 2 * tile)
    mask_lo = tl.load(S + sched + 2 * tile + 1)
    mask_hi = tl.load(S + sched + 2 * tile + 2)
    return tab_off, full_lo, mask_lo, mask_hi


@triton.jit
def _load_rows(ptr, offs_rows, stride_row, offs_d, stride_d, rows_valid, d_limit, ROW_MASK: tl.constexpr,
               D_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, width) tile; masks are compiled in only where rows or columns can fall outside."""
    ptrs = ptr + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if ROW_MASK and D_MASK:
        x = tl.load(ptrs, mask=rows_valid[:, None] & (offs_d < d_limit)[None, :], other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=rows_valid[:, None], other=0.0)
    elif D_MASK:
        x = tl.load(ptrs, mask=(offs_d < d_limit)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        # The interpreter computes bf16/fp16 dots wrongly: work in fp32 there.
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_tile(desc, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, UPCAST: tl.constexpr):
    """The (ROWS, COLS) tile at (row, col) of head (b, h), through a TMA descriptor over (B, H, L, D).

    The copy engine zero-fills rows past L and columns past D, which replaces the masks of
    :func:`_load_rows`; a 4-D descriptor (not a (B·H·L, D) view) keeps a tile that overhangs the
    sequence end from reading the next head's rows, and takes (B, N, H, D) strides as they are.
    """
    x = desc.load([b, h, row, col]).reshape(ROWS, COLS)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K0, K1, V0, V1, S, it_lo, it_hi, stride_kn, stride_kd, stride_vn,
               stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
               desc_k0, desc_k1, desc_v0, desc_v1, b32, h32,
               D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
               SMALL_NB: tl.constexpr, USE_TMA: tl.constexpr):
    for it in range(it_lo, it_hi):
        n = tl.load(S + it)
        offs_n = n * BLOCK_N + offs_n0
        n_valid = offs_n < Lk
        # TMA zero-fills keys past Lk; masked tiles (every tile that overhangs Lk) still drop them by -inf.
        if USE_TMA:
            k0 = _load_tile(desc_k0, b32, h32, n * BLOCK_N, 0, BLOCK_N, D0, UPCAST)
        else:
            k0 = _load_rows(K0, offs_n, stride_kn, offs_d0, stride_kd, n_valid, 0, MASKED, False, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if HAS_D1:
            if USE_TMA:
                k1 = _load_tile(desc_k1, b32, h32, n * BLOCK_N, D0, BLOCK_N, DP1, UPCAST)
            else:
                k1 = _load_rows(K1, offs_n, stride_kn, offs_d1, stride_kd, n_valid, D1, MASKED, D1_MASK, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        s = s * qk_scale
        if MASKED:
            allowed = _allowed(S, tab_off, nb, block_size, q_off, offs_m[:, None], offs_n[None, :], Lq, Lk, SMALL_NB)
            s = tl.where(allowed, s, float("-inf"))
        # m_i starts finite (-1e30), so a row that is fully masked in this tile gives p = 0, not NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v0 = _load_tile(desc_v0, b32, h32, n * BLOCK_N, 0, BLOCK_N, D0, UPCAST)
        else:
            v0 = _load_rows(V0, offs_n, stride_vn, offs_d0, stride_vd, n_valid, 0, MASKED, False, UPCAST)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if HAS_D1:
            if USE_TMA:
                v1 = _load_tile(desc_v1, b32, h32, n * BLOCK_N, D0, BLOCK_N, DP1, UPCAST)
            else:
                v1 = _load_rows(V1, offs_n, stride_vn, offs_d1, stride_vd, n_valid, D1, MASKED, D1_MASK, UPCAST)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit(do_not_specialize=["PAT_KEY"])
def _block_attention_fwd_kernel(
    Q, K, V, Out, Lse, S,
    desc_q0, desc_q1, desc_k0, desc_k1, desc_v0, desc_v1,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, block_size, nb, qk_scale, PAT_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr, USE_TMA: tl.constexpr,
):
    # desc_*: TMA descriptors over (B, H, L, D), columns [0, D0) ("0") and [D0, D0 + DP1) ("1"), when
    # USE_TMA (Hopper configs; the launcher's pre-hook sets their block shapes), else None.
    # Strides arrive divided by ALIGN (8 when every non-unit stride allows it): multiplying back by a
    # constant tells the compiler rows are 16-byte aligned, which vectorised, pipelined (cp.async)
    # loads need; Triton only infers that itself for strides divisible by 16 (72 is not).
    stride_qb, stride_qh, stride_qm = stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN
    stride_kb, stride_kh, stride_kn = stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN
    stride_vb, stride_vh, stride_vn = stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN
    stride_ob, stride_oh, stride_om = stride_ob * ALIGN, stride_oh * ALIGN, stride_om * ALIGN
    # The last query tiles see the most keys under causal-like patterns: launch them first.
    m, bh, b, h = _program_tile(Lq, H, BLOCK_M, True)
    q_off = Lk - Lq

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = tl.arange(0, DP1)
    m_valid = offs_m < Lq

    Qb = Q + b * stride_qb + h * stride_qh
    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    # Descriptor coordinates are int32 (the copy engine's); b and h above are int64 for pointer offsets.
    b32 = bh // H
    h32 = bh % H
    if USE_TMA:
        q0 = _load_tile(desc_q0, b32, h32, m * BLOCK_M, 0, BLOCK_M, D0, UPCAST)
    else:
        q0 = _load_rows(Qb, offs_m, stride_qm, offs_d0, stride_qd, m_valid, 0, True, False, UPCAST)
    q1 = tl.zeros([BLOCK_M, DP1], dtype=q0.dtype)
    if HAS_D1:
        if USE_TMA:
            q1 = _load_tile(desc_q1, b32, h32, m * BLOCK_M, D0, BLOCK_M, DP1, UPCAST)
        else:
            q1 = _load_rows(Qb + D0 * stride_qd, offs_m, stride_qm, offs_d1, stride_qd, m_valid, D1, True, D1_MASK,
                            UPCAST)

    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, DP1], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

    tab_off, full_lo, mask_lo, mask_hi = _tile_lists(S, m, 0, SLOT)
    acc0, acc1, l_i, m_i = _fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, Kb, Kb + D0 * stride_kd, Vb, Vb + D0 * stride_vd, S, full_lo, mask_lo,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
        block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK,
        BLOCK_N, False, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
    acc0, acc1, l_i, m_i = _fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, Kb, Kb + D0 * stride_kd, Vb, Vb + D0 * stride_vd, S, mask_lo, mask_hi,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
        block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK,
        BLOCK_N, True, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)

    # Rows past Lq never see a key in masked tiles; keep their (unstored) values finite.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    inv_l = 1.0 / l_safe
    Ob = Out + b * stride_ob + h * stride_oh
    o_ptrs0 = Ob + offs_m[:, None] * stride_om + offs_d0[None, :] * stride_od
    tl.store(o_ptrs0, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty), mask=m_valid[:, None])
    if HAS_D1:
        o_ptrs1 = Ob + offs_m[:, None] * stride_om + (D0 + offs_d1)[None, :] * stride_od
        tl.store(o_ptrs1, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=m_valid[:, None] & (offs_d1 < D1)[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_valid)


@triton.jit
def _block_attention_bwd_preprocess_kernel(
    Out, dO, dLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Lq, D,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta[r] = Σ_d dO[r, d]·O[r, d] − dlse[r]`` (fp32), the row term of dS = P∘(dP − delta)."""
    m, bh, b, h = _program_tile(Lq, H, BLOCK_M, False)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * g, 1)
    row = bh.to(tl.int64) * Lq + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + row, mask=offs_m < Lq, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, it_lo, it_hi,
                stride_qm, stride_qd, stride_gm, stride_gd, offs_n, offs_m0, offs_d0, offs_d1, qk_scale,
                Lq, Lk, q_off, block_size, nb, tab_off, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                D1_MASK: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr,
               SMALL_NB: tl.constexpr):
    for it in range(it_lo, it_hi):
        m = tl.load(S + it)
        offs_m = m * BLOCK_M + offs_m0
        m_valid = offs_m < Lq
        # Rows past Lq load q = dO = lse = delta = 0, so they add exactly zero to dK and dV.
        q0 = _load_rows(Qb, offs_m, stride_qm, offs_d0, stride_qd, m_valid, 0, True, False, UPCAST)
        do0 = _load_rows(dOb, offs_m, stride_gm, offs_d0, stride_gd, m_valid, 0, True, False, UPCAST)
        sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if HAS_D1:
            q1 = _load_rows(Qb + D0 * stride_qd, offs_m, stride_qm, offs_d1, stride_qd, m_valid, D1, True, D1_MASK,
                            UPCAST)
            do1 = _load_rows(dOb + D0 * stride_gd, offs_m, stride_gm, offs_d1, stride_gd, m_valid, D1, True,
                             D1_MASK, UPCAST)
            sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PREC)
        lse2 = tl.load(LseB + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(DeltaB + offs_m, mask=m_valid, other=0.0)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        if MASKED:
            allowedT = _allowed(S, tab_off, nb, block_size, q_off, offs_m[None, :], offs_n[:, None], Lq, Lk, SMALL_NB)
            pT = tl.where(allowedT, pT, 0.0)
        dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if HAS_D1:
            dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk0 = tl.dot(dsT.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
        if HAS_D1:
            dk1 = tl.dot(dsT.to(q1.dtype), q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=["PAT_KEY"])
def _block_attention_bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Lq, Lk, block_size, nb, qk_scale, scale, PAT_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr,
):
    # Strides arrive divided by ALIGN: see _block_attention_fwd_kernel.
    stride_qb, stride_qh, stride_qm = stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN
    stride_kb, stride_kh, stride_kn = stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN
    stride_vb, stride_vh, stride_vn = stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN
    stride_gb, stride_gh, stride_gm = stride_gb * ALIGN, stride_gh * ALIGN, stride_gm * ALIGN
    stride_dkb, stride_dkh, stride_dkn = stride_dkb * ALIGN, stride_dkh * ALIGN, stride_dkn * ALIGN
    stride_dvb, stride_dvh, stride_dvn = stride_dvb * ALIGN, stride_dvh * ALIGN, stride_dvn * ALIGN
    n, bh, b, h = _program_tile(Lk, H, BLOCK_N, False)
    q_off = Lk - Lq

    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = tl.arange(0, DP1)
    n_valid = offs_n < Lk

    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    k0 = _load_rows(Kb, offs_n, stride_kn, offs_d0, stride_kd, n_valid, 0, True, False, UPCAST)
    v0 = _load_rows(Vb, offs_n, stride_vn, offs_d0, stride_vd, n_valid, 0, True, False, UPCAST)
    k1 = tl.zeros([BLOCK_N, DP1], dtype=k0.dtype)
    v1 = tl.zeros([BLOCK_N, DP1], dtype=v0.dtype)
    if HAS_D1:
        k1 = _load_rows(Kb + D0 * stride_kd, offs_n, stride_kn, offs_d1, stride_kd, n_valid, D1, True, D1_MASK,
                        UPCAST)
        v1 = _load_rows(Vb + D0 * stride_vd, offs_n, stride_vn, offs_d1, stride_vd, n_valid, D1, True, D1_MASK,
                        UPCAST)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, DP1], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, DP1], dtype=tl.float32)

    Qb = Q + b * stride_qb + h * stride_qh
    dOb = dO + b * stride_gb + h * stride_gh
    LseB = Lse + bh.to(tl.int64) * Lq
    DeltaB = Delta + bh.to(tl.int64) * Lq
    tab_off, full_lo, mask_lo, mask_hi = _tile_lists(S, n, 1, SLOT)
    dk0, dk1, dv0, dv1 = _dkdv_inner(
        dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, full_lo, mask_lo, stride_qm, stride_qd,
        stride_gm, stride_gd, offs_n, offs_m0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
        D0, D1, HAS_D1, D1_MASK, BLOCK_M, False, UPCAST, DOT_PREC, SMALL_NB)
    dk0, dk1, dv0, dv1 = _dkdv_inner(
        dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, mask_lo, mask_hi, stride_qm, stride_qd,
        stride_gm, stride_gd, offs_n, offs_m0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
        D0, D1, HAS_D1, D1_MASK, BLOCK_M, True, UPCAST, DOT_PREC, SMALL_NB)

    dKb = dK + b * stride_dkb + h * stride_dkh
    dVb = dV + b * stride_dvb + h * stride_dvh
    tl.store(dKb + offs_n[:, None] * stride_dkn + offs_d0[None, :] * stride_dkd,
             (dk0 * scale).to(dK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(dVb + offs_n[:, None] * stride_dvn + offs_d0[None, :] * stride_dvd,
             dv0.to(dV.dtype.element_ty), mask=n_valid[:, None])
    if HAS_D1:
        mask1 = n_valid[:, None] & (offs_d1 < D1)[None, :]
        tl.store(dKb + offs_n[:, None] * stride_dkn + (D0 + offs_d1)[None, :] * stride_dkd,
                 (dk1 * scale).to(dK.dtype.element_ty), mask=mask1)
        tl.store(dVb + offs_n[:, None] * stride_dvn + (D0 + offs_d1)[None, :] * stride_dvd,
                 dv1.to(dV.dtype.element_ty), mask=mask1)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, it_lo, it_hi, stride_kn, stride_kd, stride_vn,
              stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
              D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
               SMALL_NB: tl.constexpr):
    for it in range(it_lo, it_hi):
        n = tl.load(S + it)
        offs_n = n * BLOCK_N + offs_n0
        n_valid = offs_n < Lk
        k0 = _load_rows(Kb, offs_n, stride_kn, offs_d0, stride_kd, n_valid, 0, MASKED, False, UPCAST)
        v0 = _load_rows(Vb, offs_n, stride_vn, offs_d0, stride_vd, n_valid, 0, MASKED, False, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if HAS_D1:
            k1 = _load_rows(Kb + D0 * stride_kd, offs_n, stride_kn, offs_d1, stride_kd, n_valid, D1, MASKED,
                            D1_MASK, UPCAST)
            v1 = _load_rows(Vb + D0 * stride_vd, offs_n, stride_vn, offs_d1, stride_vd, n_valid, D1, MASKED,
                            D1_MASK, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            allowed = _allowed(S, tab_off, nb, block_size, q_off, offs_m[:, None], offs_n[None, :], Lq, Lk, SMALL_NB)
            p = tl.where(allowed, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PREC)
        if HAS_D1:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit(do_not_specialize=["PAT_KEY"])
def _block_attention_bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Lq, Lk, block_size, nb, qk_scale, scale, PAT_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr,
):
    # Strides arrive divided by ALIGN: see _block_attention_fwd_kernel.
    stride_qb, stride_qh, stride_qm = stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN
    stride_kb, stride_kh, stride_kn = stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN
    stride_vb, stride_vh, stride_vn = stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN
    stride_gb, stride_gh, stride_gm = stride_gb * ALIGN, stride_gh * ALIGN, stride_gm * ALIGN
    stride_dqb, stride_dqh, stride_dqm = stride_dqb * ALIGN, stride_dqh * ALIGN, stride_dqm * ALIGN
    m, bh, b, h = _program_tile(Lq, H, BLOCK_M, True)
    q_off = Lk - Lq

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = tl.arange(0, DP1)
    m_valid = offs_m < Lq

    Qb = Q + b * stride_qb + h * stride_qh
    dOb = dO + b * stride_gb + h * stride_gh
    q0 = _load_rows(Qb, offs_m, stride_qm, offs_d0, stride_qd, m_valid, 0, True, False, UPCAST)
    do0 = _load_rows(dOb, offs_m, stride_gm, offs_d0, stride_gd, m_valid, 0, True, False, UPCAST)
    q1 = tl.zeros([BLOCK_M, DP1], dtype=q0.dtype)
    do1 = tl.zeros([BLOCK_M, DP1], dtype=do0.dtype)
    if HAS_D1:
        q1 = _load_rows(Qb + D0 * stride_qd, offs_m, stride_qm, offs_d1, stride_qd, m_valid, D1, True, D1_MASK,
                        UPCAST)
        do1 = _load_rows(dOb + D0 * stride_gd, offs_m, stride_gm, offs_d1, stride_gd, m_valid, D1, True, D1_MASK,
                         UPCAST)
    row = bh.to(tl.int64) * Lq + offs_m
    lse2 = tl.load(Lse + row, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=m_valid, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, DP1], dtype=tl.float32)

    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    tab_off, full_lo, mask_lo, mask_hi = _tile_lists(S, m, 0, SLOT)
    dq0, dq1 = _dq_inner(
        dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, full_lo, mask_lo, stride_kn, stride_kd, stride_vn,
        stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
        D0, D1, HAS_D1, D1_MASK, BLOCK_N, False, UPCAST, DOT_PREC, SMALL_NB)
    dq0, dq1 = _dq_inner(
        dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, mask_lo, mask_hi, stride_kn, stride_kd, stride_vn,
        stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
        D0, D1, HAS_D1, D1_MASK, BLOCK_N, True, UPCAST, DOT_PREC, SMALL_NB)

    dQb = dQ + b * stride_dqb + h * stride_dqh
    tl.store(dQb + offs_m[:, None] * stride_dqm + offs_d0[None, :] * stride_dqd,
             (dq0 * scale).to(dQ.dtype.element_ty), mask=m_valid[:, None])
    if HAS_D1:
        tl.store(dQb + offs_m[:, None] * stride_dqm + (D0 + offs_d1)[None, :] * stride_dqd,
                 (dq1 * scale).to(dQ.dtype.element_ty), mask=m_valid[:, None] & (offs_d1 < D1)[None, :])


# ----------------------------------------------------------------------------------------------
# Host: configurations, launchers (the schedules are built in block_schedule.py)
# ----------------------------------------------------------------------------------------------


def _split_head_dim(d: int):
    """``D = D0 + D1``: D0 the largest power of two <= D, D1 the rest, padded to DP1 (pow2, >= 16)."""
    d0 = 1 << (d.bit_length() - 1)
    d1 = d - d0
    dp1 = max(16, triton.next_power_of_2(d1)) if d1 else 16
    return d0, d1, dp1


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is always the query tile, BLOCK_N the key
# tile; the dK/dV kernel holds a key tile and streams query tiles, so it wants a small BLOCK_M.
_CONFIGS = {
    ("fwd", False): ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)),
    ("fwd", True): ((128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)),
    ("dkdv", False): ((64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3)),
    ("dkdv", True): ((32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)),
    ("dq", False): ((128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)),
    ("dq", True): ((64, 32, 4, 2), (128, 32, 8, 2), (64, 16, 4, 2)),
}
# fp32 inputs take exact (non-tf32) dots on CUDA cores: slow to compile and to run, so one modest
# config each instead of an autotuning sweep (fp32 is accepted, not the fast path).
_FP32_CONFIGS = {
    ("fwd", False): ((64, 32, 4, 2),), ("fwd", True): ((64, 32, 4, 1),),
    ("dkdv", False): ((32, 64, 4, 2),), ("dkdv", True): ((32, 32, 4, 1),),
    ("dq", False): ((64, 32, 4, 2),), ("dq", True): ((64, 32, 4, 1),),
}
# Extra forward configs for Hopper (capability >= 9), bf16/fp16, D0 + DP1 <= 128: Q, K, V tiles
# arrive by TMA (descriptor loads the pipeliner turns into async bulk copies with mbarriers: no
# address arithmetic, no masks) and the products run on wgmma straight from shared memory. Added
# to, never replacing, the pointer configs above: the autotuner on the GPU picks the faster.
# Per head width (D0 + DP1): up to 96 (DiT's 72 = 64 + 16) a 3-stage 128×128 ring fits in registers;
# at 128 it needs 225 KiB of shared memory and spills, so a 3-stage 128×64 takes its place.
_TMA_CONFIGS = {96: ((128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)),
                128: ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2))}
# The interpreter costs ~ms per program and loop step whatever the tile: one small config.
_INTERPRETER_PAIRS = ((16, 16),)
# Tests set this to run the TMA path through the interpreter (which emulates descriptor loads).
_INTERPRETER_TMA = False
_AUTOTUNE_KEY = ["Lq", "Lk", "PAT_KEY", "D0", "D1", "DOT_PREC"]
_FWD_DESCS = ("desc_q0", "desc_q1", "desc_k0", "desc_k1", "desc_v0", "desc_v1")


def _interpreting() -> bool:
    return type(_block_attention_fwd_kernel).__name__ == "InterpretedFunction"


def _set_fwd_desc_blocks(nargs: dict):
    """Autotune pre-hook: the block shapes of the forward's descriptors for this config's tiles.

    Descriptors are built once per launch and shared by every config; the block shape is part of
    the compiled signature and of the copy engine's box, so each config sets its own before it runs.
    """
    for name in _FWD_DESCS:
        desc = nargs.get(name)
        if desc is not None:
            rows = nargs["BLOCK_M"] if name.startswith("desc_q") else nargs["BLOCK_N"]
            desc.block_shape = [1, 1, rows, nargs["D0"] if name.endswith("0") else nargs["DP1"]]


def _tma_configs(width: int) -> tuple:
    """The forward's TMA configs for head width ``width`` = D0 + DP1 (<= 128)."""
    return _TMA_CONFIGS[96 if width <= 96 else 128]


@functools.cache
def _tuned(kind: str, wide: bool, fp32: bool, tma: tuple = ()):
    """The autotuned launcher of ``kind`` and its (BLOCK_M, BLOCK_N) slots, built on first use.

    ``tma`` (forward only): TMA configs appended to the list (:func:`_tma_configs`); every config then
    gets the descriptor pre-hook, since the launch passes descriptors to all of them (the pointer
    configs ignore theirs).
    """
    kernel = {"fwd": _block_attention_fwd_kernel, "dkdv": _block_attention_bwd_dkdv_kernel,
              "dq": _block_attention_bwd_dq_kernel}[kind]
    configs = [(*c, False) for c in (_FP32_CONFIGS if fp32 else _CONFIGS)[(kind, wide)]]
    configs += [(*c, True) for c in tma]
    if os.environ.get("ARD_KERNELS_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    pairs = tuple(dict.fromkeys((bm, bn) for bm, bn, _, _, _ in configs))
    tconfigs = []
    for bm, bn, w, st, use_tma in configs:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "SLOT": pairs.index((bm, bn))}
        if kind == "fwd":
            meta["USE_TMA"] = use_tma
        tconfigs.append(triton.Config(meta, num_warps=w, num_stages=st,
                                      pre_hook=_set_fwd_desc_blocks if tma else None))
    return triton.autotune(configs=tconfigs, key=_AUTOTUNE_KEY)(kernel), pairs


@functools.cache
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _tma_layout_ok(*tensors) -> bool:
    """The copy engine's rules: unit head-dim stride, 16-byte aligned base and other strides, no empty dim."""
    return all(t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def _tma_eligible(dtype, width: int, capability, *tensors) -> bool:
    """Whether a forward on ``tensors`` may offer its TMA configs on a GPU of ``capability``.

    Capability >= 9 (the copy engine), bf16/fp16 (fp32 keeps its one exact config), head width
    D0 + DP1 <= 128 (the widths the TMA configs are tuned for), strides the copy engine accepts.
    """
    return (capability[0] >= 9 and dtype in (torch.bfloat16, torch.float16) and width <= 128
            and _tma_layout_ok(*tensors))


def _use_tma(q, k, v, width: int) -> bool:
    """Whether this forward offers its TMA configs (else today's pointer configs only).

    On the GPU: :func:`_tma_eligible`, unless ARD_KERNELS_TMA=0 or this triton has no host tensor
    descriptors; under the interpreter only when the tests ask for it.
    """
    if _interpreting():
        return _INTERPRETER_TMA and _tma_layout_ok(q, k, v)
    if not q.is_cuda or os.environ.get("ARD_KERNELS_TMA", "1") == "0":
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _tma_eligible(q.dtype, width, _capability(index), q, k, v)


def _fwd_descriptors(q, k, v, d0: int, dp1: int, has_d1: bool, block_m: int, block_n: int):
    """TMA descriptors (q0, q1, k0, k1, v0, v1) over the (B, H, L, D) tensors, as the forward takes them.

    "0" covers columns [0, D0), "1" [D0, D0 + DP1) (the copy engine zero-fills past D); the "1"
    descriptors are None without a remainder. Block shapes start at (block_m, block_n); the autotune
    pre-hook resets them per config.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t, rows, cols):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols])

    return (desc(q, block_m, d0), desc(q, block_m, dp1) if has_d1 else None,
            desc(k, block_n, d0), desc(k, block_n, dp1) if has_d1 else None,
            desc(v, block_n, d0), desc(v, block_n, dp1) if has_d1 else None)


class _Launch:
    """Everything a launch needs that depends only on shapes, the table and the device."""

    def __init__(self, q, k, table, block_size, scale, kind, v=None):
        self.B, self.H, self.Lq, d = q.shape
        self.Lk = k.shape[2]
        self.nb = table.shape[0]
        self.d0, self.d1, self.dp1 = _split_head_dim(d)
        self.width = self.d0 + (self.dp1 if self.d1 else 0)  # the tile columns the kernels hold per row
        if q.device.type == "cpu" and not _interpreting():
            raise RuntimeError("q: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before import "
                               f"for CPU tensors; got device {q.device}")
        table_bytes = table.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()
        self.pat_key = block_schedule.pattern_key(table_bytes, self.nb, block_size)
        self.interp = _interpreting()
        self.tma = v is not None and kind == "fwd" and _use_tma(q, k, v, self.width)
        if self.interp:
            self.kernel = {"fwd": _block_attention_fwd_kernel, "dkdv": _block_attention_bwd_dkdv_kernel,
                           "dq": _block_attention_bwd_dq_kernel}[kind]
            pairs = _INTERPRETER_PAIRS
        else:
            self.kernel, pairs = _tuned(kind, self.width > 128, q.dtype == torch.float32, self.tma_configs())
        self.sched = block_schedule.schedule_on(table_bytes, self.nb, self.Lq, self.Lk, block_size, pairs,
                                                str(q.device))
        self.block_size = block_size
        self.kind = kind
        self.scale = float(scale)
        self.dot_prec = "ieee" if (q.dtype == torch.float32 or self.interp) else "tf32"

    def scalars(self):
        return (self.H, self.Lq, self.Lk, self.block_size, self.nb, self.scale * _LOG2E)

    def constexprs(self):
        meta = dict(D0=self.d0, D1=self.d1, DP1=self.dp1, HAS_D1=self.d1 > 0, D1_MASK=self.dp1 != self.d1,
                    UPCAST=self.interp, DOT_PREC=self.dot_prec, SMALL_NB=self.nb <= block_schedule.SMALL_NB)
        if self.interp:
            (bm, bn), = _INTERPRETER_PAIRS
            meta.update(BLOCK_M=bm, BLOCK_N=bn, SLOT=0)
            if self.kind == "fwd":
                meta.update(USE_TMA=self.tma)
        return meta

    def tma_configs(self) -> tuple:
        """The TMA configs this launch offers the autotuner (none without :attr:`tma`)."""
        return _tma_configs(self.width) if self.tma else ()

    def fwd_descriptors(self, q, k, v):
        """The forward's six descriptor arguments: TMA descriptors when :attr:`tma`, else None."""
        if not self.tma:
            return (None,) * len(_FWD_DESCS)
        bm, bn = _INTERPRETER_PAIRS[0] if self.interp else self.tma_configs()[0][:2]
        return _fwd_descriptors(q, k, v, self.d0, self.dp1, self.d1 > 0, bm, bn)


def _row_align(*tensors) -> int:
    """8 when every stride but the last (head-dim) one of ``tensors`` is a multiple of 8, else 1."""
    return 8 if all(st % 8 == 0 for t in tensors for st in t.stride()[:-1]) else 1


def _strides(t: torch.Tensor, align: int):
    """(B, H, rows) strides divided by ``align`` (the kernels multiply back), then the head-dim stride."""
    sb, sh, sm, sd = t.stride()
    return sb // align, sh // align, sm // align, sd


def _grid(rows: int, tile: str, bh: int):
    return lambda meta: (triton.cdiv(rows, meta[tile]) * bh,)


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not whichever one is current (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def block_attention_fwd(q, k, v, table, block_size: int, scale: float):
    """``O = softmax(Q·Kᵀ·scale + log M)·V`` and ``lse = log Σ exp(Q·Kᵀ·scale + log M)``.

    q: (B, H, Lq, D), k, v: (B, H, Lk, D), any strides, one float dtype; table: CPU bool (nb, nb).
    Returns O (B, H, Lq, D) in q's dtype (q's layout where q is dense) and lse (B, H, Lq) fp32.
    """
    L = _Launch(q, k, table, block_size, scale, "fwd", v)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    a = _row_align(q, k, v, out)
    with _on_device(q):
        L.kernel[_grid(L.Lq, "BLOCK_M", L.B * L.H)](
            q, k, v, out, lse, L.sched, *L.fwd_descriptors(q, k, v), *_strides(q, a), *_strides(k, a),
            *_strides(v, a), *_strides(out, a),
            *L.scalars(), L.pat_key, **L.constexprs(), ALIGN=a)
    return out, lse


def block_attention_bwd(do, q, k, v, out, lse, dlse, table, block_size: int, scale: float):
    """``dS = P∘(dO·Vᵀ − delta)``, ``delta = rowsum(dO∘O) − dlse``; returns dQ = scale·dS·K, dK = scale·dSᵀ·Q,
    dV = Pᵀ·dO, each shaped and typed like its input. ``dlse`` (B, H, Lq) fp32 may be None."""
    with _on_device(q):
        return _block_attention_bwd(do, q, k, v, out, lse, dlse, table, block_size, scale)


def _block_attention_bwd(do, q, k, v, out, lse, dlse, table, block_size: int, scale: float):
    B, H, Lq, d = q.shape
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    pre_m = 16 if _interpreting() else 64
    _block_attention_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m) * B * H,)](
        out, do, dlse.contiguous() if dlse is not None else delta, delta, *out.stride(), *do.stride(), H, Lq, d,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_D=triton.next_power_of_2(d))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    a = _row_align(q, k, v, do, dq, dk, dv)
    st = (*_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a))
    L = _Launch(q, k, table, block_size, scale, "dkdv")
    L.kernel[_grid(L.Lk, "BLOCK_N", B * H)](
        q, k, v, do, lse, delta, dk, dv, L.sched, *st, *_strides(dk, a), *_strides(dv, a), *L.scalars(), L.scale,
        L.pat_key, **L.constexprs(), ALIGN=a)
    L = _Launch(q, k, table, block_size, scale, "dq")
    L.kernel[_grid(L.Lq, "BLOCK_M", B * H)](
        q, k, v, do, lse, delta, dq, L.sched, *st, *_strides(dq, a), *L.scalars(), L.scale, L.pat_key,
        **L.constexprs(), ALIGN=a)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("ard_kernels::block_attention_fwd", mutates_args=())
def _block_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                            block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return block_attention_fwd(q, k, v, table, block_size, scale)


@_block_attention_fwd_op.register_fake
def _(q, k, v, table, block_size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ard_kernels::block_attention_bwd", mutates_args=())
def _block_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],  # noqa: UP045
                            table: torch.Tensor,
                            block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block_attention_bwd(do, q, k, v, out, lse, dlse, table, block_size, scale)


@_block_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, table, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, table, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, table = ctx.saved_tensors
    dq, dk, dv = _block_attention_bwd_op(dout, q, k, v, out, lse, dlse, table, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None


_block_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def block_attention_triton(q, k, v, block_size: int, table: torch.Tensor, scale: float, return_lse: bool = False):
    """``O = softmax(Q·Kᵀ·scale + log M)·V``, M the block mask of ``table``: the Triton backend.

    Args (validated by :func:`ard_kernels.block_attention`):
        q: (B, H, Lq, D); k, v: (B, H, Lk, D), Lq <= Lk, same float dtype and device, any strides;
            D a multiple of 8 in [16, 256]. CPU tensors run under TRITON_INTERPRET=1.
        block_size: tokens per block; table: CPU bool (nb, nb), nb = ceil(Lk / block_size).
        scale: softmax scale; return_lse: also return the fp32 log-sum-exp.

    Returns:
        O (B, H, Lq, D) in q's dtype, and with ``return_lse`` lse (B, H, Lq) fp32. Differentiable
        w.r.t. q, k, v (and through lse).
    """
    out, lse = torch.ops.ard_kernels.block_attention_fwd(q, k, v, table, int(block_size), float(scale))
    return (out, lse) if return_lse else out


def aot_specs():
    """Every tuned GPU configuration, for ``python -m ard_kernels.aot_check``.

    Head dims 72 (DiT, split 64 + 16), 128 (text-to-image) and 256 (the widest), contiguous
    (unit head-dim stride, rows aligned), at the precision each config list is meant for. On sm_90
    the bf16/fp16 forward compiles as it launches there: with descriptor arguments for every config
    (the pointer configs ignore theirs) plus the TMA configs, named ``..._tma``.
    """
    from ..aot_check import jit_function, make_signature

    kernels = {"fwd": _block_attention_fwd_kernel, "dkdv": _block_attention_bwd_dkdv_kernel,
               "dq": _block_attention_bwd_dq_kernel}
    specs = []
    # (head dim, dtype, targets, every tuned config or only the first): all of DiT's bf16 configs on
    # both GPUs; the others where they matter, keeping the check a minute or two on a CPU.
    plan = ((72, "bf16", (90, 80), True), (128, "bf16", (90,), True), (256, "bf16", (90,), False),
            (72, "fp16", (80,), False), (72, "fp32", (90,), False))
    for d, dtype, archs, every in plan:
        d0, d1, dp1 = _split_head_dim(d)
        wide = d0 + (dp1 if d1 else 0) > 128
        configs = _FP32_CONFIGS if dtype == "fp32" else _CONFIGS
        for kind, kernel in kernels.items():
            fn = jit_function(kernel)
            pointers = {name: "*fp32" if name in ("Lse", "Delta") else "*i32" if name == "S" else f"*{dtype}"
                        for name in ("Q", "K", "V", "Out", "dO", "dK", "dV", "dQ", "Lse", "Delta", "S")}
            signature = make_signature(kernel, dtype, {n: t for n, t in pointers.items() if n in fn.arg_names},
                                       floats=("qk_scale", "scale"))
            unit = {name: 1 for name in fn.arg_names if name.startswith("stride_") and name.endswith("d")}
            tuned = [(*c, False) for c in (configs[(kind, wide)] if every else configs[(kind, wide)][:1])]
            tma = kind == "fwd" and dtype != "fp32" and not wide and 90 in archs
            # (archs, configs, descriptor arguments?): the launch passes descriptors to every forward
            # config where it offers the TMA ones, None elsewhere.
            tma_configs = _tma_configs(d0 + (dp1 if d1 else 0))
            groups = [((90,), tuned + [(*c, True) for c in tma_configs], True),
                      (tuple(a for a in archs if a != 90), tuned, False)] if tma else [(archs, tuned, False)]
            for group_archs, group, descs in groups:
                if not group_archs:
                    continue
                for bm, bn, warps, stages, use_tma in group:
                    meta = dict(unit, D0=d0, D1=d1, DP1=dp1, HAS_D1=d1 > 0, D1_MASK=dp1 != d1, BLOCK_M=bm,
                                BLOCK_N=bn, SLOT=list(dict.fromkeys(c[:2] for c in group)).index((bm, bn)),
                                UPCAST=False,
                                DOT_PREC="ieee" if dtype == "fp32" else "tf32", SMALL_NB=True, ALIGN=8)
                    sig = dict(signature)
                    if kind == "fwd":
                        meta["USE_TMA"] = use_tma
                        for name in _FWD_DESCS:
                            if descs and (d1 or name.endswith("0")):
                                rows = bm if name.startswith("desc_q") else bn
                                sig[name] = f"tensordesc<{dtype}[1, 1, {rows}, {d0 if name.endswith('0') else dp1}]>"
                            else:
                                meta[name] = None
                    specs.append({
                        "name": f"block_attention_{kind}_{dtype}_D{d}_{bm}x{bn}_w{warps}s{stages}"
                                + ("_tma" if use_tma else ""),
                        "kernel": kernel,
                        "signature": sig,
                        "constexprs": meta,
                        "num_warps": warps,
                        "num_stages": stages,
                        "archs": group_archs,
                    })
    return specs
