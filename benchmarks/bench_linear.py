"""Few-row inference linears of DiT-XL/2: cuBLAS against the Triton split-K GEMM (ard_kernels/ops/linear.py).

The 4-step sampler runs every Linear of a step on B·256 token rows; at batch 1 the first H100 run measured
its GEMMs at 62% of the GPU time, ~34 µs a layer where reading the layer's weights once takes ~11.
Per layer and batch: ``qkv`` (C → 3C), ``proj`` (C → C), ``fc1`` (C → 4C, tanh-GELU fused), ``fc2``
(4C → C). Providers: ``cublas`` (``F.linear``, fc1 through cuBLASLt's GELU epilogue), ``split<s>`` (the
Triton kernel with s K-slices reduced by a second launch; its tile autotuned), ``serial<s>`` (the same,
reduced by each tile's last program: one launch), ``auto`` (:func:`ard_kernels.ops.linear.linear`, the
plan its first call timed fastest: what the model runs). ``us`` median µs (do_bench); ``tflops``;
``weight_gbps`` = weight bytes over time (the bound at few rows); ``vs_cublas`` cuBLAS's time over this
one. CPU: one tiny shape through the interpreter (a check that it runs; timings meaningless).

``chain`` rows (CUDA, compute capability 9.0 and later, the first batch): what programmatic dependent launch
(:mod:`ard_kernels.ops._pdl`) does for a Linear that follows a latency-bound kernel, as in the sampler: one CUDA
graph of 8 (modulated LayerNorm of the layer input → Linear) pairs, each Linear with its own weights (8 layers'
worth, more than L2 holds), ``us`` per pair. Providers: ``auto`` (plain launches, the plan ``linear`` times
fastest), ``triton`` (plain launches, the Triton plan ``linear`` times fastest among its own), ``pdl`` (PDL
launches, the Triton plan: its weights are prefetched into L2 while the LayerNorm runs). Writes
results/linear.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ard_kernels.ops import linear as lin  # noqa: E402
from ard_kernels.ops import sm_count  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "linear"
CPU_ARGV: list = []
GPU_ARGV: list = []
QUICK_ARGV = ["--batches", "1"]
GPU_BUDGET_S = 20
BUDGET_ARG = "--time-budget-s"
HIDDEN = 1152  # DiT-XL/2


def _layers(c: int):
    """(name, N, K, gelu) of one DiT layer's Linears at hidden width c."""
    return (("qkv", 3 * c, c, False), ("proj", c, c, False), ("fc1", 4 * c, c, True), ("fc2", c, 4 * c, False))


def _parse(argv):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.split("\n")[0])
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--batches", default="1,8" if gpu else "1", help="comma-separated batch sizes (B·256 rows)")
    p.add_argument("--tokens", type=int, default=256 if gpu else 8, help="rows per sample (one block)")
    p.add_argument("--hidden", type=int, default=HIDDEN if gpu else 32)
    p.add_argument("--out", default=None, help="directory of linear.json (default results/)")
    p.add_argument("--no-json", action="store_true")
    common.add_budget_arg(p)
    return p.parse_args(argv)


def _cases(x, w, b, gelu, splits, gpu) -> dict:
    """{provider: zero-argument callable} of one shape."""
    cases = {"cublas": lambda: lin._cublas(x, w, b, gelu)}
    for s in splits:
        cases[f"split{s}"] = lambda s=s: lin.linear_triton(x, w, b, gelu, s)
        if s > 1:
            cases[f"serial{s}"] = lambda s=s: lin.linear_triton(x, w, b, gelu, s, serial=True)
    if gpu:
        cases["auto"] = lambda: lin.linear(x, w, b, gelu)
    return cases


def run(args, on_rows=None) -> list[dict]:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    budget = common.Budget(args.time_budget_s)
    rows: list[dict] = []
    for batch in (int(b) for b in args.batches.split(",") if b):
        m = batch * args.tokens
        for name, n, k, gelu in _layers(args.hidden):
            shape = f"{name} M{m} N{n} K{k}" + (" +gelu" if gelu else "")
            if not budget.allows():
                rows.append(common.skipped(op="linear", shape=shape, batch=batch))
                continue
            x = torch.randn(m, k, device=device, dtype=dtype)
            w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
            b = torch.randn(n, device=device, dtype=dtype)
            splits = lin.split_candidates(m, n, k, sm_count(device)) if gpu else (1, 2)
            cases = _cases(x, w, b, gelu, splits, gpu)
            flops = 2 * m * n * k
            with torch.no_grad():
                for provider, fn in cases.items():
                    row = {"op": "linear", "shape": shape, "batch": batch, "provider": provider, "us": None}
                    try:
                        fn()  # compile, autotune, choose a plan
                        ms = common.time_ms(fn, device)
                        row.update(us=1e3 * ms, tflops=flops / (ms * 1e-3) / 1e12,
                                   weight_gbps=n * k * w.element_size() / (ms * 1e-3) / 1e9)
                        if provider == "auto":
                            plan = lin._PLANS.get((m, n, k, dtype, gelu, True, device, False))
                            row["plan"] = lin.plan_name(plan) if plan is not None else None
                    except Exception as e:  # noqa: BLE001 - one provider failing leaves a gap, not a crash
                        row["error"] = common.error_text(e)
                    rows.append(row)
                    common.emit(row, ("shape", "provider", "us", "tflops", "weight_gbps", "plan"))
            ref = next((r["us"] for r in rows if r.get("shape") == shape and r.get("provider") == "cublas"
                        and r.get("us")), None)
            for r in rows:
                if r.get("shape") == shape and r.get("us") and ref:
                    r["vs_cublas"] = ref / r["us"]
            del cases
            common.free_device_memory(device)
            if on_rows:
                on_rows(rows)
    if gpu and torch.cuda.get_device_capability(device)[0] >= 9 and rows:
        first = min(r["batch"] for r in rows if "batch" in r)
        for name, n, k, gelu in _layers(args.hidden):
            if not budget.allows():
                rows.append(common.skipped(op="chain", shape=f"LN + {name}", batch=first))
                continue
            rows += _chain_rows(name, first, first * args.tokens, n, k, gelu, device, dtype)
            if on_rows:
                on_rows(rows)
    # Per batch: one layer's four Linears, the sum of each provider's times (auto: what the model runs).
    for batch in sorted({r["batch"] for r in rows if "batch" in r}):
        for provider in ("cublas", "auto"):
            got = [r["us"] for r in rows if r.get("op") == "linear" and r.get("batch") == batch
                   and r.get("provider") == provider and r.get("us")]
            if len(got) == 4:
                rows.append({"op": "linear_layer", "shape": f"4 Linears of a DiT layer, M{batch * args.tokens}",
                             "batch": batch, "provider": provider, "us": sum(got)})
    print(common.markdown_table(rows), flush=True)
    return rows


def _chain_rows(name, batch, m, n, k, gelu, device, dtype, pairs: int = 8) -> list:
    """The ``chain`` rows of one Linear (module docstring): µs per (LayerNorm → Linear) pair, 8 pairs a graph."""
    from ard_kernels.graphs import GraphRunner
    from ard_kernels.ops import programmatic_launch
    from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_fwd

    x = torch.randn(1, m, k, device=device, dtype=dtype)
    shift, scale = (torch.randn(1, 1, k, device=device, dtype=dtype) * 0.1 for _ in range(2))
    layers = [(torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5, torch.randn(n, device=device, dtype=dtype))
              for _ in range(pairs)]
    rows = []
    for provider, backend, pdl in (("auto", "auto", False), ("triton", "triton", False), ("pdl", "auto", True)):
        row = {"op": "chain", "shape": f"LN + {name} M{m} N{n} K{k} x{pairs}", "batch": batch, "provider": provider,
               "us": None}
        try:
            with torch.no_grad(), programmatic_launch(pdl):
                def chain(backend=backend):
                    for w, b in layers:
                        h = modulated_layer_norm_fwd(x, shift, scale, m, 1e-6, dtype)[0].reshape(m, k)
                        y = lin.linear(h, w, b, gelu, backend=backend)
                    return y
                # the warm-up runs time the plans, compile the kernels and make the counters: never in the capture
                replay, _ = GraphRunner(device).capture(chain)
                row["us"] = 1e3 * common.time_ms(replay, device) / pairs
        except Exception as e:  # noqa: BLE001 - one provider failing leaves a gap, not a crash
            row["error"] = common.error_text(e)
        rows.append(row)
        common.emit(row, ("shape", "provider", "us"))
    return rows


def main(argv: Sequence[str] | None = None) -> list:
    args = _parse(argv)
    return common.run_and_save(NAME, args, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
