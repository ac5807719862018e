"""Row tiling shared by the per-(sample, block) row ops: modulated LayerNorm (alone and fused with
the gated residual) and gated residual.

Both ops read (B, N, C) token rows grouped in blocks of ``block_size`` tokens, each block with
one conditioning row per sample (``shift``/``scale``/``gate``: (B, nb, C), nb = ceil(N / block_size)):
``row[b, n]`` pairs with ``cond[b, n // block_size]``. A program only ever works on rows of one
block, so it loads its conditioning row once.

Programs are numbered with the unit inside a block fastest (a row tile in the forward, a row
group in the backward), then the block, then the sample, so neighbours in launch order stream
neighbouring rows. The backward reduces over a block's rows (``dshift = Σ_rows dy``...): each
program owns a fixed row group and writes its partial sum to its own slot, and the slots are
summed in a fixed order afterwards, so the gradients are bitwise reproducible (no atomics) for a
given tile; on the GPU the modulated LayerNorm kernels autotune theirs (:func:`autotuned_rows`), and
the chosen tile holds for the rest of the process.

The LayerNorm kernels hold whole rows, as two power-of-two column segments (:func:`row_split`):
1152 = 1024 + 128 fills every lane, where one power-of-two tile would pad it to 2048.
"""

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from .._backends import log_once
from . import cdiv, launch_autotuned, next_power_of_2, sm_count

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
def load_tile_raw(ptr, b, n64, cols, stride_b, stride_n, stride_c, mask):
    """The (rows ``n64``, columns ``cols``) tile of sample ``b`` of a strided (B, N, C) tensor, in its
    storage dtype (a prefetched tile waits in registers at half the size of its fp32 copy)."""
    return tl.load(ptr + b * stride_b + n64[:, None] * stride_n + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def load_tile(ptr, b, n64, cols, stride_b, stride_n, stride_c, mask):
    """The (rows ``n64``, columns ``cols``) tile of sample ``b`` of a strided (B, N, C) tensor, as fp32."""
    return load_tile_raw(ptr, b, n64, cols, stride_b, stride_n, stride_c, mask).to(tl.float32)


@triton.jit
def group_rows(blk, first, r, rows_per_group, block_size, N, BLOCK_M: tl.constexpr):
    """:func:`block_rows` of the tile at offset ``r`` of the row group starting at row ``first`` of block
    ``blk``: rows past the group's end count as absent (the prefetch after a group's last tile loads nothing)."""
    n64, row_ok = block_rows(blk, first + r, block_size, N, BLOCK_M)
    return n64, row_ok & (r + tl.arange(0, BLOCK_M) < rows_per_group)


@triton.jit
def load_block_row(ptr, b, blk64, stride_b, stride_n, stride_c, cols, col_ok):
    """Conditioning row ``cond[b, blk, cols]`` of a strided (B, nb, C) tensor, as fp32."""
    return tl.load(ptr + b * stride_b + blk64 * stride_n + cols * stride_c, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def row_columns(C, C0: tl.constexpr, C1P: tl.constexpr):
    """A whole row's columns as two power-of-two segments (:func:`row_split`): (cols0, cols1, which
    of cols1 exist). Segment 0 lies inside the row (C0 <= C); segment 1 holds the rest, masked."""
    cols0 = tl.arange(0, C0)
    cols1 = C0 + tl.arange(0, C1P)
    return cols0, cols1, cols1 < C


@triton.jit
def load_row_tile(ptr, b, n64, cols0, cols1, stride_b, stride_n, stride_c, mask0, mask1):
    """A tile of whole rows of a strided (B, N, C) tensor as its two column segments (fp32)."""
    return (load_tile(ptr, b, n64, cols0, stride_b, stride_n, stride_c, mask0),
            load_tile(ptr, b, n64, cols1, stride_b, stride_n, stride_c, mask1))


@triton.jit
def load_row_tile_raw(ptr, b, n64, cols0, cols1, stride_b, stride_n, stride_c, mask0, mask1):
    """:func:`load_row_tile` in the storage dtype."""
    return (load_tile_raw(ptr, b, n64, cols0, stride_b, stride_n, stride_c, mask0),
            load_tile_raw(ptr, b, n64, cols1, stride_b, stride_n, stride_c, mask1))


@triton.jit
def load_row_stats(MEAN_ptr, RSTD_ptr, b, N, n64, row_ok):
    """The saved per-row mean and rstd ((B, N) fp32) of rows ``n64``; zero for absent rows."""
    return (tl.load(MEAN_ptr + b * N + n64, mask=row_ok, other=0.0),
            tl.load(RSTD_ptr + b * N + n64, mask=row_ok, other=0.0))


@triton.jit
def store_row_tile(ptr, b, n64, cols0, cols1, stride_b, stride_n, stride_c, v0, v1, mask0, mask1):
    """Store the two column segments of a tile of whole rows, cast to ``ptr``'s dtype."""
    rows = ptr + b * stride_b + n64[:, None] * stride_n
    tl.store(rows + cols0[None, :] * stride_c, v0.to(ptr.dtype.element_ty), mask=mask0)
    tl.store(rows + cols1[None, :] * stride_c, v1.to(ptr.dtype.element_ty), mask=mask1)


@triton.jit
def load_block_row_pair(ptr, b, blk64, stride_b, stride_n, stride_c, cols0, cols1, col_ok1, C):
    """Conditioning row ``cond[b, blk]`` of a strided (B, nb, C) tensor as its two column segments (fp32)."""
    return (load_block_row(ptr, b, blk64, stride_b, stride_n, stride_c, cols0, cols0 < C),
            load_block_row(ptr, b, blk64, stride_b, stride_n, stride_c, cols1, col_ok1))


@triton.jit
def store_row_sums(ptr, part, cols0, cols1, col_ok1, acc0, acc1):
    """Store a program's per-column partial sums at ``ptr + part``: the column sums of its (rows, C)
    accumulator tiles ``acc0`` and ``acc1`` (the two segments of a whole row)."""
    tl.store(ptr + part + cols0, tl.sum(acc0, axis=0))
    tl.store(ptr + part + cols1, tl.sum(acc1, axis=0), mask=col_ok1)


@triton.jit
def modulated_norm_tile(x0, x1, mask1, shift0, shift1, scale0, scale1, C, eps):
    """``LN(x)·(1 + scale) + shift`` of an fp32 tile of whole rows given as its two column segments
    (x0, x1; zero outside the rows, x1 also past C, ``mask1``) and the block's shift/scale rows (fp32, two
    segments each: the kernels load them before the tile, so that their latency overlaps the tile's load
    instead of following the two row reductions): returns (y0, y1, per-row mean, per-row rstd)."""
    mean = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) / C
    xc0 = x0 - mean[:, None]  # rows outside the block are all zero, so are their mean and xc0
    xc1 = tl.where(mask1, x1 - mean[:, None], 0.0)
    rstd = tl.rsqrt((tl.sum(xc0 * xc0, axis=1) + tl.sum(xc1 * xc1, axis=1)) / C + eps)
    y0 = xc0 * rstd[:, None] * (1.0 + scale0[None, :]) + shift0[None, :]
    y1 = xc1 * rstd[:, None] * (1.0 + scale1[None, :]) + shift1[None, :]
    return y0, y1, mean, rstd


@triton.jit
def modulated_norm_backward_tile(x0, x1, dy0, dy1, mean, rstd, mask1, gain0, gain1, C):
    """One tile of the backward of ``y = x̂·gain + shift``, x̂ = LayerNorm(x) from the saved per-row
    ``mean`` and ``rstd`` (zero on absent rows), the fp32 row in two column segments (dy zero outside the
    tile): returns (x̂0, x̂1: zero outside the tile, for the dscale sums; dx0, dx1: LayerNorm's backward
    through x̂ of dy·gain, ``rstd·(dy·gain − x̂·c1 − c2)``; the per-row c1 and c2)."""
    xhat0 = (x0 - mean[:, None]) * rstd[:, None]  # zero on rows outside the block: x, mean, rstd all are
    xhat1 = tl.where(mask1, (x1 - mean[:, None]) * rstd[:, None], 0.0)
    g0 = dy0 * gain0[None, :]
    g1 = dy1 * gain1[None, :]
    c1 = (tl.sum(g0 * xhat0, axis=1) + tl.sum(g1 * xhat1, axis=1)) / C
    c2 = (tl.sum(g0, axis=1) + tl.sum(g1, axis=1)) / C
    dx0 = (g0 - xhat0 * c1[:, None] - c2[:, None]) * rstd[:, None]
    dx1 = (g1 - xhat1 * c1[:, None] - c2[:, None]) * rstd[:, None]
    return xhat0, xhat1, dx0, dx1, c1, c2


def programs_target(device):
    """Programs that fill the device a few times over; 1 under the interpreter (each costs ms)."""
    if device.type != "cuda":
        return 1
    return 4 * sm_count(device)


def tile_rows(block_size, block_c, target_elems, max_rows=None):
    """BLOCK_M for tiles BLOCK_C columns wide (any width): about ``target_elems`` elements, at most ``max_rows`` rows,
    and no more than a block's rows rounded up to a power of two (a tile never straddles two blocks)."""
    fit = max(1, target_elems // block_c)
    rows = min(next_power_of_2(block_size), 1 << (fit.bit_length() - 1))  # a power of two
    return rows if max_rows is None else min(rows, max_rows)


def interpreter_tile(C, block_size):
    """(BLOCK_M, BLOCK_C, num_warps) under the interpreter: the whole row and as many rows as
    possible, because its cost is per program, not per element."""
    block_c = next_power_of_2(C)
    return tile_rows(block_size, block_c, _INTERPRETER_ELEMS, _MAX_ROWS), block_c, 4


def row_groups(block_size, block_m, pairs, device, min_rows=8, programs=None):
    """(groups, rows_per_group): split each block's rows into groups so that ``pairs`` (sample,
    block) pairs × groups fill the device (``programs`` of them, default :func:`programs_target`);
    at least ``min_rows`` rows per group so the fp32 partial sums (one C-row per group) stay small
    next to the rows themselves. rows_per_group is a multiple of block_m."""
    tiles = cdiv(block_size, block_m)
    min_tiles = cdiv(min(min_rows, block_size), block_m)
    programs = programs_target(device) if programs is None else programs
    groups = max(1, min(cdiv(tiles, min_tiles), cdiv(programs, pairs)))
    rows_per_group = cdiv(tiles, groups) * block_m
    return cdiv(block_size, rows_per_group), rows_per_group


def row_split(C):
    """(C0, C1P): a whole row of C columns held as a power-of-two segment of C0 columns, the largest
    power of two <= C, and the rest, C - C0, in a C1P-wide one (the next power of two, at least 16;
    all masked when C is a power of two). DiT's widths split exactly (384 = 256 + 128, 768 = 512 +
    256, 1152 = 1024 + 128), where one power-of-two tile would pad 1152 to 2048: 44% of its lanes
    and registers idle, fewer rows in flight."""
    c0 = 1 << (int(C).bit_length() - 1)
    return c0, max(16, next_power_of_2(C - c0)) if C > c0 else 16


def row_tile(C, block_size, device, target_elems):
    """(BLOCK_M, C0, C1P, num_warps) for a whole-row tile of width C in two segments (:func:`row_split`).

    GPU: about ``target_elems`` elements per program (several rows for small C, at most 16) so
    each program has enough bytes in flight, and at most about 16 elements per thread (warps grow
    with the tile); a backward keeps more tiles live, so it asks for fewer. Interpreter: as many
    rows as :data:`_INTERPRETER_ELEMS` allows (its cost is per program, not per element).
    """
    return _row_tile(C, block_size, device.type == "cuda", target_elems)


# The launch plans below are pure functions of a few ints, asked at every launch: cached, since each launch's host
# time is what a small batch waits for (the first H100 run found batch 1 host-bound).
@functools.lru_cache(maxsize=1024)
def _row_tile(C, block_size, cuda: bool, target_elems):
    c0, c1p = row_split(C)
    width = c0 + c1p
    if not cuda:
        target_elems, max_rows = _INTERPRETER_ELEMS, _MAX_ROWS
    else:
        max_rows = 16
    block_m = tile_rows(block_size, width, target_elems, max_rows)
    if not cuda:
        return block_m, c0, c1p, 4
    elems = block_m * width
    num_warps = 4 if elems <= 2048 else (8 if elems <= 4096 else 16)
    return block_m, c0, c1p, num_warps


# Tiles autotuned on the GPU. The forwards (whole rows, one tile per program) are light, 30-50
# registers a thread at C = 1152; their heuristic tile (4 rows over 16 warps there) makes few programs
# at batch 1 (64 for 256 tokens on 132 SMs) and many at batch 64, so the launch also offers shorter
# tiles (more programs), each over the fewest warps that keep a thread's share of a tile at 16 values
# or less (8 for the fused forward, which keeps four tiles live), and the key holds the batch.
# The backwards keep their row group's per-column sums (dshift, dscale and, fused, dgate) in registers
# next to the row tiles. At C = 1152 with the heuristic tile (2 rows, 8 warps) that costs about 160
# (modulated LayerNorm) and 180 (fused with the gated residual) registers a thread on sm_90: one 8-warp
# program per SM, and the first H100 run measured those backwards at about half the bandwidth of the
# compiled reference. Half the rows over 16 warps need about 64 and 105 registers (two 16-warp programs
# per SM, or one; aot_check, triton 3.6 and 3.7), while the same rows over 16 warps hit the 128-register
# cap of a 512-thread program and spill at some widths.
# Which tile is fastest is the GPU's to say; the heuristic comes first and stays the only one with
# ARD_KERNELS_AUTOTUNE=0.
FORWARD_AUTOTUNE_KEY = ("B", "N", "C", "block_size")
BACKWARD_AUTOTUNE_KEY = ("N", "C", "block_size", "groups", "rows_per_group", "SUMS")


def forward_configs(block_m, num_warps, width, device, values_per_thread=16) -> tuple:
    """(BLOCK_M, num_warps) pairs a row forward autotunes over on the GPU: the heuristic tile first, then
    half its rows and one row, each over the fewest warps (4 to 16) that give a thread at most
    ``values_per_thread`` values of a tile ``width`` columns wide; the heuristic alone elsewhere (the
    interpreter). At most three: each is one more compile per width and dtype."""
    return _forward_configs(block_m, num_warps, width, device.type == "cuda", values_per_thread)


@functools.lru_cache(maxsize=1024)
def _forward_configs(block_m, num_warps, width, cuda: bool, values_per_thread) -> tuple:
    configs = [(block_m, num_warps)]
    for rows in ((block_m // 2, 1) if cuda else ()):
        if rows < 1:
            continue
        warps = 4
        while warps < 16 and rows * width > values_per_thread * 32 * warps:
            warps *= 2
        configs.append((rows, warps))
    return tuple(dict.fromkeys(configs))


# A prefetching backward holds a second set of row tiles: past this many values of a tile per thread
# (one row of 8192 over 16 warps holds 16) or with fp32 rows (twice the registers a value) it spills.
_PREFETCH_MAX_VALUES = 12


def prefetch_fits(block_m, num_warps, width, element_size) -> bool:
    """Whether a backward tile of ``block_m`` rows ``width`` columns wide over ``num_warps`` warps may also
    prefetch the next one (:func:`backward_configs`) without spilling."""
    return element_size < 4 and block_m * width <= _PREFETCH_MAX_VALUES * 32 * num_warps


def backward_configs(block_m, num_warps, device, prefetch=True) -> tuple:
    """(BLOCK_M, num_warps, PREFETCH) configs a row backward autotunes over on the GPU: the heuristic tile
    without and with prefetching the next tile (which costs registers: 119 and 126 a thread at C = 1152 in
    the modulated LayerNorm backward, sm_90), then half its rows over half its warps (at least 4) with
    prefetch when the tile has rows to halve: as many values per thread, twice the programs per SM (one
    row over half the warps would double a thread's values instead, and spills at C = 2048). The heuristic
    tile with prefetch alone elsewhere (the interpreter; tests run the other variant too). ``prefetch=False``
    (:func:`prefetch_fits` says no: fp32 rows, or wide rows over few threads): the heuristic tile alone."""
    if device.type != "cuda":
        return ((block_m, num_warps, True),)
    if not prefetch:
        return ((block_m, num_warps, False),)
    configs = [(block_m, num_warps, False), (block_m, num_warps, True)]
    if block_m > 1 and num_warps > 4:
        configs.append((block_m // 2, num_warps // 2, True))
    return tuple(configs)


def plan_backward_configs(block_m, num_warps, width, element_size, device, sums: bool) -> tuple:
    """:func:`backward_configs` of a row backward in the fused plan (``sums``: prefetching only where
    :func:`prefetch_fits`) or the split plan's dx pass (prefetching at any dtype: :func:`backward_tiling`)."""
    return backward_configs(block_m, num_warps, device,
                            prefetch=not sums or prefetch_fits(block_m, num_warps, width, element_size))


def backward_tiling(block_m, num_warps, width, element_size, pairs, block_size, device, sums: bool):
    """(configs, groups, rows_per_group) of a row backward's launch over ``pairs`` (sample, block) pairs.

    With ``sums`` (the fused plan) prefetching only where :func:`prefetch_fits`, and at least 8 rows per group
    (each writes a C-row of partials). Without (the split plan's dx pass) the kernel holds far fewer registers:
    it prefetches at any dtype (fp32 rows too: at most 179 registers and no spill from C = 768 to 8192 on
    sm_90, aot_check), and a group's only cost is its tail: many small groups, four tiles each, so that the
    prefetching configs overlap them. Row groups are sized for the tallest config's tiles."""
    configs = plan_backward_configs(block_m, num_warps, width, element_size, device, sums)
    bm = max(c[0] for c in configs)
    if sums:
        return (configs, *row_groups(block_size, bm, pairs, device))
    return (configs, *row_groups(block_size, bm, pairs, device, min_rows=4 * bm, programs=1 << 30))


def _config_meta(config, names=("PREFETCH",)) -> dict:
    """The meta-parameters of a (BLOCK_M, num_warps, *more) config: BLOCK_M, then ``names`` for the more
    (PREFETCH for the backwards, TILES for the modulated LayerNorm's forward)."""
    return {"BLOCK_M": config[0], **dict(zip(names, config[2:]))}


# Every autotuner autotuned_rows made, for row_choices.
_AUTOTUNERS: list = []


def row_choices() -> dict:
    """``{kernel: {autotuning key: "BLOCK_M=… w… [PREFETCH/TILES=…]"}}`` of the row kernels tuned so far in this
    process (what a benchmark's numbers ran on), and ``{"<op> backward plan": {key: "fused" or "split"}}`` of
    the row backwards timed so far (:func:`row_backward_plan`)."""
    out = {}
    for tuner in _AUTOTUNERS:
        name = getattr(getattr(tuner, "fn", tuner), "__name__", "kernel")
        for key, config in getattr(tuner, "cache", {}).items():
            meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            out.setdefault(name, {})[", ".join(map(str, key))] = f"{meta} w{config.num_warps}"
    for op, plans in row_backward_choices().items():
        out[f"{op} backward plan"] = plans
    return out


@functools.cache
def autotuned_rows(kernel, configs: tuple, key: tuple, restore: tuple = (), names: tuple = ("PREFETCH",)):
    """``kernel`` autotuned over ``configs`` ((BLOCK_M, num_warps) pairs, or (BLOCK_M, num_warps, *more), the
    more named by ``names``: :func:`_config_meta`) on the argument names ``key``.

    The autotuner runs each config several times: fine for kernels that only write their outputs (the
    backwards write every slot of their partial sums); a kernel that may write its input (the fused
    forward in place, OUT = X) names the output in ``restore``, which the autotuner saves before and
    puts back after timing each config. The chosen tile decides the order of the backwards' fp32 row
    sums: each config is deterministic, two configs may differ in the last bits.
    """
    if os.environ.get("ARD_KERNELS_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    tuner = triton.autotune(configs=[triton.Config(_config_meta(c, names), num_warps=c[1]) for c in configs],
                            key=list(key), restore_value=list(restore) or None, do_bench=_tuning_bench)(kernel)
    _AUTOTUNERS.append(tuner)
    return tuner


def _tuning_bench(kernel_call, quantiles):
    """The autotuner's timing of one config: 5 ms of warm-up and 25 of timed calls (its default, 25 and 100,
    would spend about half a second per key on kernels of microseconds, at every new shape)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def tile_grid(block_size, num_blocks, batch):
    """A forward's grid as a function of its tile: one program per row tile of every (sample, block)."""
    return lambda meta: (cdiv(block_size, meta["BLOCK_M"]) * num_blocks * batch,)


# The remainder segment of a row (:func:`row_split`: C1P columns past the C0 of the main one) as a tile narrower
# than the main tile gets another register layout, and Triton then converts the whole main tile into the
# remainder's layout and back through shared memory: in the compiled sm_90 code (triton 3.6, bf16, C = 1152)
# every row kernel's (BLOCK_M, 1024) tiles of x, and in the backwards of dy and dx too, make that round trip
# at every tile, with its barriers (the modulated LayerNorm forward 19-23 per tile, its split backward 21). A
# remainder as wide as the main segment (C1P = C0, masked past C) shares the main tile's layout: no tile
# conversion (forward 1 row over 4 warps: 19 → 11 barriers; split backward 21 → 15), at the cost of registers
# for masked lanes (forward 40 → 53-64, split backward 64 → 80; no spill at C = 1152, bf16 or fp32). Which wins
# is the GPU's to say: on it the autotuner weighs the padded remainder beside the exact one for the first
# _PADDED_REMAINDER_CONFIGS configs of a launch (the heuristic tile: the padded second forward tile spills a
# little under triton 3.7), for rows up to 2·_PADDED_REMAINDER_MAX_C0 columns (wider ones would double large
# tiles). ARD_KERNELS_ROW_REMAINDER: "auto" (that), "exact" or "padded" (everywhere, the
# interpreter too: how the tests run the padded kernels).
ROW_REMAINDERS = ("auto", "exact", "padded")
_ROW_REMAINDER = os.environ.get("ARD_KERNELS_ROW_REMAINDER", "auto")
_PADDED_REMAINDER_CONFIGS = 1
_PADDED_REMAINDER_MAX_C0 = 1024


def _padding_applies(c0: int, c1p: int) -> bool:
    """Whether a row split C0 + C1P may take the padded remainder: wider than 16 (a 16-wide remainder, a power-of-two
    row's dummy or a rest of at most 16 columns, is the tile Triton converts, the main one stays: C = 2048; padding
    it would only add masked lanes) and narrower than a main segment of at most _PADDED_REMAINDER_MAX_C0."""
    return 16 < c1p < c0 <= _PADDED_REMAINDER_MAX_C0


def remainder_configs(configs: tuple, names: tuple, c0: int, c1p: int, device) -> tuple:
    """``(configs, names)`` with each config's remainder width C1P appended (:data:`_ROW_REMAINDER`): the exact
    ``c1p``, and on the GPU padded copies (C1P = ``c0``) of the first configs where the row allows."""
    return _remainder_configs(configs, names, c0, c1p, device.type == "cuda", _ROW_REMAINDER)


@functools.lru_cache(maxsize=1024)
def _remainder_configs(configs: tuple, names: tuple, c0: int, c1p: int, cuda: bool, mode: str) -> tuple:
    if mode not in ROW_REMAINDERS:
        raise ValueError(f"ARD_KERNELS_ROW_REMAINDER: expected one of {ROW_REMAINDERS}, got {mode!r}")
    names = (*names[:len(configs[0]) - 2], "C1P")
    padded = _padding_applies(c0, c1p)
    if mode == "padded" and padded:
        return tuple((*c, c0) for c in configs), names
    out = [(*c, c1p) for c in configs]
    if mode == "auto" and padded and cuda:
        out += [(*c, c0) for c in configs[:_PADDED_REMAINDER_CONFIGS]]
    return tuple(out), names


def with_padded_remainder(specs: list, spec: dict, index: int, C: int, dtype: str) -> None:
    """Append ``spec`` to ``specs`` (an ``aot_check`` spec of a whole-row kernel: the ``index``-th tile of its launch),
    and for DiT-XL/2's width in bf16 and fp32 also its padded-remainder twin (``_padded``: C1P = C0) where the
    launch offers one (:func:`remainder_configs`)."""
    specs.append(spec)
    meta = spec["constexprs"]
    if (C == 1152 and dtype in ("bf16", "fp32") and index < _PADDED_REMAINDER_CONFIGS
            and _padding_applies(meta["C0"], meta["C1P"])):
        specs.append({**spec, "name": spec["name"] + "_padded", "constexprs": {**meta, "C1P": meta["C0"]}})


def launch_rows(kernel, grid, args, configs, device, key, restore=(), names=("PREFETCH",), **constexprs):
    """Launch a row kernel: on the GPU autotuned over ``configs`` (:func:`autotuned_rows`) when there is a
    choice; else with ``configs[0]`` (the interpreter's tile; num_warps is moot there). ``grid`` is a
    tuple, or a function of the config's meta-parameters (``{"BLOCK_M": ...}``); ``names``: those of a
    config's elements past num_warps (:func:`_config_meta`). A backward's row groups
    must be a multiple of every config's BLOCK_M (:func:`row_groups` with the largest). A whole-row kernel's
    remainder width ``C1P`` becomes part of its configs (:func:`remainder_configs`)."""
    if "C1P" in constexprs:
        c1p = constexprs.pop("C1P")
        configs, names = remainder_configs(tuple(configs), tuple(names), constexprs["C0"], c1p, device)
    if device.type == "cuda" and len(configs) > 1:
        launch_autotuned(autotuned_rows(kernel, configs, tuple(key), tuple(restore), tuple(names)), grid, args,
                         constexprs)
    else:
        meta = _config_meta(configs[0], names)
        kernel[grid(meta) if callable(grid) else grid](*args, num_warps=configs[0][1], **meta, **constexprs)


# ------------------------------------------------------------------------------------------------
# The split backward: the row kernels compute dx alone (SUMS=False: no per-column sums in registers),
# and the per-block column sums come from a column-parallel kernel that reads the rows once more.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _block_column_sums_kernel(
    A_ptr, X_ptr, MEAN_ptr, RSTD_ptr, SCALE_ptr, C1_ptr, C2_ptr, DOUT_ptr, Y_ptr,
    SUM_A_PART_ptr, SUM_AXHAT_PART_ptr, SUM_GY_PART_ptr,
    N, C, block_size, num_blocks, groups, rows_per_group,
    stride_a_b, stride_a_n, stride_a_c,
    stride_x_b, stride_x_n, stride_x_c,
    stride_sc_b, stride_sc_n, stride_sc_c,
    stride_do_b, stride_do_n, stride_do_c,
    stride_y_b, stride_y_n, stride_y_c,
    HAS_GY: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (sample, block, row group) × column chunk: Σ_rows a and Σ_rows a·x̂ (x̂ = (x − mean)·rstd) over the
    # group's rows, for BLOCK_C columns; with HAS_GY also Σ_rows g·y, g = dout + rstd·(a·(1 + scale) − x̂·c1 − c2)
    # (the gated residual's stream gradient, recomputed in fp32 from the row kernel's per-row c1 and c2 rather
    # than read back rounded from dx: as exact as the fused plan, and dout is read in dx's place). No row
    # reduction anywhere: each thread owns its columns, accumulates a (BLOCK_R, BLOCK_C) tile, and the rows are
    # summed once at the end, so a program holds a few dozen registers and many share an SM (the fused backwards
    # hold whole rows and their per-column sums: one or two programs per SM at C = 1152).
    b, blk, grp = block_program(tl.program_id(0), groups, num_blocks)
    blk64 = blk.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = grp * rows_per_group
    acc_a = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_axhat = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if HAS_GY:
        gain = 1.0 + load_block_row(SCALE_ptr, b, blk64, stride_sc_b, stride_sc_n, stride_sc_c, cols, col_ok)
    for r in range(0, rows_per_group, BLOCK_R):
        n64, row_ok = group_rows(blk, first, r, rows_per_group, block_size, N, BLOCK_R)
        mask = row_ok[:, None] & col_ok[None, :]
        a = load_tile(A_ptr, b, n64, cols, stride_a_b, stride_a_n, stride_a_c, mask)
        x = load_tile(X_ptr, b, n64, cols, stride_x_b, stride_x_n, stride_x_c, mask)
        mean, rstd = load_row_stats(MEAN_ptr, RSTD_ptr, b, N, n64, row_ok)
        xhat = (x - mean[:, None]) * rstd[:, None]
        acc_a += a
        acc_axhat += a * xhat  # a is zero outside the tile
        if HAS_GY:
            c1, c2 = load_row_stats(C1_ptr, C2_ptr, b, N, n64, row_ok)
            g = (a * gain[None, :] - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DOUT:
                g += load_tile(DOUT_ptr, b, n64, cols, stride_do_b, stride_do_n, stride_do_c, mask)
            acc_gy += g * load_tile(Y_ptr, b, n64, cols, stride_y_b, stride_y_n, stride_y_c, mask)
    # Each sum in its pointer's dtype: fp32 partials, or with one group per block the final sums themselves.
    part = ((b * num_blocks + blk64) * groups + grp) * C + cols
    tl.store(SUM_A_PART_ptr + part, tl.sum(acc_a, axis=0).to(SUM_A_PART_ptr.dtype.element_ty), mask=col_ok)
    tl.store(SUM_AXHAT_PART_ptr + part, tl.sum(acc_axhat, axis=0).to(SUM_AXHAT_PART_ptr.dtype.element_ty),
             mask=col_ok)
    if HAS_GY:
        tl.store(SUM_GY_PART_ptr + part, tl.sum(acc_gy, axis=0).to(SUM_GY_PART_ptr.dtype.element_ty), mask=col_ok)


# (BLOCK_R, BLOCK_C, num_warps) of the column sums on the GPU: 8 or 16 values of a tile per thread over 8 warps.
# Registers at bf16, sm_90 (aot_check, triton 3.6 and 3.7), plain / gated: 60 / 79, 76 / 135, 48 / 79; no
# spills, fp32 included (4 warps: the gated 16×128 spilled under 3.6). The first is the only one with
# ARD_KERNELS_AUTOTUNE=0.
_COLUMN_SUM_CONFIGS = ((16, 128, 8), (32, 128, 8), (8, 256, 8))
# Under the interpreter: few programs, few loop steps (each costs ms there).
_COLUMN_SUM_INTERPRETER = (16, 128, 4)
COLUMN_SUM_AUTOTUNE_KEY = ("N", "C", "block_size", "groups", "rows_per_group", "HAS_GY", "HAS_DOUT")
# Rows per group of the column sums: each group writes one fp32 C-row of partial sums per sum.
_COLUMN_SUM_MIN_ROWS = 32


@functools.cache
def _column_sums_tuner():
    configs = _COLUMN_SUM_CONFIGS[:1] if os.environ.get("ARD_KERNELS_AUTOTUNE", "1") == "0" else _COLUMN_SUM_CONFIGS
    tuner = triton.autotune(
        configs=[triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w) for r, c, w in configs],
        key=list(COLUMN_SUM_AUTOTUNE_KEY), do_bench=_tuning_bench)(_block_column_sums_kernel)
    _AUTOTUNERS.append(tuner)
    return tuner


def block_column_sums(a, x, mean, rstd, block_size, num_blocks, gated=None, out_dtypes=None):
    """Per-(sample, block) column sums over a block's rows: ``(Σ a, Σ a·x̂[, Σ g·y])``, each (B, nb, C), with
    ``x̂ = (x − mean)·rstd`` from the saved per-row statistics, accumulated in fp32.

    a, x: (B, N, C), any strides; mean, rstd: (B, N) fp32 contiguous. ``gated`` = (scale, c1, c2, dout, y) adds
    Σ g·y, ``g = dout + rstd·(a·(1 + scale) − x̂·c1 − c2)`` (the gated residual's stream gradient; scale
    (B, nb, C), c1 and c2 (B, N) fp32 contiguous, dout (B, N, C) or None, y (B, N, C)). Each program sums a
    fixed row group, the groups are summed in a fixed order afterwards: deterministic for a given tile (the
    GPU autotunes it once per shape, as the other row kernels). ``out_dtypes``: the sums' dtypes (default fp32);
    where one group spans a block (enough (sample, block, chunk) programs without splitting: training's
    B16 × 4 blocks at C 1152) the kernel stores them in those dtypes itself, no summing or casting launch after.
    """
    B, N, C = a.shape
    cuda = a.device.type == "cuda"
    count = 2 if gated is None else 3
    out_dtypes = tuple(out_dtypes or (torch.float32,) * count)
    # Row groups sized for the narrowest chunk (the most programs of any config).
    chunks = cdiv(C, min(c for _, c, _ in _COLUMN_SUM_CONFIGS) if cuda else _COLUMN_SUM_INTERPRETER[1])
    groups, rows_per_group = row_groups(block_size, 1, B * num_blocks * chunks, a.device,
                                        min_rows=_COLUMN_SUM_MIN_ROWS)
    # Separate tensors: results that were views of one tensor would alias (custom ops forbid it).
    parts = [torch.empty((B, num_blocks, C) if groups == 1 else (B, num_blocks, groups, C),
                         dtype=dtype if groups == 1 else torch.float32, device=a.device) for dtype in out_dtypes]
    scale, c1, c2, dout, y = gated if gated is not None else (a, mean, rstd, None, a)  # unread without HAS_GY
    dout_arg = a if dout is None else dout  # unread without HAS_DOUT
    args = (a, x, mean, rstd, scale, c1, c2, dout_arg, y, parts[0], parts[1], parts[-1],
            N, C, block_size, num_blocks, groups, rows_per_group,
            *a.stride(), *x.stride(),
            *scale.stride(), *dout_arg.stride(), *y.stride())
    flags = {"HAS_GY": gated is not None, "HAS_DOUT": dout is not None}
    pairs = groups * num_blocks * B
    if cuda:
        launch_autotuned(_column_sums_tuner(), lambda meta: (pairs, cdiv(C, meta["BLOCK_C"])), args, flags)
    else:
        r, c, w = _COLUMN_SUM_INTERPRETER
        _block_column_sums_kernel[(pairs, cdiv(C, c))](*args, **flags, BLOCK_R=r, BLOCK_C=c, num_warps=w)
    if groups == 1:
        return tuple(parts)
    return tuple(p.sum(dim=2).to(dtype) for p, dtype in zip(parts, out_dtypes))


# How a row backward that also reduces per-block column sums runs: "fused" (one pass: the row kernel keeps the
# sums in registers beside whole rows) or "split" (the row kernel computes dx alone, :func:`block_column_sums`
# reads the rows again for the sums). Fused moves fewer bytes; split keeps both kernels light (the first H100
# run measured the fused ones at 0.4-0.6 TB/s). On the GPU the first call of each shape times both and keeps
# the faster (never inside a CUDA-graph capture: there, fused); elsewhere fused. ARD_KERNELS_ROW_BWD=fused or
# split forces one everywhere.
ROW_BACKWARD_PLANS = ("fused", "split")
_ROW_BWD_CHOICES: dict = {}


def row_backward_plan(op: str, key: tuple, device, run, plan=None) -> str:
    """The plan (:data:`ROW_BACKWARD_PLANS`) of ``op``'s backward at ``key`` (its shape and dtypes) on
    ``device``; ``run(plan)`` runs the backward with that plan (the GPU's first call of a key times both).
    ``plan``: the caller's own choice, checked and returned as it is (None: choose)."""
    if plan is not None:
        if plan not in ROW_BACKWARD_PLANS:
            raise ValueError(f"plan: expected one of {ROW_BACKWARD_PLANS} or None, got {plan!r}")
        return plan
    forced = os.environ.get("ARD_KERNELS_ROW_BWD", "auto")
    if forced in ROW_BACKWARD_PLANS:
        return forced
    if forced != "auto":
        raise ValueError(f"ARD_KERNELS_ROW_BWD: expected one of auto, fused, split, got {forced!r}")
    if device.type != "cuda":
        return "fused"
    full_key = (op, *key, str(device))
    plan = _ROW_BWD_CHOICES.get(full_key)
    if plan is not None:
        return plan
    if torch.cuda.is_current_stream_capturing():
        log_once(f"row-bwd-capture-{full_key}", f"ard_kernels: {op} backward at {key} first seen inside a CUDA-graph "
                 "capture: the fused plan (run it once eagerly to time both)")
        return "fused"
    import triton.testing

    times = {}
    try:
        for candidate in ROW_BACKWARD_PLANS:
            run(candidate)  # compile and autotune its tiles first
            times[candidate] = triton.testing.do_bench(lambda c=candidate: run(c), warmup=5, rep=25)
    except torch.cuda.OutOfMemoryError:
        # do_bench's L2-flush buffer and the repeated outputs need memory a training step may not have left:
        # keep the fused plan (fewer bytes, no extra buffers) rather than fail the backward.
        log_once(f"row-bwd-oom-{full_key}", f"ard_kernels: {op} backward at {key}: out of memory while timing its "
                 "plans; the fused plan")
        _ROW_BWD_CHOICES[full_key] = "fused"
        return "fused"
    plan = _ROW_BWD_CHOICES[full_key] = min(times, key=times.get)
    log_once(f"row-bwd-{full_key}", f"ard_kernels: {op} backward at {key} runs {plan} "
             f"(us: {({c: round(t * 1e3, 1) for c, t in times.items()})})", logging.INFO)
    return plan


def row_backward_choices() -> dict:
    """``{op: {key: plan}}`` of the row backwards timed in this process (:func:`row_backward_plan`)."""
    out = {}
    for (op, *key), plan in _ROW_BWD_CHOICES.items():
        out.setdefault(op, {})[", ".join(map(str, key))] = plan
    return out


def column_sum_specs():
    """``aot_check`` specs of :func:`block_column_sums`' kernel: every tile it autotunes over, plain (the
    modulated LayerNorm's sums) and gated (the fused residual's, with dout), bf16 and fp32."""
    from ..aot_check import make_signature, row_divisible

    fp32 = {name: "*fp32" for name in ("MEAN_ptr", "RSTD_ptr", "C1_ptr", "C2_ptr", "SUM_A_PART_ptr",
                                       "SUM_AXHAT_PART_ptr", "SUM_GY_PART_ptr")}
    unit = ("stride_a_c", "stride_x_c", "stride_sc_c", "stride_do_c", "stride_y_c")
    specs = []
    for dtype in ("bf16", "fp32"):
        for gated in (False, True):
            for rows, cols, warps in _COLUMN_SUM_CONFIGS:
                specs.append({
                    "name": f"block_column_sums_{dtype}_{rows}x{cols}_w{warps}" + ("_gated" if gated else ""),
                    "kernel": _block_column_sums_kernel,
                    "signature": make_signature(_block_column_sums_kernel, dtype, fp32),
                    "constexprs": {"HAS_GY": gated, "HAS_DOUT": gated, "BLOCK_R": rows, "BLOCK_C": cols,
                                   **dict.fromkeys(unit, 1)},
                    "divisible": row_divisible(_block_column_sums_kernel),
                    "num_warps": warps,
                })
    return specs
