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
import os

import triton
import triton.language as tl

from . import sm_count

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
    """Store a program's per-column partial sums (two segments) at ``ptr + part``."""
    tl.store(ptr + part + cols0, acc0)
    tl.store(ptr + part + cols1, acc1, mask=col_ok1)


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
    through x̂ of dy·gain)."""
    xhat0 = (x0 - mean[:, None]) * rstd[:, None]  # zero on rows outside the block: x, mean, rstd all are
    xhat1 = tl.where(mask1, (x1 - mean[:, None]) * rstd[:, None], 0.0)
    g0 = dy0 * gain0[None, :]
    g1 = dy1 * gain1[None, :]
    c1 = (tl.sum(g0 * xhat0, axis=1) + tl.sum(g1 * xhat1, axis=1)) / C
    c2 = (tl.sum(g0, axis=1) + tl.sum(g1, axis=1)) / C
    dx0 = (g0 - xhat0 * c1[:, None] - c2[:, None]) * rstd[:, None]
    dx1 = (g1 - xhat1 * c1[:, None] - c2[:, None]) * rstd[:, None]
    return xhat0, xhat1, dx0, dx1


def programs_target(device):
    """Programs that fill the device a few times over; 1 under the interpreter (each costs ms)."""
    if device.type != "cuda":
        return 1
    return 4 * sm_count(device)


def tile_rows(block_size, block_c, target_elems, max_rows=None):
    """BLOCK_M for tiles BLOCK_C columns wide (any width): about ``target_elems`` elements, at most ``max_rows`` rows,
    and no more than a block's rows rounded up to a power of two (a tile never straddles two blocks)."""
    fit = max(1, target_elems // block_c)
    rows = min(triton.next_power_of_2(block_size), 1 << (fit.bit_length() - 1))  # a power of two
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


def row_split(C):
    """(C0, C1P): a whole row of C columns held as a power-of-two segment of C0 columns, the largest
    power of two <= C, and the rest, C - C0, in a C1P-wide one (the next power of two, at least 16;
    all masked when C is a power of two). DiT's widths split exactly (384 = 256 + 128, 768 = 512 +
    256, 1152 = 1024 + 128), where one power-of-two tile would pad 1152 to 2048: 44% of its lanes
    and registers idle, fewer rows in flight."""
    c0 = 1 << (int(C).bit_length() - 1)
    return c0, max(16, triton.next_power_of_2(C - c0)) if C > c0 else 16


def row_tile(C, block_size, device, target_elems):
    """(BLOCK_M, C0, C1P, num_warps) for a whole-row tile of width C in two segments (:func:`row_split`).

    GPU: about ``target_elems`` elements per program (several rows for small C, at most 16) so
    each program has enough bytes in flight, and at most about 16 elements per thread (warps grow
    with the tile); a backward keeps more tiles live, so it asks for fewer. Interpreter: as many
    rows as :data:`_INTERPRETER_ELEMS` allows (its cost is per program, not per element).
    """
    c0, c1p = row_split(C)
    width = c0 + c1p
    if device.type != "cuda":
        target_elems, max_rows = _INTERPRETER_ELEMS, _MAX_ROWS
    else:
        max_rows = 16
    block_m = tile_rows(block_size, width, target_elems, max_rows)
    if device.type != "cuda":
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
BACKWARD_AUTOTUNE_KEY = ("N", "C", "block_size", "groups", "rows_per_group")


def forward_configs(block_m, num_warps, width, device, values_per_thread=16) -> tuple:
    """(BLOCK_M, num_warps) pairs a row forward autotunes over on the GPU: the heuristic tile first, then
    half its rows and one row, each over the fewest warps (4 to 16) that give a thread at most
    ``values_per_thread`` values of a tile ``width`` columns wide; the heuristic alone elsewhere (the
    interpreter). At most three: each is one more compile per width and dtype."""
    configs = [(block_m, num_warps)]
    for rows in ((block_m // 2, 1) if device.type == "cuda" else ()):
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


def _config_meta(config, names=("PREFETCH",)) -> dict:
    """The meta-parameters of a (BLOCK_M, num_warps, *more) config: BLOCK_M, then ``names`` for the more
    (PREFETCH for the backwards, TILES for the modulated LayerNorm's forward)."""
    return {"BLOCK_M": config[0], **dict(zip(names, config[2:]))}


# Every autotuner autotuned_rows made, for row_choices.
_AUTOTUNERS: list = []


def row_choices() -> dict:
    """``{kernel: {autotuning key: "BLOCK_M=… w… [PREFETCH/TILES=…]"}}`` of the row kernels tuned so far in this
    process (what a benchmark's numbers ran on)."""
    out = {}
    for tuner in _AUTOTUNERS:
        name = getattr(getattr(tuner, "fn", tuner), "__name__", "kernel")
        for key, config in getattr(tuner, "cache", {}).items():
            meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            out.setdefault(name, {})[", ".join(map(str, key))] = f"{meta} w{config.num_warps}"
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
    return lambda meta: (triton.cdiv(block_size, meta["BLOCK_M"]) * num_blocks * batch,)


def launch_rows(kernel, grid, args, configs, device, key, restore=(), names=("PREFETCH",), **constexprs):
    """Launch a row kernel: on the GPU autotuned over ``configs`` (:func:`autotuned_rows`) when there is a
    choice; else with ``configs[0]`` (the interpreter's tile; num_warps is moot there). ``grid`` is a
    tuple, or a function of the config's meta-parameters (``{"BLOCK_M": ...}``); ``names``: those of a
    config's elements past num_warps (:func:`_config_meta`). A backward's row groups
    must be a multiple of every config's BLOCK_M (:func:`row_groups` with the largest)."""
    if device.type == "cuda" and len(configs) > 1:
        autotuned_rows(kernel, configs, tuple(key), tuple(restore), tuple(names))[grid](*args, **constexprs)
    else:
        meta = _config_meta(configs[0], names)
        kernel[grid(meta) if callable(grid) else grid](*args, num_warps=configs[0][1], **meta, **constexprs)
