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

CUDA graphs (``use_cuda_graphs=True``): the K steps are captured as ONE graph for a fixed
(batch, guidance, dtype, device), after an eager warm-up on a side stream (Triton autotuning,
compiled kernels, cuBLAS/cuDNN set-up, the attention schedules' device copies all happen there,
never inside the capture). A call copies the noise, labels and guidance scale into static
buffers and replays the graph: no allocation and no host work per step. The replay re-runs the
whole sampler, the history cache's reset and appends included. The graph reads the weights by
address: in-place updates (``load_state_dict``, an optimiser or EMA step) are seen; ``.to()``
and ``load_state_dict(assign=True)`` drop the graphs (recaptured at the next call); a parameter
replaced by hand needs :func:`clear_cuda_graphs` (checking every address per call would cost
more host time than the replay of a small batch). Only capture-safe attention backends are accepted
(:func:`check_capturable`): the "reference" backend, and "sdpa" on a pattern that needs a mask,
build their masks on the host at every call, which a graph cannot contain.

The capture/replay mechanics live in :class:`ard_kernels.graphs.GraphRunner`, the one seam the CPU
tests replace by a stand-in that re-runs the captured function at each replay.
"""

from __future__ import annotations

import contextlib

import torch

from . import api, graphs, masks
from ._backends import resolve
from .ops import programmatic_launch_enabled

VAE_SCALE = 0.18215


def make_cache(model, batch_size: int, dtype: torch.dtype, device: torch.device):
    """The history KV cache of ``model``'s lower layers for ``batch_size`` rows (None without history)."""
    if model.history_layers == 0:
        return None
    from .kv_cache import HistoryKVCache

    # Unfilled storage: the sampler reads only what its steps appended (a test fills it with NaN to show it).
    return HistoryKVCache(
        model.history_layers, batch_size, model.num_heads, model.config.head_dim, model.num_tokens, model.steps,
        _autocast_dtype(device) or dtype, device, backend=model.cache_backend, fill=None,
    )


def _autocast_dtype(device: torch.device):
    """The dtype the qkv Linear produces under an active autocast on ``device`` (None without one):
    the cache must hold that dtype, not the weights'."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def _guide(out, channels: int, scale):
    """``ε_u + s·(ε_c − ε_u)`` into both halves' first ``channels`` channels of a doubled batch, in place
    (``out`` is the head's fresh output); returns ``out``.

    One lerp in fp32 (``lerp(ε_u, ε_c, s)``) and one broadcast copy into the two halves, instead of a
    subtraction, a multiply, an add, casts and two concatenations of the whole output.
    """
    eps = out[:, :channels].unflatten(0, (2, -1))  # (2, B, channels, H, W): conditional, unconditional
    eps.copy_(torch.lerp(eps[1].float(), eps[0].float(), scale).unsqueeze(0))
    return out


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
    """Validate the sampler's inputs: noise (B, C, H, W), integer labels (B,) on its device, guidance, pattern."""
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
        if noise.device.type not in graphs.GraphRunner.device_types:
            raise ValueError(f"use_cuda_graphs: needs CUDA tensors, got noise on {noise.device}")
        outs = _graph_sampler(model, b, guided, dtype, noise.device).run(noise, y, cfg_scale)
    else:
        x, y2 = _inputs(model, noise, y, guided)
        # filled on the device: torch.tensor(..., device=cuda) would copy from the host and wait for the stream
        scale = torch.full((), float(cfg_scale), dtype=torch.float32, device=noise.device) if guided else None
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
        use_cuda_graphs: replay a captured CUDA graph (captured on first use for this batch size,
            guidance on/off and dtype; see :func:`check_capturable` for the backends it takes).
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
        final = decode(vae, final)
    return (final, states) if return_states else final


@torch.no_grad()
def decode(vae, latents):
    """``vae.decode(latents / 0.18215).sample``: a diffusers ``AutoencoderKL``'s images, about [-1, 1]."""
    return vae.decode(latents.to(next(vae.parameters()).dtype) / VAE_SCALE).sample


def to_uint8_images(images):
    """(B, 3, H, W) images in [-1, 1] → (B, H, W, 3) uint8, DiT's rounding (``127.5·x + 128``, clamped)."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def sample_recomputing_history(model, noise, y):
    """K-step ARD sampling WITHOUT the KV cache: (B, K, C_out, H, W), the outputs :func:`sample_outputs` gives.

    What the cache saves, written out: step k recomputes the history. Blocks 0..k−1 go through the lower
    ``history_layers`` layers again (each from its state, with its own time row and conditioning) to
    rebuild their keys and values, block k then goes through every layer and head k. No guidance. This
    is the "no cache" variant of :mod:`ard_kernels.flops`, which counts its FLOPs here, and an oracle
    the cached sampler must equal.
    """
    _check(model, noise, y, 1.0)
    dtype = model.pos_embed.dtype
    n, lower, b = model.num_tokens, model.history_layers, noise.shape[0]
    states, outs = [noise.to(dtype)], []
    y_emb = model.y_embedder(y, False)
    for k in range(model.steps):
        first = 0 if lower else k  # without history layers there is nothing to recompute
        c = model.t_embedder(model.block_times(noise.device)[first:k + 1])[None] + y_emb[:, None]  # (B, k+1-first, ·)
        cache = make_cache(model, b, dtype, noise.device)  # a fresh one: nothing is kept from step k−1
        for j in range(first, k + 1):
            x, cj = model.embed(states[j]), c[:, j - first:j - first + 1]
            layer_kwargs = model.step_layer_kwargs(j, cache)
            for block, kwargs in zip(model.blocks[:lower], layer_kwargs):
                x = block(x, cj, n, **kwargs)
            if lower:
                cache.advance(n)
        for block, kwargs in zip(model.blocks[lower:], layer_kwargs[lower:]):  # block k's upper layers
            x = block(x, cj, n, **kwargs)
        outs.append(model.unpatchify(model.heads[k](x, cj, n)))
        states.append(outs[-1][:, : model.in_channels])
    return torch.stack(outs, dim=1)


def check_capturable(model, device, training: bool = False) -> None:
    """Raise ValueError unless ``model``'s attention backend can be captured in a CUDA graph on ``device``.

    A captured graph may not copy host data to the device nor read device data on the host. The
    attention backends differ there: "triton" (schedules cached on the device at the warm-up) and
    "flex" (block masks cached, compiled at the warm-up) are capture-safe; "sdpa" is when no attention
    needs a mask (sampling: every contiguous pattern, causal, diagonal, window; ``training``, all K blocks
    at once: no history layers, or a history pattern that is block-diagonal or sees everything); "reference"
    never is (its dense mask is built on the host and copied over at every call). The modulation ops and
    the history cache are device-only in every backend.
    """
    device = torch.device(device)
    chosen = resolve(model.attn_backend, "block_attention", device)
    if chosen == "triton" and model.config.head_dim not in api.TRITON_HEAD_DIMS and model.attn_backend == "auto":
        chosen = "sdpa"  # what block_attention falls back to
    hint = "use attn_backend 'triton' (or 'flex') with CUDA graphs, e.g. model.set_backends(attn='triton')"
    if chosen == "reference":
        raise ValueError(f"attn_backend: {model.attn_backend!r} resolves to 'reference' on {device}, which builds "
                         f"its dense mask on the host at every call: a CUDA graph cannot capture that; {hint}")
    if chosen == "sdpa" and model.history_layers:
        if training:
            table = masks.pattern_table(model.pattern, model.steps)
            if not (bool(table.all()) or torch.equal(table, torch.eye(model.steps, dtype=torch.bool))):
                raise ValueError(
                    f"attn_backend: {model.attn_backend!r} resolves to 'sdpa', which needs a host-built mask for the "
                    f"history layers' pattern {model.pattern if isinstance(model.pattern, str) else 'table'!r} in "
                    f"training: a CUDA graph cannot capture that; {hint}")
            return
        masked = [k for k in range(model.steps) if _sdpa_needs_mask(model.attention_plan(k), k)]
        if masked:
            raise ValueError(
                f"attn_backend: {model.attn_backend!r} resolves to 'sdpa', which needs a host-built mask at steps "
                f"{masked} for this pattern (their rows of the table are not one contiguous run): a CUDA graph "
                f"cannot capture that; {hint}")


def _sdpa_needs_mask(plan, k: int) -> bool:
    """Whether SDPA masks history attention at step k: a table plan whose row k does not see every key block."""
    pattern = plan[3]
    return not isinstance(pattern, str) and not bool(pattern[k].all())


class CUDAGraphSampler:
    """The K sampling steps as one CUDA graph, for a fixed batch size, guidance on/off, dtype and device.

    Static buffers hold the noise, labels and guidance scale (allocated outside inference mode, so
    calls under ``torch.inference_mode`` and ``torch.no_grad`` can alternate); the graph doubles the
    batch (with guidance), builds the conditioning, resets and fills the history cache, and writes
    the K step outputs into its pool.
    """

    def __init__(self, model, batch_size: int, guided: bool, dtype: torch.dtype, device: torch.device):
        check_capturable(model, device)
        self.model = model
        self.guided = guided
        c, s = model.in_channels, model.input_size
        rows = batch_size * (2 if guided else 1)
        with torch.inference_mode(False):
            self.noise = torch.zeros(batch_size, c, s, s, dtype=dtype, device=device)
            self.y = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.scale = torch.ones((), dtype=torch.float32, device=device)
            self.cache = make_cache(model, rows, dtype, device)
        self.outs = None
        self._replay = None

    def _sample(self):
        """The K steps from the static buffers (what is captured); returns the K outputs."""
        x, y2 = _inputs(self.model, self.noise, self.y, self.guided)
        return _steps(self.model, x, y2, self.scale, self.cache, self.guided)[0]

    def capture(self) -> None:
        """(Re)capture the K steps; the previous graph and its outputs are dropped first."""
        self._replay = self.outs = None  # the old graph's pool is released before the new capture
        # Outside inference mode (grad still off): the captured outputs are normal tensors, whatever
        # mode the first call came in, so later calls in either mode may read and write them.
        # Under autocast, its cache of cast weights is off for the warm-up and the capture: the graph
        # would otherwise read the casts the warm-up cached, which are freed when the caller's autocast
        # block ends, so every later replay would read freed memory. The casts are captured instead.
        autocast_dtype = _autocast_dtype(self.noise.device)
        no_cast_cache = (torch.autocast(self.noise.device.type, dtype=autocast_dtype, cache_enabled=False)
                         if autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(False), torch.no_grad(), no_cast_cache:
            self._replay, self.outs = graphs.GraphRunner(self.noise.device).capture(self._sample)

    def run(self, noise, y, cfg_scale: float):
        """Copy the inputs in, replay; returns the K static outputs (B·(1+guided), C_out, H, W).

        The outputs are the graph's own buffers: valid until the next replay (copy to keep them).
        """
        self.noise.copy_(noise)
        self.y.copy_(y)
        self.scale.fill_(float(cfg_scale))
        if self._replay is None:
            self.capture()
        self._replay()
        return self.outs


def _graph_sampler(model, batch_size, guided, dtype, device) -> CUDAGraphSampler:
    """``model``'s cached :class:`CUDAGraphSampler` for this call, made on first use.

    The key holds everything a captured graph bakes in: batch size, guidance on/off, dtype, the
    active autocast dtype (the cache's), the device, the three backends and whether the kernels are
    launched with programmatic dependent launch (:func:`ard_kernels.ops.programmatic_launch`).
    """
    key = (batch_size, guided, dtype, _autocast_dtype(device), str(device), model.attn_backend, model.mod_backend,
           model.cache_backend, programmatic_launch_enabled())
    runner = model._graph_samplers.get(key)
    if runner is None:
        runner = CUDAGraphSampler(model, batch_size, guided, dtype, device)
        model._graph_samplers[key] = runner
    return runner


def clear_cuda_graphs(model) -> None:
    """Drop ``model``'s captured graphs and their memory (needed after replacing a parameter by hand)."""
    model._graph_samplers.clear()
