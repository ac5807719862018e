"""Programmatic dependent launch (PDL) of the inference kernels, on Hopper (sm_90) and later.

In a stream, and in a CUDA graph captured from one, a kernel starts when the previous one has finished: its
programs are scheduled, set up and begin loading only then. A kernel launched with PDL (the launch attribute
``programmaticStreamSerialization``, Triton's ``launch_pdl``) may start as soon as every program of the
previous kernel has signalled ``griddepcontrol.launch_dependents``, and must then execute
``griddepcontrol.wait`` (the previous grid complete, its memory visible) before it touches memory that kernel
may write or read. The kernels here wait before their first global load or store and signal right after the
wait, so the next kernel is resident while this one runs but is never more than one kernel ahead.

What that buys at batch 1, where a 4-step DiT-XL/2 sample is ~900 kernels of a few µs each: the launch gap and
the ramp of each kernel overlap the previous one, and the split-K linear prefetches its weight slice into L2
*before* its wait (:func:`prefetch_l2`: a hint that moves lines into L2, the GPU's point of coherence, and no
data into the program, so it cannot make the program see a stale value whatever the previous kernel writes).
The Linears' weights (32 MB a layer, the B1 sample's DRAM bound) then stream in while the LayerNorm and
attention kernels before them run, which barely use DRAM bandwidth. The first H100 run put cuBLAS at 62% of
the B1 sample's GPU time.

Off by default until a GPU run has measured it: ``ARD_KERNELS_PDL=1`` turns it on for the process,
:func:`programmatic_launch` for a block of code (``bench_e2e``'s ``graphs-pdl`` stack). A kernel gets the
instructions (constexpr ``USE_PDL``) exactly when it is launched with the attribute (:func:`pdl_meta`), and
computes the same bits either way. Only CUDA devices of compute capability 9.0 and later take it; the
interpreter never does (the instructions are inline PTX). Kernels of others (cuBLAS, PyTorch's) launch as
before: one of ours after them starts when they end, as without PDL.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.4; without them PDL stays off (pdl_active)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # pragma: no cover - depends on the installed triton
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():  # never reached: USE_PDL is never set without the real instructions
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

PDL_MODES = ("0", "1")
_MODE = os.environ.get("ARD_KERNELS_PDL", "0")
if _MODE not in PDL_MODES:
    raise ValueError(f"ARD_KERNELS_PDL: expected one of {PDL_MODES}, got {_MODE!r}")
_STATE = {"on": _MODE == "1"}


def programmatic_launch_enabled() -> bool:
    """Whether the inference kernels are launched with PDL where the device allows (:func:`pdl_active`)."""
    return _STATE["on"]


def set_programmatic_launch(enabled: bool) -> bool:
    """Turn PDL launches on or off for this process; returns the previous setting. A CUDA graph keeps the
    launches it captured: recapture after changing this (the sampler keys its graphs on it)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    previous = _STATE["on"]
    _STATE["on"] = enabled
    return previous


@contextlib.contextmanager
def programmatic_launch(enabled: bool = True):
    """``with programmatic_launch():`` the kernels launched inside use PDL (:func:`set_programmatic_launch`)."""
    previous = set_programmatic_launch(enabled)
    try:
        yield
    finally:
        set_programmatic_launch(previous)


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_active(device: torch.device) -> bool:
    """PDL switched on, ``device`` a CUDA GPU of compute capability 9.0 or later, and a triton that has the
    instructions."""
    if not _STATE["on"] or device.type != "cuda" or not _HAVE_GDC:
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def pdl_meta(device: torch.device) -> dict:
    """The launch keywords of a kernel with a ``USE_PDL`` constexpr: ``USE_PDL`` and Triton's ``launch_pdl``
    option together (a kernel launched with the attribute must wait; one that waits without it loses nothing)."""
    if pdl_active(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def wait_previous_kernel(USE_PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel is complete and its writes visible, then let the next kernel
    launch. Call before the first global load or store; nothing before it may touch memory another kernel
    writes (the caching allocator hands a freed buffer to the next kernel while the last may still read it)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask):
    """``prefetch.global.L2`` of the 128-byte line of each pointer where ``mask`` (predicated off elsewhere): a hint
    that moves no data into registers. Only addresses inside an allocation may be passed unmasked. Returns a dummy
    tensor (the instruction has no result)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def pdl_twins(specs: list, names: tuple) -> list:
    """``aot_check`` specs: a PDL twin (``_pdl``: USE_PDL compiled in, sm_90 only) of each spec in ``specs`` named in
    ``names``, so the check compiles the waits and reports that they precede every memory access."""
    picked = {}
    for spec in specs:  # one per name: the one compiled for sm_90 where several share it (as launched there)
        if spec["name"] in names and 90 in spec.get("archs", (90,)):
            picked.setdefault(spec["name"], spec)
    return [{**spec, "name": name + "_pdl", "constexprs": {**spec["constexprs"], "USE_PDL": True}, "archs": (90,)}
            for name, spec in picked.items()]
