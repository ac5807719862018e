"""DiT, the teacher: ``x_{l+1} = x_l + g·f(LN(x_l)·(1 + s) + b)`` with (b, s, g) from adaLN-Zero.

A thin, checkpoint-compatible re-implementation of the original DiT (Peebles & Xie): every
parameter carries the original name and shape, so ``DiT-XL-2-256x256.pt`` loads with
``strict=True``. What differs is the plumbing: conditioning is kept per (sample, block)
``c: (B, nb, C)`` rather than per sample, so the same blocks serve the teacher (one block of
T tokens) and the ARD student (K blocks of T tokens, :mod:`ard_kernels.models.ardit`), and the
hot ops go through :mod:`ard_kernels.api` with a selectable backend:

- attention: :func:`ard_kernels.block_attention` (``attn_backend``);
- LayerNorm + modulate and the gated residual: :func:`ard_kernels.modulated_layer_norm`,
  :func:`ard_kernels.gated_residual`, and the two fused where one follows the other
  (:func:`ard_kernels.gated_residual_modulated_layer_norm`) (``mod_backend``);
- the sinusoidal timestep features: :func:`ard_kernels.timestep_embedding` (``mod_backend``).

Shapes: images (B, C_in, H, W) with H = W = ``input_size``; T = (H / p)² tokens of width
``hidden_size``; outputs (B, C_out, H, W), C_out = 2·C_in with ``learn_sigma`` (prediction,
then variance).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import api
from ..adaln import NORM_EPS, adaln_modulation
from ..ops.linear import linear as linear_op
from .configs import DiTConfig, get_config

FREQUENCY_EMBEDDING_SIZE = 256


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """DiT's fixed 2-D position table: ``[φ(col), φ(row)]`` per token, ``φ(p) = [sin(p·ω_i), cos(p·ω_i)]``.

    ``ω_i = 10000^(−i / (embed_dim/4))``, i < embed_dim/4. Token ``n = row·grid_size + col``; the
    first half of the channels encodes the column, the second half the row (the order the
    original's ``meshgrid(w, h)`` produces). Computed in float64 as the original, returned
    (grid_size², embed_dim) fp32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim: expected a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)

    def phi(p):  # (N,) -> (N, embed_dim / 2)
        out = p[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    row = pos.repeat_interleave(grid_size)
    col = pos.repeat(grid_size)
    return torch.cat([phi(col), phi(row)], dim=1).float()


class PatchEmbed(nn.Module):
    """``(B, C, H, W) → (B, T, hidden)`` by a stride-p convolution (``x_embedder.proj``)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size: expected a multiple of patch_size {patch_size}, got {input_size}")
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # A (B, T, hidden) view of the convolution's (B, hidden, H/p, W/p) output, as the original
        # (timm) returns it: DiT.embed's position add writes the token-major stream in one pass.
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """``t ↦ Linear(SiLU(Linear(sincos_256(t))))``: (…) → (…, hidden) in the weights' dtype."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.backend = "auto"

    def forward(self, t):
        # The sinusoid is fp32 (large t·f); the MLP runs in the weights' dtype (bf16 models too).
        t_freq = api.timestep_embedding(t, self.frequency_embedding_size, backend=self.backend)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label → (hidden,) row; row ``num_classes`` is the null class of classifier-free guidance.

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows and, in training, labels are
    replaced by the null class with that probability (DiT's label dropout).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Labels (B,) with the dropped ones (random, or ``force_drop_ids == 1``) set to the null class."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        """(B,) int64 labels → (B, hidden) rows, after label dropout in training or with ``force_drop_ids``."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention (``attn.qkv``, ``attn.proj``) through :func:`ard_kernels.block_attention`.

    ``qkv`` lays out [q | k | v] × (heads, head_dim) along its output, as the original (timm)
    attention, which is the layout :class:`ard_kernels.kv_cache.HistoryKVCache` splits.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.backend = "auto"

    def forward(self, x, block_size, pattern, kv=None):
        """x (B, n, C) → (B, n, C) under the block ``pattern``.

        ``kv``, when given, maps the qkv projection (B, n, 3C) to (q, keys, values) with keys from
        elsewhere (a KV cache): the n queries are then the last n tokens of the key sequence.
        """
        b, n, c = x.shape
        qkv = inference_linear(x, self.qkv)
        if kv is None:  # packed: no copy of q, k, v, O or their gradients between the two Linears
            o = api.block_attention_qkv(qkv, self.num_heads, block_size, pattern, backend=self.backend)
            return inference_linear(o, self.proj)
        q, k, v = kv(qkv)
        o = api.block_attention(q, k, v, block_size, pattern, backend=self.backend)
        return inference_linear(o.transpose(1, 2).reshape(b, n, c), self.proj)  # a view where O is token-major


def linear_input_dtype(x) -> torch.dtype:
    """The dtype to write a modulated LayerNorm's output in, when only Linears read it: under
    autocast the autocast dtype, since the Linears would cast to it anyway (the same values, rounded
    once, without the cast's extra pass over the tokens, and half the bytes of an fp32 stream);
    else x's dtype."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def gelu_epilogue_applies(x, fc1: nn.Linear) -> bool:
    """Whether ``GELU_tanh(fc1(x))`` can run as one GEMM with a GELU epilogue (cuBLASLt's, or the Triton
    split-K GEMM's: :func:`inference_linear`), and so any of the model's Linears on these terms.

    ``torch._addmm_activation(bias, x, Wᵀ, use_gelu=True)`` applies the tanh-approximate GELU (DiT's)
    inside the GEMM on CUDA, saving a pass over the 4·C-wide hidden activations (read and write)
    and a launch per layer. It has no autograd formula and autocast does not cover it, so: CUDA
    tensors, no autograd, no autocast, one dtype, a bias. (On the CPU the same op applies the
    exact GELU, another function: never used there.)
    """
    return (x.is_cuda and not torch.is_grad_enabled() and fc1.bias is not None
            and not torch.is_autocast_enabled("cuda") and x.dtype == fc1.weight.dtype == fc1.bias.dtype)


def inference_linear(x, layer: nn.Linear, gelu: bool = False):
    """``layer(x)`` (then DiT's tanh GELU with ``gelu``), in CUDA inference through
    :func:`ard_kernels.ops.linear.linear`: cuBLAS or a Triton split-K GEMM, whichever its first-call timing
    found faster for this shape (few-row GEMMs, the batch-1 sampler's, leave most SMs idle under cuBLAS),
    the GELU inside the GEMM either way. Elsewhere (autograd, autocast, mixed dtypes, the CPU) the
    module itself, then ``F.gelu``."""
    if gelu_epilogue_applies(x, layer):
        return linear_op(x, layer.weight, layer.bias, gelu=gelu)
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``, hidden width ``mlp_ratio·C`` (``mlp.fc1``, ``mlp.fc2``).

    In CUDA inference fc1 and the GELU are one GEMM (:func:`inference_linear`).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        if gelu_epilogue_applies(x, self.fc1):
            return inference_linear(inference_linear(x, self.fc1, gelu=True), self.fc2)
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block on tokens (B, N, C) with per-block conditioning c (B, nb, C).

    ``x += gate_msa·attn(LN(x)·(1 + scale_msa) + shift_msa)``, then the same with the MLP; the
    six modulation vectors come from ``adaLN_modulation = (SiLU, Linear(C, 6C))`` applied to c
    once per block of ``block_size`` tokens, never repeated per token.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.backend = "auto"

    def modulation(self, c, activated: bool = False):
        """``Linear(SiLU(c))`` split into the six (B, nb, C) modulation vectors of conditioning c (B, nb, C)
        (``activated``: c is SiLU(c) already)."""
        return adaln_modulation(c, self.adaLN_modulation[1], 6, activated)

    def forward(self, x, c, block_size, pattern, kv=None, attn_block_size: int | None = None, mod=None, h=None,
                next_norm=None):
        """x (B, N, C), c (B, nb, C) with nb = ceil(N / block_size) → (B, N, C).

        ``kv`` and ``attn_block_size`` (default ``block_size``) go to the attention: a cached step
        attends over a key sequence blocked differently from its own tokens. ``mod``, when given,
        replaces :meth:`modulation` of c (the sampler computes all K blocks' vectors up front).

        Chaining blocks (:func:`run_blocks`): ``h``, when given, is this block's attention input
        ``LN(x)·(1 + scale_msa) + shift_msa``, already computed by the block before; with
        ``next_norm = (shift, scale)``, the modulation of the LayerNorm that follows this block,
        it returns ``(x, LN(x)·(1 + scale) + shift)``, that LayerNorm fused with its last residual.
        """
        attn_bs = block_size if attn_block_size is None else attn_block_size
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c) if mod is None else mod
        be = self.backend
        # In inference the residual stream is ours alone: update it in place (no new (B, N, C) buffer).
        inplace = not torch.is_grad_enabled()
        h_dtype = linear_input_dtype(x)  # every h here feeds Linears only (qkv, fc1, the head's linear)
        if h is None:
            h = api.modulated_layer_norm(x, shift_msa, scale_msa, block_size, eps=NORM_EPS, out_dtype=h_dtype,
                                         backend=be)
        # Each residual is fused with the LayerNorm that reads its result: one pass over the stream.
        x, h = api.gated_residual_modulated_layer_norm(x, self.attn(h, attn_bs, pattern, kv), gate_msa, shift_mlp,
                                                       scale_mlp, block_size, eps=NORM_EPS, inplace=inplace,
                                                       out_dtype=h_dtype, backend=be)
        if next_norm is None:
            return api.gated_residual(x, self.mlp(h), gate_mlp, block_size, inplace=inplace, backend=be)
        return api.gated_residual_modulated_layer_norm(x, self.mlp(h), gate_mlp, *next_norm, block_size, eps=NORM_EPS,
                                                       inplace=inplace, out_dtype=h_dtype, backend=be)


def run_blocks(blocks, x, block_size, mods, last_norm, layer_kwargs=None):
    """The trunk, each block's last residual fused with the LayerNorm after it: returns that last LayerNorm.

    ``x_{i+1} = block_i(x_i)``, then ``h = LN(x_depth)·(1 + scale) + shift`` with ``(shift, scale) =
    last_norm`` (the head's modulation), computed with one fused pass at every block boundary
    (:func:`ard_kernels.gated_residual_modulated_layer_norm`) instead of a residual pass and a
    LayerNorm pass. The caller applies the head's Linear to h.

    Args:
        blocks: the :class:`DiTBlock` s, in order.
        x: (B, N, C) tokens.
        mods: each block's six modulation vectors for these tokens (:meth:`DiTBlock.modulation`),
            computed before the blocks run: the fused boundary needs the next block's. (Not for
            blocks sharded one by one by FSDP, whose parameters exist only inside each block's
            forward: those run block by block.)
        last_norm: (shift, scale), (B, nb, C) each, of the LayerNorm after the last block.
        layer_kwargs: optional per-block dicts of extra :meth:`DiTBlock.forward` arguments
            (pattern, kv, attn_block_size); default ``pattern="diagonal"``.

    Returns:
        h (B, N, C): the head's LayerNorm output (the autocast dtype under autocast, else x's).
    """
    h = None
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        next_norm = mods[i + 1][:2] if i < last else last_norm
        kwargs = layer_kwargs[i] if layer_kwargs is not None else {"pattern": "diagonal"}
        x, h = block(x, None, block_size, mod=mods[i], h=h, next_norm=next_norm, **kwargs)
    return h


class FinalLayer(nn.Module):
    """``linear(LN(x)·(1 + scale) + shift)``: tokens (B, N, C) → (B, N, p²·C_out); (shift, scale) per block."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.backend = "auto"

    def modulation(self, c, activated: bool = False):
        """``(shift, scale) = Linear(SiLU(c))`` of conditioning c (B, nb, C), each (B, nb, C)
        (``activated``: c is SiLU(c) already)."""
        return adaln_modulation(c, self.adaLN_modulation[1], 2, activated)

    def forward(self, x, c, block_size):
        """x (B, N, C), c (B, nb, C) with nb = ceil(N / block_size) → (B, N, p²·C_out)."""
        shift, scale = self.modulation(c)
        x = api.modulated_layer_norm(x, shift, scale, block_size, eps=NORM_EPS, out_dtype=linear_input_dtype(x),
                                     backend=self.backend)
        return self.linear(x)


class DiT(nn.Module):
    """Class-conditional DiT with the original's parameter names: ``model(x, t, y)``.

    Args:
        config: a :class:`DiTConfig` or a name from :data:`ard_kernels.models.CONFIGS` ("DiT-XL/2").
        input_size: latent side H = W (32 for 256² images through the SD VAE).
        in_channels: latent channels C_in.
        num_classes: class count; with ``class_dropout_prob > 0`` the label table gets a null row.
        learn_sigma: output 2·C_in channels (prediction, variance) instead of C_in.
        class_dropout_prob: label dropout in training (classifier-free guidance).
        attn_backend: backend of :func:`ard_kernels.block_attention`.
        mod_backend: backend of the modulation ops and the timestep features.
    """

    def __init__(self, config="DiT-XL/2", input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1, attn_backend: str = "auto",
                 mod_backend: str = "auto"):
        super().__init__()
        cfg: DiTConfig = get_config(config)
        self.config = cfg
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.hidden_size = cfg.hidden_size

        self.x_embedder = PatchEmbed(input_size, cfg.patch_size, in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, cfg.hidden_size, class_dropout_prob)
        # Fixed, yet a Parameter (requires_grad=False) as in the original: it is in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.initialize_weights()
        self.set_backends(attn_backend, mod_backend)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, T = (input_size / patch_size)²."""
        return self.x_embedder.num_patches

    def set_backends(self, attn: str | None = None, mod: str | None = None) -> "DiT":
        """Choose the backend of attention (``attn``) and of the modulation ops (``mod``); None keeps it."""
        if attn is not None:
            self.attn_backend = attn
        if mod is not None:
            self.mod_backend = mod
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = self.attn_backend
            elif isinstance(m, (DiTBlock, FinalLayer, TimestepEmbedder)):
                m.backend = self.mod_backend
        return self

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears, N(0, 0.02) embeddings, adaLN-Zero (zeros)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in self._heads():
            nn.init.zeros_(head.adaLN_modulation[-1].weight)
            nn.init.zeros_(head.adaLN_modulation[-1].bias)
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)

    def _heads(self):
        return [self.final_layer]

    def embed(self, x):
        """Images (B', C_in, H, W) → tokens (B', T, hidden) with the position table added, contiguous.

        The contiguous table comes first: the sum takes its token-major layout, so the patches'
        transpose is folded into the add (one kernel, no separate copy).
        """
        return self.pos_embed + self.x_embedder(x)

    def unpatchify(self, x, leading=None):
        """Tokens (B, T, p²·C_out) → images (*leading, C_out, H, W), ``leading`` splitting B (default (B,));
        token n = row·grid + col, patch (p, q, c). A fresh tensor, never a view (FSDP2 warns on views)."""
        c, p = self.out_channels, self.patch_size
        g = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(*(leading or (x.shape[0],)), c, g * p, g * p)

    def trunk_modulations(self, c):
        """Every block's six modulation vectors of conditioning c (B, nb, C), and SiLU(c).

        Returns ``(mods, silu_c)``: mods[i] is ``blocks[i].modulation(c)``; one SiLU(c) feeds every
        block's Linear (and the caller's heads), instead of one SiLU kernel per layer.
        """
        silu_c = F.silu(c)
        return [block.modulation(silu_c, activated=True) for block in self.blocks], silu_c

    def forward(self, x, t, y):
        """``ε̂, Σ̂ = DiT(x_t, t, y)``.

        Args:
            x: (B, C_in, H, W) latents in the model's dtype.
            t: (B,) timesteps (fractional allowed).
            y: (B,) int64 class labels (``num_classes`` = null class).

        Returns:
            (B, C_out, H, W).
        """
        tokens = self.embed(x)
        c = (self.t_embedder(t) + self.y_embedder(y, self.training))[:, None]  # (B, 1, hidden): one block
        mods, silu_c = self.trunk_modulations(c)
        h = run_blocks(self.blocks, tokens, self.num_tokens, mods, self.final_layer.modulation(silu_c, activated=True))
        return self.unpatchify(self.final_layer.linear(h))

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels: int = 3):
        """Classifier-free guidance on a doubled batch, as the original DiT.

        The first half of ``x`` is used for both halves; ``y`` holds the class labels then the null
        labels. The first ``guidance_channels`` output channels become ``ε_u + s·(ε_c − ε_u)`` in
        both halves, the rest pass through. The default 3 reproduces the original DiT exactly (its
        code guides ``model_out[:, :3]``); pass ``guidance_channels=self.in_channels`` to guide
        every prediction channel, as :meth:`ARDiT.sample` does.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :guidance_channels], model_out[:, guidance_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    @classmethod
    def from_checkpoint(cls, state_dict_or_path, config=None, **kwargs) -> "DiT":
        """A teacher loaded strictly from a DiT checkpoint (e.g. ``DiT-XL-2-256x256.pt``).

        ``config`` and the size arguments are inferred from the tensor shapes unless given; the
        file is read with ``torch.load(weights_only=True)`` or safetensors (see
        :func:`ard_kernels.models.convert.read_state_dict`).
        """
        from .convert import infer_dit_kwargs, read_state_dict

        sd = read_state_dict(state_dict_or_path)
        inferred = infer_dit_kwargs(sd)
        inferred_config = inferred.pop("config")
        inferred.update(kwargs)
        model = cls(inferred_config if config is None else config, **inferred)
        model.load_state_dict(sd, strict=True)
        return model

    @staticmethod
    def expected_num_params(config="DiT-XL/2", input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                            learn_sigma: bool = True, class_dropout_prob: float = 0.1) -> int:
        """Parameter count from the formula (``pos_embed`` included, as the original counts it)."""
        cfg = get_config(config)
        c, p, d = cfg.hidden_size, cfg.patch_size, cfg.depth
        out = in_channels * (2 if learn_sigma else 1)
        mlp = int(c * cfg.mlp_ratio)
        tokens = (input_size // p) ** 2
        per_block = (3 * c * c + 3 * c) + (c * c + c) + (c * mlp + mlp) + (mlp * c + c) + (6 * c * c + 6 * c)
        embed = in_channels * p * p * c + c + tokens * c
        t_emb = FREQUENCY_EMBEDDING_SIZE * c + c + c * c + c
        y_emb = (num_classes + int(class_dropout_prob > 0)) * c
        final = c * p * p * out + p * p * out + 2 * c * c + 2 * c
        return embed + t_emb + y_emb + d * per_block + final

