"""Token-wise conditioning kernels: modulated LayerNorm, gated residual, and one layer's adaLN path.

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
  (B, N, C) as its adaLN Linear produces it; DiT's ``modulate`` / ``x + gate·y`` in eager.

``adaln_layer`` times the whole adaLN path of one DiT layer with the attention and MLP replaced
by the identity: the modulation Linear (on B·nb block rows for ours/eager_ref/compiled_ref, on
B·N token rows for per_token), two modulated LayerNorms and two gated residuals; its bwd mode
also differentiates the Linear's weights. ``x_per_token`` = per_token ms / ms.

Run: ``python benchmarks/bench_modulation.py`` (CUDA: B 1/64, 4×256 tokens C1152 and 4×4096
C2048, bf16; CPU: small shapes, eager providers only). Writes results/bench_modulation.json.
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

NAME = "bench_modulation"
EPS = 1e-6
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (N, C, block_size): DiT-XL/2 ARD training (4 states × 256 tokens) and text-to-image (4 × 4096, C 2048).
GPU_SHAPES = [(4 * 256, 1152, 256), (4 * 4096, 2048, 4096)]
GPU_BATCHES = [1, 64]
CPU_SHAPES = [(4 * 16, 128, 16)]
CPU_BATCHES = [1, 2]
OPS = ("modulated_layer_norm", "gated_residual", "adaln_layer")


def _parse(argv: Sequence[str] | None):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog="bench_modulation", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=tuple(_DTYPES))
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--providers", default=None, help="comma-separated subset of ours,eager_ref,compiled_ref,per_token")
    p.add_argument("--quick", action="store_true", help="first shape only (4×256 on CUDA)")
    p.add_argument("--out", default=None, help="directory of bench_modulation.json (default results/)")
    p.add_argument("--no-json", action="store_true")
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
        # fwd: x, y, shift, scale; bwd: x, dy, dx, mean/rstd, scale, dshift, dscale.
        nbytes = {"fwd": 2 * tok + 2 * blk, "bwd": 3 * tok + 8 * b * n + 3 * blk}
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
    cases = []
    for p in providers:
        if p not in fns:
            continue
        args = inputs
        if p == "per_token":  # its Linear already made per-token conditioning: not timed here
            n_cond = 2 if op == "modulated_layer_norm" else 1
            args = inputs[:-n_cond] + [_per_token(t, n, block_size) for t in inputs[-n_cond:]]
        cases.append((p, fns[p], args))
    return cases, nbytes, torch.randn(b, n, c, device=device, dtype=dtype)


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
    try:
        ms = _time(fn, inputs, dy, mode, device)
        note = ""
    except torch.cuda.OutOfMemoryError:
        ms, note = None, "out of memory"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gbps = nbytes / (ms * 1e-3) / 1e9 if (ms and nbytes) else None
    rows.append({"op": op, "shape": shape, "provider": provider, "mode": mode, "ms": ms, "gbps": gbps,
                 **({"note": note} if note else {})})


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    gpu = device.type == "cuda"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    shapes = shapes[:1] if args.quick else shapes
    batches = [int(v) for v in args.batches.split(",")] if args.batches else (GPU_BATCHES if gpu else CPU_BATCHES)
    providers = args.providers.split(",") if args.providers else _default_providers(device)
    if not gpu:
        providers = [p for p in providers if p != "compiled_ref"]  # inductor on CPU: slow to build, not the target
    ops = [o for o in args.ops.split(",") if o]
    rows: list[dict] = []
    torch.manual_seed(0)
    for n, c, block_size in shapes:
        for b in batches:
            shape = f"B{b} N{n // block_size}x{block_size} C{c}"
            for op in ops:
                if "compiled_ref" in providers:
                    torch._dynamo.reset()  # the same lambdas recompile per shape: stay under the recompile limit
                if op == "adaln_layer":
                    try:
                        cases, dy = _layer_cases(b, n, c, block_size, dtype, device, providers)
                    except torch.cuda.OutOfMemoryError:
                        continue
                    start = len(rows)
                    for mode in ("fwd", "bwd"):
                        for p, fn, inputs in cases:
                            _run_case(rows, op, shape, mode, p, fn, inputs, dy, device)
                    base = {q["mode"]: q["ms"] for q in rows[start:] if q["provider"] == "per_token"}
                    for r in rows[start:]:
                        if base.get(r["mode"]) and r["ms"]:
                            r["x_per_token"] = base[r["mode"]] / r["ms"]
                else:
                    try:
                        cases, nbytes, dy = _elementwise_cases(op, b, n, c, block_size, dtype, device, providers)
                    except torch.cuda.OutOfMemoryError:
                        continue
                    for mode in ("fwd", "bwd"):
                        for p, fn, inputs in cases:
                            _run_case(rows, op, shape, mode, p, fn, inputs, dy, device, nbytes[mode])
                del cases, dy
                if gpu:
                    torch.cuda.empty_cache()
    print(f"bench_modulation ({args.dtype}, {device}):")
    print(common.markdown_table(rows))
    if not args.no_json:
        path = common.write_json(NAME, rows, args.out, dtype=args.dtype)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
