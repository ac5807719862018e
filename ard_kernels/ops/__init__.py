"""One module per op: its Triton kernels, launcher and autograd / custom-op glue."""

import contextlib
import functools

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
