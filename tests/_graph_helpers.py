"""CUDA-graph capture on the CPU: a stand-in for :class:`ard_kernels.graphs.GraphRunner` and a guard that fails
on the host↔device traffic a capture cannot hold (the ``meta`` device stands in for the GPU)."""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ard_kernels import graphs

aten = torch.ops.aten


class HostWork(AssertionError):
    """What a CUDA graph cannot capture: host data copied to the device, a device value read on the host."""


class HostWorkGuard(TorchDispatchMode):
    """Fails on host↔device traffic, with any non-CPU device (``meta`` here) standing in for the GPU.

    Host-only work (the CPU pattern tables, Python scalars, 0-dim CPU scalars in arithmetic) is
    fine in a capture; a CPU tensor feeding a device op (a mask built on the host and copied over)
    or a device value read back (``.item()``, ``nonzero``) is not.
    """

    COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default}
    SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type != "cpu"]
        if func in self.SYNCS and on_device:
            raise HostWork(f"{func}: reads a device value on the host")
        host = [t for t in tensors if t.device.type == "cpu" and (t.dim() > 0 or func in self.COPIES)]
        out = func(*args, **kwargs)
        out_device = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        if host and (on_device or out_device):
            raise HostWork(f"{func}: copies host data {[tuple(t.shape) for t in host]} to the device")
        return out


class EagerReplay:
    """Stand-in for :class:`ard_kernels.graphs.GraphRunner` on CPU (and ``meta``): "capture" runs ``fn`` after
    a warm-up run, each "replay" runs it again and writes the results into the captured outputs,
    as a graph replay rewrites its pool. So stale static inputs, a cache not reset by the replay,
    or a returned output aliasing the pool show up as wrong numbers; capture and replays run under
    :class:`HostWorkGuard`."""

    device_types = ("cpu", "meta")
    captures = 0
    replaying = False

    def __init__(self, device, capture_error_mode="global"):
        self.device = device
        self.capture_error_mode = capture_error_mode

    def guard(self):
        # On the CPU every tensor is a host tensor: the guard only means something on meta.
        return contextlib.nullcontext() if torch.device(self.device).type == "cpu" else HostWorkGuard()

    def capture(self, fn):
        type(self).captures += 1
        fn()  # the warm-up
        with self.guard():
            outputs = fn()

        def replay():
            type(self).replaying = True
            try:
                with self.guard():
                    fresh = fn()
                for old, new in zip(tree_leaves(outputs), tree_leaves(fresh), strict=True):
                    if old is None or new is None:  # e.g. the gradient of a parameter the loss does not reach
                        assert old is None and new is None, "an output was None in one run only"
                        continue
                    old.copy_(new)
            finally:
                type(self).replaying = False

        return replay, outputs


def install_eager_replay(monkeypatch):
    """Replace the graph runner by a fresh :class:`EagerReplay` subclass (its own capture count); returns it."""
    runner = type("Runner", (EagerReplay,), {"captures": 0})
    monkeypatch.setattr(graphs, "GraphRunner", runner)
    return runner
