"""The ARD K-step sampler: ``s_{k+1} = head_k(trunk(s_k | history of s_0..s_{k−1}))[:C]``, s_0 = noise.

Step k runs only block k's T tokens through :meth:`ARDiT.forward_step`: the lower
``history_layers`` layers append their keys/values to a
:class:`ard_kernels.kv_cache.HistoryKVCache` and attend to the earlier blocks their pattern
allows plus their own; the upper layers attend within the block. The next block's input is the
first C output channels of head k (after guidance). The K outputs are what
:meth:`ARDiT.forward_train` computes on the states ``[s_0, …, s_{K−1}]`` in one pass.

Classifier-free guidance as DiT: the batch is doubled with the null class (label
``num_classes``), and the first C channels become ``ε_u + s·(ε_c − ε_u)`` in both halves (both
halves then carry the same guided state into the next step).

CUDA graphs (``use_cuda_graphs=True``): one graph per step for a fixed (batch, guidance,
dtype, device), captured after a warm-up, sharing one memory pool; inputs are copied into
static buffers and a call is K replays, with no allocation per step. The graphs read the
weights by address: in-place weight updates are seen, replacing parameters needs
:func:`clear_cuda_graphs`.
"""

from __future__ import annotations

import torch

VAE_SCALE = 0.18215


def make_cache(model, batch_size: int, dtype: torch.dtype, device: torch.device):
    """The history KV cache of ``model``'s lower layers for ``batch_size`` rows (None without history)."""
    if model.history_layers == 0:
        return None
    from .kv_cache import HistoryKVCache

    return HistoryKVCache(
        model.history_layers, batch_size, model.num_heads, model.config.head_dim, model.num_tokens, model.steps,
        dtype, device, backend=model.cache_backend,
    )


def _guide(out, channels: int, scale):
    """``[ε_u + s·(ε_c − ε_u)] × 2`` on the first ``channels`` channels of a doubled batch (math in fp32)."""
    eps = out[:, :channels].float()
    cond, uncond = eps.chunk(2, dim=0)
    guided = (uncond + scale * (cond - uncond)).to(out.dtype)
    return torch.cat([torch.cat([guided, guided], dim=0), out[:, channels:]], dim=1)


def _inputs(model, noise, y, guided: bool):
    """The (possibly doubled) batch: noise twice, labels then null labels."""
    if not guided:
        return noise, y
    return torch.cat([noise, noise], dim=0), torch.cat([y, torch.full_like(y, model.num_classes)], dim=0)


def _steps(model, x, y2, scale, cache, guided: bool, first: int = 0, last: int = None, ctx=None):
    """Run steps ``first..last−1``; returns (outputs, ctx), ctx = (conditioning, modulations).

    ``ctx`` is built from ``y2`` when not given: the conditioning of all K blocks and every
    layer's modulation vectors for all of them, computed once before step 0. Step 0 resets the cache.
    """
    last = model.steps if last is None else last
    if ctx is None:
        cond = model.condition(y2, train=False)
        ctx = (cond, model.step_modulations(cond))
    if first == 0 and cache is not None:
        cache.reset()
    outs = []
    for k in range(first, last):
        out = model.forward_step(x, k, ctx[0], cache, mods=ctx[1])
        if guided:
            out = _guide(out, model.in_channels, scale)
        outs.append(out)
        x = out[:, : model.in_channels]
    return outs, ctx


def _check(model, noise, y, cfg_scale):
    expected = (model.in_channels, model.input_size, model.input_size)
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or tuple(noise.shape[1:]) != expected:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected shape (B, {', '.join(map(str, expected))}), got {shape}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (noise.shape[0],) or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected integer labels of shape ({noise.shape[0]},), got {shape}")
    if y.device != noise.device:
        raise ValueError(f"y: expected device {noise.device} (as noise), got {y.device}")
    if cfg_scale != 1.0 and model.class_dropout_prob <= 0:
        raise ValueError("cfg_scale: guidance needs the null class, but the model has class_dropout_prob == 0")
    model.check_sampling_pattern()


@torch.no_grad()
def sample_outputs(model, noise, y, cfg_scale: float = 1.0, use_cuda_graphs: bool = False):
    """Every step's full output: (B, K, C_out, H, W) (after guidance, conditional half).

    ``outputs[:, k, :C]`` is the state fed to step k+1; ``outputs[:, -1, :C]`` the sample.
    """
    _check(model, noise, y, cfg_scale)
    dtype = model.pos_embed.dtype
    noise = noise.to(dtype)
    guided = cfg_scale != 1.0
    b = noise.shape[0]
    if use_cuda_graphs:
        if noise.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs: needs CUDA tensors, got noise on {noise.device}")
        outs = _graph_sampler(model, b, guided, dtype, noise.device).run(noise, y, cfg_scale)
    else:
        x, y2 = _inputs(model, noise, y, guided)
        scale = torch.tensor(float(cfg_scale), dtype=torch.float32, device=noise.device) if guided else None
        cache = make_cache(model, x.shape[0], dtype, noise.device)
        outs, _ = _steps(model, x, y2, scale, cache, guided)
    return torch.stack([o[:b] for o in outs], dim=1)  # a copy: the graphs' buffers are reused next call


@torch.no_grad()
def sample(model, noise, y, cfg_scale: float = 1.0, return_states: bool = False, use_cuda_graphs: bool = False,
           vae=None):
    """K-step ARD sampling from ``noise``.

    Args:
        model: an :class:`~ard_kernels.models.ARDiT` (eval mode is not required: no dropout runs).
        noise: (B, C, H, W) x_T (cast to the model's dtype).
        y: (B,) int64 class labels.
        cfg_scale: classifier-free guidance scale s (1.0 = none: the batch is not doubled).
        return_states: also return every step's output state.
        use_cuda_graphs: replay captured CUDA graphs (captured on first use for this batch size).
        vae: optional diffusers ``AutoencoderKL``: the final latent is decoded with
            ``vae.decode(x / 0.18215).sample``.

    Returns:
        final (B, C, H, W) latent (or the decoded images with ``vae``); with ``return_states`` the
        tuple (final, states), states (B, K, C, H, W) the first C channels of each step's output
        (``states[:, -1]`` is the final latent).
    """
    outs = sample_outputs(model, noise, y, cfg_scale=cfg_scale, use_cuda_graphs=use_cuda_graphs)
    states = outs[:, :, : model.in_channels]
    final = states[:, -1]
    if vae is not None:
        final = vae.decode(final.to(next(vae.parameters()).dtype) / VAE_SCALE).sample
    return (final, states) if return_states else final


class CUDAGraphSampler:
    """K CUDA graphs, one per step, for a fixed batch size, guidance on/off, dtype and device.

    Static buffers hold the noise, labels and guidance scale; the first graph doubles the batch
    (with guidance) and builds the conditioning, graph k reads graph k−1's output in place.
    All graphs share one memory pool, and the outputs of earlier graphs stay referenced, so no
    later graph reuses their memory.
    """

    def __init__(self, model, batch_size: int, guided: bool, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.guided = guided
        c, s = model.in_channels, model.input_size
        self.noise = torch.zeros(batch_size, c, s, s, dtype=dtype, device=device)
        self.y = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        rows = batch_size * (2 if guided else 1)
        self.cache = make_cache(model, rows, dtype, device)
        self.graphs = []
        self.outs = []

    def _eager(self):
        x, y2 = _inputs(self.model, self.noise, self.y, self.guided)
        return _steps(self.model, x, y2, self.scale, self.cache, self.guided)[0]

    def capture(self) -> None:
        device = self.noise.device
        # Warm-up on a side stream: autotuning, lazy inits and compiled kernels happen here, not in capture.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._eager()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        if self.cache is not None:
            self.cache.reset()  # capture then bakes in the offsets 0, T, 2T, … of the steps
        ctx = None
        for k in range(self.model.steps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if k == 0:
                    x, y2 = _inputs(self.model, self.noise, self.y, self.guided)
                else:
                    x, y2 = self.outs[-1][:, : self.model.in_channels], None
                outs, ctx = _steps(self.model, x, y2, self.scale, self.cache, self.guided, k, k + 1, ctx)
            self.graphs.append(graph)
            self.outs.append(outs[0])
        self._ctx = ctx  # produced by graph 0, read by the others: keep it alive

    def run(self, noise, y, cfg_scale: float):
        """Copy the inputs in, replay the K graphs; returns the K static outputs (B·(1+guided), C_out, H, W).

        The outputs are the graphs' own buffers: valid until the next replay (copy to keep them).
        """
        self.noise.copy_(noise)
        self.y.copy_(y)
        self.scale.fill_(float(cfg_scale))
        if not self.graphs:
            self.capture()
        for graph in self.graphs:
            graph.replay()
        return self.outs


def _graph_sampler(model, batch_size, guided, dtype, device) -> CUDAGraphSampler:
    key = (batch_size, guided, dtype, str(device), model.attn_backend, model.mod_backend, model.cache_backend)
    runner = model._graph_samplers.get(key)
    if runner is None:
        runner = CUDAGraphSampler(model, batch_size, guided, dtype, device)
        model._graph_samplers[key] = runner
    return runner


def clear_cuda_graphs(model) -> None:
    """Drop ``model``'s captured graphs (after replacing parameters or changing its layout)."""
    model._graph_samplers.clear()
