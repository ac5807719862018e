"""Block attention: our Triton kernel against every peer, forward and forward+backward.

Useful TFLOP/s counts only the allowed (query, key) token pairs: ``4·B·H·D·pairs`` for the
forward (QKᵀ and PV), ×3.5 for forward+backward (the backward's five matmuls, 2.5× the forward).
With whole blocks ``pairs = Σ allowed block pairs · block²``.

Providers (each skipped where it cannot run):
  ours            ``block_attention(..., backend="triton")`` (head dim 72 split 64 + 16)
  ours_pad128     the same kernel on inputs zero-padded to head dim 128: what the split saves
  sdpa_mask       ``F.scaled_dot_product_attention`` with a dense bool mask, default dispatch
  sdpa_efficient  the same, forced onto the memory-efficient backend
  flex            FlexAttention, compiled, with a cached ``BlockMask``
  block_loop      a loop over query blocks of flash SDPA on the allowed keys (no mask)
  flash_attn      the same loop through flash-attn's ``flash_attn_func`` (if importable)
  xformers        the same loop through ``xformers.ops.memory_efficient_attention`` (if importable)
  reference       ``block_attention_ref`` (CPU mode only)

Usage: ``python -m benchmarks.bench_attention [--cpu] [--quick] [--modes fwd,fwd+bwd]``; writes
``results/bench_attention.json`` and ``results/bench_attention.md``; ``main(argv)`` returns the rows.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ard_kernels import masks  # noqa: E402
from ard_kernels.reference import block_attention_ref  # noqa: E402
from benchmarks import common  # noqa: E402

OP = "block_attention"

# (B, H, D, nb, block_size, Lq blocks, pattern): ImageNet ARD (DiT-XL/2) and text-to-image.
GPU_SHAPES = (
    [(b, 16, 72, nb, 256, nb, "causal") for b in (1, 8, 64) for nb in range(1, 6)]
    + [(64, 16, 72, 4, 256, 1, "causal")]  # KV-cached step: one block of queries, four of keys
    + [(2, 16, 128, 4, 1024, 4, "causal"), (2, 16, 128, 4, 4096, 4, "causal")]
)
QUICK_SHAPES = [(8, 16, 72, 4, 256, 4, "causal"), (64, 16, 72, 4, 256, 4, "causal"),
                (2, 16, 128, 4, 4096, 4, "causal")]
CPU_SHAPES = [(1, 2, 72, 2, 32, 2, "causal"), (1, 2, 72, 3, 16, 1, "causal")]


def shape_name(b, h, d, nb, bs, lq_blocks, pattern) -> str:
    q = "" if lq_blocks == nb else f" q{lq_blocks}blk"
    return f"B{b} H{h} D{d} {nb}x{bs} {pattern}{q}"


def useful_flops(b, h, d, nb, bs, lq_blocks, pattern, mode) -> float:
    """4·B·H·D·(allowed token pairs), ×3.5 with the backward."""
    lk, lq = nb * bs, lq_blocks * bs
    pairs = int(masks.dense_mask(pattern, lq, lk, bs).sum())
    return 4.0 * b * h * d * pairs * (3.5 if mode == "fwd+bwd" else 1.0)


def _allowed_runs(table: torch.Tensor, i: int):
    """Key blocks seen by query block ``i`` as maximal runs [start, end) of consecutive blocks."""
    runs, cols = [], table[i].nonzero().flatten().tolist()
    for j in cols:
        if runs and runs[-1][1] == j:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return runs


def _block_loop(attend: Callable, q, k, v, bs, table, seq_dim: int):
    """Per query block: attend (no mask) to its allowed keys; non-contiguous keys are concatenated."""
    lq, lk = q.shape[seq_dim], k.shape[seq_dim]
    off = lk - lq
    outs = []
    for i in range(off // bs, masks.num_blocks(lk, bs)):
        r0, r1 = max(i * bs, off) - off, min((i + 1) * bs, lk) - off
        runs = _allowed_runs(table, i)
        ks = [k.narrow(seq_dim, a * bs, min(e * bs, lk) - a * bs) for a, e in runs]
        vs = [v.narrow(seq_dim, a * bs, min(e * bs, lk) - a * bs) for a, e in runs]
        kk = ks[0] if len(ks) == 1 else torch.cat(ks, seq_dim)
        vv = vs[0] if len(vs) == 1 else torch.cat(vs, seq_dim)
        outs.append(attend(q.narrow(seq_dim, r0, r1 - r0), kk, vv))
    return torch.cat(outs, seq_dim)


def _providers(device) -> dict[str, Callable]:
    """name -> builder(q, k, v, bs, pattern, table, scale) returning a zero-argument forward, or
    (forward, the tensors it differentiates) when it runs on copies, or None when it does not apply."""
    import ard_kernels

    def ours(q, k, v, bs, pattern, table, scale):
        return lambda: ard_kernels.block_attention(q, k, v, bs, pattern, scale=scale, backend="triton")

    def ours_pad128(q, k, v, bs, pattern, table, scale):
        if q.shape[-1] >= 128:
            return None
        pad = [t.detach().new_zeros(*t.shape[:-1], 128) for t in (q, k, v)]
        for p, t in zip(pad, (q, k, v)):
            p[..., :t.shape[-1]] = t.detach()
            p.requires_grad_(t.requires_grad)
        fwd = lambda: ard_kernels.block_attention(*pad, bs, pattern, scale=scale, backend="triton")  # noqa: E731
        return lambda: fwd()[..., :q.shape[-1]], pad

    def sdpa_mask(q, k, v, bs, pattern, table, scale):
        mask = masks.dense_mask(table, q.shape[2], k.shape[2], bs, device=q.device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def sdpa_efficient(q, k, v, bs, pattern, table, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask = masks.dense_mask(table, q.shape[2], k.shape[2], bs, device=q.device)

        def run():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return run

    def flex(q, k, v, bs, pattern, table, scale):
        from ard_kernels.ops.attention_peers import block_attention_flex

        return lambda: block_attention_flex(q, k, v, bs, table, scale)

    def block_loop(q, k, v, bs, pattern, table, scale):
        def attend(qi, ki, vi):
            return F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
        return lambda: _block_loop(attend, q, k, v, bs, table, 2)

    def flash_attn(q, k, v, bs, pattern, table, scale):
        from flash_attn import flash_attn_func

        # flash-attn takes (B, N, H, D); the transposes are views of our (B, H, N, D) inputs.
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: _block_loop(lambda a, b_, c: flash_attn_func(a, b_, c, softmax_scale=scale),
                                   qt, kt, vt, bs, table, 1).transpose(1, 2)

    def xformers(q, k, v, bs, pattern, table, scale):
        import xformers.ops as xops

        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: _block_loop(lambda a, b_, c: xops.memory_efficient_attention(a, b_, c, scale=scale),
                                   qt, kt, vt, bs, table, 1).transpose(1, 2)

    def reference(q, k, v, bs, pattern, table, scale):
        return lambda: block_attention_ref(q, k, v, bs, table, scale)

    if device.type == "cpu":
        from ard_kernels.ops import block_attention as ba

        provs = {"reference": reference, "sdpa_mask": sdpa_mask, "block_loop": block_loop}
        if ba._interpreting():
            provs["ours"] = ours
        return provs
    provs = {"ours": ours, "ours_pad128": ours_pad128, "sdpa_mask": sdpa_mask, "sdpa_efficient": sdpa_efficient,
             "flex": flex, "block_loop": block_loop}
    for name, fn in (("flash_attn", flash_attn), ("xformers", xformers)):
        try:
            __import__("flash_attn" if name == "flash_attn" else "xformers.ops")
            provs[name] = fn
        except Exception:  # noqa: BLE001 - optional peers: any import failure just drops them
            pass
    return provs


def _timed(build, q, k, v, mode, device) -> float | None:
    out_dim = q.shape[-1]
    fwd = build()
    if fwd is None:
        return None
    if isinstance(fwd, tuple):
        fwd, (q, k, v) = fwd
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd()
    else:
        g = torch.randn(*q.shape[:-1], out_dim, device=q.device, dtype=q.dtype)

        def step():
            out = fwd()
            return torch.autograd.grad(out, (q, k, v), g)
    step()  # compile / autotune outside the timing
    common.sync(device)
    return common.time_ms(step, device)


def run(shapes, modes, device, dtype, providers=None) -> list[dict]:
    provs = _providers(device)
    if providers:
        provs = {n: f for n, f in provs.items() if n in providers}
    rows = []
    for shp in shapes:
        b, h, d, nb, bs, lq_blocks, pattern = shp
        lk, lq = nb * bs, lq_blocks * bs
        table = masks.pattern_table(pattern, nb)
        scale = 1.0 / math.sqrt(d)
        for mode in modes:
            q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2)
                       .requires_grad_(mode != "fwd") for n in (lq, lk, lk))
            flops = useful_flops(*shp, mode)
            for name, builder in provs.items():
                row = {"op": OP, "shape": shape_name(*shp), "provider": name, "mode": mode, "ms": None,
                       "tflops": None}
                try:
                    build = functools.partial(builder, q, k, v, bs, pattern, table, scale)
                    ms = _timed(build, q, k, v, mode, device)
                except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is a table gap
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    ms = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if ms is not None:
                    row["ms"] = round(ms, 4)
                    row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
                if ms is not None or "error" in row:
                    rows.append(row)
                    print(f"{row['shape']:<34} {mode:<8} {name:<15} "
                          + (f"{ms:9.3f} ms {row['tflops']:8.1f} TFLOP/s" if ms is not None else row["error"]),
                          flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (reference, SDPA, interpreter)")
    parser.add_argument("--quick", action="store_true", help="three headline shapes only")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--providers", default="", help="comma-separated subset of providers")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cpu") if args.cpu or not common.on_gpu() else torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        shapes, dtype = CPU_SHAPES, torch.float32
    else:
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
    providers = [p for p in args.providers.split(",") if p]
    rows = run(shapes, args.modes.split(","), device, dtype, providers)
    path = common.write_json("bench_attention", rows, args.out_dir, dtype=str(dtype))
    table = common.markdown_table(rows, ["shape", "mode", "provider", "ms", "tflops"])
    path.with_suffix(".md").write_text(f"# Block attention ({common.env_info()['device']}, {dtype})\n\n" + table)
    print(table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
