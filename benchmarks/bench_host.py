"""Host time per call of the ops, one layer at a time: where a small batch's eager time goes.

The first H100 run (BENCHMARKS.md) found the small-batch rows host-bound: B1 4×256 attention took
0.435 ms for GPU work of the order of 20 µs, and an eager 4-step sample at B1 kept the GPU busy 4% of
its wall time. This benchmark times the launch path alone, on shapes whose GPU work is shorter than
their launch (so the queue never fills and the loop measures the host), peeling one layer at a time:

  api       ``ard_kernels.<op>(..., backend="triton")``: validation and backend choice on top of (without
            autograd, as timed here, the launcher directly: ``ard_kernels.ops.direct_launch_ok``)
  op        ``torch.ops.ard_kernels.<op>``: the custom op's dispatch (its autograd layer included) on top of
  launcher  the op's launch function: the launch plan, allocations and Triton's own launch, with
  plan      the attention's launch plan alone (schedule lookup, tile configs, TMA eligibility);
  floor     for scale: a torch elementwise op and SDPA on the same tensors (this host's per-op cost).

Forward + backward (``fwd+bwd``, autograd's engine included) of the attention and the two LayerNorm ops
through the public op, whose plain eager calls take a ``torch.autograd.Function`` over the launchers
(``ard_kernels.ops.differentiable_call``), beside the same call through the custom op's registered
autograd (``custom op fwd+bwd``, what torch.compile and dispatch modes get) and PyTorch's own
(``floor: ... fwd+bwd``). The KV cache's split-append through its checked wrapper, the raw op and
``HistoryKVCache``.
``us`` = median (``--stat min``: minimum) over ``--reps`` rounds of ``--calls`` calls of the host time per
call (perf_counter, no sync inside a round; ``--interleave``: the rounds of all cases taken in turn).
CUDA; on the CPU the same code runs under TRITON_INTERPRET=1 (a check that it works, its numbers are the
interpreter's), and with ``--stub-kernels`` the interpreter's kernel runs are no-ops: what is left is the host
time the package adds per call (validation, plans, allocations, dispatch), measurable without a GPU. Writes
results/host.json after every case.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ard_kernels as ak  # noqa: E402
from ard_kernels import _ext  # noqa: E402
from ard_kernels._backends import triton_runs_on  # noqa: E402
from ard_kernels.kv_cache import HistoryKVCache  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "host"
CPU_ARGV = ["--calls", "2", "--reps", "1"]
GPU_ARGV: list = []
QUICK_ARGV = ["--calls", "20", "--reps", "3"]
GPU_BUDGET_S = 8
BUDGET_ARG = "--time-budget-s"


def _parse(argv):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.split("\n")[0])
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--heads", type=int, default=16 if gpu else 1, help="attention heads (B1, 2 blocks of 16 tokens)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed round")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (their median is reported, or see --stat)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic over the rounds: min is the steadier on a shared machine (noise only adds time)")
    p.add_argument("--interleave", action="store_true",
                   help="time the cases round by round (each round every case once) instead of one after another")
    p.add_argument("--out", default=None, help="directory of host.json (default results/)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--stub-kernels", action="store_true",
                   help="CPU under TRITON_INTERPRET=1 only: the interpreter's kernel runs replaced by a no-op, so "
                        "that the rows time the package's own host path (validation, plans, allocations, dispatch)")
    common.add_budget_arg(p)
    return p.parse_args(argv)


def host_us(fn: Callable[[], object], device: torch.device, calls: int, reps: int, stat: str = "median") -> float:
    """Host µs per call of ``fn``: the median (or min) over ``reps`` rounds of ``calls`` calls, after 3 warm-up
    calls."""
    for _ in range(3):
        fn()
    common.sync(device)
    per_call = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
    common.sync(device)
    return 1e6 * (min(per_call) if stat == "min" else statistics.median(per_call))


def _attention_cases(device, dtype, heads):
    from ard_kernels.ops import block_attention as ba
    from ard_kernels.ops import block_schedule

    bs, nb, d = 16, 2, 72
    q, k, v = (torch.randn(1, heads, nb * bs, d, device=device, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    rows = block_schedule.encode_pattern("causal", nb)
    qkv = torch.randn(1, nb * bs, 3 * heads * d, device=device, dtype=dtype)
    qg = q.detach().clone().requires_grad_()
    grad = torch.randn_like(q)

    def fwd_bwd():
        ak.block_attention(qg, k, v, bs, "causal", backend="triton").backward(grad)

    return "block_attention", f"B1 H{heads} D{d} 2x{bs}", {
        "floor: x + 1": lambda: q.add(1.0),
        "floor: SDPA, no mask": lambda: F.scaled_dot_product_attention(q, k, v),
        "floor: SDPA, no mask, fwd+bwd": lambda: F.scaled_dot_product_attention(qg, k, v).backward(grad),
        "api": lambda: ak.block_attention(q, k, v, bs, "causal", backend="triton"),
        "api, packed qkv": lambda: ak.block_attention_qkv(qkv, heads, bs, "diagonal", backend="triton"),
        "op": lambda: torch.ops.ard_kernels.block_attention_fwd(q, k, v, nb, rows, bs, scale),
        "launcher": lambda: ba.block_attention_fwd(q, k, v, nb, rows, bs, scale),
        "plan": lambda: ba._Launch(q, k, nb, rows, bs, scale, "fwd", v),
        "api fwd+bwd": fwd_bwd,
        "custom op fwd+bwd": through_custom_op(fwd_bwd),
    }


@contextlib.contextmanager
def stubbed_kernels(on: bool):
    """With ``on``: every interpreted Triton kernel launch returns at once (``InterpretedFunction.run`` a no-op), the
    launch path up to it unchanged. Without a GPU that isolates the host time the package adds per call."""
    if not on:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    saved = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = saved


def through_custom_op(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every op call routed through its torch custom op (direct launches and the eager autograd
    route off for the call), for the cost of the custom op's layers."""
    from ard_kernels import ops

    def call():
        saved, ops._DIRECT_LAUNCH = ops._DIRECT_LAUNCH, False
        try:
            return fn()
        finally:
            ops._DIRECT_LAUNCH = saved

    return call


def _modulation_cases(device, dtype):
    from ard_kernels.ops import gated_residual_modulated_layer_norm as grmln
    from ard_kernels.ops import modulated_layer_norm as mln

    bs, n, c, eps = 16, 32, 1152, 1e-6
    x, y = (torch.randn(1, n, c, device=device, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(1, n // bs, c, device=device, dtype=dtype) for _ in range(3))
    ops = torch.ops.ard_kernels
    xg, shift_g, scale_g = (t.detach().clone().requires_grad_() for t in (x, shift, scale))
    dy = torch.randn_like(x)

    def mln_fwd_bwd():
        ak.modulated_layer_norm(xg, shift_g, scale_g, bs, backend="triton").backward(dy)

    def grmln_fwd_bwd():
        out, h = ak.gated_residual_modulated_layer_norm(xg, y, gate, shift_g, scale_g, bs, backend="triton")
        torch.autograd.backward((out, h), (dy, dy))

    return "modulation", f"B1 N{n} C{c}", {
        "floor: x + 1": lambda: x.add(1.0),
        "floor: F.layer_norm fwd+bwd": lambda: F.layer_norm(xg, (c,)).backward(dy),
        "modulated_layer_norm api fwd+bwd": mln_fwd_bwd,
        "modulated_layer_norm custom op fwd+bwd": through_custom_op(mln_fwd_bwd),
        "fused residual+LN api fwd+bwd": grmln_fwd_bwd,
        "fused residual+LN custom op fwd+bwd": through_custom_op(grmln_fwd_bwd),
        "gated_residual api": lambda: ak.gated_residual(x, y, gate, bs, backend="triton"),
        "modulated_layer_norm api": lambda: ak.modulated_layer_norm(x, shift, scale, bs, backend="triton"),
        "modulated_layer_norm op": lambda: ops.modulated_layer_norm_fwd(x, shift, scale, bs, eps, dtype),
        "modulated_layer_norm launcher": lambda: mln.modulated_layer_norm_fwd(x, shift, scale, bs, eps, dtype),
        "fused residual+LN api": lambda: ak.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, bs,
                                                                                 backend="triton"),
        "fused residual+LN api, in place": lambda: ak.gated_residual_modulated_layer_norm(
            x, y, gate, shift, scale, bs, inplace=True, backend="triton"),
        "fused residual+LN op, in place": lambda: ops.gated_residual_modulated_layer_norm_inplace(
            x, y, gate, shift, scale, bs, eps, dtype),
        "fused residual+LN launcher, in place": lambda: grmln._launch_fwd(x, y, gate, shift, scale, x, bs, eps,
                                                                          dtype),
    }


def _kv_cases(device, dtype, heads):
    if device.type != "cuda" or not _ext.extension_available():
        return None
    b, n, d, blocks = 1, 16, 72, 4
    cache = HistoryKVCache(1, b, heads, d, n, blocks, dtype=dtype, device=device, backend="cuda")
    cache.advance(n * (blocks - 1))
    kc, vc = cache.k[0], cache.v[0]  # layer 0 of the cache: what its split_append writes
    qkv = torch.randn(b, n, 3 * heads * d, device=device, dtype=dtype)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    stream = _ext.current_stream(device)
    off = n * (blocks - 1)
    return "kv_cache", f"B{b} H{heads} D{d} n{n}", {
        "floor: x + 1": lambda: qkv.add(1.0),
        "split_append wrapper (checked)": lambda: _ext.qkv_split_append(qkv, kc, vc, off, heads, status=status),
        "split_append op": lambda: torch.ops.ard_kernels.qkv_split_append(qkv, kc, vc, None, off, status, heads,
                                                                          stream),
        "HistoryKVCache.split_append": lambda: cache.split_append(0, qkv),
    }


def _row(op: str, shape: str, layer: str, args) -> dict:
    """A case's row before its timing: what it is, and whether the kernels ran."""
    return {"op": op, "shape": shape, "layer": layer, **({"kernels": "stubbed"} if args.stub_kernels else {})}


def _interleaved(groups, device, args) -> list[dict]:
    """Every case's rounds taken in turn (round r times each case once), so that a slow spell of a shared machine
    falls on all cases alike rather than on the one being timed; then each case's ``--stat`` over its rounds."""
    cases = [(_row(op, shape, layer, args), fn) for op, shape, group in filter(None, groups)
             for layer, fn in group.items()]
    times: dict = {}
    with stubbed_kernels(args.stub_kernels):
        for r in range(args.reps + 1):  # round 0 warms every case up
            for i, (row, fn) in enumerate(cases):
                if "error" in row:
                    continue
                try:
                    with torch.set_grad_enabled(row["layer"].endswith("fwd+bwd")):
                        times.setdefault(i, []).append(host_us(fn, device, args.calls, 1) if r else fn())
                except Exception as exc:  # noqa: BLE001 - one layer failing leaves a gap, not a crash
                    row["error"] = common.error_text(exc)
    for i, (row, _) in enumerate(cases):
        per_round = times.get(i, [])[1:]
        if "error" not in row and per_round:
            row["us"] = min(per_round) if args.stat == "min" else statistics.median(per_round)
    return [row for row, _ in cases]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    device = torch.device(args.device)
    rows: list[dict] = []
    if not triton_runs_on(device):
        rows.append(common.skipped("the Triton kernels do not run here (CUDA, or TRITON_INTERPRET=1 on the CPU)",
                                   op="all"))
        return rows
    if args.stub_kernels and device.type == "cuda":
        raise SystemExit("--stub-kernels: CPU tensors under TRITON_INTERPRET=1 only (a GPU runs its kernels)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = common.Budget(args.time_budget_s)
    with torch.no_grad():
        groups = [_attention_cases(device, dtype, args.heads), _modulation_cases(device, dtype),
                  _kv_cases(device, dtype, args.heads)]
    if args.interleave:
        rows = _interleaved(groups, device, args)
    for group in filter(None, () if args.interleave else groups):
        op, shape, cases = group
        for layer, fn in cases.items():
            row = _row(op, shape, layer, args)
            if not budget.allows():
                rows.append(common.skipped(**row))
                continue
            try:
                with stubbed_kernels(args.stub_kernels), torch.set_grad_enabled(layer.endswith("fwd+bwd")):
                    row["us"] = host_us(fn, device, args.calls, args.reps, args.stat)
            except Exception as exc:  # noqa: BLE001 - one layer failing leaves a gap, not a crash
                row["error"] = common.error_text(exc)
            rows.append(row)
            common.emit(row, ("op", "layer", "us", "error"))
            if not args.no_json:
                common.write_json(NAME, rows, args.out, complete=False)
    print(common.markdown_table(rows), flush=True)
    if not args.no_json:
        common.write_json(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
