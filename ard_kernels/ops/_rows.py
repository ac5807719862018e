"""Row tiling shared by the per-(sample, block) row ops: modulated LayerNorm and gated residual.

Both ops read (B, N, C) token rows grouped in blocks of ``block_size`` tokens, each block with
one conditioning row per sample (``shift``/``scale``/``gate``: (B, nb, C), nb = ceil(N / block_size)):
``row[b, n]`` pairs with ``cond[b, n // block_size]``. A program only ever works on rows of one
block, so it loads its conditioning row once.

Programs are numbered with the unit inside a block fastest (a row tile in the forward, a row
group in the backward), then the block, then the sample, so neighbours in launch order stream
neighbouring rows. The backward reduces over a block's rows (``dshift = Σ_rows dy``...): each
program owns a fixed row group and writes its partial sum to its own slot, and the slots are
summed in a fixed order afterwards, so the gradients are bitwise reproducible (no atomics).
"""

import functools

import torch
import triton
import triton.language as tl

# Interpreter tiles: at most this many elements per tile, and 16 rows (each program costs ms there).
_INTERPRETER_ELEMS = 4096
_MAX_ROWS = 16


@triton.jit
def block_program(pid, per_block, num_blocks):
    """(sample b as int64, block, unit within the block) of program ``pid``."""
    unit = pid % per_block
    blk = (pid // per_block) % num_blocks
    b = (pid // per_block // num_blocks).to(tl.int64)
    return b, blk, unit


@triton.jit
def block_rows(blk, first, block_size, N, BLOCK_M: tl.constexpr):
    """Token indices (int64: B·N·C exceeds 2**31 at text-to-image sizes) of rows ``first`` to
    ``first + BLOCK_M`` of block ``blk``, and which of them exist (inside the block and below N)."""
    m = first + tl.arange(0, BLOCK_M)
    n = blk * block_size + m
    row_ok = (m < block_size) & (n < N)
    return n.to(tl.int64), row_ok


@triton.jit
def load_tile(ptr, b, n64, cols, stride_b, stride_n, stride_c, mask):
    """The (rows ``n64``, columns ``cols``) tile of sample ``b`` of a strided (B, N, C) tensor, as fp32."""
    return tl.load(ptr + b * stride_b + n64[:, None] * stride_n + cols[None, :] * stride_c,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_block_row(ptr, b, blk64, stride_b, stride_n, stride_c, cols, col_ok):
    """Conditioning row ``cond[b, blk, cols]`` of a strided (B, nb, C) tensor, as fp32."""
    return tl.load(ptr + b * stride_b + blk64 * stride_n + cols * stride_c, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def modulated_norm_tile(x, mask, SHIFT_ptr, SCALE_ptr, b, blk64, stride_sh_b, stride_sh_n, stride_sh_c,
                        stride_sc_b, stride_sc_n, stride_sc_c, cols, col_ok, C, eps):
    """``LN(x)·(1 + scale) + shift`` of an fp32 tile of whole rows (zero outside ``mask``), with the
    block's shift/scale rows loaded here: returns (y, per-row mean, per-row rstd)."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    shift = load_block_row(SHIFT_ptr, b, blk64, stride_sh_b, stride_sh_n, stride_sh_c, cols, col_ok)
    scale = load_block_row(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols, col_ok)
    return xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :], mean, rstd


@triton.jit
def modulated_norm_backward_tile(x, dy, MEAN_ptr, RSTD_ptr, b, N, n64, row_ok, mask, gain, C):
    """One tile of the backward of ``y = x̂·gain + shift``, x̂ = LayerNorm(x) from the saved per-row
    mean and rstd: returns (x̂, zero outside ``mask``, for the dscale sums; dx, LayerNorm's backward
    through x̂ of the upstream gradient dy·gain)."""
    mean = tl.load(MEAN_ptr + b * N + n64, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD_ptr + b * N + n64, mask=row_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g_xhat = dy * gain[None, :]
    c1 = tl.sum(g_xhat * xhat, axis=1) / C
    c2 = tl.sum(g_xhat, axis=1) / C
    return xhat, (g_xhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_target(device):
    """Programs that fill the device a few times over; 1 under the interpreter (each costs ms)."""
    if device.type != "cuda":
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def tile_rows(block_size, block_c, target_elems, max_rows=None):
    """BLOCK_M for BLOCK_C-wide tiles: about ``target_elems`` elements, at most ``max_rows`` rows,
    and no more than a block's rows rounded up to a power of two (a tile never straddles two blocks)."""
    rows = min(triton.next_power_of_2(block_size), max(1, target_elems // block_c))
    return rows if max_rows is None else min(rows, max_rows)


def interpreter_tile(C, block_size):
    """(BLOCK_M, BLOCK_C, num_warps) under the interpreter: the whole row and as many rows as
    possible, because its cost is per program, not per element."""
    block_c = triton.next_power_of_2(C)
    return tile_rows(block_size, block_c, _INTERPRETER_ELEMS, _MAX_ROWS), block_c, 4


def row_groups(block_size, block_m, pairs, device):
    """(groups, rows_per_group): split each block's rows into groups so that ``pairs`` (sample,
    block) pairs × groups fill the device; at least 8 rows per group so the fp32 partial sums
    (one C-row per group) stay small next to the rows themselves. rows_per_group is a multiple
    of block_m."""
    tiles = triton.cdiv(block_size, block_m)
    min_tiles = triton.cdiv(min(8, block_size), block_m)
    groups = max(1, min(triton.cdiv(tiles, min_tiles), triton.cdiv(programs_target(device), pairs)))
    rows_per_group = triton.cdiv(tiles, groups) * block_m
    return triton.cdiv(block_size, rows_per_group), rows_per_group


def row_tile(C, block_size, device, target_elems):
    """(BLOCK_M, BLOCK_C, num_warps) for a whole-row tile of width C.

    GPU: about ``target_elems`` elements per program (several rows for small C, at most 16) so
    each program has enough bytes in flight, and about 16 elements per thread (warps grow with
    the tile); a backward keeps more tiles live, so it asks for fewer.
    """
    if device.type != "cuda":
        return interpreter_tile(C, block_size)
    block_c = triton.next_power_of_2(C)
    block_m = tile_rows(block_size, block_c, target_elems, 16)
    elems = block_m * block_c
    num_warps = 4 if elems <= 2048 else (8 if elems <= 4096 else 16)
    return block_m, block_c, num_warps
