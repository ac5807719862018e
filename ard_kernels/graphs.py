"""Capture and replay of one CUDA graph: the seam shared by the graphed sampler and the graphed training step.

``replay, outputs = GraphRunner(device).capture(fn)`` runs ``fn`` eagerly ``warmup_iters`` times on a side
stream (lazy initialisation, Triton autotuning and compilation, the attention schedules' device copies, the
row backwards' plan timing, cuBLAS/cuDNN set-up: everything a capture may not contain happens there), then
once under capture. ``outputs`` is what ``fn`` returned during the capture: tensors of the graph's private
memory pool, rewritten in place by every ``replay()``.

Users: :mod:`ard_kernels.sampling` (the K sampling steps) and :mod:`ard_kernels.training.graphed_step`
(forward, loss and backward of a training step). Their CPU tests replace :class:`GraphRunner` here by a
stand-in with the same interface that re-runs ``fn`` at every replay (both look it up at call time).
"""

from __future__ import annotations

import torch

CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")


class GraphRunner:
    """Capture and replay of one CUDA graph on ``device``.

    ``capture_error_mode`` is :class:`torch.cuda.graph`'s: "global" (a capture-unsafe CUDA call from any
    thread fails the capture) suits the sampler, which owns the process while it captures; "thread_local"
    restricts only the capturing thread, for a training loop whose DataLoader pin-memory thread may allocate
    pinned host memory at any moment (in global mode that call would invalidate the capture). Kernels that
    other threads launch on the capturing stream, such as the autograd engine's backward, are captured in
    either mode: capture follows the stream.
    """

    device_types = ("cuda",)
    warmup_iters = 2

    def __init__(self, device, capture_error_mode: str = "global"):
        if capture_error_mode not in CAPTURE_ERROR_MODES:
            raise ValueError(f"capture_error_mode: expected one of {CAPTURE_ERROR_MODES}, got {capture_error_mode!r}")
        self.device = torch.device(device)
        self.capture_error_mode = capture_error_mode
        self.graph = None

    def capture(self, fn):
        """``(replay, outputs)``: ``fn`` warmed up, then captured; ``replay()`` re-runs the captured work."""
        with torch.cuda.device(self.device):  # the capture stream and pool on the tensors' GPU
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    fn()
            current.wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=self.capture_error_mode):
                outputs = fn()
        return self.graph.replay, outputs
