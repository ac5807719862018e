"""History-KV-cache writes: the CUDA append / split-append kernels against the PyTorch ways.

``us`` = median µs (``triton.testing.do_bench`` on CUDA, a perf_counter loop on CPU); ``gbps`` =
effective bandwidth: the bytes an ideal kernel moves over ``us``, the same count for every
provider of an op (append: k and v read once and written once, 4·B·H·n·D·bytes; split-append:
qkv read once, q, k, v written once, 6·B·H·n·D·bytes), so gbps ranks providers like 1/us.
Each step writes the last block of the cache (history = max_blocks − 1 blocks before it), as
step K−1 of the sampler does, so torch.cat copies the largest history.

Ops and providers:
- ``append`` (k, v (B, H, n, D) into the caches): ``cuda`` (kv_append kernel, one launch),
  ``slice_copy`` (``cache[:, :, o:o+n].copy_(k)`` for k and v), ``torch_cat`` (the published
  code's ``torch.cat([history, k], dim=2)`` for k and v);
- ``split_append`` (qkv (B, n, 3·H·D) → q (B, H, n, D) + cache): ``cuda`` (qkv_split_append,
  one launch), ``q_contiguous_slice_copy`` (the unfused path: ``q.contiguous()`` + two slice copies
  from the permuted views), ``q_contiguous_cat`` (``q.contiguous()`` + torch.cat of k and v);
- ``qkv_append`` (qkv's k and v parts into the caches, q left where it is: what the sampler's history
  layers run, their attention reading q in place): ``cuda`` (qkv_append, one launch), ``slice_copy``
  (two slice copies from the permuted views); 4·B·H·n·D·bytes;
- ``cache_step`` (one sampler step of the history layers, for each layer): ``cache_cuda``
  (``HistoryKVCache.split_append``), ``cache_cuda_q_in_place`` (``HistoryKVCache.append_qkv``, the
  sampler's call) and ``cache_torch`` (``split_append`` on the PyTorch path); gbps counts all layers'
  split-append bytes for every provider (the same step, whichever way q reaches the attention).

Shapes (CUDA, bf16): ImageNet ARD, DiT-XL/2 (B 1 and 64, H 16, D 72, 256-token blocks, 4 blocks,
6 history layers) and text-to-image (B 2, H 16, D 128, 4096-token blocks, 4 blocks). CPU: one
small shape, PyTorch providers only. ``cache_step`` rows on CUDA also count the GPU kernels (and
copies) one step launches per layer (``launches_per_layer``, from the profiler). Rows say whether
the compiled extension was loaded (``ext``); without it only the PyTorch providers run. Writes
results/kv_cache.json after every case (and a markdown table).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ard_kernels import _ext  # noqa: E402
from ard_kernels.kv_cache import HistoryKVCache  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "kv_cache"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, B, H, D, block tokens n, max_blocks, history layers)
GPU_SHAPES = [
    ("imagenet_B1", 1, 16, 72, 256, 4, 6),
    ("imagenet_B64", 64, 16, 72, 256, 4, 6),
    ("t2i_B2", 2, 16, 128, 4096, 4, 6),
]
CPU_SHAPES = [("cpu_small", 1, 4, 72, 64, 4, 2)]
OPS = ("append", "split_append", "qkv_append", "cache_step")
CPU_ARGV: list = []
GPU_ARGV: list = []
QUICK_ARGV = ["--quick"]
GPU_BUDGET_S = 25
BUDGET_ARG = "--time-budget-s"


def _parse(argv):
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.split("\n")[0])
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--quick", action="store_true", help="first two shapes only")
    p.add_argument("--out", default=None, help="directory of kv_cache.json (default results/)")
    p.add_argument("--no-json", action="store_true")
    common.add_budget_arg(p)
    return p.parse_args(argv)


def _cases(op, b, h, d, n, blocks, dtype, device, use_ext):
    """{provider: zero-argument callable} for one op and shape; each call writes the last block."""
    cap = n * blocks
    off = cap - n
    kc = torch.zeros(b, h, cap, d, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    stream = _ext.current_stream(device) if device.type == "cuda" else 0
    cases = {}
    if op == "append":
        k = torch.randn(b, h, n, d, device=device).to(dtype)
        v = torch.randn_like(k)
        if use_ext:
            cases["cuda"] = lambda: torch.ops.ard_kernels.kv_append(kc, vc, k, v, None, off, status, stream)

        def slice_copy():
            kc[:, :, off:off + n].copy_(k)
            vc[:, :, off:off + n].copy_(v)

        cases["slice_copy"] = slice_copy
        hist_k, hist_v = kc[:, :, :off].contiguous(), vc[:, :, :off].contiguous()
        cases["torch_cat"] = lambda: (torch.cat([hist_k, k], dim=2), torch.cat([hist_v, v], dim=2))
    elif op in ("split_append", "qkv_append"):
        with_q = op == "split_append"
        qkv = torch.randn(b, n, 3 * h * d, device=device).to(dtype)
        if use_ext:
            kernel = getattr(torch.ops.ard_kernels, "qkv_split_append" if with_q else "qkv_append")
            cases["cuda"] = lambda: kernel(qkv, kc, vc, None, off, status, h, stream)

        def unfused():  # with q: the unfused path, q made contiguous, k and v sliced in
            q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            kc[:, :, off:off + n].copy_(k)
            vc[:, :, off:off + n].copy_(v)
            return q.contiguous() if with_q else None

        cases["q_contiguous_slice_copy" if with_q else "slice_copy"] = unfused
        if with_q:
            hist_k, hist_v = kc[:, :, :off].contiguous(), vc[:, :, :off].contiguous()

            def cat():
                q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
                return q.contiguous(), torch.cat([hist_k, k], dim=2), torch.cat([hist_v, v], dim=2)

            cases["q_contiguous_cat"] = cat
    return cases


def _step_cases(b, h, d, n, blocks, layers, dtype, device, use_ext):
    """One sampler step of every history layer through HistoryKVCache (the write position held at the last block)."""
    qkvs = [torch.randn(b, n, 3 * h * d, device=device).to(dtype) for _ in range(layers)]
    cases = {}
    for backend in (["cuda"] if use_ext else []) + ["torch"]:
        cache = HistoryKVCache(layers, b, h, d, n, blocks, dtype=dtype, device=device, backend=backend)
        cache.advance(n * (blocks - 1))

        def step(cache=cache):
            for layer in range(layers):
                cache.split_append(layer, qkvs[layer])

        cases[f"cache_{backend}"] = step
        if backend == "cuda":
            def step_in_place(cache=cache):
                for layer in range(layers):
                    cache.append_qkv(layer, qkvs[layer])

            cases["cache_cuda_q_in_place"] = step_in_place
    return cases


def _launches(fn, layers: int) -> float | None:
    """GPU kernels and copies/memsets one call of ``fn`` issues, per layer (torch.profiler), or None."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        n = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        return n / layers
    except Exception as e:  # noqa: BLE001 - the count is a nicety; the timings stand without it
        print(f"bench_kv_cache: launch count failed: {type(e).__name__}: {e}", flush=True)
        return None


def _measure(rows, op, shape, cases, nbytes, device, dtype_name, ext, layers):
    for provider, fn in cases.items():
        row = {"op": op, "shape": shape, "provider": provider, "mode": f"{device.type}-{dtype_name}", "us": None,
               "gbps": None, "ext": ext}
        try:
            ms = common.time_ms(fn, device)
            row.update(us=1e3 * ms, gbps=nbytes / (ms * 1e-3) / 1e9)
            if op == "cache_step" and device.type == "cuda":
                row["launches_per_layer"] = _launches(fn, layers)
        except Exception as e:  # noqa: BLE001 - one provider failing leaves a gap, not a crash
            row["error"] = common.error_text(e)
        rows.append(row)
        common.emit(row, ("op", "shape", "provider", "us", "gbps", "launches_per_layer"))


def main(argv: Sequence[str] | None = None) -> list:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = _DTYPES[dtype_name]
    use_ext = gpu and _ext.extension_available()
    ext = "yes" if use_ext else ("no (CPU)" if not gpu else f"no: {_ext.extension_error()}"[:200])
    print(f"bench_kv_cache: CUDA extension {ext}", flush=True)
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    ops = [o for o in args.ops.split(",") if o]
    es = torch.finfo(dtype).bits // 8
    budget = common.Budget(args.time_budget_s)
    rows = []
    for name, b, h, d, n, blocks, layers in shapes:
        shape = f"{name} B{b} H{h} D{d} n{n}×{blocks}"
        for op in ops:
            if not budget.allows():
                rows.append(common.skipped(op=op, shape=shape))
                continue
            try:
                if op == "cache_step":
                    cases = _step_cases(b, h, d, n, blocks, layers, dtype, device, use_ext)
                    nbytes = 6 * b * h * n * d * es * layers
                else:
                    cases = _cases(op, b, h, d, n, blocks, dtype, device, use_ext)
                    nbytes = (6 if op == "split_append" else 4) * b * h * n * d * es
                _measure(rows, op, shape, cases, nbytes, device, dtype_name, ext, layers)
                del cases
            except Exception as e:  # noqa: BLE001 - e.g. out of memory building a case's tensors
                rows.append({"op": op, "shape": shape, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            common.free_device_memory(device)
            if not args.no_json:
                common.write_json(NAME, rows, args.out, complete=False, extension=ext)
    base = {(r["op"], r["shape"]): r["us"] for r in rows
            if r.get("provider") in ("slice_copy", "q_contiguous_slice_copy", "cache_torch") and r.get("us")}
    for r in rows:
        ref = base.get((r["op"], r.get("shape")))
        if r.get("us"):
            r["speedup_vs_unfused"] = ref / r["us"] if ref else None
    print(common.markdown_table(rows), flush=True)
    if not args.no_json:
        path = common.write_json(NAME, rows, args.out, extension=ext)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
