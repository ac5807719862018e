"""A training step's forward, loss and backward as one CUDA graph: ``loss, *extras = GraphedStep(fn, params)(*batch)``.

Why: the first H100 run measured the DiT-XL/2 ARD student's forward + backward (B16, 4×256 tokens) at
155.5 ms of wall time for 132.7 ms of kernels: the GPU idled 16.5% of the step while Python issued its
~2400 launches (autograd, autocast casts, the custom ops' glue). A replayed graph issues them all at once.

What is captured: ``p.grad = None`` for every parameter, then ``loss, *extras = fn(*inputs)`` (under
autocast when ``autocast_dtype`` is given) and ``loss.backward()``. The backward therefore *sets* the
gradients (as ``zero_grad(set_to_none=True)`` + backward would, never accumulating over steps) in tensors
of the graph's memory pool, which every replay rewrites in place; after each call every ``p.grad`` points
at them, ready for gradient clipping and the optimizer, which stay outside the graph (fused AdamW and the
clipping are a handful of launches, and an eager optimizer keeps its learning-rate schedule and
checkpointing as they are).

Shapes are fixed by the first call (the capture): later calls copy their inputs into the static buffers
(from pinned host memory without blocking) and replay; a call with other shapes or dtypes raises. The
graph reads the parameters by address: in-place updates (optimizer, ``load_state_dict``) are seen; a
parameter replaced by a new tensor (``.to()``, ``load_state_dict(assign=True)``) needs a new GraphedStep.

Not for DDP or FSDP (their gradient hooks communicate during the backward, which needs NCCL capture set-up
that this class does not do) nor activation checkpointing (its RNG-state bookkeeping reads the generator on
the host): :mod:`ard_kernels.train` refuses those combinations. Label dropout must be an input (as
:mod:`ard_kernels.train` draws it), or come from the device generator, which graphs advance per replay.
"""

from __future__ import annotations

import contextlib

import torch

from .. import graphs


class GraphedStep:
    """``outputs = step(*inputs)``: ``loss, *extras = fn(*inputs)`` and ``loss.backward()``, one graph replay.

    Args:
        fn: ``fn(*inputs) -> loss`` or ``(loss, *extras)``: tensors; ``loss`` a scalar that requires grad.
        params: the parameters whose gradients the backward sets (those the optimizer steps).
        device: the CUDA device the inputs are copied to and the graph runs on.
        autocast_dtype: run ``fn`` under ``torch.autocast(device, autocast_dtype)`` (its weight-cast cache
            off: the graph captures the casts, rather than reading casts cached by the warm-up); None: none.

    Returns from a call: ``(loss, *extras)``, detached copies (valid after the next replay).
    """

    def __init__(self, fn, params, device, autocast_dtype: torch.dtype | None = None):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one parameter that requires grad")
        self.device = torch.device(device)
        if self.device.type not in graphs.GraphRunner.device_types:
            raise ValueError(f"device: CUDA graphs need a CUDA device, got {self.device}")
        self.autocast_dtype = autocast_dtype
        self.inputs: list[torch.Tensor] | None = None
        self.replays = 0
        self._replay = None
        self._outputs = None
        self._grads = None

    def _captured(self):
        """The work the graph holds; returns ((loss, *extras) detached, the parameters' gradients)."""
        for p in self.params:
            p.grad = None  # the backward sets the gradients in the graph's pool
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            out = self.fn(*self.inputs)
        loss, *extras = out if isinstance(out, (tuple, list)) else (out,)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise ValueError(f"fn: expected a scalar loss that requires grad first, got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        loss.backward()
        # Parameters that got no gradient keep None (the optimizer skips them) in every replay.
        return (loss.detach(), *(e.detach() for e in extras)), [p.grad for p in self.params]

    def _check(self, inputs) -> None:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} tensors as captured, got {len(inputs)}")
        for i, (new, static) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype:
                got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"inputs[{i}]: expected {tuple(static.shape)} {static.dtype} (the captured batch; "
                                 f"a new shape needs a new GraphedStep), got {got}")

    def __call__(self, *inputs):
        if self.inputs is None:
            for i, x in enumerate(inputs):
                if not isinstance(x, torch.Tensor):
                    raise ValueError(f"inputs[{i}]: expected a tensor, got {type(x).__name__}")
            # Static buffers outside any inference mode: the capture's autograd must be able to read them.
            with torch.inference_mode(False):
                self.inputs = [torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in inputs]
        else:
            self._check(inputs)
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        if self._replay is None:
            # thread_local: a DataLoader's pin-memory thread may allocate pinned memory during the capture.
            runner = graphs.GraphRunner(self.device, capture_error_mode="thread_local")
            with torch.inference_mode(False), torch.enable_grad():
                self._replay, (self._outputs, self._grads) = runner.capture(self._captured)
        self._replay()
        self.replays += 1
        for p, g in zip(self.params, self._grads):
            p.grad = g  # the graph's buffers, whatever happened to p.grad since (a zero_grad, a stand-in's rerun)
        return tuple(o.clone() for o in self._outputs)
