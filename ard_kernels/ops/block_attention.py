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

Where no tile straddles a block (ARD's 256-token blocks), the kernels are compiled without their masked
loop (``MASKED_TILES``), which frees registers and shared memory. On Hopper, some forward configs run the
full-tile loop one tile ahead (``OVERLAP``): the next tile's Q·Kᵀ is on the tensor cores while this
tile's exponentials run.

Schedules are cached per (pattern, Lq, Lk, block_size, tiles) and copied to the device once, so a
launch never reads device memory on the host (no syncs; capturable in a CUDA graph once warm).
The ops take the pattern as plain ints (``nb`` and ``rows``, the row bit masks of
:func:`ard_kernels.ops.block_schedule.encode_pattern`), not as a tensor: under ``torch.compile``
they are constants of the graph, so no CPU tensor lands in it (inductor would compile CPU code
for one, and CUDA-graph trees skip graphs holding CPU tensors).
The head dim is split into a power-of-two main part and a power-of-two remainder (72 = 64 + 8,
the 8 padded to a 16-wide masked tile) and every product runs as two dots accumulating into the
same tile, instead of padding 72 to 128.

Backward (FlashAttention-2 style): ``delta = rowsum(dO ∘ O) − dlse``; a dK/dV kernel iterates over
the query tiles that see each key tile, a dQ kernel over the key tiles each query tile sees.
Exposed as torch custom ops ``ard_kernels::block_attention_fwd`` / ``block_attention_bwd`` with
fake implementations and registered autograd, so ``torch.compile`` traces them without breaks
(a named pattern encodes to constants; a user table is read with ``tolist()``: a graph break).

The ``@triton.jit`` kernels are in :mod:`ard_kernels.ops.block_attention_kernels`; this module holds
the host side: tile configs, the Hopper TMA path, launchers, custom ops and :func:`aot_specs`.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Optional

import torch
import triton

from ..reference import split_qkv
from . import (
    _LAUNCH_MEMO,
    arrival_counters,
    block_schedule,
    cdiv,
    differentiable_call,
    forward_call,
    launch_device,
    next_power_of_2,
    sm_count,
)
from ._pdl import pdl_meta, pdl_twins
from .block_attention_kernels import (
    _block_attention_bwd_dkdv_kernel,
    _block_attention_bwd_dq_kernel,
    _block_attention_bwd_preprocess_kernel,
    _block_attention_fwd_kernel,
)

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Host: configurations, launchers (kernels in block_attention_kernels.py, schedules in block_schedule.py)
# ----------------------------------------------------------------------------------------------


def _split_head_dim(d: int):
    """``D = D0 + D1``: D0 the largest power of two <= D, D1 the rest, padded to DP1 (pow2, >= 16)."""
    d0 = 1 << (d.bit_length() - 1)
    d1 = d - d0
    dp1 = max(16, next_power_of_2(d1)) if d1 else 16
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
# Per head width (D0 + DP1): up to 96 (DiT's 72 = 64 + 16) the small tiles that let several programs
# share an SM once the masked loop is compiled out (ARD's 256-token blocks: block_schedule.has_masked_tiles;
# sm_90, triton 3.6: 64×64 by 4 warps 114 registers and 51 KB, four programs per SM; 128×64 by 4 warps, the
# tile of the pointer config the first H100 run chose, two; 2 stages, since 3 spill with the masked loop
# under triton 3.7), and a 3-stage 128×128 ring, which fits in registers;
# at 128 that ring needs 225 KiB of shared memory and spills, so a 3-stage 128×64 takes its place.
_TMA_CONFIGS = {96: ((128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3)),
                128: ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2))}
# TMA configs whose full-tile loop runs one key tile ahead (OVERLAP: the scores of the next tile on the tensor
# cores while this one's exponentials run, :func:`.block_attention_kernels._fwd_inner_overlapped`), for head
# dims with a remainder up to width 96 (DiT's 72). The second score tile costs registers (sm_90, triton 3.6,
# without the masked loop: 64×64 114 -> 134, still three programs per SM; 128×128 by 8 warps 162 -> 204, one
# as before), so they join the plain ones rather than replace them.
_TMA_OVERLAP_CONFIGS = {96: ((64, 64, 4, 3), (128, 128, 8, 3))}
# dQ configs whose full-tile loop runs one key tile ahead (S and dP of the next tile on the tensor cores while
# this one's exponentials and dS run: block_attention_kernels._dq_inner_overlapped), Hopper, half precision,
# head dims with a remainder up to width 96. Two score-sized tiles more in registers, so narrower key tiles
# (sm_90, triton 3.6, without the masked loop: 64×32 by 4 warps 166 registers and 58 KB, three programs per
# SM as the plain 64×64 at 156; 128×32 by 8 warps 136).
_DQ_OVERLAP_CONFIGS = ((64, 32, 4, 2), (128, 32, 8, 2))
# The same for dK/dV (Sᵀ and dPᵀ of the next query tile: _dkdv_inner_overlapped): 32×128 by 8 warps 218
# registers, one program per SM as the plain 32×128 at 181; 32×64 by 4 warps 227, two as the plain 64×64 at 239.
_DKDV_OVERLAP_CONFIGS = ((32, 128, 8, 2), (32, 64, 4, 2))
# Forward configs added where the grid is under one wave (GRID_KEY 0: B1's KV-cached step, 256 queries × 16 heads,
# makes 32 programs of 128 rows or 64 of 64 on 132 SMs): 32-row query tiles double the programs of the 64-row
# ones, each walking its key tiles on mma.sync (wgmma wants 64 rows a warpgroup). Two stages: three spill with the
# masked loop under triton 3.6 (sm_90, D72: 255 registers and 36 bytes; two: 202, or 186 without the masked
# loop). A separate autotuner from the full-grid one, so the larger grids neither compile nor time them.
_SMALL_GRID_CONFIGS = ((32, 64, 4, 2),)
# Split-KV forward configs for the same grids, (BLOCK_M, BLOCK_N, warps, stages, SPLITS): grid axis 1 splits each
# query tile's key list in SPLITS contiguous runs, each program carries one run, and the query tile's last program
# to finish merges the SPLITS partials (fp32, through a workspace in L2; block_attention_kernels._split_kv_finish):
# SPLITS times the programs and a key loop SPLITS times shorter, where the one-wave grid leaves most SMs idle and
# each program's loop of dependent loads and products is the latency (flash-decoding). B1's KV-cached step walks
# 4 to 16 key tiles of 64 per query tile. Per head width (D0 + DP1): the 64-row tile holds too much at 128 (sm_90,
# triton 3.6: 255 registers and 68 bytes of spill; 181 at DiT's 80; the 32-row ones 187 at 128).
# ARD_KERNELS_SPLIT_KV=0: not offered.
_SPLIT_KV_CONFIGS = {96: ((32, 64, 4, 2, 2), (32, 64, 4, 2, 4), (64, 64, 4, 2, 4)),
                     128: ((32, 64, 4, 2, 2), (32, 64, 4, 2, 4))}
# The interpreter costs ~ms per program and loop step whatever the tile: one small config.
_INTERPRETER_PAIRS = ((16, 16),)
# Tests set this to run the TMA path through the interpreter (which emulates descriptor loads).
_INTERPRETER_TMA = False
# Tests set this to run the overlapped full-tile loops (forward, dQ, dK/dV) through the interpreter.
_INTERPRETER_OVERLAP = False
# Tests set this to run the split-KV forward (that many splits) through the interpreter.
_INTERPRETER_SPLITS = 1
# GRID_KEY (an occupancy class, :func:`_occupancy_class`): a config tuned on a full grid (B64) is not the one
# a grid of fewer programs than SMs wants (B1's KV-cached step: 32 query tiles of 128 rows on 132 SMs), and the
# other keys ignore the batch and head count.
_AUTOTUNE_KEY = ["Lq", "Lk", "PAT_KEY", "GRID_KEY", "D0", "D1", "DOT_PREC"]
_OCCUPANCY_TILE = 128  # rows per program of the largest tile the configs use
_FWD_DESCS = ("desc_q0", "desc_q1", "desc_k0", "desc_k1", "desc_v0", "desc_v1")


def _occupancy_class(rows: int, bh: int, sms: int) -> int:
    """How a grid over ``rows`` rows (per batch·head, ``bh`` of them) fills ``sms`` SMs at 128-row tiles:
    0 under one wave (programs < SMs), 1 under four, 2 beyond."""
    programs = cdiv(rows, _OCCUPANCY_TILE) * bh
    return 0 if programs < sms else (1 if programs < 4 * sms else 2)


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


def _extra_configs(kind: str, width: int, remainder: bool, tma: bool, hopper_half: bool,
                   small_grid: bool = False) -> tuple:
    """The configs a launch adds to the pointer list, as (BLOCK_M, BLOCK_N, warps, stages, USE_TMA, OVERLAP[, SPLITS]):
    the forward's TMA ones where ``tma`` (:func:`_tma_configs`) and its :data:`_SMALL_GRID_CONFIGS` and
    :data:`_SPLIT_KV_CONFIGS` on a grid under one wave (``small_grid``, head width up to 128), the overlapped dQ
    and dK/dV ones on Hopper in half
    precision for head dims with a remainder up to width 96."""
    if kind == "fwd":
        split = (_SPLIT_KV_CONFIGS[_width_bucket(width)]
                 if os.environ.get("ARD_KERNELS_SPLIT_KV", "1") != "0" and width <= 128 else ())
        small = (tuple((*c, False, False) for c in _SMALL_GRID_CONFIGS)
                 + tuple((*c[:4], False, False, c[4]) for c in split)) if small_grid and width <= 128 else ()
        return (tuple((*c[:4], True, c[4]) for c in _tma_configs(width, remainder)) if tma else ()) + small
    if hopper_half and remainder and width <= 96:
        return tuple((*c, False, True) for c in {"dq": _DQ_OVERLAP_CONFIGS, "dkdv": _DKDV_OVERLAP_CONFIGS}[kind])
    return ()


def _width_bucket(width: int) -> int:
    """The head width (D0 + DP1, at most 128) a config list is tuned for: 96 (DiT's 80 and narrower) or 128."""
    return 96 if width <= 96 else 128


def _tma_configs(width: int, remainder: bool = False) -> tuple:
    """The forward's TMA configs, (BLOCK_M, BLOCK_N, warps, stages, OVERLAP), for head width ``width`` =
    D0 + DP1 (<= 128); with a ``remainder`` (D1 > 0) also the overlapped ones of that width."""
    bucket = _width_bucket(width)
    overlapped = _TMA_OVERLAP_CONFIGS.get(bucket, ()) if remainder else ()
    return tuple((*c, False) for c in _TMA_CONFIGS[bucket]) + tuple((*c, True) for c in overlapped)


@functools.cache
def _tuned(kind: str, wide: bool, fp32: bool, extra: tuple = ()):
    """The autotuned launcher of ``kind`` and its (BLOCK_M, BLOCK_N) slots, built on first use.

    ``extra``: configs appended to the pointer list (:func:`_extra_configs`). With TMA ones (forward only)
    every config gets the descriptor pre-hook, since the launch passes descriptors to all of them (the
    pointer configs ignore theirs).
    """
    kernel = {"fwd": _block_attention_fwd_kernel, "dkdv": _block_attention_bwd_dkdv_kernel,
              "dq": _block_attention_bwd_dq_kernel}[kind]
    # (BLOCK_M, BLOCK_N, warps, stages, USE_TMA, OVERLAP)
    configs = [(*c, False, False) for c in (_FP32_CONFIGS if fp32 else _CONFIGS)[(kind, wide)]] + list(extra)
    tma = any(c[4] for c in extra)
    if os.environ.get("ARD_KERNELS_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    pairs = tuple(dict.fromkeys(c[:2] for c in configs))
    tconfigs = []
    for bm, bn, w, st, use_tma, overlap, *splits in configs:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "SLOT": pairs.index((bm, bn))}
        if kind == "fwd":
            meta.update(USE_TMA=use_tma, OVERLAP=overlap, SPLITS=splits[0] if splits else 1)
        else:
            meta.update(OVERLAP=overlap)
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
    """Everything a launch needs that depends only on shapes, the pattern and the device.

    ``nb``, ``rows``: the pattern's int encoding (:func:`block_schedule.encode_pattern`).
    """

    def __init__(self, q, k, nb, rows, block_size, scale, kind, v=None):
        self.B, self.H, self.Lq, d = q.shape
        self.Lk = k.shape[2]
        self.nb = int(nb)
        if self.nb != -(-self.Lk // block_size):
            raise ValueError(f"nb: expected ceil(Lk / block_size) = {-(-self.Lk // block_size)} blocks, got {nb}")
        self.d0, self.d1, self.dp1 = _split_head_dim(d)
        self.width = self.d0 + (self.dp1 if self.d1 else 0)  # the tile columns the kernels hold per row
        self.dtype = q.dtype
        if q.device.type == "cpu" and not _interpreting():
            raise RuntimeError("q: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before import "
                               f"for CPU tensors; got device {q.device}")
        rows = tuple(rows)
        self.pat_key = block_schedule.pattern_key(rows, self.nb, block_size)
        self.interp = _interpreting()
        self.tma = v is not None and kind == "fwd" and _use_tma(q, k, v, self.width)
        rows_axis = self.Lk if kind == "dkdv" else self.Lq  # the dK/dV kernel's programs walk key tiles
        # Hopper in half precision (the overlapped dQ configs): the GPU's, never the interpreter's.
        self.hopper_half = (not self.interp and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
                            and _capability(q.device.index if q.device.index is not None
                                            else torch.cuda.current_device())[0] >= 9)
        self.grid_key = 0 if self.interp else _occupancy_class(rows_axis, self.B * self.H, sm_count(q.device))
        if self.interp:
            self.kernel = {"fwd": _block_attention_fwd_kernel, "dkdv": _block_attention_bwd_dkdv_kernel,
                           "dq": _block_attention_bwd_dq_kernel}[kind]
            pairs = _INTERPRETER_PAIRS
        else:
            self.extra = self.extra_configs()  # once per launch: the autotuner's configs and the split-KV buffers
            self.kernel, pairs = _tuned(kind, self.width > 128, q.dtype == torch.float32, self.extra)
        self.sched = block_schedule.schedule_on(rows, self.nb, self.Lq, self.Lk, block_size, pairs,
                                                str(q.device))
        self.masked_tiles = block_schedule.has_masked_tiles(rows, self.nb, self.Lq, self.Lk, block_size, pairs)
        self.block_size = block_size
        self.kind = kind
        self.scale = float(scale)
        self.dot_prec = "ieee" if (q.dtype == torch.float32 or self.interp) else "tf32"
        self.align = 1  # the launch sets it (:func:`_aligned_strides` of its tensors)
        # The forward under programmatic dependent launch (:mod:`._pdl`; the backwards run in training, launched
        # plainly): USE_PDL and Triton's launch_pdl option, or USE_PDL=False.
        self.pdl = pdl_meta(q.device) if kind == "fwd" else {}

    def scalars(self):
        return (self.H, self.Lq, self.Lk, self.block_size, self.nb, self.scale * _LOG2E)

    def constexprs(self):
        meta = dict(D0=self.d0, D1=self.d1, DP1=self.dp1, HAS_D1=self.d1 > 0, D1_MASK=self.dp1 != self.d1,
                    UPCAST=self.interp, DOT_PREC=self.dot_prec, SMALL_NB=self.nb <= block_schedule.SMALL_NB,
                    ALIGN=self.align, MASKED_TILES=self.masked_tiles, **self.pdl)
        if self.interp:
            (bm, bn), = _INTERPRETER_PAIRS
            meta.update(BLOCK_M=bm, BLOCK_N=bn, SLOT=0)
            if self.kind == "fwd":
                meta.update(USE_TMA=self.tma, OVERLAP=_INTERPRETER_OVERLAP, SPLITS=_INTERPRETER_SPLITS)
            else:
                meta.update(OVERLAP=_INTERPRETER_OVERLAP)
        return meta

    def split_kv_buffers(self, q, lse):
        """The forward's ``Ws, Cnt`` arguments: where this launch offers split-KV configs, an fp32 workspace for the
        largest split count and the arrival counters of the smallest query tile's grid
        (:func:`.block_attention_kernels._split_kv_finish`); else ``lse`` and the schedule, never read."""
        if self.interp:
            splits, tiles = _INTERPRETER_SPLITS, [_INTERPRETER_PAIRS[0][0]]
        else:
            split_configs = [c for c in self.extra if len(c) > 6 and c[6] > 1]
            splits = max((c[6] for c in split_configs), default=1)
            tiles = [c[0] for c in split_configs]
            chosen = _CHOSEN.get(self.memo_key(q)) if _LAUNCH_MEMO else None
            capturing = torch.cuda.is_current_stream_capturing()
            if chosen is not None and chosen.kwargs.get("SPLITS", 1) == 1 and not capturing:
                splits = 1  # the memo's config reads no workspace (a capture takes the autotuner: any config)
        if splits <= 1:
            return lse, self.sched
        rows = self.B * self.H * self.Lq
        ws = torch.empty(splits * rows * (self.d0 + self.dp1 + 2), device=q.device, dtype=torch.float32)
        counters = arrival_counters(q.device, cdiv(self.Lq, min(tiles)) * self.B * self.H)
        if counters is None:
            raise RuntimeError(f"block_attention: a forward of shape (B={self.B}, H={self.H}, Lq={self.Lq}, "
                               f"Lk={self.Lk}) first seen inside a CUDA-graph capture; run it once eagerly first "
                               "(its autotuning and arrival counters cannot be made in a capture)")
        return ws, counters

    def memo_key(self, q):
        """This launch's key in :data:`_CHOSEN` (the config its autotuned launch chose)."""
        return (self.kernel, self.Lq, self.Lk, self.pat_key, self.grid_key, self.d0, self.d1, self.dot_prec, self.align,
                q.dtype, self.tma, q.device)

    def extra_configs(self) -> tuple:
        """The configs this launch adds to the pointer list (:func:`_extra_configs`)."""
        # fp32 keeps its one exact config (its dots run on CUDA cores; the small-grid tiles spill kilobytes there).
        small_grid = self.grid_key == 0 and self.dtype != torch.float32
        return _extra_configs(self.kind, self.width, self.d1 > 0, self.tma, self.hopper_half, small_grid)

    def tma_configs(self) -> tuple:
        """The TMA configs this launch offers the autotuner (none without :attr:`tma`)."""
        return _tma_configs(self.width, self.d1 > 0) if self.tma else ()

    def fwd_descriptors(self, q, k, v, config=None):
        """The forward's six descriptor arguments: TMA descriptors when :attr:`tma`, else None. ``config``
        (the meta-parameters of one chosen config, :func:`_launch`): None for a pointer config, else
        descriptors with that config's block shapes; without it, the first TMA config's (the autotune
        pre-hook resets them per config)."""
        if not self.tma or (config is not None and not config["USE_TMA"]):
            return (None,) * len(_FWD_DESCS)
        if config is not None:
            bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        else:
            bm, bn = _INTERPRETER_PAIRS[0] if self.interp else self.tma_configs()[0][:2]
        return _fwd_descriptors(q, k, v, self.d0, self.dp1, self.d1 > 0, bm, bn)


# The config each autotuned launch chose, per (kernel, autotuning key, dtype, TMA offered): later eager calls
# launch the JIT function with it directly. That skips the autotuner's per-call work (dicts over ~50
# arguments, the key, the pre-hook) and, when a pointer config won, the TMA descriptors: Triton's launcher
# turns every descriptor argument into a CUtensorMap at every call, even for a kernel that ignores it. The
# small-batch rows of the first H100 run were host-bound (B1 forward 0.435 ms for ~20 µs of GPU work).
# Inside a CUDA-graph capture the autotuned path runs as before (the memo path's first call compiles a
# variant without descriptors, which a capture must not see). ARD_KERNELS_LAUNCH_MEMO=0: never.
_CHOSEN: dict = {}
# The config of the latest GPU launch of each kernel ("fwd", "dkdv", "dq"): benchmarks record what the
# autotuner chose (:func:`last_configs`).
_LAST_CONFIG: dict = {}


def _describe(config) -> str:
    """"BLOCK_MxBLOCK_N wW sS [tma] [overlap] [splitN]" of a tuned config."""
    kw = config.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps}s{config.num_stages}"
            + (" tma" if kw.get("USE_TMA") else "") + (" overlap" if kw.get("OVERLAP") else "")
            + (f" split{kw['SPLITS']}" if kw.get("SPLITS", 1) > 1 else ""))


def last_configs(clear: bool = False) -> dict:
    """``{kernel: "BLOCK_MxBLOCK_N wW sS [tma] [overlap]"}`` of the latest GPU launch of each attention kernel
    in this process (empty under the interpreter); ``clear`` forgets them afterwards."""
    described = {kind: _describe(config) for kind, config in _LAST_CONFIG.items()}
    if clear:
        _LAST_CONFIG.clear()
    return described


def chosen_configs() -> dict:
    """Every launch plan the autotuner settled in this process, ``{"<kernel> Lq Lk occupancy D dtype": config}``
    (the launch memo's entries: what a benchmark's numbers ran on)."""
    out = {}
    for (kernel, lq, lk, _, grid_key, d0, d1, _, _, dtype, tma, _), config in _CHOSEN.items():
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel").replace("_block_attention_", "")
        out[f"{name} Lq{lq} Lk{lk} occ{grid_key} D{d0 + d1} {str(dtype).replace('torch.', '')}"
            + (" tma-offered" if tma else "")] = _describe(config)
    return out


def _launch(L, grid, head, tail, q, descriptors=None):
    """Launch ``L.kernel`` on ``(*head, *descriptors, *tail)`` with ``L``'s constexprs; ``descriptors(config)``
    gives the forward's six TMA descriptor arguments for a config (None: the dK/dV and dQ kernels)."""
    meta = L.constexprs()
    if L.interp:
        L.kernel[grid](*head, *(descriptors(None) if descriptors else ()), *tail, **meta)
        return
    key = L.memo_key(q)
    config = _CHOSEN.get(key) if _LAUNCH_MEMO else None
    capturing = torch.cuda.is_current_stream_capturing()
    if config is None or capturing:
        L.kernel[grid](*head, *(descriptors(None) if descriptors else ()), *tail, **meta)
        chosen = getattr(L.kernel, "best_config", None)
        if chosen is not None:
            _LAST_CONFIG[L.kind] = chosen
        if _LAUNCH_MEMO and config is None and not capturing and chosen is not None:
            # The same launch once more by the memo path: it compiles its variant now (identical
            # outputs, written again), not inside a later call that may be timed or captured.
            _launch_chosen(L, grid, head, tail, meta, chosen, descriptors)
            _CHOSEN[key] = chosen
        return
    _LAST_CONFIG[L.kind] = config
    _launch_chosen(L, grid, head, tail, meta, config, descriptors)


def _launch_chosen(L, grid, head, tail, meta, config, descriptors):
    """``L.kernel``'s JIT function launched with ``config`` (a triton.Config the autotuner chose)."""
    kwargs = config.all_kwargs()
    descs = descriptors(kwargs) if descriptors else ()
    L.kernel.fn[grid](*head, *descs, *tail, **meta, **kwargs)


def _grid(rows: int, tile: str, bh: int):
    """Programs: the ``tile``-row tiles of ``rows`` rows per batch·head, by the forward's key splits (SPLITS)."""
    return lambda meta: (cdiv(rows, meta[tile]) * bh, meta.get("SPLITS", 1))


def _token_major_like(q):
    """An empty (B, H, Lq, D) tensor like q laid out (B, Lq, H, D) in memory: the attention projection's
    input ``O.transpose(1, 2).reshape(B, Lq, H·D)`` is then a view, not a copy of O."""
    B, H, Lq, D = q.shape
    return torch.empty_strided((B, H, Lq, D), (Lq * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


def _aligned_strides(*tensors):
    """(align, strides) of (B, H, L, D) ``tensors``: align 8 when every stride but the last (head-dim) one is a
    multiple of 8, else 1; then each tensor's (B, H, rows) strides divided by align (the kernels multiply back, so
    the compiler sees the multiple) and its head-dim stride, in one tuple."""
    all_strides = [t.stride() for t in tensors]
    a = 8 if all(st % 8 == 0 for sts in all_strides for st in sts[:-1]) else 1
    return a, tuple(x for sb, sh, sm, sd in all_strides for x in (sb // a, sh // a, sm // a, sd))


def block_attention_fwd(q, k, v, nb: int, rows, block_size: int, scale: float, out=None):
    """``O = softmax(Q·Kᵀ·scale + log M)·V`` and ``lse = log Σ exp(Q·Kᵀ·scale + log M)``.

    q: (B, H, Lq, D), k, v: (B, H, Lk, D), any strides, one float dtype; nb, rows: the pattern's int
    encoding (:func:`block_schedule.encode_pattern`), nb = ceil(Lk / block_size).
    Returns O (B, H, Lq, D) in q's dtype, token-major in memory (:func:`_token_major_like`) or written
    into ``out`` (any strides) when given, and lse (B, H, Lq) fp32.
    """
    L = _Launch(q, k, nb, rows, block_size, scale, "fwd", v)
    out = _token_major_like(q) if out is None else out
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    L.align, strides = _aligned_strides(q, k, v, out)
    with launch_device(q):
        ws, counters = L.split_kv_buffers(q, lse)
        _launch(L, _grid(L.Lq, "BLOCK_M", L.B * L.H), (q, k, v, out, lse, L.sched, ws, counters),
                (*strides, *L.scalars(), L.pat_key, L.grid_key), q,
                descriptors=lambda config: L.fwd_descriptors(q, k, v, config))
    return out, lse


def block_attention_bwd(do, q, k, v, out, lse, dlse, nb: int, rows, block_size: int, scale: float):
    """``dS = P∘(dO·Vᵀ − delta)``, ``delta = rowsum(dO∘O) − dlse``; returns dQ = scale·dS·K, dK = scale·dSᵀ·Q,
    dV = Pᵀ·dO, each shaped and typed like its input. ``dlse`` (B, H, Lq) fp32 may be None."""
    with launch_device(q):
        return _block_attention_bwd(do, q, k, v, out, lse, dlse, nb, rows, block_size, scale)


def _preprocess_tile(d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the backward's row pass: 4096 values of O and of dO per program, 32 per thread
    of its 4 warps (a fixed 64 rows spilled at D = 256), 16 rows under the interpreter (tiny grids)."""
    block_d = next_power_of_2(d)
    return (16 if _interpreting() else max(16, 4096 // block_d)), block_d


def _block_attention_bwd(do, q, k, v, out, lse, dlse, nb: int, rows, block_size: int, scale: float, grads=None):
    """The backward's three launches; ``grads``, when given, are the (dq, dk, dv) tensors to write (any strides)."""
    B, H, Lq, d = q.shape
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    pre_m, pre_d = _preprocess_tile(d)
    _block_attention_bwd_preprocess_kernel[(cdiv(Lq, pre_m) * B * H,)](
        out, do, dlse.contiguous() if dlse is not None else delta, delta, *out.stride(), *do.stride(), H, Lq, d,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_D=pre_d)
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if grads is None else grads

    a, strides = _aligned_strides(q, k, v, do, dq, dk, dv)
    st, st_dq, st_dkdv = strides[:16], strides[16:20], strides[20:]
    L = _Launch(q, k, nb, rows, block_size, scale, "dkdv")
    L.align = a
    _launch(L, _grid(L.Lk, "BLOCK_N", B * H), (q, k, v, do, lse, delta, dk, dv, L.sched),
            (*st, *st_dkdv, *L.scalars(), L.scale, L.pat_key, L.grid_key), q)
    L = _Launch(q, k, nb, rows, block_size, scale, "dq")
    L.align = a
    _launch(L, _grid(L.Lq, "BLOCK_M", B * H), (q, k, v, do, lse, delta, dq, L.sched),
            (*st, *st_dq, *L.scalars(), L.scale, L.pat_key, L.grid_key), q)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch custom ops
# ----------------------------------------------------------------------------------------------


# The pattern travels as ``int nb, int[] rows`` (block_schedule's int encoding), never as a tensor:
# dynamo specialises on them (a new pattern recompiles) and the graph holds no CPU tensor.
@torch.library.custom_op("ard_kernels::block_attention_fwd", mutates_args=())
def _block_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nb: int, rows: list[int],
                            block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return block_attention_fwd(q, k, v, nb, rows, block_size, scale)


@_block_attention_fwd_op.register_fake
def _(q, k, v, nb, rows, block_size, scale):
    return _token_major_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ard_kernels::block_attention_bwd", mutates_args=())
def _block_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],  # noqa: UP045
                            nb: int, rows: list[int],
                            block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block_attention_bwd(do, q, k, v, out, lse, dlse, nb, rows, block_size, scale)


@_block_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, nb, rows, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, nb, rows, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.nb, ctx.rows, ctx.block_size, ctx.scale = nb, rows, block_size, scale
    # An unused lse (the common case) arrives as None, not a materialised (B, H, Lq) zero tensor
    # that the backward would allocate and read: the kernels take dlse as optional.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = forward_call(torch.ops.ard_kernels.block_attention_bwd, block_attention_bwd, dout, q, k, v, out,
                              lse, dlse, ctx.nb, ctx.rows, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None


_block_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# Packed QKV: the qkv Linear's output (B, N, 3·H·D) in, the projection's input (B, N, H·D) out. q, k, v
# are strided views of qkv, O is written token-major and the backward writes dq, dk, dv into one
# (B, N, 3·H·D) gradient: nothing is copied on either side (the unpacked op's caller would permute O
# into the projection's input, and autograd would stack dq, dk, dv and permute them back into dqkv).
def _block_attention_qkv_fwd(qkv, num_heads: int, nb: int, rows, block_size: int, scale: float):
    """The packed forward: (O (B, N, H·D), lse (B, H, N))."""
    q, k, v = split_qkv(qkv, num_heads)
    b, h, n, d = q.shape
    out = qkv.new_empty((b, n, h * d))
    _, lse = block_attention_fwd(q, k, v, nb, rows, block_size, scale, out=out.view(b, n, h, d).transpose(1, 2))
    return out, lse


@torch.library.custom_op("ard_kernels::block_attention_qkv_fwd", mutates_args=())
def _block_attention_qkv_fwd_op(qkv: torch.Tensor, num_heads: int, nb: int, rows: list[int], block_size: int,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _block_attention_qkv_fwd(qkv, num_heads, nb, rows, block_size, scale)


@_block_attention_qkv_fwd_op.register_fake
def _(qkv, num_heads, nb, rows, block_size, scale):
    b, n, width = qkv.shape
    return qkv.new_empty((b, n, width // 3)), qkv.new_empty((b, num_heads, n), dtype=torch.float32)


@torch.library.custom_op("ard_kernels::block_attention_qkv_bwd", mutates_args=())
def _block_attention_qkv_bwd_op(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                num_heads: int, nb: int, rows: list[int], block_size: int,
                                scale: float) -> torch.Tensor:
    return _block_attention_qkv_bwd(do, qkv, out, lse, num_heads, nb, rows, block_size, scale)


def _block_attention_qkv_bwd(do, qkv, out, lse, num_heads: int, nb: int, rows, block_size: int, scale: float):
    """The packed backward: dqkv (B, N, 3·H·D), dq, dk, dv written into their thirds."""
    q, k, v = split_qkv(qkv, num_heads)
    b, h, n, d = q.shape
    dqkv = torch.empty((b, n, 3 * h * d), dtype=qkv.dtype, device=qkv.device)
    with launch_device(q):
        _block_attention_bwd(do.reshape(b, n, h, d).transpose(1, 2), q, k, v, out.view(b, n, h, d).transpose(1, 2),
                             lse, None, nb, rows, block_size, scale, grads=split_qkv(dqkv, num_heads))
    return dqkv


@_block_attention_qkv_bwd_op.register_fake
def _(do, qkv, out, lse, num_heads, nb, rows, block_size, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, nb, rows, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, nb, rows, block_size, scale)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # the lse's gradient arrives as None, not as a zero tensor filled per call


def _qkv_backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    if dout is None:  # O unused: a zero gradient
        return torch.zeros_like(qkv), None, None, None, None, None
    dqkv = forward_call(torch.ops.ard_kernels.block_attention_qkv_bwd, _block_attention_qkv_bwd, dout, qkv, out, lse,
                        *ctx.args)
    return dqkv, None, None, None, None, None


_block_attention_qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def block_attention_qkv_triton(qkv, num_heads: int, block_size: int, pattern, scale: float):
    """:func:`block_attention_triton` on a packed projection: qkv (B, N, 3·H·D) → O (B, N, H·D), no copies.

    Args (validated by :func:`ard_kernels.block_attention_qkv`): qkv laid out [q | k | v] × (H, D)
    along its last axis (DiT's qkv Linear); num_heads H; block_size, pattern, scale as for
    :func:`block_attention_triton` (queries = keys = the N tokens).

    Returns:
        O (B, N, H·D) contiguous in qkv's dtype, differentiable w.r.t. qkv (its gradient one tensor).
    """
    nb = -(-qkv.shape[1] // block_size)
    rows = block_schedule.encode_pattern(pattern, nb)
    return differentiable_call(torch.ops.ard_kernels.block_attention_qkv_fwd, _block_attention_qkv_fwd,
                               _qkv_setup_context, _qkv_backward, qkv, int(num_heads), nb, rows, int(block_size),
                               float(scale))[0]


def block_attention_triton(q, k, v, block_size: int, pattern, scale: float, return_lse: bool = False):
    """``O = softmax(Q·Kᵀ·scale + log M)·V``, M the block mask of ``pattern``: the Triton backend.

    Args (validated by :func:`ard_kernels.block_attention`):
        q: (B, H, Lq, D); k, v: (B, H, Lk, D), Lq <= Lk, same float dtype and device, any strides;
            D a multiple of 8 in [16, 256]. CPU tensors run under TRITON_INTERPRET=1.
        block_size: tokens per block; pattern: a name ("causal", "diagonal", "window", "first") or a
            validated bool table (nb, nb), nb = ceil(Lk / block_size). A name is encoded in plain
            Python (constants under ``torch.compile``); a table is read with ``tolist()`` (a graph break
            under ``torch.compile``: pass a name where one fits).
        scale: softmax scale; return_lse: also return the fp32 log-sum-exp.

    Returns:
        O (B, H, Lq, D) in q's dtype, laid out (B, Lq, H, D) in memory (so ``O.transpose(1, 2)
        .reshape(B, Lq, H·D)`` is a view), and with ``return_lse`` lse (B, H, Lq) fp32.
        Differentiable w.r.t. q, k, v (and through lse).
    """
    nb = -(-k.shape[2] // block_size)
    rows = block_schedule.encode_pattern(pattern, nb)
    out, lse = differentiable_call(torch.ops.ard_kernels.block_attention_fwd, block_attention_fwd, _setup_context,
                                   _backward, q, k, v, nb, rows, int(block_size), float(scale))
    return (out, lse) if return_lse else out


def aot_specs():
    """Every tuned GPU configuration, for ``python -m ard_kernels.aot_check``.

    Head dims 72 (DiT, split 64 + 16), 128 (text-to-image) and 256 (the widest), contiguous
    (unit head-dim stride, rows aligned), at the precision each config list is meant for. On sm_90
    the bf16/fp16 forward compiles as it launches there: with descriptor arguments for every config
    (the pointer configs ignore theirs) plus the TMA configs, named ``..._tma``. Every kernel compiles
    with its masked loop (any block size); DiT's bf16 kernels also without it, named ``..._fullonly``,
    as ARD's 256-token blocks launch them (:func:`block_schedule.has_masked_tiles`).
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
            pointers = {name: "*fp32" if name in ("Lse", "Delta", "Ws") else "*i32" if name in ("S", "Cnt")
                        else f"*{dtype}"
                        for name in ("Q", "K", "V", "Out", "dO", "dK", "dV", "dQ", "Lse", "Delta", "S", "Ws", "Cnt")}
            signature = make_signature(kernel, dtype, {n: t for n, t in pointers.items() if n in fn.arg_names},
                                       floats=("qk_scale", "scale"))
            unit = {name: 1 for name in fn.arg_names if name.startswith("stride_") and name.endswith("d")}
            tuned = [(*c, False, False) for c in (configs[(kind, wide)] if every else configs[(kind, wide)][:1])]
            # (archs, configs, descriptor arguments?): the launch passes descriptors to every forward
            # config where it offers the TMA ones, None elsewhere.
            tma = kind == "fwd" and dtype != "fp32" and not wide
            extra = (_extra_configs(kind, d0 + (dp1 if d1 else 0), d1 > 0, tma, dtype != "fp32",
                                    small_grid=dtype != "fp32")
                     if 90 in archs else ())
            # Ampere gets the small-grid forward configs (pointer loads, split-KV too) as the launch offers them there.
            ampere = [c for c in extra if not c[4] and not c[5]]
            groups = [((90,), tuned + list(extra), tma),
                      (tuple(a for a in archs if a != 90), tuned + ampere, False)] if extra else [(archs, tuned, False)]
            for group_archs, group, descs in groups:
                if not group_archs:
                    continue
                masked_variants = (True, False) if (d, dtype) == (72, "bf16") else (True,)
                for (bm, bn, warps, stages, use_tma, overlap, *splits), masked in itertools.product(group,
                                                                                                     masked_variants):
                    meta = dict(unit, D0=d0, D1=d1, DP1=dp1, HAS_D1=d1 > 0, D1_MASK=dp1 != d1, BLOCK_M=bm,
                                BLOCK_N=bn, SLOT=list(dict.fromkeys(c[:2] for c in group)).index((bm, bn)),
                                UPCAST=False, DOT_PREC="ieee" if dtype == "fp32" else "tf32", SMALL_NB=True,
                                ALIGN=8, MASKED_TILES=masked)
                    sig = dict(signature)
                    meta["OVERLAP"] = overlap
                    if kind == "fwd":
                        meta["USE_TMA"] = use_tma
                        meta["SPLITS"] = splits[0] if splits else 1
                        for name in _FWD_DESCS:
                            if descs and (d1 or name.endswith("0")):
                                rows = bm if name.startswith("desc_q") else bn
                                sig[name] = f"tensordesc<{dtype}[1, 1, {rows}, {d0 if name.endswith('0') else dp1}]>"
                            else:
                                meta[name] = None
                    specs.append({
                        "name": f"block_attention_{kind}_{dtype}_D{d}_{bm}x{bn}_w{warps}s{stages}"
                                + ("_tma" if use_tma else "") + ("_overlap" if overlap else "")
                                + (f"_split{splits[0]}" if splits else "") + ("" if masked else "_fullonly"),
                        "kernel": kernel,
                        "signature": sig,
                        "constexprs": meta,
                        "num_warps": warps,
                        "num_stages": stages,
                        "archs": group_archs,
                    })
        # the backward's row pass (delta = rowsum(dO∘O) − dlse), as _block_attention_bwd launches it
        pre_m, pre_d = _preprocess_tile(d)
        pointers = {"Out": f"*{dtype}", "dO": f"*{dtype}", "dLse": "*fp32", "Delta": "*fp32"}
        specs.append({
            "name": f"block_attention_bwd_preprocess_{dtype}_D{d}",
            "kernel": _block_attention_bwd_preprocess_kernel,
            "signature": make_signature(_block_attention_bwd_preprocess_kernel, dtype, pointers),
            "constexprs": dict(stride_od=1, stride_gd=1, HAS_DLSE=True, BLOCK_M=pre_m, BLOCK_D=pre_d),
            "num_warps": 4,
            "num_stages": 3,
            "archs": archs,
        })
    # the DiT forward (head dim 72, bf16, 256-token blocks) as the sampler launches it under PDL
    dit = tuple(s["name"] for s in specs
                if s["name"].startswith("block_attention_fwd_bf16_D72_") and s["name"].endswith("_fullonly"))
    return specs + pdl_twins(specs, dit)
