"""ARDiT, the ARD student: one DiT trunk over the K trajectory states, K output heads.

Training (:meth:`ARDiT.forward_train`) runs all K blocks of T tokens in one pass: block k holds
state ``s_k`` (``s_0 = x_T``) at time ``t_k = t_max·(1 − k/K)`` and conditioning
``c[b, k] = t_emb(t_k) + y_emb(y_b)`` (one vector per (sample, block)); the lower
``history_layers`` layers attend with the block pattern (M4 "causal" by default), the upper
layers within their block ("diagonal"); head k (``final_layer``, ``final_layer2``, …) reads
block k and predicts ``s_{k+1}`` (the last head predicts x_0).

Sampling (:meth:`ARDiT.forward_step`, driven by :mod:`ard_kernels.sampling`) runs block k's T
tokens only: the lower layers append their keys/values to a
:class:`ard_kernels.kv_cache.HistoryKVCache` and attend to the blocks their pattern row allows;
the upper layers attend within the block. The two paths compute the same function, which the
tests check for every pattern.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import api, masks
from ..adaln import NORM_EPS
from .configs import get_config
from .dit import DiT, FinalLayer, linear_input_dtype, run_blocks


def _history_kv(cache, layer: int, lo: int, hi: int, qkv):
    """Append ``qkv`` (B, n, 3·C)'s keys/values to history layer ``layer`` of ``cache``.

    Returns (q (B, H, n, D), a view of qkv: the attention reads it in place; keys, values (B, H, hi − lo, D)):
    the cached tokens [lo, hi) are the ones attended.
    """
    q, k_all, v_all = cache.append_qkv(layer, qkv)
    return q, k_all[:, :, lo:hi], v_all[:, :, lo:hi]


class ARDiT(DiT):
    """The ARD student: a DiT with K heads, block-wise time conditioning and history attention.

    Args:
        config: DiT size, as for :class:`DiT`.
        history_layers: N, the lower layers that attend across blocks (0 = step distillation).
        steps: K, the number of sampling steps = blocks = heads.
        pattern: block pattern of the lower layers: "causal" (M4, default), "diagonal" (M1),
            "window" (M2), "first" (M3) or a bool table (K, K).
        t_max: time of the first block; block k has ``t_max·(1 − k/K)``.
        **dit_kwargs: input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
            attn_backend, mod_backend (as for :class:`DiT`), and ``cache_backend`` for the KV cache.
    """

    def __init__(self, config="DiT-XL/2", history_layers: int = 6, steps: int = 4, pattern="causal",
                 t_max: float = 999, cache_backend: str = "auto", **dit_kwargs):
        cfg = get_config(config)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        if isinstance(history_layers, bool) or not isinstance(history_layers, int) or not (
            0 <= history_layers <= cfg.depth
        ):
            raise ValueError(f"history_layers: expected an int in [0, depth={cfg.depth}], got {history_layers!r}")
        # Validates name / shape / empty rows; always a CPU table (host data even when the model is
        # built under `with torch.device("meta"|"cuda")`), so the plans below need no device guard.
        table = masks.pattern_table(pattern, steps)
        super().__init__(cfg, **dit_kwargs)
        self.steps = steps
        self.history_layers = history_layers
        self.pattern = pattern if isinstance(pattern, str) else table
        self.pattern_table = table
        self._looks_ahead = bool(torch.triu(table, diagonal=1).any())  # checked at every sampling call
        self.t_max = float(t_max)
        self.cache_backend = cache_backend
        for k in range(2, steps + 1):
            head = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
            setattr(self, f"final_layer{k}", head)
        self._init_heads()
        self._plans = [self._attention_plan(k) for k in range(steps)] if history_layers else None
        self.set_backends()
        self._graph_samplers = {}

    # ----------------------------------------------------------------------------------------- heads
    @property
    def heads(self):
        """The K output heads, in step order: ``final_layer``, ``final_layer2``, …, ``final_layerK``."""
        return self._heads()

    def _heads(self):
        steps = getattr(self, "steps", 1)
        return [self.final_layer] + [getattr(self, f"final_layer{k}") for k in range(2, steps + 1)
                                     if hasattr(self, f"final_layer{k}")]

    @torch.no_grad()
    def _init_heads(self):
        for head in self._heads():
            for p in head.parameters():
                nn.init.zeros_(p)

    def set_backends(self, attn: str | None = None, mod: str | None = None, cache: str | None = None):
        """As :meth:`DiT.set_backends`, plus the backend of the history KV cache (``cache``)."""
        if cache is not None:
            self.cache_backend = cache
        if cache is not None or attn is not None or mod is not None:
            self._graph_samplers = {}  # captured graphs baked the old backends in
        return super().set_backends(attn, mod)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the parameters' storage: captured graphs would read the
        # old addresses, so drop them (and their memory pools) here.
        self._graph_samplers = {}
        return super()._apply(fn, *args, **kwargs)

    # -------------------------------------------------------------------------------- conditioning
    def block_times(self, device=None) -> torch.Tensor:
        """``t_k = t_max·(1 − k/K)``, k < K: (K,) fp32 (999, 749.25, 499.5, 249.75 for K = 4).

        Built by ``arange`` on ``device`` (no host-to-device copy, so it can run inside a CUDA graph).
        """
        k = torch.arange(self.steps, device=device, dtype=torch.float32)
        return self.t_max * (1 - k / self.steps)

    def condition(self, y, train: bool = False, force_drop_ids=None):
        """``c[b, k] = t_emb(t_k) + y_emb(y_b)``: (B, K, hidden), one row per (sample, block)."""
        t_emb = self.t_embedder(self.block_times(y.device))  # (K, hidden)
        y_emb = self.y_embedder(y, train, force_drop_ids)  # (B, hidden)
        return t_emb[None] + y_emb[:, None]

    def layer_pattern(self, layer: int):
        """The block pattern layer ``layer`` uses in training: ``pattern`` below N, "diagonal" above."""
        return self.pattern if layer < self.history_layers else "diagonal"

    # ------------------------------------------------------------------------------------ training
    def forward_train(self, states, y, force_drop_ids=None):
        """All K steps in one pass: ``pred[:, k] = head_k(trunk([s_0, …, s_{K−1}], c)[block k])``.

        Args:
            states: (B, K, C_in, H, W): ``states[:, 0] = x_T``, ``states[:, k]`` the state fed to step k.
            y: (B,) int64 labels (label dropout applies in training mode, as in DiT).
            force_drop_ids: optional (B,) ints, 1 = replace the label by the null class.

        Returns:
            (B, K, C_out, H, W): head k's prediction from block k.
        """
        b = states.shape[0]
        expected = (b, self.steps, self.in_channels, self.input_size, self.input_size)
        if states.dim() != 5 or tuple(states.shape) != expected:
            raise ValueError(f"states: expected shape (B, K, C, H, W) = {expected}, got {tuple(states.shape)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y: expected shape ({b},), got {tuple(y.shape)}")
        n = self.num_tokens
        # Every block gets the same position table: embed the B·K images, then lay blocks end to end.
        tokens = self.embed(states.reshape(b * self.steps, *expected[2:])).reshape(b, self.steps * n, -1)
        c = self.condition(y, self.training, force_drop_ids)
        if self._blocks_sharded():
            # FSDP gathers a block's parameters only inside its forward: no modulation ahead of it.
            for i, block in enumerate(self.blocks):
                tokens = block(tokens, c, n, self.layer_pattern(i))
            shift, scale = self._head_norm(F.silu(c))
            h = api.modulated_layer_norm(tokens, shift, scale, n, eps=NORM_EPS, out_dtype=linear_input_dtype(tokens),
                                         backend=self.heads[0].backend)
        else:
            # Block boundaries fused (run_blocks), the heads' LayerNorm (head k's modulation on block k) too.
            mods, silu_c = self.trunk_modulations(c)
            h = run_blocks(self.blocks, tokens, n, mods, self._head_norm(silu_c),
                           [{"pattern": self.layer_pattern(i)} for i in range(len(self.blocks))])
        return self.unpatchify(self._heads_on_blocks(h), (b, self.steps))

    def _head_norm(self, silu_c):
        """(shift, scale), (B, K, C) each: head k's LayerNorm modulation of block k, from SiLU(c) (B, K, C)."""
        return [torch.cat(parts, dim=1) for parts in
                zip(*(head.modulation(silu_c[:, k:k + 1], activated=True) for k, head in enumerate(self.heads)))]

    def _heads_on_blocks(self, h):
        """``head_k.linear(h[:, block k])`` for every k as one batched GEMM: h (B, K·T, C) → (B·K, T, p²·C_out).

        One baddbmm over the B·K blocks (each head's weight repeated over the batch: a few MB) instead of K
        Linears on strided slices of h, each of which would copy its slice and, in the backward, write a
        zero-filled gradient of h's full size.
        """
        b, n = h.shape[0], self.num_tokens
        weight = torch.stack([head.linear.weight for head in self.heads]).transpose(1, 2)  # (K, C, out)
        bias = torch.stack([head.linear.bias for head in self.heads])[:, None]  # (K, 1, out)
        k, c, width = weight.shape
        return torch.baddbmm(bias.expand(b, k, 1, width).reshape(b * k, 1, width), h.reshape(b * k, n, c),
                             weight.expand(b, k, c, width).reshape(b * k, c, width))

    def _blocks_sharded(self) -> bool:
        """Whether FSDP shards the blocks one by one (their parameters exist only inside their forward)."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # a torch without distributed support
            return False
        return any(isinstance(block, FSDPModule) for block in self.blocks)

    # ------------------------------------------------------------------------------------ sampling
    def check_sampling_pattern(self) -> None:
        """The cached sampler only sees earlier blocks: a lower-layer table may not look ahead."""
        if self.history_layers and self._looks_ahead:
            raise ValueError(
                "pattern: sampling needs a table with no entry above the diagonal (block i seeing a later "
                f"block j > i cannot be computed step by step), got\n{self.pattern_table.int()}"
            )

    def attention_plan(self, k: int):
        """``(lo, hi, block_size, pattern)`` of the history layers at step k (see :meth:`_attention_plan`)."""
        return self._plans[k]

    def _attention_plan(self, k: int):
        """How history layers attend at step k: ``(lo, hi, block_size, pattern)`` over the cached tokens.

        When the allowed key blocks of row k form one run ``[j0, j1]`` (causal, diagonal, window),
        the keys are the slice ``[j0·T, (j1+1)·T)`` and every query sees all of it: one block, no
        mask, the fast path of every backend. Otherwise (e.g. "first") the queries attend to the
        whole cache ``[0, (k+1)·T)`` under the table restricted to the first k+1 blocks; the
        queries are the last T tokens, exactly the rows of block k.
        """
        n = self.num_tokens
        row = self.pattern_table[k, : k + 1]
        allowed = row.nonzero().flatten().tolist()
        j0, j1 = allowed[0], allowed[-1]
        if j1 - j0 + 1 == len(allowed):
            return j0 * n, (j1 + 1) * n, (j1 + 1 - j0) * n, "causal"
        return 0, (k + 1) * n, n, self.pattern_table[: k + 1, : k + 1].clone()

    def step_modulations(self, c):
        """Every trunk layer's six modulation vectors for all K blocks, and SiLU(c): ``(mods, silu_c)``
        as :meth:`trunk_modulations` (mods a list of 6-tuples (B, K, C)).

        The conditioning of every step is known before the first one (it depends on t_k and y
        only), so the sampler runs each adaLN Linear once on K rows instead of K times on one
        row: the adaLN weights (a third of DiT-XL/2's) are read once per sample, not K times.
        """
        return self.trunk_modulations(c)

    def step_layer_kwargs(self, k: int, cache) -> list[dict]:
        """Each layer's attention arguments at step k: the lower layers append block k to ``cache`` and attend
        over the keys :meth:`attention_plan` allows, the upper ones within the block."""
        n = self.num_tokens
        lo, hi, bs, pat = self._plans[k] if self.history_layers else (0, n, n, "causal")
        return [
            {"pattern": pat, "kv": functools.partial(_history_kv, cache, i, lo, hi), "attn_block_size": bs}
            if i < self.history_layers else {"pattern": "diagonal"}
            for i in range(len(self.blocks))
        ]

    def forward_step(self, x, k: int, c, cache=None, mods=None):
        """Step k on block k alone: ``head_k(trunk(x))`` with history from ``cache``.

        Args:
            x: (B, C_in, H, W) the state fed to step k.
            k: step index, 0 <= k < K.
            c: (B, K, hidden) conditioning from :meth:`condition`.
            cache: a HistoryKVCache holding blocks 0..k−1 of the lower layers (None when
                ``history_layers == 0``); block k is appended and the cache advanced.
            mods: optional :meth:`step_modulations` of c (else computed here for block k); its
                SiLU(c) also feeds head k's modulation.

        Returns:
            (B, C_out, H, W).
        """
        n = self.num_tokens
        tokens = self.embed(x)
        ck = c[:, k:k + 1]
        layer_kwargs = self.step_layer_kwargs(k, cache)
        if mods is None:
            mods, silu_ck = self.trunk_modulations(ck)
        else:
            layers, silu_c = mods
            mods, silu_ck = [tuple(m[:, k:k + 1] for m in layer) for layer in layers], silu_c[:, k:k + 1]
        head = self.heads[k]
        h = run_blocks(self.blocks, tokens, n, mods, head.modulation(silu_ck, activated=True), layer_kwargs)
        if self.history_layers:
            cache.advance(n)
        return self.unpatchify(head.linear(h))

    def sample(self, noise, y, cfg_scale: float = 1.0, return_states: bool = False, use_cuda_graphs: bool = False,
               vae=None):
        """K-step ARD sampling; see :func:`ard_kernels.sampling.sample`."""
        from ..sampling import sample

        return sample(self, noise, y, cfg_scale=cfg_scale, return_states=return_states,
                      use_cuda_graphs=use_cuda_graphs, vae=vae)

    # ------------------------------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may store the position table of all K blocks (1, K·T, C); ours is (1, T, C)
        # repeated per block, so take the first block's rows.
        key = prefix + "pos_embed"
        pe = state_dict.get(key)
        n = self.num_tokens
        if args and isinstance(args[0], dict) and args[0].get("assign_to_params_buffers", False):
            self._graph_samplers = {}  # assign=True replaces the tensors the captured graphs read
        if pe is not None and pe.dim() == 3 and pe.shape[1] == self.steps * n and self.steps > 1:
            state_dict[key] = pe[:, :n]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_checkpoint(cls, state_dict_or_path, config=None, **kwargs) -> "ARDiT":
        """A student loaded strictly from an ARDiT checkpoint (ours, or the published layout).

        As :meth:`DiT.from_checkpoint`, and ``steps`` = K is read from the heads ``final_layer2..K``
        unless given; ``history_layers``, ``pattern`` and ``t_max`` are not in the weights (defaults
        6, "causal", 999: pass the ones the student was trained with).
        """
        from .convert import read_state_dict, student_steps

        sd = read_state_dict(state_dict_or_path)
        kwargs.setdefault("steps", student_steps(sd))
        return super().from_checkpoint(sd, config, **kwargs)

    @classmethod
    def from_dit(cls, state_dict_or_path, config=None, history_layers: int = 6, steps: int = 4, pattern="causal",
                 t_max: float = 999, **kwargs):
        """A student initialised from a teacher checkpoint, ``final_layer`` copied into every head.

        Args:
            state_dict_or_path: a DiT state dict, or a path to one (``.pt``/``.pth`` read with
                ``torch.load(weights_only=True)``, ``.safetensors``); {"ema": …}/{"model": …}
                training checkpoints are unwrapped (EMA first).
            config: DiT size; None infers it (and input_size, in_channels, num_classes, learn_sigma)
                from the tensor shapes.
        """
        from .convert import infer_dit_kwargs, read_state_dict

        sd = read_state_dict(state_dict_or_path)
        inferred = infer_dit_kwargs(sd)
        inferred_config = inferred.pop("config")
        inferred.update(kwargs)
        model = cls(inferred_config if config is None else config, history_layers=history_layers, steps=steps,
                    pattern=pattern, t_max=t_max, **inferred)
        sd = dict(sd)
        head_keys = [k for k in sd if k.startswith("final_layer.")]
        for k in range(2, steps + 1):
            for key in head_keys:
                sd.setdefault(f"final_layer{k}." + key[len("final_layer."):], sd[key].clone())
        model.load_state_dict(sd, strict=True)
        return model
