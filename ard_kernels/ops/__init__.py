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


# ARD_KERNELS_DIRECT_LAUNCH=0: every call goes through the ops' torch custom ops (read once, at import).
_DIRECT_LAUNCH = os.environ.get("ARD_KERNELS_DIRECT_LAUNCH", "1") != "0"


def direct_launch_ok(*tensors: torch.Tensor) -> bool:
    """Whether an op's forward may call its launcher directly rather than through its torch custom op.

    The custom op's Python dispatch (autograd layer, redispatch, dynamo's guard) costs more than the
    launcher's own work at small sizes (about 15 µs a call on the CPU machine here, 20 with a mutated
    input; ``benchmarks/bench_host.py`` measures it per layer), and the first H100 run found small
    batches host-bound. So plain eager calls that need no autograd skip it. The custom op stays for
    everything it exists for: autograd (an input requires grad under grad mode), torch.compile (traced
    calls), fake, meta and subclass tensors, dispatch modes (FakeTensorMode, FlopCounterMode,
    functionalization, selective checkpointing) and functorch transforms.
    """
    if not _DIRECT_LAUNCH or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and t.device.type in ("cuda", "cpu") and not (grad and t.requires_grad)
               for t in tensors)


def forward_call(op, launcher, *args):
    """``launcher(*args)`` where :func:`direct_launch_ok` allows it, else ``op(*args)``: ``op`` is the custom op
    whose body is ``launcher``, so both take the same arguments (the tensors among them decide)."""
    if direct_launch_ok(*(a for a in args if isinstance(a, torch.Tensor))):
        return launcher(*args)
    return op(*args)
