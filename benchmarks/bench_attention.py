"""Block attention: our Triton kernel against every peer, forward and forward+backward.

Useful TFLOP/s counts only the allowed (query, key) token pairs: ``4·B·H·D·pairs`` for the
forward (QKᵀ and PV), ×3.5 for forward+backward (the backward's five matmuls, 2.5× the forward).
With whole blocks ``pairs = Σ allowed block pairs · block²``.

Providers (each skipped where it cannot run):
  ours            ``block_attention(..., backend="triton")`` (head dim 72 split 64 + 16)
  ours_pad128     the same kernel on inputs zero-padded to head dim 128: what the split saves
  sdpa_mask       ``F.scaled_dot_product_attention`` with a dense bool mask, default dispatch
  sdpa_efficient  the same, forced onto the memory-efficient backend
  block_loop      a loop over query blocks of flash SDPA on the allowed keys (no mask)
  flex            FlexAttention, compiled, with a cached ``BlockMask``
  flash_attn      the same loop through flash-attn's ``flash_attn_func`` (if importable)
  xformers        the same loop through ``xformers.ops.memory_efficient_attention`` (if importable)
  reference       ``block_attention_ref`` (CPU mode only)

Columns: ``ms`` (median, ``triton.testing.do_bench``), ``tflops`` (useful), ``first_s`` (the first
call: Triton autotuning / torch.compile included), ``err`` (forward only: max |out − fp32 SDPA|),
``vs_flex`` (FlexAttention ms / ms) and, for ``ours``, ``split_saves_%`` (time saved against
``ours_pad128``: what splitting head dim 72 as 64 + 16 saves over padding it to 128).

Cases (shape, mode) in priority order (a ``--time-budget-s`` run starts no case once the budget
is spent and lists the rest as skipped): ``--shapes main`` (default on CUDA) — issue 3's targets
first (B64 4×256 D72 fwd, B2 4×4096 D128 fwd, B64 4×256 fwd+bwd), then the KV-cached step (B64,
one block of queries on 4×256 keys), B2 4×4096 fwd+bwd, B8 and B1 4×256, B2 4×1024;
``ours_pad128`` only on the headline forward; ``extra`` — the padded comparison in fwd+bwd, 1, 2,
3, 5 blocks at B 64/8/1, the diagonal pattern; ``all`` — both; ``quick`` — the three targets.
CPU: two tiny shapes (fp32, the interpreter). Providers run in the order listed above (flash_attn and
xformers after flex). JSON is rewritten after every provider.

Usage: ``python benchmarks/bench_attention.py [--shapes main|extra|all|quick] [--modes fwd,fwd+bwd]
[--providers ours,flex] [--time-budget-s 120]``; writes ``results/attention.json`` (after every
provider); ``main(argv)`` returns the rows.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ard_kernels import masks  # noqa: E402
from ard_kernels.reference import block_attention_ref  # noqa: E402
from benchmarks import common  # noqa: E402

OP = "block_attention"
NAME = "attention"
CPU_ARGV: list[str] = []
GPU_ARGV: list[str] = ["--shapes", "main"]
QUICK_ARGV = ["--shapes", "quick"]
GPU_BUDGET_S = 150  # run_all's share for this module on a GPU (its --time-budget-s)
BUDGET_ARG = "--time-budget-s"
BUDGET_GRACE_S = 40  # a FlexAttention forward+backward compile may be in flight when the budget ends

# (shape, mode, providers left out), most wanted first; shape = (B, H, D, nb, block_size, Lq blocks, pattern).
# ImageNet ARD (DiT-XL/2, head dim 72) and text-to-image (head dim 128). Every new shape and mode costs
# FlexAttention a compile (~5-30 s) and our kernel an autotuning pass, so the default list puts the
# issue's three targets first and keeps the padded-to-128 comparison to the headline forward.
B64, B8, B1 = ((b, 16, 72, 4, 256, 4, "causal") for b in (64, 8, 1))
T2I, T2I_1K = (2, 16, 128, 4, 4096, 4, "causal"), (2, 16, 128, 4, 1024, 4, "causal")
KV_STEP = (64, 16, 72, 4, 256, 1, "causal")  # KV-cached step: one block of queries, four of keys
NO_PAD = ("ours_pad128",)
MAIN_SHAPES = [
    (B64, "fwd", ()), (T2I, "fwd", ()), (B64, "fwd+bwd", NO_PAD),  # issue 3's targets
    (KV_STEP, "fwd", NO_PAD), (T2I, "fwd+bwd", ()),
    (B8, "fwd", NO_PAD), (B1, "fwd", NO_PAD), (B8, "fwd+bwd", NO_PAD), (B1, "fwd+bwd", NO_PAD),
    (T2I_1K, "fwd", ()), (T2I_1K, "fwd+bwd", ()),
]
EXTRA_SHAPES = (
    [(B64, "fwd+bwd", ())]  # the padded comparison for training too
    + [((b, 16, 72, nb, 256, nb, "causal"), mode, ()) for b in (64, 8, 1) for nb in (1, 2, 3, 5)
       for mode in ("fwd", "fwd+bwd")]
    + [((64, 16, 72, 4, 256, 4, "diagonal"), mode, ()) for mode in ("fwd", "fwd+bwd")]  # upper layers' pattern
)
SHAPE_SETS = {"main": MAIN_SHAPES, "extra": EXTRA_SHAPES, "all": MAIN_SHAPES + EXTRA_SHAPES,
              "quick": MAIN_SHAPES[:3]}
CPU_SHAPES = [((1, 2, 72, 2, 32, 2, "causal"), m, ()) for m in ("fwd", "fwd+bwd")] + \
    [((1, 2, 72, 3, 16, 1, "causal"), m, ()) for m in ("fwd", "fwd+bwd")]


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


def _providers(device, gpu_paths: bool = False) -> dict[str, Callable]:
    """name -> builder(q, k, v, bs, pattern, table, scale) returning a zero-argument forward, or
    (forward, the tensors it differentiates) when it runs on copies, or None when it does not apply."""
    import ard_kernels

    def ours(q, k, v, bs, pattern, table, scale):
        return lambda: ard_kernels.block_attention(q, k, v, bs, pattern, scale=scale, backend="triton")

    def ours_pad128(q, k, v, bs, pattern, table, scale):
        if q.shape[-1] >= 128:
            return None
        # padded in the inputs' own layout ((B, N, H, D) storage seen as (B, H, N, D)), so the comparison
        # with `ours` differs in the head dim only
        pad = [t.detach().new_zeros(t.shape[0], t.shape[2], t.shape[1], 128).transpose(1, 2) for t in (q, k, v)]
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

    if device.type == "cpu" and not gpu_paths:
        from ard_kernels.ops import block_attention as ba

        provs = {"reference": reference, "sdpa_mask": sdpa_mask, "block_loop": block_loop}
        if ba._interpreting():
            provs["ours"] = ours
        return provs
    # FlexAttention last: its compile is the slowest first call, and a run cut short mid-compile
    # should still have every other provider of that case.
    provs = {"ours": ours, "ours_pad128": ours_pad128, "sdpa_mask": sdpa_mask, "sdpa_efficient": sdpa_efficient,
             "block_loop": block_loop, "flex": flex}
    for name, fn in (("flash_attn", flash_attn), ("xformers", xformers)):
        try:
            __import__("flash_attn" if name == "flash_attn" else "xformers.ops")
            provs[name] = fn
        except Exception:  # noqa: BLE001 - optional peers: any import failure just drops them
            pass
    return provs


def _timed(build, q, k, v, mode, device):
    """(median ms, seconds of the first call, forward output or None) of one provider."""
    out_dim = q.shape[-1]
    fwd = build()
    if fwd is None:
        return None, None, None
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
    t0 = time.perf_counter()
    first = step()  # compile / autotune outside the timing
    common.sync(device)
    first_s = time.perf_counter() - t0
    out = first if mode == "fwd" else None
    del first
    return common.time_ms(step, device), first_s, out


def _reference(q, k, v, table, bs, scale):
    """fp32 SDPA with the dense mask: what every provider's forward is compared with (None if it fails).

    On CUDA the memory-efficient kernel only: PyTorch's math fallback would materialise fp32 scores,
    34 GB at B2 H16 over 16k tokens.
    """
    try:
        mask = masks.dense_mask(table, q.shape[2], k.shape[2], bs, device=q.device)
        q32, k32, v32 = (t.detach().float() for t in (q, k, v))
        with torch.no_grad():
            if q.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale)
            return F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale)
    except Exception as e:  # noqa: BLE001 - the error column is a check, not the benchmark
        print(f"bench_attention: no fp32 reference ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def _annotate(rows: list[dict]) -> None:
    """vs_flex on every row of one (shape, mode); split_saves_% on ours (against ours_pad128)."""
    ms = {r["provider"]: r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        if r.get("ms") and ms.get("flex"):
            r["vs_flex"] = round(ms["flex"] / r["ms"], 3)
    for r in rows:
        if r["provider"] == "ours" and r.get("ms") and ms.get("ours_pad128"):
            r["split_saves_%"] = round(100.0 * (1.0 - r["ms"] / ms["ours_pad128"]), 1)


def _case(shp, mode, provs, device, dtype, check: bool, rows: list, on_rows=None) -> None:
    """Append one row per provider of (shape, mode) to ``rows``; ``on_rows(rows)`` after each. Our rows name the
    configs the autotuner chose (``configs``: per kernel, tile, warps, stages, TMA, overlap)."""
    from ard_kernels.ops import block_attention as ours_ops  # after the caller has set TRITON_INTERPRET
    b, h, d, nb, bs, lq_blocks, pattern = shp
    lk, lq = nb * bs, lq_blocks * bs
    table = masks.pattern_table(pattern, nb)
    scale = 1.0 / math.sqrt(d)
    # (B, N, H, D) storage viewed as (B, H, N, D): the layout DiT's qkv projection produces.
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_(mode != "fwd")
               for n in (lq, lk, lk))
    ref = _reference(q, k, v, table, bs, scale) if (check and mode == "fwd") else None
    flops = useful_flops(*shp, mode)
    start = len(rows)
    for name, builder in provs.items():
        row = {"op": OP, "shape": shape_name(*shp), "provider": name, "mode": mode, "ms": None, "tflops": None}
        try:
            build = functools.partial(builder, q, k, v, bs, pattern, table, scale)
            ours_ops.last_configs(clear=True)
            ms, first_s, out = _timed(build, q, k, v, mode, device)
            if ms is None:
                continue  # the provider does not apply to this shape
            chosen = ours_ops.last_configs() if name.startswith("ours") else None
            if chosen:  # what the autotuner chose, per kernel: which of the tuned configs carry the result
                row["configs"] = "; ".join(f"{kind} {desc}" for kind, desc in chosen.items())
            row["ms"] = round(ms, 4)
            row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
            row["first_s"] = round(first_s, 2)
            if ref is not None and out is not None:
                row["err"] = float(f"{(out.float() - ref).abs().max().item():.3g}")
            del out
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is a table gap
            row["error"] = common.error_text(e)
        common.free_device_memory(device)
        rows.append(row)
        common.emit(row, ("shape", "mode", "provider", "ms", "tflops", "first_s", "err", "configs"))
        if on_rows:
            on_rows(rows)
    _annotate(rows[start:])


def run(shapes, device, dtype, providers=None, modes=None, budget=None, check=True, gpu_paths=False,
        on_rows=None) -> list[dict]:
    """Rows for ``shapes`` = [(shape, mode, providers left out)]; ``on_rows(rows)`` after each row."""
    provs = _providers(device, gpu_paths)
    if providers:
        provs = {n: f for n, f in provs.items() if n in providers}
    budget = budget or common.Budget()
    rows: list[dict] = []
    for shp, mode, left_out in shapes:
        if modes and mode not in modes:
            continue
        if not budget.allows():
            rows.append(common.skipped(op=OP, shape=shape_name(*shp), mode=mode))
            continue
        _case(shp, mode, {n: f for n, f in provs.items() if n not in left_out}, device, dtype, check, rows,
              on_rows)
    if on_rows:
        on_rows(rows)
    return rows


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench_attention", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (reference, SDPA, interpreter)")
    p.add_argument("--shapes", default="main", choices=tuple(SHAPE_SETS), help="which shape list (CUDA)")
    p.add_argument("--quick", action="store_true", help="same as --shapes quick")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--providers", default="", help="comma-separated subset of providers")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--no-check", action="store_true", help="skip the forward error against fp32 SDPA")
    p.add_argument("--out", "--out-dir", dest="out", default=None, help="directory of attention.json")
    p.add_argument("--gpu-paths", action="store_true", help=argparse.SUPPRESS)  # GPU providers on the CPU (tests)
    common.add_budget_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    device = torch.device("cpu") if args.cpu or not common.on_gpu() else torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        shapes, dtype = CPU_SHAPES[:2] if (args.quick or args.shapes == "quick") else CPU_SHAPES, torch.float32
    else:
        shapes = SHAPE_SETS["quick" if args.quick else args.shapes]
        common.raise_recompile_limits()  # one compiled flex_attention serves every shape and mode
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    extra = {"dtype": str(dtype), "argv": list(argv or [])}

    def save(rows, complete=False):
        common.write_json(NAME, rows, args.out, complete=complete, kernel_choices=common.kernel_choices(), **extra)

    rows = run(shapes, device, dtype, providers, modes, common.Budget(args.time_budget_s), not args.no_check,
               args.gpu_paths, on_rows=save)
    save(rows, complete=True)
    print(common.markdown_table(rows, ["shape", "mode", "provider", "ms", "tflops", "first_s", "err", "vs_flex",
                                       "split_saves_%", "error", "skipped"]), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
