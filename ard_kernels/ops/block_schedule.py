"""Host-side tile schedules for the block-sparse attention kernels (numpy, built once per key).

A schedule tells each program of :mod:`ard_kernels.ops.block_attention` which tiles to visit, so
that tiles of disallowed blocks are never loaded. Query token ``r`` (the queries are the last Lq
of Lk tokens) sees key token ``c`` when ``table[(Lk - Lq + r) // block_size, c // block_size]``.
Each (query tile m, key tile n) pair of a (BLOCK_M, BLOCK_N) tiling is one of:

* **full**: every (valid row, key) pair in it is allowed, so the kernel skips the per-element
  mask; key tiles that overhang Lk are never full;
* **masked**: some pairs are allowed, not all (the tile straddles a block boundary or the
  sequence end); the kernel looks the table up per element;
* skipped: no pair is allowed.

Everything is packed into one int32 tensor ``S``, copied to the device once per (pattern, Lq, Lk,
block_size, tile sizes) and cached, so a launch never reads device memory on the host (no syncs;
capturable in a CUDA graph once warm)::

    S = [tab_off, fwd_0, bwd_0, fwd_1, bwd_1, ... | table | sections]

* ``tab_off`` (= ``S[0]``): where the table starts. With nb <= :data:`SMALL_NB` blocks the table is
  nb int32 row bit masks (bit j of row i: query block i sees key block j), else nb·nb int32 entries.
* ``fwd_s`` (= ``S[1 + 2s]``), one per autotune slot s, i.e. per (BLOCK_M, BLOCK_N) in ``pairs``:
  the offset of 2·num_m + 1 CSR pointers over query tiles. Query tile m's full key tiles are
  ``S[S[fwd_s + 2m] : S[fwd_s + 2m + 1]]`` and its masked ones ``S[S[fwd_s + 2m + 1] : S[fwd_s + 2m + 2]]``
  (the forward and dQ passes).
* ``bwd_s`` (= ``S[2 + 2s]``): the transpose, per key tile over the query tiles that see it (dK/dV).

All offsets are absolute indices into ``S``, so the kernels need only ``S`` and the slot.

The pattern reaches the custom ops, and this module's caches, as plain ints (:func:`encode_pattern`):
``nb`` and ``rows``, row i's allowed key blocks as a bit mask split into :data:`WORD_BITS`-bit words,
``rows[i·W + w]`` holding key blocks ``[w·WORD_BITS, (w + 1)·WORD_BITS)`` (bit b: block
``w·WORD_BITS + b``), ``W = ceil(nb / WORD_BITS)``. ``torch.compile`` sees constants (a new pattern
is a recompile), not a CPU tensor inside the graph; the table is rebuilt here, on the host.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Up to this many blocks a table row fits one int32 bit mask (the kernels' SMALL_NB path).
SMALL_NB = 32
# Bits per word of the int encoding: every word is a non-negative int64 well clear of the sign bit.
WORD_BITS = 62


def words_per_row(nb: int) -> int:
    """``W = ceil(nb / WORD_BITS)``: the words of one row in the int encoding."""
    return -(-nb // WORD_BITS)


def _named_row_mask(pattern: str, i: int) -> int:
    """Query block i's key blocks under a named pattern as one Python int bit mask (bit j: block j).

    Closed forms of :func:`ard_kernels.masks.block_visible` (tests check them against it), O(1) per
    row so that tracing stays cheap however many blocks there are.
    """
    if pattern == "causal":
        return (1 << (i + 1)) - 1
    if pattern == "diagonal":
        return 1 << i
    if pattern == "window":
        return (1 << i) | ((1 << (i - 1)) if i else 0)
    if pattern == "first":
        return (1 << i) | 1
    raise ValueError(f"pattern: expected one of ('causal', 'diagonal', 'window', 'first') or a bool table, "
                     f"got {pattern!r}")


def encode_pattern(pattern, nb: int) -> list:
    """The int encoding ``rows`` (module docstring) of a named pattern or a bool (nb, nb) table.

    A name is encoded in plain Python, so ``torch.compile`` folds it to constants. A table (tensor
    or numpy array, already validated) is read with ``.tolist()``, which under ``torch.compile``
    is a graph break for a tensor: user tables are data, and a schedule is built from them on the host.
    Returns a list of nb·W non-negative ints below ``2**WORD_BITS``.
    """
    if isinstance(pattern, str):
        # Every eager attention call encodes its pattern: a named one is encoded once per (name, nb) (traced
        # calls skip the memo, so that no dict of this module is guarded on).
        traced = torch.compiler.is_compiling()
        rows = None if traced else _NAMED_ROWS.get((pattern, nb))
        if rows is None:
            rows = _encode_masks([_named_row_mask(pattern, i) for i in range(nb)], nb)
            if not traced:
                _NAMED_ROWS[(pattern, nb)] = tuple(rows)
            return rows
        return list(rows)
    return _encode_masks([sum(1 << j for j, seen in enumerate(row) if seen) for row in pattern.tolist()], nb)


_NAMED_ROWS: dict = {}


def _encode_masks(masks: list, nb: int) -> list:
    """Row bit masks (bit j: key block j allowed) as ``words_per_row(nb)`` words of WORD_BITS bits each."""
    word = (1 << WORD_BITS) - 1
    return [(m >> (WORD_BITS * w)) & word for m in masks for w in range(words_per_row(nb))]


def decode_pattern(nb: int, rows) -> np.ndarray:
    """The bool (nb, nb) table of an int encoding (inverse of :func:`encode_pattern`)."""
    w = words_per_row(nb)
    if len(rows) != nb * w:
        raise ValueError(f"rows: expected {nb * w} words for {nb} blocks ({w} per row), got {len(rows)}")
    words = np.array(rows, dtype=np.int64).reshape(nb, w)
    j = np.arange(nb)
    table = (words[:, j // WORD_BITS] >> (j % WORD_BITS)) & 1
    return table.astype(np.bool_)


def classify_tiles(table: np.ndarray, lq: int, lk: int, block_size: int, block_m: int, block_n: int):
    """Per (query tile, key tile): ``full`` (every valid pair allowed) and ``masked`` (some, not all).

    Counts allowed pairs per tile pair as ``R·T·Cᵀ`` with ``R[m, i]`` the rows of query tile m in
    query block i and ``C[n, j]`` the keys of key tile n in key block j. A tile is full when the
    count equals (valid rows)·BLOCK_N, so key tiles that overhang Lk are never full; rows past Lq
    are not counted (their results are never stored, and they add zero to dK/dV).

    table: bool (nb, nb). Returns two bool arrays (num_m, num_n).
    """
    nb = table.shape[0]
    num_m, num_n = -(-lq // block_m), -(-lk // block_n)
    rows = np.arange(lq)
    r = np.zeros((num_m, nb))
    np.add.at(r, (rows // block_m, (lk - lq + rows) // block_size), 1.0)
    cols = np.arange(lk)
    c = np.zeros((num_n, nb))
    np.add.at(c, (cols // block_n, cols // block_size), 1.0)
    allowed = r @ table.astype(np.float64) @ c.T
    full = allowed == r.sum(axis=1, keepdims=True) * block_n
    return full, (allowed > 0) & ~full


def _csr(full: np.ndarray, masked: np.ndarray, base: int):
    """Per row: [start of full list, start of masked list, ..., end] (absolute offsets) and the indices."""
    ptr, idx = [], []
    for f_row, m_row in zip(full, masked):
        ptr.append(base + len(idx))
        idx.extend(np.flatnonzero(f_row).tolist())
        ptr.append(base + len(idx))
        idx.extend(np.flatnonzero(m_row).tolist())
    ptr.append(base + len(idx))
    return ptr, idx


def _packed_table(table: np.ndarray) -> list:
    """The table as the kernels read it: row bit masks up to SMALL_NB blocks, else nb·nb entries."""
    nb = table.shape[0]
    if nb <= SMALL_NB:
        # Row i as a bit mask of the key blocks it sees (bit 31 lands in the sign: the kernel's
        # arithmetic shift and `& 1` still read it right).
        weights = (np.int64(1) << np.arange(nb, dtype=np.int64))
        rows = (table.astype(np.int64) * weights).sum(axis=1)
        return [int(np.int32(np.uint32(r))) for r in rows]
    return table.astype(np.int32).ravel().tolist()


@functools.lru_cache(maxsize=256)
def schedule_host(rows: tuple, nb: int, lq: int, lk: int, block_size: int, pairs: tuple) -> torch.Tensor:
    """The packed schedule ``S`` (module docstring) on the CPU, for every (BLOCK_M, BLOCK_N) in ``pairs``.

    rows: the int encoding of the (nb, nb) table, as a tuple (hashable: the cache key). Returns a 1-D
    int32 tensor; one small tensor, so one host-to-device copy per key.
    """
    table = decode_pattern(nb, rows)
    header = [0] * (1 + 2 * len(pairs))
    header[0] = len(header)
    out = header + _packed_table(table)
    for slot, (bm, bn) in enumerate(pairs):
        full, masked = classify_tiles(table, lq, lk, block_size, bm, bn)
        for direction, (f, m) in enumerate(((full, masked), (full.T, masked.T))):
            num_rows = f.shape[0]
            ptr_at = len(out)
            ptr, idx = _csr(f, m, ptr_at + 2 * num_rows + 1)
            out[1 + 2 * slot + direction] = ptr_at
            out.extend(ptr)
            out.extend(idx)
    if len(out) >= 2**31:
        raise ValueError(f"rows: schedule too large for int32 offsets ({len(out)} entries)")
    return torch.tensor(out, dtype=torch.int32, device="cpu")  # host data, whatever default device is set


@functools.lru_cache(maxsize=256)
def has_masked_tiles(rows: tuple, nb: int, lq: int, lk: int, block_size: int, pairs: tuple) -> bool:
    """Whether any (BLOCK_M, BLOCK_N) tiling in ``pairs`` has a masked tile (one straddling a block boundary
    or the sequence end).

    The kernels compile their masked loop only where this is True (their ``MASKED_TILES``): with blocks a
    multiple of every tile and Lq, Lk multiples of the blocks, as in ARD's 256-token blocks, every tile is
    full or skipped, and a kernel without that loop holds fewer registers and less shared memory (DiT's
    head dim 72 on sm_90: 230 instead of 255 registers and a spill for the 128×64 forward tile, 114 instead
    of 160 for 64×64 by TMA: ``python -m ard_kernels.aot_check --filter fwd_bf16_D72``), so more programs
    share an SM. One flag for all of ``pairs`` because the autotuner picks the tiling after the launch.
    """
    table = decode_pattern(nb, rows)
    return any(classify_tiles(table, lq, lk, block_size, bm, bn)[1].any() for bm, bn in pairs)


# Never evicted: a captured CUDA graph reads a schedule by address, so freeing one (as an LRU bound
# would after enough other shapes) would let a later replay read reused memory. A schedule is a few
# KB and there is one per (pattern, shape, tile pair, device) a process has run.
@functools.cache
def schedule_on(rows: tuple, nb, lq, lk, block_size, pairs, device: str) -> torch.Tensor:
    """:func:`schedule_host` copied to ``device`` once and cached there (no host-to-device copy after warm-up)."""
    return schedule_host(rows, nb, lq, lk, block_size, pairs).to(device)


_PATTERN_KEYS: dict = {}


def pattern_key(rows: tuple, nb: int, block_size: int) -> int:
    """Small int naming a (pattern, block_size): an autotune key that ignores batch and head count."""
    return _PATTERN_KEYS.setdefault((rows, nb, block_size), len(_PATTERN_KEYS))
