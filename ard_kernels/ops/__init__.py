"""One module per op: its Triton kernels, launcher and autograd / custom-op glue."""

import contextlib
import functools
import os

import torch


def launch_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not whichever one is current: Triton launches on the current device,
    so a model on ``cuda:1`` would otherwise run its kernels on GPU 0. On the current device already (the usual
    case) nothing is switched: entering and leaving ``torch.cuda.device`` costs a few µs of every launch."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# Host-side integer helpers. Triton's own ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions:
# called from Python they unwrap every argument first, a few µs a call, and a launch makes several (grids, tiles).
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


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


# The config each autotuned kernel chose, per (autotuner, autotuning key): later launches with that key call the JIT
# function with it directly (:func:`launch_autotuned`). ARD_KERNELS_LAUNCH_MEMO=0: never (read once, at import; the
# attention keeps a memo of its own, which also drops the TMA descriptors a pointer config ignores).
_TUNED: dict = {}
_TUNED_KEY_INDEX: dict = {}
_LAUNCH_MEMO = os.environ.get("ARD_KERNELS_LAUNCH_MEMO", "1") != "0"


def launch_autotuned(tuner, grid, args: tuple, kwargs: dict) -> None:
    """``tuner[grid](*args, **kwargs)`` for a ``triton.autotune``d kernel, past the autotuner once it has chosen.

    Triton's autotuner rebuilds a dict over every argument and its key from them at each call, then launches the
    JIT function with the config cached for that key: with the 20 to 40 arguments of these kernels, host time that
    every launch pays (the first H100 run found batch 1 host-bound). Here the key is
    what the autotuner builds (the key arguments' values and the dtype of every tensor argument), in a tuple made
    without dicts; its first launch goes through the autotuner (timing, or its cache) and records the config it
    used; later ones launch ``tuner.fn`` with that config: the same compiled kernel, the same bits. Under a
    CUDA-graph capture too (the recorded config was compiled when it was chosen, outside the capture).
    """
    index = _TUNED_KEY_INDEX.get(tuner) if _LAUNCH_MEMO else None
    if index is None:
        if not _LAUNCH_MEMO or not all(hasattr(tuner, a) for a in ("keys", "arg_names", "fn")):
            tuner[grid](*args, **kwargs)
            return
        positions = {name: i for i, name in enumerate(tuner.arg_names)}
        index = _TUNED_KEY_INDEX[tuner] = tuple((positions[k], k) for k in tuner.keys if k in positions)
    key = (tuner, *(args[i] if i < len(args) else kwargs.get(k) for i, k in index),
           *(a.dtype for a in args if isinstance(a, torch.Tensor)),
           *(a.dtype for a in kwargs.values() if isinstance(a, torch.Tensor)))
    config = _TUNED.get(key)
    if config is None:
        tuner[grid](*args, **kwargs)
        if tuner.best_config.pre_hook is None:  # a config's own hook runs at every launch: only its autotuner runs it
            _TUNED[key] = tuner.best_config.all_kwargs()
        return
    tuner.fn[grid](*args, **kwargs, **config)


# ARD_KERNELS_DIRECT_LAUNCH=0: every call goes through the ops' torch custom ops (read once, at import).
_DIRECT_LAUNCH = os.environ.get("ARD_KERNELS_DIRECT_LAUNCH", "1") != "0"


def _plain_eager(tensors) -> bool:
    """Plain tensors on CPU/CUDA, eager: no torch.compile trace, dispatch mode or functorch transform."""
    if not _DIRECT_LAUNCH or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # is_cuda / is_cpu rather than t.device.type: no torch.device object made per tensor per call
    return all(type(t) is torch.Tensor and (t.is_cuda or t.is_cpu) for t in tensors)


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
