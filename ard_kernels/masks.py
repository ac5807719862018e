"""Block attention patterns of ARD: tables, dense token masks and FlexAttention mask_mods.

A sequence of ``Lk`` tokens is cut into ``nb = ceil(Lk / block_size)`` blocks (the last one may
be partial). A *pattern* says which key blocks each query block may attend to:

==========  ======  =========================================================================
name        paper   query block ``i`` sees key block ``j`` when
==========  ======  =========================================================================
causal      M4      ``j <= i``            (ARD's default: itself and every earlier state)
diagonal    M1      ``j == i``            (plain step distillation; ARD's upper layers)
window      M2      ``i - 1 <= j <= i``   (itself and the previous state)
first       M3      ``j == i or j == 0``  (itself and the x_T block)
==========  ======  =========================================================================

or a bool tensor ``(nb, nb)`` whose ``[i, j]`` entry says whether query block ``i`` may see
key block ``j``. Every query block must see at least one key block (an empty row would make
the softmax undefined), which the validation here enforces.

Queries are the *last* ``Lq`` tokens of the sequence (``Lq <= Lk``), so query token ``r``
lives in block ``(Lk - Lq + r) // block_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

PATTERNS = ("causal", "diagonal", "window", "first")
Pattern = Union[str, torch.Tensor]


def num_blocks(length: int, block_size: int) -> int:
    """``ceil(length / block_size)``: the number of (possibly partial) blocks of a sequence."""
    return -(-length // block_size)


def pattern_table(pattern: Pattern, nb: int) -> torch.Tensor:
    """Return the (nb, nb) bool table of ``pattern`` on the CPU.

    ``table[i, j]`` is True when query block ``i`` may attend to key block ``j``. A tensor
    pattern is validated (shape, dtype, no empty row) and returned as a CPU bool copy, so
    callers can build launch schedules from it without touching the GPU again.
    """
    if nb < 1:
        raise ValueError(f"nb: expected a positive number of blocks, got {nb}")
    if isinstance(pattern, str):
        # Built on the CPU even under a `with torch.device("meta"|"cuda")` context: schedules read it.
        i = torch.arange(nb, device="cpu").unsqueeze(1)
        j = torch.arange(nb, device="cpu").unsqueeze(0)
        if pattern == "causal":
            return j <= i
        if pattern == "diagonal":
            return j == i
        if pattern == "window":
            return (j <= i) & (j >= i - 1)
        if pattern == "first":
            return (j == i) | (j == 0)
        raise ValueError(f"pattern: expected one of {PATTERNS} or a bool tensor (nb, nb), got {pattern!r}")
    if not isinstance(pattern, torch.Tensor):
        raise TypeError(f"pattern: expected a str or a bool tensor, got {type(pattern).__name__}")
    if pattern.dtype != torch.bool:
        raise TypeError(f"pattern: expected a bool tensor, got dtype {pattern.dtype}")
    if tuple(pattern.shape) != (nb, nb):
        raise ValueError(f"pattern: expected a table of shape ({nb}, {nb}) for {nb} blocks, got {tuple(pattern.shape)}")
    if pattern.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # reading it on the host is a sync, which a capture cannot contain (CUDA's own error would not say why)
        raise ValueError("pattern: a table on the GPU is read on the host at every call, which a CUDA graph "
                         "capture cannot contain; pass the (nb, nb) bool table as a CPU tensor")
    table = pattern.detach().to("cpu", copy=True)
    empty = (~table.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"pattern: query block(s) {empty.tolist()} see no key block; every row of the table needs a True entry"
        )
    return table


def block_visible(pattern: Pattern, i: int, j: int) -> bool:
    """Whether query block ``i`` may see key block ``j``, in plain Python for named patterns.

    Host-side decisions (which fast path to take) use this rather than a table tensor, so that
    ``torch.compile`` sees Python booleans, not data-dependent tensor values.
    """
    if isinstance(pattern, str):
        if pattern == "causal":
            return j <= i
        if pattern == "diagonal":
            return j == i
        if pattern == "window":
            return i - 1 <= j <= i
        if pattern == "first":
            return j == i or j == 0
        raise ValueError(f"pattern: expected one of {PATTERNS} or a bool tensor (nb, nb), got {pattern!r}")
    return bool(pattern[i, j])


def query_block_ids(lq: int, lk: int, block_size: int, device=None) -> torch.Tensor:
    """Block index of each query token (the queries are the last ``lq`` of ``lk`` tokens)."""
    return torch.div(torch.arange(lk - lq, lk, device=device), block_size, rounding_mode="floor")


def key_block_ids(lk: int, block_size: int, device=None) -> torch.Tensor:
    """Block index of each key token."""
    return torch.div(torch.arange(lk, device=device), block_size, rounding_mode="floor")


def dense_mask(pattern: Pattern, lq: int, lk: int, block_size: int, device=None) -> torch.Tensor:
    """Token-level bool mask (lq, lk): True where query token r may attend to key token c.

    The shape that SDPA's ``attn_mask`` broadcasts over (B, H, lq, lk); the slow but obviously
    right way to express a block pattern, used by the references and the dense peers.
    """
    check_lengths(lq, lk, block_size)
    table = pattern_table(pattern, num_blocks(lk, block_size)).to(device)
    qb = query_block_ids(lq, lk, block_size, device)
    kb = key_block_ids(lk, block_size, device)
    return table[qb][:, kb]


def check_lengths(lq: int, lk: int, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    if lk < 1:
        raise ValueError(f"k: expected at least one key token, got Lk={lk}")
    if not 1 <= lq <= lk:
        raise ValueError(f"q: expected 1 <= Lq <= Lk (queries are the last Lq of the Lk tokens), got Lq={lq}, Lk={lk}")


def flex_mask_mod(pattern: Pattern, lq: int, lk: int, block_size: int, device=None) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``pattern``.

    Named patterns are closed-form (no captured tensor beyond the offset); a table pattern
    is looked up from a captured (nb, nb) tensor on ``device``.
    """
    check_lengths(lq, lk, block_size)
    nb = num_blocks(lk, block_size)
    offset = lk - lq
    if isinstance(pattern, str):
        pattern_table(pattern, nb)  # validates the name

        def blocks(q_idx, kv_idx):
            return (q_idx + offset) // block_size, kv_idx // block_size

        if pattern == "causal":
            def mask_mod(b, h, q_idx, kv_idx):
                qb, kb = blocks(q_idx, kv_idx)
                return kb <= qb
        elif pattern == "diagonal":
            def mask_mod(b, h, q_idx, kv_idx):
                qb, kb = blocks(q_idx, kv_idx)
                return kb == qb
        elif pattern == "window":
            def mask_mod(b, h, q_idx, kv_idx):
                qb, kb = blocks(q_idx, kv_idx)
                return (kb <= qb) & (kb >= qb - 1)
        else:  # first
            def mask_mod(b, h, q_idx, kv_idx):
                qb, kb = blocks(q_idx, kv_idx)
                return (kb == qb) | (kb == 0)
        return mask_mod

    table = pattern_table(pattern, nb).to(device)

    def table_mask_mod(b, h, q_idx, kv_idx):
        return table[(q_idx + offset) // block_size, kv_idx // block_size]

    return table_mask_mod


def allowed_block_pairs(pattern: Pattern, nb: int) -> int:
    """Number of allowed (query block, key block) pairs: what useful-FLOP counts multiply."""
    return int(pattern_table(pattern, nb).sum())
