"""One module per op: its Triton kernels, launcher and autograd / custom-op glue."""

import contextlib

import torch


def launch_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not whichever one is current: Triton launches on the current device,
    so a model on ``cuda:1`` would otherwise run its kernels on GPU 0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
