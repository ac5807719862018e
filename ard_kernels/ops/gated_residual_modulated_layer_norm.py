"""Gated residual fused with the next modulated LayerNorm, per-(sample, block) conditioning (Triton).

``out[b, n] = x[b, n] + gate[b, j]·y[b, n]``,
``h[b, n] = LN(out[b, n])·(1 + scale[b, j]) + shift[b, j]``, with ``j = n // block_size``.

Inside a DiT block the attention's gated residual is followed at once by the MLP's modulated
LayerNorm of the same stream. Run apart, the two ops read the stream twice and launch twice;
fused, one pass reads x and y and writes out and h (4 row passes instead of 5, 1 launch
instead of 2), which matters most at batch 1, where each launch is a visible share of a step.
The LayerNorm sees ``out`` rounded to its storage dtype, exactly what the separate ops see.

Backward, one pass with ``g = dout + LN_backward(dh·(1 + scale))``: ``dx = g``,
``dy = gate·g``, and the per-(sample, block) reductions ``dgate = Σ_rows g·y``,
``dshift = Σ_rows dh``, ``dscale = Σ_rows dh·x̂``, reduced deterministically over row groups
as in :mod:`ard_kernels.ops._rows` (5 row passes instead of the 9 of the separate backwards). That is
the *fused* plan; the *split* one (:func:`ard_kernels.ops._rows.row_backward_plan`, timed on the GPU at
a shape's first call) writes dx, dy and two fp32 terms per row, then a column-parallel kernel reads dh,
out, dout and y for the three sums, rebuilding g in fp32 from the per-row terms (9 row passes, light
programs, the same precision).

Registered as ``ard_kernels::gated_residual_modulated_layer_norm_fwd`` / ``_bwd`` (autograd)
and ``ard_kernels::gated_residual_modulated_layer_norm_inplace`` (updates x, inference).
"""

import torch
import triton
import triton.language as tl

from . import differentiable_call, direct_launch_ok, forward_call, launch_device
from ._pdl import pdl_meta, pdl_twins, wait_previous_kernel
from ._rows import (
    BACKWARD_AUTOTUNE_KEY,
    FORWARD_AUTOTUNE_KEY,
    backward_tiling,
    block_column_sums,
    block_program,
    block_rows,
    forward_configs,
    group_rows,
    launch_rows,
    load_block_row_pair,
    load_row_stats,
    load_row_tile,
    load_row_tile_raw,
    modulated_norm_backward_tile,
    modulated_norm_tile,
    plan_backward_configs,
    row_backward_plan,
    row_columns,
    row_tile,
    store_row_sums,
    store_row_tile,
    tile_grid,
    with_padded_remainder,
)

# Elements per program: the forward keeps x, y, out and h live, the backward seven tiles.
_FWD_TILE_ELEMS = 8192
# The shorter forward tiles offered to the autotuner: at most 8 values of a tile per thread (x, y, out and
# h are live together; 12 spilled at C = 3072 in fp16).
_FWD_VALUES_PER_THREAD = 8
_BWD_TILE_ELEMS = 4096
# Wider rows hold too much for the one-pass backward (seven row tiles and six per-column sums: it
# spills from C = 4096 on, kilobytes per thread at 8192): above this the two separate backwards run.
_FUSED_BWD_MAX_C = 3072


@triton.jit(do_not_specialize=["B"])
def _gated_residual_modulated_layer_norm_fwd_kernel(
    X_ptr, Y_ptr, GATE_ptr, SHIFT_ptr, SCALE_ptr, OUT_ptr, H_ptr, MEAN_ptr, RSTD_ptr,
    B, N, C, block_size, num_blocks, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_g_b, stride_g_n, stride_g_c,
    stride_sh_b, stride_sh_n, stride_sh_c,
    stride_sc_b, stride_sc_n, stride_sc_c,
    stride_o_b, stride_o_n, stride_o_c,
    stride_h_b, stride_h_n,
    BLOCK_M: tl.constexpr, C0: tl.constexpr, C1P: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_previous_kernel(USE_PDL)  # programmatic dependent launch (:mod:`._pdl`): before any global access
    # One program per (sample, block, row tile), row tiles fastest; whole rows (LayerNorm needs them),
    # each in two column segments. In place, OUT is X: every element is read before the same program
    # overwrites it. B: the batch, an autotuning key only (the grid holds it).
    b, blk, tile = block_program(tl.program_id(0), tl.cdiv(block_size, BLOCK_M), num_blocks)
    n64, row_ok = block_rows(blk, tile * BLOCK_M, block_size, N, BLOCK_M)
    cols0, cols1, col_ok1 = row_columns(C, C0, C1P)
    mask0 = row_ok[:, None]
    mask1 = row_ok[:, None] & col_ok1[None, :]
    blk64 = blk.to(tl.int64)

    gate0, gate1 = load_block_row_pair(GATE_ptr, b, blk64, stride_g_b, stride_g_n, stride_g_c, cols0, cols1,
                                       col_ok1, C)
    shift0, shift1 = load_block_row_pair(SHIFT_ptr, b, blk64, stride_sh_b, stride_sh_n, stride_sh_c, cols0, cols1,
                                         col_ok1, C)
    scale0, scale1 = load_block_row_pair(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols0, cols1,
                                         col_ok1, C)
    x0, x1 = load_row_tile(X_ptr, b, n64, cols0, cols1, stride_x_b, stride_x_n, stride_x_c, mask0, mask1)
    y0, y1 = load_row_tile(Y_ptr, b, n64, cols0, cols1, stride_y_b, stride_y_n, stride_y_c, mask0, mask1)
    out0 = (x0 + gate0[None, :] * y0).to(OUT_ptr.dtype.element_ty)
    out1 = (x1 + gate1[None, :] * y1).to(OUT_ptr.dtype.element_ty)
    store_row_tile(OUT_ptr, b, n64, cols0, cols1, stride_o_b, stride_o_n, stride_o_c, out0, out1, mask0, mask1)

    # Normalise the stored value, as a separate LayerNorm reading `out` back would.
    h0, h1, mean, rstd = modulated_norm_tile(out0.to(tl.float32), out1.to(tl.float32), mask1, shift0, shift1,
                                             scale0, scale1, C, eps)
    store_row_tile(H_ptr, b, n64, cols0, cols1, stride_h_b, stride_h_n, 1, h0, h1, mask0, mask1)
    tl.store(MEAN_ptr + b * N + n64, mean, mask=row_ok)
    tl.store(RSTD_ptr + b * N + n64, rstd, mask=row_ok)


@triton.jit
def _load_bwd_tile(DOUT_ptr, DH_ptr, OUT_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, cols0, cols1, col_ok1,
                   stride_do_b, stride_do_n, stride_do_c, stride_dh_b, stride_dh_n, stride_dh_c,
                   stride_o_b, stride_o_n, stride_o_c, stride_y_b, stride_y_n, stride_y_c, HAS_DOUT: tl.constexpr,
                   SUMS: tl.constexpr):
    """A backward tile's inputs as stored: out, dh, dout (zero without HAS_DOUT) and y (zero without SUMS: only
    dgate reads it), two column segments each, the rows' mean and rstd."""
    mask0 = row_ok[:, None]
    mask1 = row_ok[:, None] & col_ok1[None, :]
    o0, o1 = load_row_tile_raw(OUT_ptr, b, n64, cols0, cols1, stride_o_b, stride_o_n, stride_o_c, mask0, mask1)
    dh0, dh1 = load_row_tile_raw(DH_ptr, b, n64, cols0, cols1, stride_dh_b, stride_dh_n, stride_dh_c, mask0, mask1)
    if HAS_DOUT:  # the stream's own gradient: out also feeds the next residual
        dout0, dout1 = load_row_tile_raw(DOUT_ptr, b, n64, cols0, cols1, stride_do_b, stride_do_n, stride_do_c,
                                         mask0, mask1)
    else:
        dout0, dout1 = tl.zeros_like(dh0), tl.zeros_like(dh1)
    if SUMS:
        y0, y1 = load_row_tile_raw(Y_ptr, b, n64, cols0, cols1, stride_y_b, stride_y_n, stride_y_c, mask0, mask1)
    else:
        y0, y1 = tl.zeros_like(dh0), tl.zeros_like(dh1)
    mean, rstd = load_row_stats(MEAN_ptr, RSTD_ptr, b, N, n64, row_ok)
    return o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd


@triton.jit
def _bwd_tile_step(o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd, DX_ptr, DY_ptr, C1_ptr, C2_ptr, b, N, n64,
                   row_ok, cols0, cols1, col_ok1, gain0, gain1, gate0, gate1, C, stride_dx_b, stride_dx_n, stride_dy_b,
                   stride_dy_n, acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1,
                   SUMS: tl.constexpr):
    """dx and dy of one loaded tile, stored; returns the (BLOCK_M, C) accumulators of dgate, dshift and dscale
    with it added. Without SUMS (the split plan, whose column sums kernel does them) the accumulators come back
    unchanged and the rows' LayerNorm-backward terms c1 and c2 are stored instead (that kernel rebuilds the
    stream gradient from them for dgate)."""
    mask0 = row_ok[:, None]
    mask1 = row_ok[:, None] & col_ok1[None, :]
    dh0f, dh1f = dh0.to(tl.float32), dh1.to(tl.float32)
    xhat0, xhat1, g0, g1, c1, c2 = modulated_norm_backward_tile(o0.to(tl.float32), o1.to(tl.float32), dh0f, dh1f,
                                                                mean, rstd, mask1, gain0, gain1, C)
    g0 += dout0.to(tl.float32)
    g1 += dout1.to(tl.float32)
    store_row_tile(DX_ptr, b, n64, cols0, cols1, stride_dx_b, stride_dx_n, 1, g0, g1, mask0, mask1)
    store_row_tile(DY_ptr, b, n64, cols0, cols1, stride_dy_b, stride_dy_n, 1, g0 * gate0[None, :],
                   g1 * gate1[None, :], mask0, mask1)
    if SUMS:
        acc_dgate0 += g0 * y0.to(tl.float32)
        acc_dgate1 += g1 * y1.to(tl.float32)
        acc_dshift0 += dh0f
        acc_dshift1 += dh1f
        acc_dscale0 += dh0f * xhat0
        acc_dscale1 += dh1f * xhat1
    else:
        tl.store(C1_ptr + b * N + n64, c1, mask=row_ok)
        tl.store(C2_ptr + b * N + n64, c2, mask=row_ok)
    return acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1


@triton.jit
def _gated_residual_modulated_layer_norm_bwd_kernel(
    DOUT_ptr, DH_ptr, OUT_ptr, Y_ptr, GATE_ptr, SCALE_ptr, MEAN_ptr, RSTD_ptr,
    DX_ptr, DY_ptr, DGATE_PART_ptr, DSHIFT_PART_ptr, DSCALE_PART_ptr, C1_ptr, C2_ptr,
    N, C, block_size, num_blocks, groups, rows_per_group,
    stride_do_b, stride_do_n, stride_do_c,
    stride_dh_b, stride_dh_n, stride_dh_c,
    stride_o_b, stride_o_n, stride_o_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_g_b, stride_g_n, stride_g_c,
    stride_sc_b, stride_sc_n, stride_sc_c,
    stride_dx_b, stride_dx_n,
    stride_dy_b, stride_dy_n,
    HAS_DOUT: tl.constexpr, BLOCK_M: tl.constexpr, C0: tl.constexpr, C1P: tl.constexpr, PREFETCH: tl.constexpr,
    SUMS: tl.constexpr,
):
    # SUMS=False (the split plan: _rows.block_column_sums does the sums): dx and dy, and per row the LayerNorm
    # backward's c1 and c2 (C1_ptr, C2_ptr: (B, N) fp32), y never read.
    # One program per (sample, block, row group): loops over its rows in BLOCK_M tiles (rows_per_group is a
    # multiple of BLOCK_M), the three per-block sums accumulating as (BLOCK_M, C) tiles reduced over their rows
    # once at the end; PREFETCH loads the next tile before this one's math, as in the modulated LayerNorm's
    # backward (ard_kernels/ops/modulated_layer_norm.py, which says why).
    b, blk, grp = block_program(tl.program_id(0), groups, num_blocks)
    blk64 = blk.to(tl.int64)
    first = grp * rows_per_group
    cols0, cols1, col_ok1 = row_columns(C, C0, C1P)
    gate0, gate1 = load_block_row_pair(GATE_ptr, b, blk64, stride_g_b, stride_g_n, stride_g_c, cols0, cols1,
                                       col_ok1, C)
    scale0, scale1 = load_block_row_pair(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols0, cols1,
                                         col_ok1, C)
    gain0, gain1 = 1.0 + scale0, 1.0 + scale1
    acc_dgate0 = tl.zeros((BLOCK_M, C0), dtype=tl.float32)
    acc_dshift0 = tl.zeros((BLOCK_M, C0), dtype=tl.float32)
    acc_dscale0 = tl.zeros((BLOCK_M, C0), dtype=tl.float32)
    acc_dgate1 = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)
    acc_dshift1 = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)
    acc_dscale1 = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)

    if PREFETCH:
        n64, row_ok = group_rows(blk, first, 0, rows_per_group, block_size, N, BLOCK_M)
        o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd = _load_bwd_tile(
            DOUT_ptr, DH_ptr, OUT_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, cols0, cols1, col_ok1,
            stride_do_b, stride_do_n, stride_do_c, stride_dh_b, stride_dh_n, stride_dh_c,
            stride_o_b, stride_o_n, stride_o_c, stride_y_b, stride_y_n, stride_y_c, HAS_DOUT, SUMS)
        for r in range(0, rows_per_group, BLOCK_M):
            n64_next, row_ok_next = group_rows(blk, first, r + BLOCK_M, rows_per_group, block_size, N, BLOCK_M)
            o0_n, o1_n, dh0_n, dh1_n, dout0_n, dout1_n, y0_n, y1_n, mean_n, rstd_n = _load_bwd_tile(
                DOUT_ptr, DH_ptr, OUT_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, b, N, n64_next, row_ok_next, cols0, cols1,
                col_ok1, stride_do_b, stride_do_n, stride_do_c, stride_dh_b, stride_dh_n, stride_dh_c,
                stride_o_b, stride_o_n, stride_o_c, stride_y_b, stride_y_n, stride_y_c, HAS_DOUT, SUMS)
            acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1 = _bwd_tile_step(
                o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd, DX_ptr, DY_ptr, C1_ptr, C2_ptr, b, N, n64, row_ok,
                cols0, cols1, col_ok1, gain0, gain1, gate0, gate1, C, stride_dx_b, stride_dx_n, stride_dy_b,
                stride_dy_n, acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1, SUMS)
            n64, row_ok = n64_next, row_ok_next
            o0, o1, dh0, dh1, dout0, dout1, y0, y1 = o0_n, o1_n, dh0_n, dh1_n, dout0_n, dout1_n, y0_n, y1_n
            mean, rstd = mean_n, rstd_n
    else:
        for r in range(0, rows_per_group, BLOCK_M):
            n64, row_ok = group_rows(blk, first, r, rows_per_group, block_size, N, BLOCK_M)
            o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd = _load_bwd_tile(
                DOUT_ptr, DH_ptr, OUT_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, cols0, cols1, col_ok1,
                stride_do_b, stride_do_n, stride_do_c, stride_dh_b, stride_dh_n, stride_dh_c,
                stride_o_b, stride_o_n, stride_o_c, stride_y_b, stride_y_n, stride_y_c, HAS_DOUT, SUMS)
            acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1 = _bwd_tile_step(
                o0, o1, dh0, dh1, dout0, dout1, y0, y1, mean, rstd, DX_ptr, DY_ptr, C1_ptr, C2_ptr, b, N, n64, row_ok,
                cols0, cols1, col_ok1, gain0, gain1, gate0, gate1, C, stride_dx_b, stride_dx_n, stride_dy_b,
                stride_dy_n, acc_dgate0, acc_dgate1, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1, SUMS)

    if SUMS:
        part = ((b * num_blocks + blk64) * groups + grp) * C
        store_row_sums(DGATE_PART_ptr, part, cols0, cols1, col_ok1, acc_dgate0, acc_dgate1)
        store_row_sums(DSHIFT_PART_ptr, part, cols0, cols1, col_ok1, acc_dshift0, acc_dshift1)
        store_row_sums(DSCALE_PART_ptr, part, cols0, cols1, col_ok1, acc_dscale0, acc_dscale1)


def _bwd_tile(C, block_size, device):
    """The backward's whole-row tile (BLOCK_M, C0, C1P, num_warps): :func:`row_tile` at
    :data:`_BWD_TILE_ELEMS`, its seven live tiles kept below the register file's spill point."""
    return row_tile(C, block_size, device, _BWD_TILE_ELEMS)


def _launch_fwd(x, y, gate, shift, scale, out, block_size, eps, h_dtype):
    """Run the forward into ``out`` (x itself in place); returns (h in h_dtype, mean, rstd)."""
    B, N, C = x.shape
    nb = gate.shape[1]
    h = torch.empty((B, N, C), dtype=h_dtype, device=x.device)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if h.numel() == 0:
        return h, mean, rstd
    block_m, c0, c1p, num_warps = row_tile(C, block_size, x.device, _FWD_TILE_ELEMS)
    configs = forward_configs(block_m, num_warps, c0 + c1p, x.device, _FWD_VALUES_PER_THREAD)

    with launch_device(x):
        # In place OUT is X: the autotuner puts it back after each timed call (the copy is timed with every
        # tile alike). Out of place too, so that one autotuner serves both and they pick the same tile (the
        # same rounding: inference in place gives what training computes).
        launch_rows(_gated_residual_modulated_layer_norm_fwd_kernel, tile_grid(block_size, nb, B), (
            x, y, gate, shift, scale, out, h, mean, rstd,
            B, N, C, block_size, nb, eps,
            *x.stride(),
            *y.stride(),
            *gate.stride(),
            *shift.stride(),
            *scale.stride(),
            *out.stride(),
            *h.stride()[:2],
        ), configs, x.device, FORWARD_AUTOTUNE_KEY, restore=("OUT_ptr",), C0=c0, C1P=c1p, **pdl_meta(x.device))
    return h, mean, rstd


def gated_residual_modulated_layer_norm_fwd(x, y, gate, shift, scale, block_size, eps, h_dtype):
    """Launch the forward: returns (out in x's dtype, h in h_dtype, both (B, N, C) contiguous; mean,
    rstd (B, N) fp32)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h, mean, rstd = _launch_fwd(x, y, gate, shift, scale, out, block_size, eps, h_dtype)
    return out, h, mean, rstd


def gated_residual_modulated_layer_norm_bwd(dout, dh, out, y, gate, shift_dtype, scale, mean, rstd, block_size,
                                            plan=None):
    """Launch the backward: returns (dx like out, dy like y, dgate, dshift, dscale (B, nb, C)).

    ``dout`` may be None (out itself unused downstream). The per-block sums are accumulated in fp32
    per (sample, block, row group) and summed over the groups in a fixed order (deterministic).
    ``plan``: "fused" (one kernel: dx, dy and the sums), "split" (dx and dy, then
    :func:`~._rows.block_column_sums` over dh, out and dx·y) or None (:func:`~._rows.row_backward_plan`: the
    GPU times both at a shape's first call). Rows wider than :data:`_FUSED_BWD_MAX_C` take the modulated
    LayerNorm's and the gated residual's own backwards, one after the other, whatever the plan.
    """
    B, N, C = out.shape
    nb = gate.shape[1]
    if C > _FUSED_BWD_MAX_C and out.numel():
        from .gated_residual import gated_residual_bwd
        from .modulated_layer_norm import modulated_layer_norm_bwd

        g, dshift, dscale = modulated_layer_norm_bwd(dh, out, scale, mean, rstd, block_size, shift_dtype, plan)
        if dout is not None:
            g = g + dout
        dy, dgate = gated_residual_bwd(g, y, gate, block_size)
        return g, dy, dgate, dshift, dscale
    if out.numel() == 0:
        zeros = torch.zeros((B, nb, C), dtype=torch.float32, device=out.device)
        return (torch.empty((B, N, C), dtype=out.dtype, device=out.device),
                torch.empty((B, N, C), dtype=y.dtype, device=out.device),
                zeros.to(gate.dtype), zeros.to(shift_dtype), zeros.to(scale.dtype))

    def run(which):
        if which == "fused":
            dx, dy, dgate, dshift, dscale = _launch_bwd(dout, dh, out, y, gate, scale, mean, rstd, block_size, True)
        else:
            dx, dy, c1, c2 = _launch_bwd(dout, dh, out, y, gate, scale, mean, rstd, block_size, False)
            dshift, dscale, dgate = block_column_sums(dh, out, mean, rstd, block_size, nb, (scale, c1, c2, dout, y),
                                                      (shift_dtype, scale.dtype, gate.dtype))
        return dx, dy, dgate.to(gate.dtype), dshift.to(shift_dtype), dscale.to(scale.dtype)

    return run(row_backward_plan("gated_residual_modulated_layer_norm",
                                 (B, N, C, block_size, out.dtype, y.dtype, dh.dtype, dout is not None), out.device,
                                 run, plan))


def _launch_bwd(dout, dh, out, y, gate, scale, mean, rstd, block_size, sums: bool):
    """The row kernel: (dx, dy, dgate, dshift, dscale) with the sums in fp32 with ``sums``, else (dx, dy, c1, c2),
    c1 and c2 the rows' LayerNorm-backward terms ((B, N) fp32: :func:`~._rows.modulated_norm_backward_tile`)."""
    B, N, C = out.shape
    nb = gate.shape[1]
    dx = torch.empty((B, N, C), dtype=out.dtype, device=out.device)
    dy = torch.empty((B, N, C), dtype=y.dtype, device=out.device)
    block_m, c0, c1p, num_warps = _bwd_tile(C, block_size, out.device)
    configs, groups, rows_per_group = backward_tiling(block_m, num_warps, c0 + c1p, out.element_size(), B * nb,
                                                      block_size, out.device, sums)
    parts = torch.empty((3, B, nb, groups, C) if sums else (3, 1), dtype=torch.float32, device=out.device)
    terms = torch.empty((2, 1) if sums else (2, B, N), dtype=torch.float32, device=out.device)
    has_dout = dout is not None
    dout_arg = dout if has_dout else dh  # never read without HAS_DOUT; any tensor fills the slot
    with launch_device(out):
        launch_rows(_gated_residual_modulated_layer_norm_bwd_kernel, (groups * nb * B,), (
            dout_arg, dh, out, y, gate, scale, mean, rstd,
            dx, dy, parts[0], parts[1], parts[2], terms[0], terms[1],
            N, C, block_size, nb, groups, rows_per_group,
            *dout_arg.stride(),
            *dh.stride(),
            *out.stride(),
            *y.stride(),
            *gate.stride(),
            *scale.stride(),
            *dx.stride()[:2],
            *dy.stride()[:2],
        ), configs, out.device, BACKWARD_AUTOTUNE_KEY, HAS_DOUT=has_dout, C0=c0, C1P=c1p, SUMS=sums)
    if not sums:
        return dx, dy, terms[0], terms[1]
    # Three separate sums: results that were views of one tensor would alias (custom ops forbid it).
    return dx, dy, parts[0].sum(dim=2), parts[1].sum(dim=2), parts[2].sum(dim=2)


@torch.library.custom_op("ard_kernels::gated_residual_modulated_layer_norm_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    block_size: int, eps: float, h_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_modulated_layer_norm_fwd(x, y, gate, shift, scale, block_size, eps, h_dtype)


@_fwd_op.register_fake
def _fwd_fake(x, y, gate, shift, scale, block_size, eps, h_dtype):
    B, N, C = x.shape
    stats = x.new_empty((B, N), dtype=torch.float32)
    return x.new_empty((B, N, C)), x.new_empty((B, N, C), dtype=h_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("ard_kernels::gated_residual_modulated_layer_norm_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor | None, dh: torch.Tensor, out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
    shift: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_launch(dout, dh, out, y, gate, shift, scale, mean, rstd, block_size)


def _bwd_launch(dout, dh, out, y, gate, shift, scale, mean, rstd, block_size):
    """The backward op's body (its argument list): shift is passed only for its dtype (the schema carries no
    dtypes); it is never read."""
    return gated_residual_modulated_layer_norm_bwd(dout, dh, out, y, gate, shift.dtype, scale, mean, rstd,
                                                   block_size)


@_bwd_op.register_fake
def _bwd_fake(dout, dh, out, y, gate, shift, scale, mean, rstd, block_size):
    return (out.new_empty(out.shape), y.new_empty(y.shape), gate.new_empty(gate.shape),
            shift.new_empty(shift.shape), scale.new_empty(scale.shape))


def _setup_context(ctx, inputs, output):
    _, y, gate, shift, scale, block_size, _, _ = inputs
    out, _, mean, rstd = output
    # The backward needs `out` (for x̂), not x: x itself is never saved.
    ctx.save_for_backward(out, y, gate, shift, scale, mean, rstd)
    ctx.block_size = block_size
    ctx.mark_non_differentiable(mean, rstd)
    # Unused outputs (mean and rstd always) arrive as None, not as zero tensors autograd would allocate and
    # fill at every backward: the backward handles None.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dh, _dmean, _drstd):
    out, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(out)
    dx, dy, dgate, dshift, dscale = forward_call(torch.ops.ard_kernels.gated_residual_modulated_layer_norm_bwd,
                                                 _bwd_launch, dout, dh, out, y, gate, shift, scale, mean, rstd,
                                                 ctx.block_size)
    return dx, dy, dgate, dshift, dscale, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ard_kernels::gated_residual_modulated_layer_norm_inplace", mutates_args=("x",))
def _inplace_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                block_size: int, eps: float, h_dtype: torch.dtype) -> torch.Tensor:
    return _launch_fwd(x, y, gate, shift, scale, x, block_size, eps, h_dtype)[0]


@_inplace_op.register_fake
def _inplace_fake(x, y, gate, shift, scale, block_size, eps, h_dtype):
    return x.new_empty(x.shape, dtype=h_dtype)


def gated_residual_modulated_layer_norm_triton(x, y, gate, shift, scale, block_size: int, eps: float = 1e-6,
                                               inplace: bool = False, out_dtype=None):
    """``out = x + gate·y``, ``h = LN(out)·(1 + scale) + shift``, conditioning per block (Triton).

    Row n of sample b uses ``gate``/``shift``/``scale[b, n // block_size]``. LayerNorm without
    affine (biased variance, eps inside the root) of ``out`` as stored; math in fp32.

    Args:
        x, y: (B, N, C) bf16/fp16/fp32, any strides (no copy is made).
        gate, shift, scale: (B, nb, C), nb = ceil(N / block_size), any float dtype and strides.
        block_size: tokens per block (the last block may be partial).
        eps: LayerNorm epsilon.
        inplace: write ``out`` into x and return x as ``out`` (inference only). y must not overlap x.
        out_dtype: h's dtype (default x's); out is in x's.

    Returns:
        (out, h), both (B, N, C): out in x's dtype (contiguous unless in place), h contiguous in out_dtype.
        Differentiable in x, y, gate, shift and scale (per-block sums deterministic). Inputs are
        assumed validated (:func:`ard_kernels.gated_residual_modulated_layer_norm` validates).

    Raises:
        RuntimeError: ``inplace=True`` while grad mode is on and an input requires grad.
    """
    h_dtype = out_dtype or x.dtype
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, gate, shift, scale)):
            raise RuntimeError(
                "inplace: gated_residual_modulated_layer_norm(inplace=True) is inference-only, but an input "
                "requires grad (use inplace=False, or run under torch.no_grad())"
            )
        if direct_launch_ok(x, y, gate, shift, scale):  # plain eager: the launcher without the custom op's dispatch
            h = _launch_fwd(x, y, gate, shift, scale, x, int(block_size), float(eps), h_dtype)[0]
            torch.autograd.graph.increment_version(x)  # what the mutating op's dispatch would do for x
            return x, h
        h = torch.ops.ard_kernels.gated_residual_modulated_layer_norm_inplace(x, y, gate, shift, scale,
                                                                              int(block_size), float(eps), h_dtype)
        return x, h
    out, h, _, _ = differentiable_call(torch.ops.ard_kernels.gated_residual_modulated_layer_norm_fwd,
                                       gated_residual_modulated_layer_norm_fwd, _setup_context, _backward,
                                       x, y, gate, shift, scale, int(block_size), float(eps), h_dtype)
    return out, h


def aot_specs():
    """GPU configurations for ``python -m ard_kernels.aot_check``: DiT and text-to-image widths."""
    from ..aot_check import make_signature, row_divisible

    cuda = torch.device("cuda")
    fp32 = {name: "*fp32" for name in ("MEAN_ptr", "RSTD_ptr", "DGATE_PART_ptr", "DSHIFT_PART_ptr",
                                       "DSCALE_PART_ptr", "C1_ptr", "C2_ptr")}
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for C in (768, 1152, 2048, 3072, 8192):
            for kind, kernel in (("fwd", _gated_residual_modulated_layer_norm_fwd_kernel),
                                 ("bwd", _gated_residual_modulated_layer_norm_bwd_kernel)):
                if kind == "bwd" and C > _FUSED_BWD_MAX_C:
                    continue  # never launched: wider rows take the two separate backwards
                if kind == "fwd":  # every tile the launch autotunes over
                    block_m, c0, c1p, num_warps = row_tile(C, 256, cuda, _FWD_TILE_ELEMS)
                    tiles = forward_configs(block_m, num_warps, c0 + c1p, cuda, _FWD_VALUES_PER_THREAD)
                else:
                    block_m, c0, c1p, num_warps = _bwd_tile(C, 256, cuda)
                # Column strides are 1 at run time, and the JIT compiles a unit stride in: so do these specs.
                unit = (("stride_do_c", "stride_dh_c", "stride_o_c", "stride_y_c", "stride_g_c", "stride_sc_c")
                        if kind == "bwd" else
                        ("stride_x_c", "stride_y_c", "stride_g_c", "stride_sh_c", "stride_sc_c", "stride_o_c"))
                constexprs = {"C0": c0, "C1P": c1p, **dict.fromkeys(unit, 1)}
                if kind == "bwd":
                    constexprs["HAS_DOUT"] = True
                name = f"gated_residual_modulated_layer_norm_{kind}_{dtype}_C{C}"
                # The backward in both plans (as the modulated LayerNorm's: fp16 compiles as bf16 does).
                variants = (True, False) if kind == "bwd" and dtype != "fp16" else (True,)
                for sums in variants:
                    if kind == "bwd":  # the tiles _launch_bwd offers in this plan
                        tiles = plan_backward_configs(block_m, num_warps, c0 + c1p, 4 if dtype == "fp32" else 2,
                                                      cuda, sums)
                    for i, config in enumerate(tiles):
                        bm, warps = config[:2]
                        meta = {**constexprs, "BLOCK_M": bm}
                        suffix = f"_{bm}x{warps}"
                        if kind == "bwd":
                            meta["PREFETCH"] = config[2]
                            meta["SUMS"] = sums
                            suffix += "_prefetch" if config[2] else ""
                        with_padded_remainder(specs, {
                            "name": name + (suffix if i else "") + ("" if sums else "_split"),
                            "kernel": kernel,
                            "signature": make_signature(kernel, dtype, fp32, floats=("eps",)),
                            "constexprs": meta,
                            "divisible": row_divisible(kernel),
                            "num_warps": warps,
                        }, i, C, dtype)
    return specs + pdl_twins(specs, ("gated_residual_modulated_layer_norm_fwd_bf16_C1152",))
