"""Fused LayerNorm + adaLN modulation with per-(sample, block) conditioning (Triton).

``y[b, n] = LN(x[b, n])·(1 + scale[b, n // block_size]) + shift[b, n // block_size]``

Forward: one pass over x (one read, one write of y); the shift/scale rows are read once per
row tile because a tile never straddles two blocks. Saves the per-row mean and rstd (fp32).
Backward: dx plus the per-(sample, block) reductions ``dshift = Σ_rows dy`` and
``dscale = Σ_rows dy·x̂``, reduced deterministically over row groups, in one of two plans
(:func:`ard_kernels.ops._rows.row_backward_plan`, timed on the GPU at a shape's first call): *fused*,
the row kernel keeps the sums beside its rows (3 row passes), or *split*, the row kernel computes dx
alone and a column-parallel kernel reads x and dy again for the sums (5 row passes, light programs).
The row tiling, program order and row groups are shared with the gated residual
(:mod:`ard_kernels.ops._rows`).

Registered as ``ard_kernels::modulated_layer_norm_fwd`` / ``_bwd`` custom ops with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them.
"""

import torch
import triton
import triton.language as tl

from . import cdiv, differentiable_call, forward_call, launch_device
from ._pdl import pdl_meta, pdl_twins, wait_previous_kernel
from ._rows import (
    BACKWARD_AUTOTUNE_KEY,
    FORWARD_AUTOTUNE_KEY,
    backward_tiling,
    block_column_sums,
    block_program,
    block_rows,
    column_sum_specs,
    forward_configs,
    group_rows,
    launch_rows,
    load_block_row_pair,
    load_row_stats,
    load_row_tile_raw,
    modulated_norm_backward_tile,
    modulated_norm_tile,
    plan_backward_configs,
    row_backward_plan,
    row_columns,
    row_tile,
    store_row_sums,
    store_row_tile,
    with_padded_remainder,
)


@triton.jit(do_not_specialize=["B"])
def _modulated_layer_norm_fwd_kernel(
    X_ptr, SHIFT_ptr, SCALE_ptr, Y_ptr, MEAN_ptr, RSTD_ptr,
    B, N, C, block_size, num_blocks, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_sh_b, stride_sh_n, stride_sh_c,
    stride_sc_b, stride_sc_n, stride_sc_c,
    stride_y_b, stride_y_n,
    BLOCK_M: tl.constexpr, C0: tl.constexpr, C1P: tl.constexpr, TILES: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_previous_kernel(USE_PDL)  # programmatic dependent launch (:mod:`._pdl`): before any global access
    # One program per (sample, block, run of TILES row tiles), runs fastest; each row in two column
    # segments. With TILES > 1 each tile's successor is loaded before the tile is normalised and stored,
    # so a program keeps a load in flight through its math (one tile per program waits on its load, then
    # on two row reductions, then stores: the first H100 run measured this forward at 1.5 TB/s, 2 row
    # passes per load-to-store chain). B: the batch, an autotuning key only (the grid holds it).
    b, blk, run = block_program(tl.program_id(0), tl.cdiv(tl.cdiv(block_size, BLOCK_M), TILES), num_blocks)
    cols0, cols1, col_ok1 = row_columns(C, C0, C1P)
    blk64 = blk.to(tl.int64)
    shift0, shift1 = load_block_row_pair(SHIFT_ptr, b, blk64, stride_sh_b, stride_sh_n, stride_sh_c, cols0, cols1,
                                         col_ok1, C)
    scale0, scale1 = load_block_row_pair(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols0, cols1,
                                         col_ok1, C)
    first = run * TILES * BLOCK_M
    n64, row_ok = block_rows(blk, first, block_size, N, BLOCK_M)
    x0, x1 = load_row_tile_raw(X_ptr, b, n64, cols0, cols1, stride_x_b, stride_x_n, stride_x_c, row_ok[:, None],
                               row_ok[:, None] & col_ok1[None, :])
    for t in tl.static_range(TILES):  # unrolled: TILES is small, and the rotation below is compile-time
        if t + 1 < TILES:
            n64_next, row_ok_next = block_rows(blk, first + (t + 1) * BLOCK_M, block_size, N, BLOCK_M)
            x0_next, x1_next = load_row_tile_raw(X_ptr, b, n64_next, cols0, cols1, stride_x_b, stride_x_n,
                                                 stride_x_c, row_ok_next[:, None],
                                                 row_ok_next[:, None] & col_ok1[None, :])
        mask1 = row_ok[:, None] & col_ok1[None, :]
        y0, y1, mean, rstd = modulated_norm_tile(x0.to(tl.float32), x1.to(tl.float32), mask1, shift0, shift1,
                                                 scale0, scale1, C, eps)
        store_row_tile(Y_ptr, b, n64, cols0, cols1, stride_y_b, stride_y_n, 1, y0, y1, row_ok[:, None], mask1)
        tl.store(MEAN_ptr + b * N + n64, mean, mask=row_ok)
        tl.store(RSTD_ptr + b * N + n64, rstd, mask=row_ok)
        if t + 1 < TILES:
            n64, row_ok, x0, x1 = n64_next, row_ok_next, x0_next, x1_next


@triton.jit
def _load_bwd_tile(X_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, cols0, cols1, col_ok1,
                   stride_x_b, stride_x_n, stride_x_c, stride_dy_b, stride_dy_n, stride_dy_c):
    """A backward tile's inputs as stored: x and dy (two column segments each), the rows' mean and rstd."""
    mask0 = row_ok[:, None]
    mask1 = row_ok[:, None] & col_ok1[None, :]
    x0, x1 = load_row_tile_raw(X_ptr, b, n64, cols0, cols1, stride_x_b, stride_x_n, stride_x_c, mask0, mask1)
    dy0, dy1 = load_row_tile_raw(DY_ptr, b, n64, cols0, cols1, stride_dy_b, stride_dy_n, stride_dy_c, mask0, mask1)
    mean, rstd = load_row_stats(MEAN_ptr, RSTD_ptr, b, N, n64, row_ok)
    return x0, x1, dy0, dy1, mean, rstd


@triton.jit
def _bwd_tile_step(x0, x1, dy0, dy1, mean, rstd, DX_ptr, b, n64, row_ok, cols0, cols1, col_ok1, gain0, gain1, C,
                   stride_dx_b, stride_dx_n, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1, SUMS: tl.constexpr):
    """dx of one loaded tile, stored; returns the (BLOCK_M, C) accumulators of dshift and dscale with it added
    (unchanged without SUMS: the split plan's column sums kernel does them)."""
    mask1 = row_ok[:, None] & col_ok1[None, :]
    dy0f, dy1f = dy0.to(tl.float32), dy1.to(tl.float32)
    xhat0, xhat1, dx0, dx1, _, _ = modulated_norm_backward_tile(x0.to(tl.float32), x1.to(tl.float32), dy0f, dy1f,
                                                          mean, rstd, mask1, gain0, gain1, C)
    store_row_tile(DX_ptr, b, n64, cols0, cols1, stride_dx_b, stride_dx_n, 1, dx0, dx1, row_ok[:, None], mask1)
    if SUMS:
        acc_dshift0 += dy0f
        acc_dshift1 += dy1f
        acc_dscale0 += dy0f * xhat0
        acc_dscale1 += dy1f * xhat1
    return acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1


@triton.jit
def _modulated_layer_norm_bwd_kernel(
    DY_ptr, X_ptr, SCALE_ptr, MEAN_ptr, RSTD_ptr, DX_ptr, DSHIFT_PART_ptr, DSCALE_PART_ptr,
    N, C, block_size, num_blocks, groups, rows_per_group,
    stride_dy_b, stride_dy_n, stride_dy_c,
    stride_x_b, stride_x_n, stride_x_c,
    stride_sc_b, stride_sc_n, stride_sc_c,
    stride_dx_b, stride_dx_n,
    BLOCK_M: tl.constexpr, C0: tl.constexpr, C1P: tl.constexpr, PREFETCH: tl.constexpr, SUMS: tl.constexpr,
):
    # SUMS=False (the split plan: _rows.block_column_sums does the sums): dx alone, no accumulators, no partials.
    # One program per (sample, block, row group); it loops over its rows in BLOCK_M tiles (rows_per_group is a
    # multiple of BLOCK_M). dshift/dscale accumulate as (BLOCK_M, C) tiles, summed over their rows once at the
    # end: inside the loop the only cross-thread reductions are LayerNorm's two per row. PREFETCH: the next
    # tile's loads are issued before this tile's math and stores (software pipelining by hand), so a
    # program keeps two tiles of loads in flight instead of waiting on each: the first H100 run measured
    # this loop latency-bound (one load, reduce, store after another). It costs registers; the autotuner
    # weighs the two.
    b, blk, g = block_program(tl.program_id(0), groups, num_blocks)
    blk64 = blk.to(tl.int64)
    first = g * rows_per_group

    cols0, cols1, col_ok1 = row_columns(C, C0, C1P)
    scale0, scale1 = load_block_row_pair(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols0, cols1,
                                         col_ok1, C)
    gain0, gain1 = 1.0 + scale0, 1.0 + scale1
    acc_dshift0 = tl.zeros((BLOCK_M, C0), dtype=tl.float32)
    acc_dscale0 = tl.zeros((BLOCK_M, C0), dtype=tl.float32)
    acc_dshift1 = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)
    acc_dscale1 = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)

    if PREFETCH:
        n64, row_ok = group_rows(blk, first, 0, rows_per_group, block_size, N, BLOCK_M)
        x0, x1, dy0, dy1, mean, rstd = _load_bwd_tile(X_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, cols0,
                                                      cols1, col_ok1, stride_x_b, stride_x_n, stride_x_c,
                                                      stride_dy_b, stride_dy_n, stride_dy_c)
        for r in range(0, rows_per_group, BLOCK_M):
            n64_next, row_ok_next = group_rows(blk, first, r + BLOCK_M, rows_per_group, block_size, N, BLOCK_M)
            x0_next, x1_next, dy0_next, dy1_next, mean_next, rstd_next = _load_bwd_tile(
                X_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, b, N, n64_next, row_ok_next, cols0, cols1, col_ok1,
                stride_x_b, stride_x_n, stride_x_c, stride_dy_b, stride_dy_n, stride_dy_c)
            acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1 = _bwd_tile_step(
                x0, x1, dy0, dy1, mean, rstd, DX_ptr, b, n64, row_ok, cols0, cols1, col_ok1, gain0, gain1, C,
                stride_dx_b, stride_dx_n, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1, SUMS)
            n64, row_ok = n64_next, row_ok_next
            x0, x1, dy0, dy1, mean, rstd = x0_next, x1_next, dy0_next, dy1_next, mean_next, rstd_next
    else:
        for r in range(0, rows_per_group, BLOCK_M):
            n64, row_ok = group_rows(blk, first, r, rows_per_group, block_size, N, BLOCK_M)
            x0, x1, dy0, dy1, mean, rstd = _load_bwd_tile(X_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok,
                                                          cols0, cols1, col_ok1, stride_x_b, stride_x_n, stride_x_c,
                                                          stride_dy_b, stride_dy_n, stride_dy_c)
            acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1 = _bwd_tile_step(
                x0, x1, dy0, dy1, mean, rstd, DX_ptr, b, n64, row_ok, cols0, cols1, col_ok1, gain0, gain1, C,
                stride_dx_b, stride_dx_n, acc_dshift0, acc_dshift1, acc_dscale0, acc_dscale1, SUMS)

    if SUMS:
        part = ((b * num_blocks + blk64) * groups + g) * C
        store_row_sums(DSHIFT_PART_ptr, part, cols0, cols1, col_ok1, acc_dshift0, acc_dshift1)
        store_row_sums(DSCALE_PART_ptr, part, cols0, cols1, col_ok1, acc_dscale0, acc_dscale1)


def modulated_layer_norm_fwd(x, shift, scale, block_size, eps, out_dtype):
    """Launch the forward kernel: returns (y (B, N, C) in out_dtype, mean (B, N) fp32, rstd (B, N) fp32).

    Any strides are accepted for x, shift and scale (the kernel takes them); y is contiguous.
    """
    B, N, C = x.shape
    nb = shift.shape[1]
    y = torch.empty((B, N, C), dtype=out_dtype, device=x.device)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, mean, rstd
    block_m, c0, c1p, num_warps = row_tile(C, block_size, x.device, 8192)
    configs = forward_configs_with_runs(block_m, num_warps, c0 + c1p, block_size, x.device)

    def grid(meta):
        return (cdiv(cdiv(block_size, meta["BLOCK_M"]), meta["TILES"]) * nb * B,)

    with launch_device(x):
        launch_rows(_modulated_layer_norm_fwd_kernel, grid, (
            x, shift, scale, y, mean, rstd,
            B, N, C, block_size, nb, eps,
            *x.stride(),
            *shift.stride(),
            *scale.stride(),
            *y.stride()[:2],
        ), configs, x.device, FORWARD_AUTOTUNE_KEY, names=("TILES",), C0=c0, C1P=c1p, **pdl_meta(x.device))
    return y, mean, rstd


# Tiles per program of the forward's run configs (:func:`forward_configs_with_runs`).
_FWD_RUN_TILES = 4


def forward_configs_with_runs(block_m, num_warps, width, block_size, device) -> tuple:
    """(BLOCK_M, num_warps, TILES) configs of the forward: :func:`~._rows.forward_configs`, one tile per
    program, then on the GPU its second tile (half the heuristic's rows over the fewest warps: light
    programs, several per SM) in runs of :data:`_FWD_RUN_TILES` tiles per program (prefetching) when a
    block holds that many."""
    singles = forward_configs(block_m, num_warps, width, device)
    configs = [(bm, w, 1) for bm, w in singles]
    bm, w = singles[1] if len(singles) > 1 else singles[0]
    if device.type == "cuda" and cdiv(block_size, bm) >= _FWD_RUN_TILES:
        configs.append((bm, w, _FWD_RUN_TILES))
    return tuple(configs)


def modulated_layer_norm_bwd(dy, x, scale, mean, rstd, block_size, shift_dtype, plan=None):
    """Launch the backward: returns (dx like x, dshift (B, nb, C), dscale (B, nb, C)).

    dshift/dscale are accumulated in fp32 per (sample, block, row group) and summed over the
    groups in a fixed order (deterministic), then cast to shift_dtype / scale's dtype.
    ``plan``: "fused" (one kernel: dx and the sums), "split" (dx, then :func:`~._rows.block_column_sums`)
    or None (:func:`~._rows.row_backward_plan`: the GPU times both at a shape's first call).
    """
    B, N, C = x.shape
    nb = scale.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros((B, nb, C), dtype=torch.float32, device=x.device)
        return torch.empty((B, N, C), dtype=x.dtype, device=x.device), zeros.to(shift_dtype), zeros.to(scale.dtype)

    def run(which):
        if which == "fused":
            dx, dshift, dscale = _launch_bwd(dy, x, scale, mean, rstd, block_size, sums=True)
        else:
            dx = _launch_bwd(dy, x, scale, mean, rstd, block_size, sums=False)[0]
            dshift, dscale = block_column_sums(dy, x, mean, rstd, block_size, nb,
                                               out_dtypes=(shift_dtype, scale.dtype))
        return dx, dshift.to(shift_dtype), dscale.to(scale.dtype)

    return run(row_backward_plan("modulated_layer_norm", (B, N, C, block_size, x.dtype, dy.dtype), x.device, run,
                                 plan))


def _launch_bwd(dy, x, scale, mean, rstd, block_size, sums: bool):
    """The row kernel: (dx, dshift, dscale) in fp32 with ``sums``, else (dx, None, None)."""
    B, N, C = x.shape
    nb = scale.shape[1]
    dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    block_m, c0, c1p, num_warps = row_tile(C, block_size, x.device, 4096)
    configs, groups, rows_per_group = backward_tiling(block_m, num_warps, c0 + c1p, x.element_size(), B * nb,
                                                      block_size, x.device, sums)
    dshift_part = torch.empty((B, nb, groups, C) if sums else (1,), dtype=torch.float32, device=x.device)
    dscale_part = torch.empty((B, nb, groups, C) if sums else (1,), dtype=torch.float32, device=x.device)
    with launch_device(x):
        launch_rows(_modulated_layer_norm_bwd_kernel, (groups * nb * B,), (
            dy, x, scale, mean, rstd, dx, dshift_part, dscale_part,
            N, C, block_size, nb, groups, rows_per_group,
            *dy.stride(),
            *x.stride(),
            *scale.stride(),
            *dx.stride()[:2],
        ), configs, x.device, BACKWARD_AUTOTUNE_KEY, C0=c0, C1P=c1p, SUMS=sums)
    if not sums:
        return dx, None, None
    return dx, dshift_part.sum(dim=2), dscale_part.sum(dim=2)


@torch.library.custom_op("ard_kernels::modulated_layer_norm_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block_size: int, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulated_layer_norm_fwd(x, shift, scale, block_size, eps, out_dtype)


@_fwd_op.register_fake
def _fwd_fake(x, shift, scale, block_size, eps, out_dtype):
    B, N, C = x.shape
    stats = x.new_empty((B, N), dtype=torch.float32)
    return x.new_empty((B, N, C), dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("ard_kernels::modulated_layer_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_launch(dy, x, shift, scale, mean, rstd, block_size)


def _bwd_launch(dy, x, shift, scale, mean, rstd, block_size):
    """The backward op's body (its argument list): shift is passed only for its dtype (the schema carries no
    dtypes); it is never read."""
    return modulated_layer_norm_bwd(dy, x, scale, mean, rstd, block_size, shift.dtype)


@_bwd_op.register_fake
def _bwd_fake(dy, x, shift, scale, mean, rstd, block_size):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, shift, scale, block_size, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, mean, rstd)
    ctx.block_size = block_size
    ctx.mark_non_differentiable(mean, rstd)
    # Unused outputs (mean and rstd always) arrive as None, not as zero tensors autograd would allocate and
    # fill at every backward: the backward handles None.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dmean, _drstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dshift, dscale = forward_call(torch.ops.ard_kernels.modulated_layer_norm_bwd, _bwd_launch, dy, x, shift,
                                      scale, mean, rstd, ctx.block_size)
    return dx, dshift, dscale, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_layer_norm_triton(x, shift, scale, block_size: int, eps: float = 1e-6, out_dtype=None):
    """``y[b, n] = LN(x[b, n])·(1 + scale[b, n // block_size]) + shift[b, n // block_size]`` (Triton).

    LayerNorm without affine (biased variance, eps inside the root), math in fp32.

    Args:
        x: (B, N, C) bf16/fp16/fp32, any strides (no copy is made).
        shift, scale: (B, nb, C), nb = ceil(N / block_size), x's dtype and device, any strides.
        block_size: tokens per block (the last block may be partial).
        eps: LayerNorm epsilon.
        out_dtype: y's dtype (default x's); dx is in x's dtype whatever dy's.

    Returns:
        y (B, N, C) contiguous, in out_dtype. Differentiable in x, shift and scale; the
        dshift/dscale reductions are deterministic. Inputs are assumed validated
        (:func:`ard_kernels.modulated_layer_norm` validates).
    """
    return differentiable_call(torch.ops.ard_kernels.modulated_layer_norm_fwd, modulated_layer_norm_fwd,
                               _setup_context, _backward, x, shift, scale, int(block_size), float(eps),
                               out_dtype or x.dtype)[0]


def aot_specs():
    """GPU configurations for ``python -m ard_kernels.aot_check``: DiT and text-to-image widths."""
    from ..aot_check import make_signature, row_divisible

    cuda = torch.device("cuda")
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for C in (768, 1152, 2048, 8192):
            for kind, kernel, target in (("fwd", _modulated_layer_norm_fwd_kernel, 8192),
                                         ("bwd", _modulated_layer_norm_bwd_kernel, 4096)):
                block_m, c0, c1p, num_warps = row_tile(C, 256, cuda, target)
                # every tile the launch autotunes over
                stats = {"MEAN_ptr": "*fp32", "RSTD_ptr": "*fp32", "DSHIFT_PART_ptr": "*fp32",
                         "DSCALE_PART_ptr": "*fp32"}
                # Column strides are 1 at run time, and the JIT compiles a unit stride in: so do these specs.
                unit = (("stride_x_c", "stride_dy_c", "stride_sc_c") if kind == "bwd"
                        else ("stride_x_c", "stride_sh_c", "stride_sc_c"))
                # The backward in both plans (SUMS: fused; without, the split plan's dx pass: bf16 and fp32 only,
                # fp16 compiles as bf16 does).
                variants = (True, False) if kind == "bwd" and dtype != "fp16" else (True,)
                for sums in variants:
                    tiles = (plan_backward_configs(block_m, num_warps, c0 + c1p, 4 if dtype == "fp32" else 2, cuda,
                                                   sums) if kind == "bwd"
                             else forward_configs_with_runs(block_m, num_warps, c0 + c1p, 256, cuda))
                    for i, config in enumerate(tiles):
                        bm, warps = config[:2]
                        meta = {"BLOCK_M": bm, "C0": c0, "C1P": c1p, **dict.fromkeys(unit, 1)}
                        suffix = f"_{bm}x{warps}"
                        if kind == "bwd":
                            meta["PREFETCH"] = config[2]
                            meta["SUMS"] = sums
                            suffix += "_prefetch" if config[2] else ""
                        else:
                            meta["TILES"] = config[2]
                            suffix += f"_run{config[2]}" if config[2] > 1 else ""
                        with_padded_remainder(specs, {
                            "name": f"modulated_layer_norm_{kind}_{dtype}_C{C}" + (suffix if i else "")
                                    + ("" if sums else "_split"),
                            "kernel": kernel,
                            "signature": make_signature(kernel, dtype, stats, floats=("eps",)),
                            "constexprs": meta,
                            "divisible": row_divisible(kernel),
                            "num_warps": warps,
                        }, i, C, dtype)
    return specs + pdl_twins(specs, ("modulated_layer_norm_fwd_bf16_C1152",)) + column_sum_specs()
