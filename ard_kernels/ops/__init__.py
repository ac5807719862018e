"""One module per op: its Triton kernels, launcher and autograd / custom-op glue."""

import contextlib
import functools
import os

import torch


def launch_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not whichever one is current: Triton launches on the current device,
    so a model on ``cuda:1`` would otherwise run its kernels on GPU 0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (its index, or the current device's)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Arrival counters of the kernels whose last program to finish a tile reduces it (the serial split-K linear, the
# split-KV attention forward), per (device, number of tiles): int32 zeros that every launch leaves at zero. Made
# outside CUDA-graph captures only (a capture records a memset without running it) and never freed (a captured
# graph holds their address). One set per device, shared by those kernels: they must not run concurrently on two
# streams of one device (the model's sampler runs one stream; one stream runs them one after another).
_COUNTERS: dict = {}


def arrival_counters(device: torch.device, tiles: int):
    """The zeroed arrival counters for ``tiles`` tiles on ``device``, or None inside a CUDA-graph capture when there
    are none yet (a warm-up outside the capture makes them)."""
    key = (str(device), tiles)
    counters = _COUNTERS.get(key)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[key] = torch.zeros(tiles, dtype=torch.int32, device=device)
    return counters


# ARD_KERNELS_DIRECT_LAUNCH=0: every call goes through the ops' torch custom ops (read once, at import).
_DIRECT_LAUNCH = os.environ.get("ARD_KERNELS_DIRECT_LAUNCH", "1") != "0"


def _plain_eager(tensors) -> bool:
    """Plain tensors on CPU/CUDA, eager: no torch.compile trace, dispatch mode or functorch transform."""
    if not _DIRECT_LAUNCH or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(t) is torch.Tensor and t.device.type in ("cuda", "cpu") for t in tensors)


def _needs_grad(tensors) -> bool:
    """Whether autograd must record a call on ``tensors``: grad mode on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def direct_launch_ok(*tensors: torch.Tensor) -> bool:
    """Whether an op's forward may call its launcher directly rather than through its torch custom op.

    The custom op's Python dispatch (autograd layer, redispatch, dynamo's guard) costs more than the
    launcher's own work at small sizes (about 15 µs a call on the CPU machine here, 20 with a mutated
    input; ``benchmarks/bench_host.py`` measures it per layer), and the first H100 run found small
    batches host-bound. So plain eager calls that need no autograd skip it. The custom op stays for
    everything it exists for: torch.compile (traced calls), fake, meta and subclass tensors, dispatch
    modes (FakeTensorMode, FlopCounterMode, functionalization, selective checkpointing) and functorch
    transforms. Plain eager calls that do need autograd take :func:`differentiable_call`'s
    ``torch.autograd.Function`` instead.
    """
    return _plain_eager(tensors) and not _needs_grad(tensors)


def forward_call(op, launcher, *args):
    """``launcher(*args)`` where :func:`direct_launch_ok` allows it, else ``op(*args)``: ``op`` is the custom op
    whose body is ``launcher``, so both take the same arguments (the tensors among them decide)."""
    if direct_launch_ok(*(a for a in args if isinstance(a, torch.Tensor))):
        return launcher(*args)
    return op(*args)


def differentiable_call(op, launcher, setup_context, backward, *args):
    """A differentiable op's forward by the cheapest route that keeps its semantics.

    ``op`` is the custom op whose body is ``launcher`` and whose autograd is ``backward`` with
    ``setup_context`` (as given to ``register_autograd``). Plain eager calls (:func:`_plain_eager`) skip the
    custom op's dispatch: ``launcher(*args)`` when no input needs a gradient (:func:`direct_launch_ok`), else a
    ``torch.autograd.Function`` running the same launcher, setup and backward (:func:`_eager_function`). The
    custom op's autograd layer costs about as much host time as the launch itself (BENCHMARKS.md: about a
    third of a modulated LayerNorm forward + backward's host time on the development CPU; ``bench_host``
    measures both routes), and an eager training step makes thousands of these calls. Traced, fake, meta,
    subclass, mode and functorch calls keep the custom op. The backwards route their own kernels through
    :func:`forward_call` (grad mode is off there), so both routes run the same launchers on the same
    arguments: the same numbers (tested).
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if _plain_eager(tensors):
        if not _needs_grad(tensors):
            return launcher(*args)
        return _eager_function(launcher, setup_context, backward).apply(*args)
    return op(*args)


@functools.cache
def _eager_function(launcher, setup_context, backward):
    """The ``torch.autograd.Function`` of one op's eager route: forward = launcher + setup, backward as registered."""

    def forward(ctx, *args):
        output = launcher(*args)
        setup_context(ctx, args, output)
        return output

    name = "".join(part.title() for part in launcher.__name__.strip("_").split("_")) + "EagerFunction"
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


# Programmatic dependent launch of the inference kernels (Hopper): off unless switched on (see ._pdl).
from ._pdl import programmatic_launch, programmatic_launch_enabled, set_programmatic_launch  # noqa: E402, F401
