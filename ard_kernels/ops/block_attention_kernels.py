"""Triton kernels of block-sparse attention ``O = softmax(Q·Kᵀ·scale + log M)·V``: forward, dK/dV, dQ.

The host side (configs, schedules, launchers, custom ops) is :mod:`ard_kernels.ops.block_attention`,
whose docstring explains the algorithm; the schedule ``S`` layout is :mod:`.block_schedule`'s.
Programs visit only the (query tile, key tile) pairs the block table allows: first the "full"
tiles (no per-element mask), then the "masked" ones (block table looked up per element).

The in-kernel helpers live here with the kernels because Triton resolves the ``@triton.jit``
functions a kernel calls through the kernel module's globals. Whether these are compiled or
interpreted (TRITON_INTERPRET=1) is fixed when this module is imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pdl import wait_previous_kernel


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
    # Clamped: columns past Lk (a tile overhanging the end) would give kb >= 32, and a shift by 32 or
    # more is poison in LLVM, which `& valid` does not clean up.
    kb = tl.minimum(cols, Lk - 1) // block_size
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
def _tile_scores(q0, q1, K0, K1, S, n, stride_kn, stride_kd, offs_m, offs_n0, offs_d0, offs_d1, Lq, Lk, q_off,
                 block_size, nb, tab_off, desc_k0, desc_k1, b32, h32, D0: tl.constexpr, D1: tl.constexpr,
                 DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SMALL_NB: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """``Q·Kᵀ`` (unscaled) of key tile ``n``, -inf where a masked tile's pair is not allowed.

    The remainder's product is issued first and the main one accumulates onto it. That order is what lets
    :func:`_fwd_inner_overlapped` overlap: Triton waits for a wgmma product where its result is next used,
    and the first product is used at once (as the second one's accumulator), so the wait lands before the
    wide product is issued, which then runs on while the caller works.
    """
    offs_n = n * BLOCK_N + offs_n0
    n_valid = offs_n < Lk
    # TMA zero-fills keys past Lk; masked tiles (every tile that overhangs Lk) still drop them by -inf.
    if USE_TMA:
        k0 = _load_tile(desc_k0, b32, h32, n * BLOCK_N, 0, BLOCK_N, D0, UPCAST)
    else:
        k0 = _load_rows(K0, offs_n, stride_kn, offs_d0, stride_kd, n_valid, 0, MASKED, False, UPCAST)
    if HAS_D1:
        if USE_TMA:
            k1 = _load_tile(desc_k1, b32, h32, n * BLOCK_N, D0, BLOCK_N, DP1, UPCAST)
        else:
            k1 = _load_rows(K1, offs_n, stride_kn, offs_d1, stride_kd, n_valid, D1, MASKED, D1_MASK, UPCAST)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q0, tl.trans(k0), s, input_precision=DOT_PREC)
    else:
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    if MASKED:
        allowed = _allowed(S, tab_off, nb, block_size, q_off, offs_m[:, None], offs_n[None, :], Lq, Lk, SMALL_NB)
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _tile_update(acc0, acc1, l_i, m_i, s, V0, V1, n, stride_vn, stride_vd, offs_n0, offs_d0, offs_d1, qk_scale, Lk,
                 desc_v0, desc_v1, b32, h32, D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr,
                 HAS_D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """The online-softmax step: (acc, l, m) updated by the scores ``s`` of key tile ``n`` and its values."""
    offs_n = n * BLOCK_N + offs_n0
    n_valid = offs_n < Lk
    # The scale (> 0) commutes with the max, so it is applied to the row maxima and then inside the
    # exponent, where scale·s − m is one fused multiply-add per element instead of a multiply and a
    # subtraction. m_i starts finite (-1e30), so a row fully masked in this tile gives p = 0, not NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
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
    return acc0, acc1, l_i, m_new


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K0, K1, V0, V1, S, it_lo, it_hi, stride_kn, stride_kd, stride_vn,
               stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
               desc_k0, desc_k1, desc_v0, desc_v1, b32, h32,
               D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
               SMALL_NB: tl.constexpr, USE_TMA: tl.constexpr):
    """The forward over key tiles ``S[it_lo:it_hi]``, all full or all masked (``MASKED``), one after another."""
    for it in range(it_lo, it_hi):
        n = tl.load(S + it)
        s = _tile_scores(q0, q1, K0, K1, S, n, stride_kn, stride_kd, offs_m, offs_n0, offs_d0, offs_d1, Lq, Lk, q_off,
                         block_size, nb, tab_off, desc_k0, desc_k1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK, BLOCK_N,
                         MASKED, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
        acc0, acc1, l_i, m_i = _tile_update(acc0, acc1, l_i, m_i, s, V0, V1, n, stride_vn, stride_vd, offs_n0,
                                            offs_d0, offs_d1, qk_scale, Lk, desc_v0, desc_v1, b32, h32, D0, D1, DP1,
                                            HAS_D1, D1_MASK, BLOCK_N, MASKED, UPCAST, DOT_PREC, USE_TMA)
    return acc0, acc1, l_i, m_i


@triton.jit
def _fwd_inner_overlapped(acc0, acc1, l_i, m_i, q0, q1, K0, K1, V0, V1, S, it_lo, it_hi, stride_kn, stride_kd,
                          stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
                          block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0: tl.constexpr,
                          D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
                          BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                          SMALL_NB: tl.constexpr, USE_TMA: tl.constexpr):
    """:func:`_fwd_inner` over full tiles, one tile ahead: the scores of tile i + 1 are issued before the
    softmax of tile i, so the tensor cores compute them while the same warps exponentiate (FlashAttention-3's
    intra-warpgroup overlap, written in the source). At head dim 72 the exponentials (16 per clock per SM)
    take about as long as the products, which otherwise wait for each other. Costs a second score tile in
    registers; offered as separate autotune configs (``OVERLAP``), for head dims with a remainder (see
    :func:`_tile_scores` for why)."""
    if it_hi > it_lo:
        n = tl.load(S + it_lo)
        s = _tile_scores(q0, q1, K0, K1, S, n, stride_kn, stride_kd, offs_m, offs_n0, offs_d0, offs_d1, Lq, Lk, q_off,
                         block_size, nb, tab_off, desc_k0, desc_k1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK, BLOCK_N,
                         False, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
        for it in range(it_lo + 1, it_hi):
            n_next = tl.load(S + it)
            s_next = _tile_scores(q0, q1, K0, K1, S, n_next, stride_kn, stride_kd, offs_m, offs_n0, offs_d0, offs_d1,
                                  Lq, Lk, q_off, block_size, nb, tab_off, desc_k0, desc_k1, b32, h32, D0, D1, DP1,
                                  HAS_D1, D1_MASK, BLOCK_N, False, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
            acc0, acc1, l_i, m_i = _tile_update(acc0, acc1, l_i, m_i, s, V0, V1, n, stride_vn, stride_vd, offs_n0,
                                                offs_d0, offs_d1, qk_scale, Lk, desc_v0, desc_v1, b32, h32, D0, D1,
                                                DP1, HAS_D1, D1_MASK, BLOCK_N, False, UPCAST, DOT_PREC, USE_TMA)
            s = s_next
            n = n_next
        acc0, acc1, l_i, m_i = _tile_update(acc0, acc1, l_i, m_i, s, V0, V1, n, stride_vn, stride_vd, offs_n0,
                                            offs_d0, offs_d1, qk_scale, Lk, desc_v0, desc_v1, b32, h32, D0, D1, DP1,
                                            HAS_D1, D1_MASK, BLOCK_N, False, UPCAST, DOT_PREC, USE_TMA)
    return acc0, acc1, l_i, m_i


@triton.jit
def _store_output(acc0, acc1, l_i, m_i, Out, Lse, bh, b, h, offs_m, offs_d0, offs_d1, m_valid, Lq, stride_ob, stride_oh,
                  stride_om, stride_od, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr):
    """O = acc / l in Out's dtype and lse = (m + log2 l)·ln 2 of one query tile (m, l: base-2 row max and sum)."""
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
def _split_kv_finish(acc0, acc1, l_i, m_i, Ws, Cnt, Out, Lse, bh, b, h, offs_m, offs_d0, offs_d1, m_valid, Lq,
                     stride_ob, stride_oh, stride_om, stride_od, D0: tl.constexpr, D1: tl.constexpr,
                     DP1: tl.constexpr, HAS_D1: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr):
    """Split-KV: store this split's partial (unnormalised acc, row max m, row sum l; fp32) and, in the query
    tile's last split to arrive, merge the SPLITS partials in split order and store O and lse.

    Workspace ``Ws`` (fp32): acc as (SPLITS, rows, D0 + DP1), then m and l as (SPLITS, rows) each, rows = B·H·Lq.
    ``Cnt``: one int32 arrival counter per query tile (program along axis 0), zero before the launch and put back
    to zero by the merging program. The merge is the same sum whichever split arrives last (deterministic).
    """
    WIDTH: tl.constexpr = D0 + DP1
    tile = tl.program_id(0)
    rows = (tl.num_programs(0) // tl.cdiv(Lq, BLOCK_M)).to(tl.int64) * Lq
    row = bh.to(tl.int64) * Lq + offs_m
    Ws_m = Ws + SPLITS * rows * WIDTH
    Ws_l = Ws_m + SPLITS * rows
    mine = tl.program_id(1) * rows + row
    tl.store(Ws + mine[:, None] * WIDTH + offs_d0[None, :], acc0, mask=m_valid[:, None])
    if HAS_D1:
        tl.store(Ws + mine[:, None] * WIDTH + (D0 + offs_d1)[None, :], acc1, mask=m_valid[:, None])
    tl.store(Ws_m + mine, m_i, mask=m_valid)
    tl.store(Ws_l + mine, l_i, mask=m_valid)
    # Every thread's partial is stored before one thread's release (the barrier); the counter's acquire makes the
    # other splits' partials visible to the merging program, whose loads skip L1 (not coherent across SMs).
    tl.debug_barrier()
    arrived = tl.atomic_add(Cnt + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLITS - 1:
        m_all = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        for t in tl.static_range(SPLITS):
            m_all = tl.maximum(m_all, tl.load(Ws_m + t * rows + row, mask=m_valid, other=-1.0e30,
                                               cache_modifier=".cg"))
        l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
        o0 = tl.zeros_like(acc0)
        o1 = tl.zeros_like(acc1)
        for t in tl.static_range(SPLITS):
            part = t * rows + row
            w = tl.math.exp2(tl.load(Ws_m + part, mask=m_valid, other=-1.0e30, cache_modifier=".cg") - m_all)
            l_all += w * tl.load(Ws_l + part, mask=m_valid, other=0.0, cache_modifier=".cg")
            o0 += w[:, None] * tl.load(Ws + part[:, None] * WIDTH + offs_d0[None, :], mask=m_valid[:, None],
                                       other=0.0, cache_modifier=".cg")
            if HAS_D1:
                o1 += w[:, None] * tl.load(Ws + part[:, None] * WIDTH + (D0 + offs_d1)[None, :],
                                           mask=m_valid[:, None], other=0.0, cache_modifier=".cg")
        _store_output(o0, o1, l_all, m_all, Out, Lse, bh, b, h, offs_m, offs_d0, offs_d1, m_valid, Lq, stride_ob,
                      stride_oh, stride_om, stride_od, D0, D1, HAS_D1)
        tl.atomic_xchg(Cnt + tile, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["PAT_KEY", "GRID_KEY"])
def _block_attention_fwd_kernel(
    Q, K, V, Out, Lse, S, Ws, Cnt,
    desc_q0, desc_q1, desc_k0, desc_k1, desc_v0, desc_v1,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, block_size, nb, qk_scale, PAT_KEY, GRID_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr, USE_TMA: tl.constexpr, MASKED_TILES: tl.constexpr,
    OVERLAP: tl.constexpr, SPLITS: tl.constexpr = 1, USE_PDL: tl.constexpr = False,
):
    wait_previous_kernel(USE_PDL)  # programmatic dependent launch (:mod:`._pdl`): before any global access
    # Ws, Cnt: the split-KV workspace and arrival counters (:func:`_split_kv_finish`), used when SPLITS > 1.
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
    if SPLITS > 1:
        # Split-KV (grid axis 1, for grids under one wave): this program takes its share of the tile's key list,
        # a contiguous run of full then masked tiles; its partial is merged in :func:`_split_kv_finish`.
        per = tl.cdiv(mask_hi - full_lo, SPLITS)
        lo = tl.minimum(full_lo + tl.program_id(1) * per, mask_hi)
        hi = tl.minimum(lo + per, mask_hi)
        full_lo, mask_lo, mask_hi, masked_lo = lo, tl.minimum(hi, mask_lo), hi, tl.maximum(lo, mask_lo)
    else:
        masked_lo = mask_lo
    if OVERLAP:
        acc0, acc1, l_i, m_i = _fwd_inner_overlapped(
            acc0, acc1, l_i, m_i, q0, q1, Kb, Kb + D0 * stride_kd, Vb, Vb + D0 * stride_vd, S, full_lo, mask_lo,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
            block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK,
            BLOCK_N, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
    else:
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, Kb, Kb + D0 * stride_kd, Vb, Vb + D0 * stride_vd, S, full_lo, mask_lo,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
            block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK,
            BLOCK_N, False, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)
    if MASKED_TILES:
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, Kb, Kb + D0 * stride_kd, Vb, Vb + D0 * stride_vd, S, masked_lo, mask_hi,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off,
            block_size, nb, tab_off, desc_k0, desc_k1, desc_v0, desc_v1, b32, h32, D0, D1, DP1, HAS_D1, D1_MASK,
            BLOCK_N, True, UPCAST, DOT_PREC, SMALL_NB, USE_TMA)

    if SPLITS > 1:
        _split_kv_finish(acc0, acc1, l_i, m_i, Ws, Cnt, Out, Lse, bh, b, h, offs_m, offs_d0, offs_d1, m_valid, Lq,
                         stride_ob, stride_oh, stride_om, stride_od, D0, D1, DP1, HAS_D1, BLOCK_M, SPLITS)
    else:
        _store_output(acc0, acc1, l_i, m_i, Out, Lse, bh, b, h, offs_m, offs_d0, offs_d1, m_valid, Lq, stride_ob,
                      stride_oh, stride_om, stride_od, D0, D1, HAS_D1)


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


@triton.jit
def _two_products(a0, a1, b0, b1, c0, c1, d0, d1, DOT_PREC: tl.constexpr):
    """``(A·Bᵀ, C·Dᵀ)`` over a head dim split in a main part ("0") and a remainder ("1"): both remainder
    products first, then both main ones onto them. Triton waits for a product used in the same iteration
    right after issuing it, so both waits land before the main products are issued, and a caller that
    carries the results into its next iteration finds those still running."""
    x = tl.dot(a1, tl.trans(b1), input_precision=DOT_PREC)
    y = tl.dot(c1, tl.trans(d1), input_precision=DOT_PREC)
    x = tl.dot(a0, tl.trans(b0), x, input_precision=DOT_PREC)
    y = tl.dot(c0, tl.trans(d0), y, input_precision=DOT_PREC)
    return x, y


@triton.jit
def _dkdv_tile_products(k0, k1, v0, v1, Qb, dOb, m, stride_qm, stride_qd, stride_gm, stride_gd, offs_m0, offs_d0,
                        offs_d1, Lq, D0: tl.constexpr, D1: tl.constexpr, D1_MASK: tl.constexpr,
                        BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ of query tile ``m`` (head dim with a remainder), by :func:`_two_products`."""
    offs_m = m * BLOCK_M + offs_m0
    m_valid = offs_m < Lq
    q0 = _load_rows(Qb, offs_m, stride_qm, offs_d0, stride_qd, m_valid, 0, True, False, UPCAST)
    do0 = _load_rows(dOb, offs_m, stride_gm, offs_d0, stride_gd, m_valid, 0, True, False, UPCAST)
    q1 = _load_rows(Qb + D0 * stride_qd, offs_m, stride_qm, offs_d1, stride_qd, m_valid, D1, True, D1_MASK, UPCAST)
    do1 = _load_rows(dOb + D0 * stride_gd, offs_m, stride_gm, offs_d1, stride_gd, m_valid, D1, True, D1_MASK,
                     UPCAST)
    return _two_products(k0, k1, q0, q1, v0, v1, do0, do1, DOT_PREC)


@triton.jit
def _dkdv_tile_update(dk0, dk1, dv0, dv1, sT, dpT, Qb, dOb, LseB, DeltaB, m, stride_qm, stride_qd, stride_gm,
                      stride_gd, offs_m0, offs_d0, offs_d1, qk_scale, Lq, D0: tl.constexpr, D1: tl.constexpr,
                      D1_MASK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q for full query tile ``m``, from its Sᵀ and dPᵀ."""
    offs_m = m * BLOCK_M + offs_m0
    m_valid = offs_m < Lq
    lse2 = tl.load(LseB + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DeltaB + offs_m, mask=m_valid, other=0.0)
    pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
    dsT = pT * (dpT - delta[None, :])
    q0 = _load_rows(Qb, offs_m, stride_qm, offs_d0, stride_qd, m_valid, 0, True, False, UPCAST)
    do0 = _load_rows(dOb, offs_m, stride_gm, offs_d0, stride_gd, m_valid, 0, True, False, UPCAST)
    q1 = _load_rows(Qb + D0 * stride_qd, offs_m, stride_qm, offs_d1, stride_qd, m_valid, D1, True, D1_MASK, UPCAST)
    do1 = _load_rows(dOb + D0 * stride_gd, offs_m, stride_gm, offs_d1, stride_gd, m_valid, D1, True, D1_MASK,
                     UPCAST)
    dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
    dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
    dk0 = tl.dot(dsT.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
    dk1 = tl.dot(dsT.to(q1.dtype), q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_inner_overlapped(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, it_lo, it_hi, stride_qm,
                           stride_qd, stride_gm, stride_gd, offs_m0, offs_d0, offs_d1, qk_scale, Lq,
                           D0: tl.constexpr, D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                           UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """:func:`_dkdv_inner` over full tiles, one query tile ahead (as :func:`_dq_inner_overlapped`)."""
    if it_hi > it_lo:
        m = tl.load(S + it_lo)
        sT, dpT = _dkdv_tile_products(k0, k1, v0, v1, Qb, dOb, m, stride_qm, stride_qd, stride_gm, stride_gd,
                                      offs_m0, offs_d0, offs_d1, Lq, D0, D1, D1_MASK, BLOCK_M, UPCAST, DOT_PREC)
        for it in range(it_lo + 1, it_hi):
            m_next = tl.load(S + it)
            sT_next, dpT_next = _dkdv_tile_products(k0, k1, v0, v1, Qb, dOb, m_next, stride_qm, stride_qd,
                                                    stride_gm, stride_gd, offs_m0, offs_d0, offs_d1, Lq, D0, D1,
                                                    D1_MASK, BLOCK_M, UPCAST, DOT_PREC)
            dk0, dk1, dv0, dv1 = _dkdv_tile_update(dk0, dk1, dv0, dv1, sT, dpT, Qb, dOb, LseB, DeltaB, m, stride_qm,
                                                   stride_qd, stride_gm, stride_gd, offs_m0, offs_d0, offs_d1,
                                                   qk_scale, Lq, D0, D1, D1_MASK, BLOCK_M, UPCAST, DOT_PREC)
            sT = sT_next
            dpT = dpT_next
            m = m_next
        dk0, dk1, dv0, dv1 = _dkdv_tile_update(dk0, dk1, dv0, dv1, sT, dpT, Qb, dOb, LseB, DeltaB, m, stride_qm,
                                               stride_qd, stride_gm, stride_gd, offs_m0, offs_d0, offs_d1, qk_scale,
                                               Lq, D0, D1, D1_MASK, BLOCK_M, UPCAST, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=["PAT_KEY", "GRID_KEY"])
def _block_attention_bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Lq, Lk, block_size, nb, qk_scale, scale, PAT_KEY, GRID_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr, MASKED_TILES: tl.constexpr,
    OVERLAP: tl.constexpr,
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
    if OVERLAP and HAS_D1:
        dk0, dk1, dv0, dv1 = _dkdv_inner_overlapped(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, full_lo, mask_lo, stride_qm, stride_qd,
            stride_gm, stride_gd, offs_m0, offs_d0, offs_d1, qk_scale, Lq, D0, D1, D1_MASK, BLOCK_M, UPCAST,
            DOT_PREC)
    else:
        dk0, dk1, dv0, dv1 = _dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qb, dOb, LseB, DeltaB, S, full_lo, mask_lo, stride_qm, stride_qd,
            stride_gm, stride_gd, offs_n, offs_m0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb,
            tab_off, D0, D1, HAS_D1, D1_MASK, BLOCK_M, False, UPCAST, DOT_PREC, SMALL_NB)
    if MASKED_TILES:
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


@triton.jit
def _dq_tile_products(q0, q1, do0, do1, Kb, Vb, n, stride_kn, stride_kd, stride_vn, stride_vd, offs_n0, offs_d0,
                      offs_d1, Lk, D0: tl.constexpr, D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """S = Q·Kᵀ and dP = dO·Vᵀ of full key tile ``n`` (head dim with a remainder), by :func:`_two_products`."""
    offs_n = n * BLOCK_N + offs_n0
    k0 = _load_rows(Kb, offs_n, stride_kn, offs_d0, stride_kd, offs_n < Lk, 0, False, False, UPCAST)
    v0 = _load_rows(Vb, offs_n, stride_vn, offs_d0, stride_vd, offs_n < Lk, 0, False, False, UPCAST)
    k1 = _load_rows(Kb + D0 * stride_kd, offs_n, stride_kn, offs_d1, stride_kd, offs_n < Lk, D1, False, D1_MASK,
                    UPCAST)
    v1 = _load_rows(Vb + D0 * stride_vd, offs_n, stride_vn, offs_d1, stride_vd, offs_n < Lk, D1, False, D1_MASK,
                    UPCAST)
    return _two_products(q0, q1, k0, k1, do0, do1, v0, v1, DOT_PREC)


@triton.jit
def _dq_tile_update(dq0, dq1, s, dp, lse2, delta, Kb, n, stride_kn, stride_kd, offs_n0, offs_d0, offs_d1, qk_scale, Lk,
                    D0: tl.constexpr, D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ += dS·K for full key tile ``n``, dS = P∘(dP − delta), P = exp(S·scale − lse)."""
    offs_n = n * BLOCK_N + offs_n0
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    ds = p * (dp - delta[:, None])
    k0 = _load_rows(Kb, offs_n, stride_kn, offs_d0, stride_kd, offs_n < Lk, 0, False, False, UPCAST)
    k1 = _load_rows(Kb + D0 * stride_kd, offs_n, stride_kn, offs_d1, stride_kd, offs_n < Lk, D1, False, D1_MASK,
                    UPCAST)
    dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PREC)
    dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _dq_inner_overlapped(dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, it_lo, it_hi, stride_kn, stride_kd,
                         stride_vn, stride_vd, offs_n0, offs_d0, offs_d1, qk_scale, Lk, D0: tl.constexpr,
                         D1: tl.constexpr, D1_MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """:func:`_dq_inner` over full tiles, one tile ahead: S and dP of tile i + 1 are on the tensor cores while
    tile i's exponentials and dS are computed (as :func:`_fwd_inner_overlapped`; head dims with a remainder)."""
    if it_hi > it_lo:
        n = tl.load(S + it_lo)
        s, dp = _dq_tile_products(q0, q1, do0, do1, Kb, Vb, n, stride_kn, stride_kd, stride_vn, stride_vd, offs_n0,
                                  offs_d0, offs_d1, Lk, D0, D1, D1_MASK, BLOCK_N, UPCAST, DOT_PREC)
        for it in range(it_lo + 1, it_hi):
            n_next = tl.load(S + it)
            s_next, dp_next = _dq_tile_products(q0, q1, do0, do1, Kb, Vb, n_next, stride_kn, stride_kd, stride_vn,
                                                stride_vd, offs_n0, offs_d0, offs_d1, Lk, D0, D1, D1_MASK, BLOCK_N,
                                                UPCAST, DOT_PREC)
            dq0, dq1 = _dq_tile_update(dq0, dq1, s, dp, lse2, delta, Kb, n, stride_kn, stride_kd, offs_n0, offs_d0,
                                       offs_d1, qk_scale, Lk, D0, D1, D1_MASK, BLOCK_N, UPCAST, DOT_PREC)
            s = s_next
            dp = dp_next
            n = n_next
        dq0, dq1 = _dq_tile_update(dq0, dq1, s, dp, lse2, delta, Kb, n, stride_kn, stride_kd, offs_n0, offs_d0,
                                   offs_d1, qk_scale, Lk, D0, D1, D1_MASK, BLOCK_N, UPCAST, DOT_PREC)
    return dq0, dq1


@triton.jit(do_not_specialize=["PAT_KEY", "GRID_KEY"])
def _block_attention_bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Lq, Lk, block_size, nb, qk_scale, scale, PAT_KEY, GRID_KEY,
    D0: tl.constexpr, D1: tl.constexpr, DP1: tl.constexpr, HAS_D1: tl.constexpr, D1_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SMALL_NB: tl.constexpr, ALIGN: tl.constexpr, MASKED_TILES: tl.constexpr,
    OVERLAP: tl.constexpr,
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
    if OVERLAP and HAS_D1:
        dq0, dq1 = _dq_inner_overlapped(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, full_lo, mask_lo, stride_kn, stride_kd, stride_vn,
            stride_vd, offs_n0, offs_d0, offs_d1, qk_scale, Lk, D0, D1, D1_MASK, BLOCK_N, UPCAST, DOT_PREC)
    else:
        dq0, dq1 = _dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, Kb, Vb, S, full_lo, mask_lo, stride_kn, stride_kd, stride_vn,
            stride_vd, offs_m, offs_n0, offs_d0, offs_d1, qk_scale, Lq, Lk, q_off, block_size, nb, tab_off,
            D0, D1, HAS_D1, D1_MASK, BLOCK_N, False, UPCAST, DOT_PREC, SMALL_NB)
    if MASKED_TILES:
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
