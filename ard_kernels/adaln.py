"""The adaLN path of an ARD layer with conditioning kept per (sample, block).

``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = Linear(SiLU(c))``, then

``x ← x + gate_msa·attn(LN(x)·(1 + scale_msa) + shift_msa)``,
``x ← x + gate_mlp·mlp(LN(x)·(1 + scale_mlp) + shift_mlp)``.

In ARD block k of K trajectory states has its own timestep, so the conditioning
``c = t_emb(t_k) + y_emb`` is one vector per (sample, block): c is (B, nb, C). The published
code repeats c for every token and runs the adaLN Linear(C, 6C) on all B·N token rows; here it
runs on the B·nb block rows (N/nb = 256× fewer rows for DiT-XL/2 at 4×256 tokens) and the
chunks feed :func:`ard_kernels.modulated_layer_norm` / :func:`ard_kernels.gated_residual` (and the
two fused, :func:`ard_kernels.gated_residual_modulated_layer_norm`, at the attention's residual),
which index them by ``n // block_size``: the token-wise time embedding costs nothing per token.

The ``*_per_token`` functions are the published formulation (conditioning repeated per token,
DiT's ``modulate``), kept as the oracle for the tests and the peer in the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import api

NORM_EPS = 1e-6


def adaln_modulation(c_blocks, linear, chunks=6, activated=False):
    """``Linear(SiLU(c))`` on the (B·nb, C) block rows, split into ``chunks`` tensors (B, nb, C').

    Args:
        c_blocks: (B, nb, C) conditioning, one row per (sample, block).
        linear: the modulation Linear (C → chunks·C'), e.g. DiT's ``adaLN_modulation[1]``;
            any callable on (…, C) works.
        chunks: how many vectors it produces (6 for a DiT block, 2 for the final layer).
        activated: c_blocks is SiLU(c) already (every layer reads the same c: the model takes
            one SiLU for all of their Linears instead of one per layer).

    Returns:
        tuple of ``chunks`` tensors (B, nb, C'), views into the one Linear output (last axis
        contiguous, row stride chunks·C'); the Triton kernels take these strides without a copy.
    """
    if c_blocks.dim() != 3:
        raise ValueError(f"c_blocks: expected (B, nb, C), got shape {tuple(c_blocks.shape)}")
    b, nb, c = c_blocks.shape
    rows = c_blocks.reshape(b * nb, c)
    out = linear(rows if activated else F.silu(rows))
    if out.shape[-1] % chunks:
        raise ValueError(f"linear: output width {out.shape[-1]} is not a multiple of chunks={chunks}")
    return out.reshape(b, nb, out.shape[-1]).chunk(chunks, dim=-1)


def repeat_per_token(c_blocks, n_tokens, block_size):
    """(B, nb, C) → (B, n_tokens, C): row n is c_blocks[:, n // block_size] (the published layout)."""
    idx = torch.div(torch.arange(n_tokens, device=c_blocks.device), block_size, rounding_mode="floor")
    return c_blocks[:, idx]


def adaln_modulation_per_token(c_blocks, linear, n_tokens, block_size, chunks=6):
    """The published formulation: c repeated per token, ``Linear(SiLU(c))`` on all B·N rows.

    Returns ``chunks`` tensors (B, n_tokens, C').
    """
    c_tok = repeat_per_token(c_blocks, n_tokens, block_size)
    return linear(F.silu(c_tok)).chunk(chunks, dim=-1)


def modulate_per_token(x, shift, scale, eps=NORM_EPS):
    """DiT's ``modulate(norm(x), shift, scale) = LN(x)·(1 + scale) + shift`` with (B, N, C) shift/scale.

    LayerNorm without affine in x's dtype, as ``nn.LayerNorm(C, elementwise_affine=False)``.
    """
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def adaln_layer(x, c_blocks, linear, attn, mlp, block_size, eps=NORM_EPS, backend="auto"):
    """One DiT/ARD layer's adaLN path with per-block conditioning (module docstring formula).

    Args:
        x: (B, N, C) tokens; c_blocks: (B, nb, C), nb = ceil(N / block_size).
        linear: the modulation Linear(C, 6C); attn, mlp: callables (B, N, C) → (B, N, C).
        backend: for :func:`ard_kernels.modulated_layer_norm` and :func:`ard_kernels.gated_residual`.

    Returns:
        (B, N, C) in x's dtype.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_modulation(c_blocks, linear, 6)
    h = api.modulated_layer_norm(x, shift_msa, scale_msa, block_size, eps=eps, backend=backend)
    # The attention's residual and the MLP's LayerNorm of its result: one fused pass.
    x, h = api.gated_residual_modulated_layer_norm(x, attn(h), gate_msa, shift_mlp, scale_mlp, block_size, eps=eps,
                                                   backend=backend)
    return api.gated_residual(x, mlp(h), gate_mlp, block_size, backend=backend)


def adaln_layer_per_token(x, c_blocks, linear, attn, mlp, block_size, eps=NORM_EPS):
    """The same layer as the published code computes it: per-token conditioning, eager ops."""
    n = x.shape[1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_modulation_per_token(
        c_blocks, linear, n, block_size, 6)
    x = x + gate_msa * attn(modulate_per_token(x, shift_msa, scale_msa, eps))
    return x + gate_mlp * mlp(modulate_per_token(x, shift_mlp, scale_mlp, eps))
