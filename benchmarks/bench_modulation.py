"""Token-wise conditioning kernels: modulated LayerNorm, gated residual, the two fused, one layer's adaLN path.

``ms`` = median time (``triton.testing.do_bench`` on CUDA, a perf_counter loop on CPU);
``gbps`` = effective bandwidth: the bytes an ideal kernel moves (each tensor read or written
once, conditioning read once per (sample, block)) over ``ms``, the same count for every
provider, so gbps ranks providers like 1/ms. Modes: ``fwd`` (no autograd) and ``bwd`` (the
backward alone: ``autograd.grad`` of a retained graph, which also gives dshift/dscale/dgate).

Providers:
- ``ours``: the Triton kernels (:mod:`ard_kernels.ops`), conditioning per (sample, block);
- ``eager_ref``: :mod:`ard_kernels.reference` in eager PyTorch (per-block view, fp32 math);
- ``compiled_ref``: ``torch.compile`` of the same reference (CUDA only);
- ``per_token``: the published formulation, conditioning already repeated per token
  (B, N, C) as its adaLN Linear produces it; DiT's ``modulate`` / ``x + gate·y`` in eager;
- ``ours_unfused`` (``gated_residual_modulated_layer_norm`` only): our two separate kernels, one
  after the other, so the row shows what the fusion saves;
- ``ours_fused`` / ``ours_split`` (the two LayerNorm ops, ``bwd`` only, CUDA): our backward forced to one
  plan (``ARD_KERNELS_ROW_BWD``: the sums in the row kernel, or dx alone then the column-parallel sums);
  ``ours`` runs whichever its first call timed faster (``kernel_choices`` in the JSON says which).

``adaln_layer`` times the whole adaLN path of one DiT layer with the attention and MLP replaced
by the identity: the modulation Linear (on B·nb block rows for ours/eager_ref/compiled_ref, on
B·N token rows for per_token), two modulated LayerNorms and two gated residuals; its bwd mode
also differentiates the Linear's weights. ``x_per_token`` = per_token ms / ms.

Cases, most wanted first (``--cases``): ``main`` (CUDA default) — B64 4×256 C1152 (the issue's
targets), B1 4×256 C1152, B1 4×4096 C2048 (text-to-image); ``extra`` — B64 4×4096 C2048; ``all``.
``compiled_ref`` compiles per case, op and mode (~5 s each), so only the first
``--compiled-cases`` cases (default 1) and the ``--compiled-ops`` (default the two kernels, not
the adaLN layer, whose target is against the per-token formulation) get it. ``--time-budget-s``:
no new (case, op) starts once it is spent. CPU: small shapes, eager providers only.

Run: ``python benchmarks/bench_modulation.py [--cases all] [--compiled-cases 3]``; writes
results/modulation.json after every case.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "modulation"
EPS = 1e-6
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_ARGV: list[str] = []
GPU_ARGV: list[str] = ["--cases", "main", "--compiled-cases", "1"]
QUICK_ARGV = ["--quick"]
GPU_BUDGET_S = 45
BUDGET_ARG = "--time-budget-s"
# (B, N, C, block_size): DiT-XL/2 ARD training (4 states × 256 tokens) and text-to-image (4 × 4096, C 2048).
CASES = {
    "main": [(64, 4 * 256, 1152, 256), (1, 4 * 256, 1152, 256), (1, 4 * 4096, 2048, 4096)],
    "extra": [(64, 4 * 4096, 2048, 4096)],
}
CASES["all"] = CASES["main"] + CASES["extra"]
CPU_CASES = [(2, 4 * 16, 128, 16), (1, 4 * 16, 128, 16)]
OPS = ("modulated_layer_norm", "adaln_layer", "gated_residual", "gated_residual_modulated_layer_norm")


def _parse(argv: Sequence[str] | None):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog="bench_modulation", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=tuple(_DTYPES))
    p.add_argument("--cases", default="main", choices=tuple(CASES), help="case list on CUDA")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (filters the cases)")
    p.add_argument("--compiled-cases", type=int, default=1, help="how many leading cases get compiled_ref")
    p.add_argument("--compiled-ops", default="modulated_layer_norm,gated_residual",
                   help="the ops that get compiled_ref")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--providers", default=None, help="comma-separated subset of ours,eager_ref,compiled_ref,per_token")
    p.add_argument("--quick", action="store_true", help="first case only (B64 4×256 C1152 on CUDA)")
    p.add_argument("--out", default=None, help="directory of modulation.json (default results/)")
    p.add_argument("--no-json", action="store_true")
    common.add_budget_arg(p)
    return p.parse_args(argv)


def _default_providers(device: torch.device) -> list[str]:
    from ard_kernels import available_backends

    if device.type != "cuda":
        return ["eager_ref", "per_token"]
    names = ["ours", "eager_ref", "compiled_ref", "per_token"]
    return names if "triton" in available_backends(device) else names[1:]


def _per_token(cond, n, block_size):
    idx = torch.div(torch.arange(n, device=cond.device), block_size, rounding_mode="floor")
    return cond[:, idx].contiguous()


# Providers that force one plan of the row backwards (bwd rows only: their forward is ours').
_PLAN_PROVIDERS = {"ours_fused": "fused", "ours_split": "split"}


def _time(fn, inputs, dy, mode, device):
    """ms of the forward (no autograd) or of the backward alone (retained graph, no .grad accumulation)."""
    if mode == "fwd":
        with torch.no_grad():
            return common.time_ms(lambda: fn(*inputs), device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return common.time_ms(lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True), device)


def _elementwise_cases(op, b, n, c, block_size, dtype, device, providers):
    """(provider, fn, inputs) for one of the two kernels, plus (fwd bytes, bwd bytes)."""
    from ard_kernels import reference

    nb = -(-n // block_size)
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(b, n, c, device=device, dtype=dtype)
    conds = [torch.randn(b, nb, c, device=device, dtype=dtype) * 0.1 for _ in range(2)]
    tok, blk = b * n * c * es, b * nb * c * es
    if op == "modulated_layer_norm":
        from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_triton as ours

        ref = reference.modulated_layer_norm_ref
        inputs = [x, *conds]
        fns = {
            "ours": lambda a, s, k: ours(a, s, k, block_size, EPS),
            "eager_ref": lambda a, s, k: ref(a, s, k, block_size, EPS),
            "per_token": lambda a, s, k: F.layer_norm(a, (c,), eps=EPS) * (1 + k) + s,
        }
        fns.update(dict.fromkeys(_PLAN_PROVIDERS, fns["ours"]))
        # fwd: x, y, shift, scale; bwd: x, dy, dx, mean/rstd, scale, dshift, dscale.
        nbytes = {"fwd": 2 * tok + 2 * blk, "bwd": 3 * tok + 8 * b * n + 3 * blk}
    elif op == "gated_residual_modulated_layer_norm":
        from ard_kernels.ops.gated_residual import gated_residual_triton
        from ard_kernels.ops.gated_residual_modulated_layer_norm import gated_residual_modulated_layer_norm_triton
        from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_triton

        ref = reference.gated_residual_modulated_layer_norm_ref
        gate = torch.randn(b, nb, c, device=device, dtype=dtype) * 0.1
        inputs = [x, torch.randn(b, n, c, device=device, dtype=dtype), gate, *conds]

        def unfused(a, y, g, s, k):  # our two kernels one after the other: what the fusion saves
            out = gated_residual_triton(a, y, g, block_size)
            return out, modulated_layer_norm_triton(out, s, k, block_size, EPS)

        def per_token(a, y, g, s, k):
            out = a + g * y
            return out, F.layer_norm(out, (c,), eps=EPS) * (1 + k) + s

        fns = {
            "ours": lambda a, y, g, s, k: gated_residual_modulated_layer_norm_triton(a, y, g, s, k, block_size, EPS),
            "ours_unfused": unfused,
            "eager_ref": lambda a, y, g, s, k: ref(a, y, g, s, k, block_size, EPS),
            "per_token": per_token,
        }
        fns.update(dict.fromkeys(_PLAN_PROVIDERS, fns["ours"]))
        if "ours" in providers and "ours_unfused" not in providers:
            providers = [*providers, "ours_unfused"]
        # fwd: x, y, out, h, gate/shift/scale; bwd: dout, dh, out, y, dx, dy, mean/rstd, gate, scale, 3 sums.
        nbytes = {"fwd": 4 * tok + 3 * blk, "bwd": 6 * tok + 8 * b * n + 5 * blk}
    else:
        from ard_kernels.ops.gated_residual import gated_residual_triton as ours

        ref = reference.gated_residual_ref
        inputs = [x, torch.randn(b, n, c, device=device, dtype=dtype), conds[0]]
        fns = {
            "ours": lambda a, y, g: ours(a, y, g, block_size),
            "eager_ref": lambda a, y, g: ref(a, y, g, block_size),
            "per_token": lambda a, y, g: a + g * y,
        }
        # fwd: x, y, out, gate; bwd: dout, y, dy, gate, dgate (dx is dout itself).
        nbytes = {"fwd": 3 * tok + blk, "bwd": 3 * tok + 2 * blk}
    if "compiled_ref" in providers:
        fns["compiled_ref"] = torch.compile(fns["eager_ref"], dynamic=False)
    if "ours" in providers and device.type == "cuda" and _PLAN_PROVIDERS.keys() <= fns.keys():
        providers = [*providers, *[p for p in _PLAN_PROVIDERS if p not in providers]]
    cases = []
    for p in providers:
        if p not in fns:
            continue
        args = inputs
        if p == "per_token":  # its Linear already made per-token conditioning: not timed here
            n_cond = {"modulated_layer_norm": 2, "gated_residual": 1}.get(op, 3)
            args = inputs[:-n_cond] + [_per_token(t, n, block_size) for t in inputs[-n_cond:]]
        cases.append((p, fns[p], args))
    dy = torch.randn(b, n, c, device=device, dtype=dtype)
    return cases, nbytes, ((dy, torch.randn_like(dy)) if op == "gated_residual_modulated_layer_norm" else dy)


def _layer_cases(b, n, c, block_size, dtype, device, providers):
    """(provider, fn, inputs) for one layer's adaLN path (attention and MLP = identity)."""
    from ard_kernels.adaln import adaln_layer, adaln_layer_per_token

    nb = -(-n // block_size)
    linear = nn.Linear(c, 6 * c, device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(b, n, c, device=device, dtype=dtype)
    c_blocks = torch.randn(b, nb, c, device=device, dtype=dtype)

    def ident(h):
        return h

    def lin(w, bias):
        return lambda h: F.linear(h, w, bias)

    # The weights are inputs so that bwd differentiates them too (autograd.grad on leaves).
    fns = {
        "ours": lambda a, cb, w, bias: adaln_layer(a, cb, lin(w, bias), ident, ident, block_size, backend="triton"),
        "eager_ref": lambda a, cb, w, bias: adaln_layer(a, cb, lin(w, bias), ident, ident, block_size,
                                                        backend="reference"),
        "per_token": lambda a, cb, w, bias: adaln_layer_per_token(a, cb, lin(w, bias), ident, ident, block_size),
    }
    if "compiled_ref" in providers:
        fns["compiled_ref"] = torch.compile(fns["eager_ref"], dynamic=False)
    inputs = [x, c_blocks, linear.weight.detach(), linear.bias.detach()]
    cases = [(p, fns[p], inputs) for p in providers if p in fns]
    return cases, torch.randn(b, n, c, device=device, dtype=dtype)


def _run_case(rows, op, shape, mode, provider, fn, inputs, dy, device, nbytes=None):
    row = {"op": op, "shape": shape, "provider": provider, "mode": mode, "ms": None, "gbps": None}
    try:
        with common.env_var("ARD_KERNELS_ROW_BWD", _PLAN_PROVIDERS.get(provider)):
            ms = _time(fn, inputs, dy, mode, device)
        row["ms"] = ms
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9 if (ms and nbytes) else None
    except torch.cuda.OutOfMemoryError:
        row["note"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - one provider failing (e.g. a compile error) leaves a gap, not a crash
        row["error"] = common.error_text(e)
    common.free_device_memory(device)
    rows.append(row)
    common.emit(row, ("op", "shape", "mode", "provider", "ms", "gbps"))


def _one_op(rows, op, b, n, c, block_size, dtype, device, providers):
    shape = f"B{b} N{n // block_size}x{block_size} C{c}"
    if "compiled_ref" in providers:
        torch._dynamo.reset()  # the same lambdas recompile per shape: stay under the recompile limit
    try:
        if op == "adaln_layer":
            cases, dy = _layer_cases(b, n, c, block_size, dtype, device, providers)
            nbytes = {}
        else:
            cases, nbytes, dy = _elementwise_cases(op, b, n, c, block_size, dtype, device, providers)
    except torch.cuda.OutOfMemoryError:
        rows.append({"op": op, "shape": shape, "note": "out of memory (inputs)"})
        return
    start = len(rows)
    for mode in ("fwd", "bwd"):
        for p, fn, inputs in cases:
            if mode == "fwd" and p in _PLAN_PROVIDERS:
                continue
            _run_case(rows, op, shape, mode, p, fn, inputs, dy, device, nbytes.get(mode))
    if op == "adaln_layer":
        base = {q["mode"]: q["ms"] for q in rows[start:] if q["provider"] == "per_token"}
        for r in rows[start:]:
            if base.get(r["mode"]) and r["ms"]:
                r["x_per_token"] = base[r["mode"]] / r["ms"]
    del cases, dy
    common.free_device_memory(device)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    gpu = device.type == "cuda"
    cases = CASES[args.cases] if gpu else CPU_CASES
    if args.batches:
        keep = {int(v) for v in args.batches.split(",")}
        cases = [cs for cs in cases if cs[0] in keep]
    cases = cases[:1] if args.quick else cases
    providers = args.providers.split(",") if args.providers else _default_providers(device)
    if not gpu and not args.providers:
        providers = [p for p in providers if p != "compiled_ref"]  # inductor on CPU: slow to build, not the target
    if "compiled_ref" in providers:
        common.raise_recompile_limits()
    ops = [o for o in args.ops.split(",") if o]
    budget = common.Budget(args.time_budget_s)
    rows: list[dict] = []
    torch.manual_seed(0)
    for i, (b, n, c, block_size) in enumerate(cases):
        compiled_ops = args.compiled_ops.split(",") if i < args.compiled_cases else []
        for op in ops:
            if not budget.allows():
                rows.append(common.skipped(op=op, shape=f"B{b} N{n // block_size}x{block_size} C{c}"))
                continue
            op_providers = [p for p in providers if p != "compiled_ref" or op in compiled_ops]
            _one_op(rows, op, b, n, c, block_size, dtype, device, op_providers)
            if not args.no_json:
                common.write_json(NAME, rows, args.out, complete=False, dtype=args.dtype,
                                  kernel_choices=common.kernel_choices())
    print(f"bench_modulation ({args.dtype}, {device}):")
    print(common.markdown_table(rows), flush=True)
    if not args.no_json:
        path = common.write_json(NAME, rows, args.out, dtype=args.dtype, kernel_choices=common.kernel_choices())
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
