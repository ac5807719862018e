"""Gated residual with per-(sample, block) gates (Triton): ``out[b, n] = x[b, n] + gate[b, n // block_size]·y[b, n]``.

DiT's ``x + gate·f(x)`` after attention and after the MLP, with adaLN-Zero gates kept per block.
Forward reads x and y once and writes out once (or writes into x, in place, for inference);
a gate row is read once per row tile. Backward: ``dx = dout``, ``dy = gate·dout`` and
``dgate = Σ_rows dout·y`` per (sample, block), reduced deterministically over row groups (per
C-chunk). The row tiling, program order and row groups are shared with the modulated LayerNorm
(:mod:`ard_kernels.ops._rows`).

Registered as ``ard_kernels::gated_residual_fwd`` / ``_bwd`` (autograd) and
``ard_kernels::gated_residual_inplace`` (mutates x, no autograd) custom ops.
"""

import torch
import triton
import triton.language as tl

from . import cdiv, differentiable_call, direct_launch_ok, forward_call, launch_device, next_power_of_2
from ._pdl import pdl_meta, pdl_twins, wait_previous_kernel
from ._rows import (
    block_program,
    block_rows,
    group_rows,
    interpreter_tile,
    load_block_row,
    load_tile,
    load_tile_raw,
    row_groups,
    tile_rows,
)


@triton.jit
def _gated_residual_fwd_kernel(
    X_ptr, Y_ptr, GATE_ptr, OUT_ptr,
    N, C, block_size, num_blocks, tiles_per_block,
    stride_x_b, stride_x_n, stride_x_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_g_b, stride_g_n, stride_g_c,
    stride_o_b, stride_o_n, stride_o_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_previous_kernel(USE_PDL)  # programmatic dependent launch (:mod:`._pdl`): before any global access
    # Axis 0: (sample, block, row tile), row tiles fastest; axis 1: C-chunks.
    b, blk, tile = block_program(tl.program_id(0), tiles_per_block, num_blocks)
    n64, row_ok = block_rows(blk, tile * BLOCK_M, block_size, N, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]

    gate = load_block_row(GATE_ptr, b, blk.to(tl.int64), stride_g_b, stride_g_n, stride_g_c, cols, col_ok)
    x = load_tile(X_ptr, b, n64, cols, stride_x_b, stride_x_n, stride_x_c, mask)
    y = load_tile(Y_ptr, b, n64, cols, stride_y_b, stride_y_n, stride_y_c, mask)
    out = x + gate[None, :] * y
    tl.store(OUT_ptr + b * stride_o_b + n64[:, None] * stride_o_n + cols[None, :] * stride_o_c,
             out.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile_step(dout, y, gate, DY_ptr, b, n64, cols, stride_dy_b, stride_dy_n, mask, acc):
    """dy = gate·dout of one loaded tile, stored; returns the dgate accumulator with dout·y added."""
    doutf = dout.to(tl.float32)
    tl.store(DY_ptr + b * stride_dy_b + n64[:, None] * stride_dy_n + cols[None, :],
             (doutf * gate[None, :]).to(DY_ptr.dtype.element_ty), mask=mask)
    return acc + doutf * y.to(tl.float32)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT_ptr, Y_ptr, GATE_ptr, DY_ptr, DGATE_PART_ptr,
    N, C, block_size, num_blocks, groups, rows_per_group,
    stride_do_b, stride_do_n, stride_do_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_g_b, stride_g_n, stride_g_c,
    stride_dy_b, stride_dy_n,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
):
    # One program per (sample, block, row group, C-chunk); loops over its rows in BLOCK_M tiles
    # (rows_per_group is a multiple of BLOCK_M). The dgate partial sum accumulates as a (BLOCK_M, BLOCK_C)
    # tile, summed over its rows once at the end (no cross-warp reduction inside the loop). PREFETCH (all
    # but fp32, where it spills): each iteration loads the next tile before working on this one, so two
    # tiles of loads stay in flight (the first H100 run measured this backward at 2/3 of the compiled
    # reference's bandwidth; the modulated LayerNorm's backward says more).
    b, blk, g = block_program(tl.program_id(0), groups, num_blocks)
    blk64 = blk.to(tl.int64)
    first = g * rows_per_group
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gate = load_block_row(GATE_ptr, b, blk64, stride_g_b, stride_g_n, stride_g_c, cols, col_ok)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if PREFETCH:
        n64, row_ok = group_rows(blk, first, 0, rows_per_group, block_size, N, BLOCK_M)
        mask = row_ok[:, None] & col_ok[None, :]
        dout = load_tile_raw(DOUT_ptr, b, n64, cols, stride_do_b, stride_do_n, stride_do_c, mask)
        y = load_tile_raw(Y_ptr, b, n64, cols, stride_y_b, stride_y_n, stride_y_c, mask)
        for r in range(0, rows_per_group, BLOCK_M):
            n64_next, row_ok_next = group_rows(blk, first, r + BLOCK_M, rows_per_group, block_size, N, BLOCK_M)
            mask_next = row_ok_next[:, None] & col_ok[None, :]
            dout_next = load_tile_raw(DOUT_ptr, b, n64_next, cols, stride_do_b, stride_do_n, stride_do_c, mask_next)
            y_next = load_tile_raw(Y_ptr, b, n64_next, cols, stride_y_b, stride_y_n, stride_y_c, mask_next)
            acc = _bwd_tile_step(dout, y, gate, DY_ptr, b, n64, cols, stride_dy_b, stride_dy_n, mask, acc)
            n64, mask, dout, y = n64_next, mask_next, dout_next, y_next
    else:
        for r in range(0, rows_per_group, BLOCK_M):
            n64, row_ok = group_rows(blk, first, r, rows_per_group, block_size, N, BLOCK_M)
            mask = row_ok[:, None] & col_ok[None, :]
            dout = load_tile_raw(DOUT_ptr, b, n64, cols, stride_do_b, stride_do_n, stride_do_c, mask)
            y = load_tile_raw(Y_ptr, b, n64, cols, stride_y_b, stride_y_n, stride_y_c, mask)
            acc = _bwd_tile_step(dout, y, gate, DY_ptr, b, n64, cols, stride_dy_b, stride_dy_n, mask, acc)
    # In the pointer's dtype: fp32 partials, or with one group per block dgate itself (gated_residual_bwd).
    tl.store(DGATE_PART_ptr + ((b * num_blocks + blk64) * groups + g) * C + cols,
             tl.sum(acc, axis=0).to(DGATE_PART_ptr.dtype.element_ty), mask=col_ok)


def _tile(C, block_size, device):
    """(BLOCK_M, BLOCK_C, num_warps) for the elementwise tiles.

    GPU: a C-chunk that divides C when it can (no masked lanes for 384, 1152, 2048...) and
    ~4K elements per program.
    """
    if device.type != "cuda":
        return interpreter_tile(C, block_size)
    block_c = next((w for w in (256, 128, 64) if C % w == 0), min(256, next_power_of_2(C)))
    return tile_rows(block_size, block_c, 4096), block_c, 8


def _launch_fwd(x, y, gate, out, block_size):
    B, N, C = x.shape
    nb = gate.shape[1]
    block_m, block_c, num_warps = _tile(C, block_size, x.device)
    tiles = cdiv(block_size, block_m)
    grid = (tiles * nb * B, cdiv(C, block_c))
    with launch_device(x):
        _gated_residual_fwd_kernel[grid](
            x, y, gate, out,
            N, C, block_size, nb, tiles,
            *x.stride(),
            *y.stride(),
            *gate.stride(),
            *out.stride(),
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps, **pdl_meta(x.device),
        )


def gated_residual_fwd(x, y, gate, block_size):
    """Launch the forward kernel into a new contiguous (B, N, C) tensor of x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_fwd(x, y, gate, out, block_size)
    return out


def _prefetch(y) -> bool:
    """Whether the backward prefetches (PREFETCH): always under the interpreter (tests force the other way
    too), on the GPU unless the rows are fp32 (the second set of fp32 tiles spills at C = 2048)."""
    return not _FORCE_NO_PREFETCH and (y.device.type != "cuda" or y.element_size() < 4)


# Tests set this to run the backward without prefetch through the interpreter.
_FORCE_NO_PREFETCH = False


def gated_residual_bwd(dout, y, gate, block_size):
    """Launch the backward kernel: returns (dy like y, dgate (B, nb, C) in gate's dtype)."""
    B, N, C = y.shape
    nb = gate.shape[1]
    dy = torch.empty((B, N, C), dtype=y.dtype, device=y.device)
    if dy.numel() == 0:
        return dy, torch.zeros(gate.shape, dtype=gate.dtype, device=gate.device)
    block_m, block_c, num_warps = _tile(C, block_size, y.device)
    chunks = cdiv(C, block_c)
    groups, rows_per_group = row_groups(block_size, block_m, B * nb * chunks, y.device)
    # One group per block (enough (sample, block, chunk) programs without splitting: DiT-XL at B16 and up): the
    # kernel writes dgate itself, in gate's dtype; else fp32 partials, summed over the groups below.
    part = torch.empty((B, nb, C) if groups == 1 else (B, nb, groups, C),
                       dtype=gate.dtype if groups == 1 else torch.float32, device=y.device)
    with launch_device(y):
        _gated_residual_bwd_kernel[(groups * nb * B, chunks)](
            dout, y, gate, dy, part,
            N, C, block_size, nb, groups, rows_per_group,
            *dout.stride(),
            *y.stride(),
            *gate.stride(),
            *dy.stride()[:2],
            BLOCK_M=block_m, BLOCK_C=block_c, PREFETCH=_prefetch(y), num_warps=num_warps,
        )
    return dy, part if groups == 1 else part.sum(dim=2).to(gate.dtype)


@torch.library.custom_op("ard_kernels::gated_residual_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, block_size: int) -> torch.Tensor:
    return gated_residual_fwd(x, y, gate, block_size)


@_fwd_op.register_fake
def _fwd_fake(x, y, gate, block_size):
    return x.new_empty(x.shape)


@torch.library.custom_op("ard_kernels::gated_residual_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dout, y, gate, block_size)


@_bwd_op.register_fake
def _bwd_fake(dout, y, gate, block_size):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    _, y, gate, block_size = inputs
    ctx.save_for_backward(y, gate)
    ctx.block_size = block_size


def _backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = forward_call(torch.ops.ard_kernels.gated_residual_bwd, gated_residual_bwd, dout, y, gate,
                             ctx.block_size)
    return dout, dy, dgate, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ard_kernels::gated_residual_inplace", mutates_args=("x",))
def _inplace_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, block_size: int) -> None:
    if x.numel():
        _launch_fwd(x, y, gate, x, block_size)


@_inplace_op.register_fake
def _inplace_fake(x, y, gate, block_size):
    return None


def gated_residual_triton(x, y, gate, block_size: int, inplace: bool = False):
    """``out[b, n] = x[b, n] + gate[b, n // block_size]·y[b, n]`` (Triton), math in fp32.

    Args:
        x, y: (B, N, C) bf16/fp16/fp32, any strides (no copy is made).
        gate: (B, nb, C), nb = ceil(N / block_size), x's dtype and device, any strides.
        block_size: tokens per block (the last block may be partial).
        inplace: write into x and return it (inference only). y must not overlap x.

    Returns:
        out (B, N, C) contiguous in x's dtype, differentiable in x, y and gate (dgate reduced
        deterministically); or x itself when ``inplace``.

    Raises:
        RuntimeError: ``inplace=True`` while grad mode is on and an input requires grad.
    """
    if inplace:
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad):
            raise RuntimeError(
                "inplace: gated_residual(inplace=True) is inference-only, but an input requires grad "
                "(use inplace=False, or run under torch.no_grad())"
            )
        if direct_launch_ok(x, y, gate):  # plain eager: the launcher without the custom op's dispatch
            if x.numel():
                _launch_fwd(x, y, gate, x, int(block_size))
            torch.autograd.graph.increment_version(x)  # what the mutating op's dispatch would do for x
        else:
            torch.ops.ard_kernels.gated_residual_inplace(x, y, gate, int(block_size))
        return x
    return differentiable_call(torch.ops.ard_kernels.gated_residual_fwd, gated_residual_fwd, _setup_context,
                               _backward, x, y, gate, int(block_size))


def aot_specs():
    """GPU configurations for ``python -m ard_kernels.aot_check``: DiT and text-to-image widths."""
    from ..aot_check import make_signature, row_divisible

    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for C in (1152, 2048, 100):
            block_m, block_c, num_warps = _tile(C, 256, torch.device("cuda"))
            for kind, kernel in (("fwd", _gated_residual_fwd_kernel), ("bwd", _gated_residual_bwd_kernel)):
                specs.append({
                    "name": f"gated_residual_{kind}_{dtype}_C{C}",
                    "kernel": kernel,
                    "signature": make_signature(kernel, dtype, {"DGATE_PART_ptr": "*fp32"}),
                    # unit column strides, compiled in as the JIT does at run time
                    "constexprs": {"BLOCK_M": block_m, "BLOCK_C": block_c,
                                   **({"PREFETCH": dtype != "fp32"} if kind == "bwd" else {}),
                                   **dict.fromkeys(("stride_x_c", "stride_y_c", "stride_g_c", "stride_o_c")
                                                   if kind == "fwd" else ("stride_do_c", "stride_y_c", "stride_g_c"),
                                                   1)},
                    "divisible": row_divisible(kernel) if C % 16 == 0 else (),  # C = 100: nothing is
                    "num_warps": num_warps,
                })
    return specs + pdl_twins(specs, ("gated_residual_fwd_bf16_C1152",))
