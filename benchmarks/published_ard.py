"""The published ARD code's *formulation*, re-implemented from its description: the baseline stack.

Written from the facts in ARD.md (no code copied), with the original DiT parameter names so that it
loads the same state dict as :class:`ard_kernels.models.ARDiT` (``strict=True``). What makes it the
published formulation, and slower than ard_kernels:

- per-token conditioning: ``c_k = t_emb(t_k) + y_emb`` is repeated over the block's tokens and the
  adaLN ``Linear(C, 6C)`` runs on every token row (B·L rows instead of B·nb);
- attention through ``F.scaled_dot_product_attention`` with a *float additive* mask (0 / −inf), which
  rules out the flash kernels and materialises an (L, L) bias;
- at inference the history keys/values of the lower layers grow by ``torch.cat`` at every step
  (a fresh allocation and a copy of the whole history each time).

Semantics are those of ARD: K blocks of T tokens, block k at time ``t_k = t_max·(1 − k/K)``, the
lower ``history_layers`` layers block-causal (M4), the upper ones within the block (M1), K heads
``final_layer``, ``final_layer2`` … ``final_layerK``; the next block's input is the first C output
channels of the previous head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ard_kernels.flops import shape_from_config


def _sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos embedding (grid², dim): half the channels from each axis."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)


def _timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t·f_i), sin(t·f_i)]``, ``f_i = exp(−ln(max_period)·i/(dim/2))``: (len(t), dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class _PatchEmbed(nn.Module):
    def __init__(self, patch, in_ch, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(_timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: the null class

    def forward(self, y):
        return self.embedding_table(y)


class _Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, bias, cache=None):
        """x (B, L, C); bias: float (L, Lk) additive mask; cache: list [k, v] grown by torch.cat."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, hidden, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, hidden, heads, mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(hidden, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c_tok, bias, cache=None):
        """x, c_tok: (B, L, C) — the conditioning already repeated per token (the published way)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c_tok).chunk(6, dim=-1)
        x = x + g1 * self.attn(_modulate(self.norm1(x), sh1, sc1), bias, cache)
        return x + g2 * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class _FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c_tok):
        shift, scale = self.adaLN_modulation(c_tok).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class PublishedARD(nn.Module):
    """ARD student in the published code's formulation (per-token adaLN, float-mask SDPA, cat cache).

    Args:
        config: DiT config name ("DiT-XL/2", "DiT-tiny/2", …).
        history_layers: N lower layers with block-causal attention (0 = step distillation).
        steps: K.
    """

    def __init__(self, config="DiT-XL/2", history_layers=6, steps=4, input_size=32, in_channels=4,
                 num_classes=1000, learn_sigma=True, t_max=999.0):
        super().__init__()
        s = shape_from_config(config, input_size=input_size, learn_sigma=learn_sigma)
        if not 0 <= history_layers <= s.depth:
            raise ValueError(f"history_layers: expected 0 <= N <= {s.depth}, got {history_layers}")
        self.in_channels, self.out_channels = in_channels, s.out_channels
        self.patch, self.input_size, self.num_classes = s.patch, input_size, num_classes
        self.history_layers, self.steps, self.t_max = history_layers, steps, float(t_max)
        self.tokens = s.tokens
        self.x_embedder = _PatchEmbed(s.patch, in_channels, s.hidden)
        self.t_embedder = _TimestepEmbedder(s.hidden)
        self.y_embedder = _LabelEmbedder(num_classes, s.hidden)
        grid = input_size // s.patch
        # numpy builds on the host; follow a `with torch.device(...)` context like every other parameter
        pos = torch.from_numpy(_sincos_pos_embed(s.hidden, grid)).float().unsqueeze(0).to(torch.get_default_device())
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(_Block(s.hidden, s.heads, s.mlp_hidden) for _ in range(s.depth))
        for k in range(steps):
            name = "final_layer" if k == 0 else f"final_layer{k + 1}"
            setattr(self, name, _FinalLayer(s.hidden, s.patch, s.out_channels))

    def head(self, k: int) -> _FinalLayer:
        return getattr(self, "final_layer" if k == 0 else f"final_layer{k + 1}")

    def block_times(self, device=None) -> torch.Tensor:
        """``t_k = t_max·(1 − k/K)``: (K,) fp32."""
        k = torch.arange(self.steps, dtype=torch.float32, device=device)
        return self.t_max * (1 - k / self.steps)

    def _bias(self, nq_blocks, nk_blocks, causal, device):
        """Float additive mask (nq·T, nk·T): 0 where allowed, −inf elsewhere; queries = last nq blocks."""
        qb = torch.arange(nk_blocks - nq_blocks, nk_blocks, device=device).repeat_interleave(self.tokens)
        kb = torch.arange(nk_blocks, device=device).repeat_interleave(self.tokens)
        allowed = kb[None] <= qb[:, None] if causal else kb[None] == qb[:, None]
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))

    def _unpatchify(self, x):
        p, c, g = self.patch, self.out_channels, self.input_size // self.patch
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def _cond(self, t, y, n_tok):
        """(B, nb) times, (B,) labels -> per-token conditioning (B, nb·n_tok, C)."""
        b, nb = t.shape
        c = self.t_embedder(t.reshape(-1)).reshape(b, nb, -1) + self.y_embedder(y)[:, None]
        return c.repeat_interleave(n_tok, dim=1)

    def forward_train(self, states, y):
        """states (B, K, C, H, W), y (B,) -> the K predictions (B, K, out_channels, H, W)."""
        b, k = states.shape[:2]
        x = self.x_embedder(states.flatten(0, 1)) + self.pos_embed
        x = x.reshape(b, k * self.tokens, -1)
        c = self._cond(self.block_times(x.device).expand(b, k), y, self.tokens)
        lo, hi = self._bias(k, k, True, x.device), self._bias(k, k, False, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, lo if i < self.history_layers else hi)
        outs = [self.head(j)(x[:, j * self.tokens:(j + 1) * self.tokens], c[:, j * self.tokens:(j + 1) * self.tokens])
                for j in range(k)]
        return torch.stack([self._unpatchify(o) for o in outs], dim=1)

    @torch.no_grad()
    def sample(self, noise, y, cfg_scale=1.0, return_states=False):
        """K steps from ``noise`` (B, C, H, W): step k runs block k's tokens against a torch.cat cache.

        Returns the final state (B, C, H, W), and with ``return_states`` also every step's output
        (B, K, C, H, W).
        """
        b, ch = noise.shape[:2]
        if cfg_scale != 1.0:  # DiT's guidance: doubled batch, second half the null class
            noise = torch.cat([noise, noise])
            y = torch.cat([y, torch.full_like(y, self.num_classes)])
        caches = [[] for _ in range(self.history_layers)]
        times = self.block_times(noise.device)
        x_in, states = noise, []
        for k in range(self.steps):
            x = self.x_embedder(x_in) + self.pos_embed
            c = self._cond(times[k].expand(x.shape[0], 1), y, self.tokens)
            lo = self._bias(1, k + 1, True, x.device)
            hi = self._bias(1, 1, False, x.device)
            for i, blk in enumerate(self.blocks):
                hist = i < self.history_layers
                x = blk(x, c, lo if hist else hi, caches[i] if hist else None)
            out = self._unpatchify(self.head(k)(x, c))[:, :ch]
            if cfg_scale != 1.0:
                cond, uncond = out.chunk(2)
                out = torch.cat([uncond + cfg_scale * (cond - uncond)] * 2)
            x_in = out.to(noise.dtype)
            states.append(x_in[:b])
        return (x_in[:b], torch.stack(states, dim=1)) if return_states else x_in[:b]
