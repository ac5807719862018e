"""Few-row linear layers for inference (Triton, split-K): ``y = act(x·Wᵀ + b)``.

A 4-step sample at batch 1 runs every Linear of DiT-XL/2 on M = 256 token rows. cuBLAS tiles such a
GEMM into few output tiles (256 × 1152 is 18 tiles of 128 × 128 on 132 SMs), each streaming the whole
K: the first H100 run measured the GEMMs at 62% of the B1 sample's GPU time, about 34 µs a layer
against the ~11 µs it takes to read the layer's 32 MB of weights once. Splitting K over programs
multiplies the programs that read the weights: each computes a (BLOCK_M, BLOCK_N) tile over one
K-slice and writes fp32 partial sums, and a second pass adds them in a fixed order (deterministic),
adds the bias and applies the activation (DiT's tanh-approximate GELU after fc1). With one slice the
GEMM writes ``y`` directly. The *serial* plans do that second pass inside the GEMM: the last program
of an output tile to finish (an arrival counter per tile) sums the tile's partials in the same fixed
order and writes ``y``, so a split costs one launch instead of two (at batch 1 each launch is a few µs
of a ~10 µs GEMM). Same bits as the two-pass plan.

Which of cuBLAS and the split-K plans is fastest depends on the shape and the GPU, so
:func:`linear` times them on the first call of each (M, N, K, dtype, activation, device) and keeps
the fastest for the rest of the process (cuBLAS whenever it wins: never slower than ``F.linear``
beyond the timing's noise). Inference only: no autograd (callers keep ``nn.Linear`` for training).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._backends import log_once
from ..reference import linear_ref
from . import arrival_counters, cdiv, launch_autotuned, launch_device, sm_count
from ._pdl import pdl_active, pdl_meta, prefetch_l2, wait_previous_kernel


@triton.jit
def _gelu_tanh(x):
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` in fp32, with tanh(u) = 1 − 2/(e^{2u} + 1)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # e^{2u} clamped below fp32's overflow: tanh is 1 to the last bit long before 2u = 80.
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))


@triton.jit
def _linear_epilogue(acc, BIAS_ptr, Y_ptr, offs_m, offs_n, n_ok, mask, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
                     GELU: tl.constexpr):
    """``y = act(acc + bias)`` stored in Y's dtype."""
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    y_ptrs = Y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    X_ptr, W_ptr, BIAS_ptr, Y_ptr, PART_ptr, COUNT_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False, LINE: tl.constexpr = 64,
):
    # Axis 0: output tiles, M fastest (the M-tiles sharing a weight tile run together and read it from L2);
    # axis 1: the K-slice [s·k_per_split, (s + 1)·k_per_split), k_per_split a multiple of BLOCK_K.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    if USE_PDL:
        # Launched while the previous kernel runs (PDL, :mod:`._pdl`): stream this program's share of its weight
        # slice into L2 meanwhile (the previous kernel never writes weights), then wait for it. The M-tiles of one
        # weight tile share the prefetch: M-tile pid_m takes every num_m-th line of LINE elements (128 bytes).
        w_rows = W_ptr + offs_n.to(tl.int64) * stride_wn
        for kk in range(k_lo + pid_m * LINE, k_hi, num_m * LINE):
            prefetch_l2(w_rows + kk * stride_wk, n_ok)
    wait_previous_kernel(USE_PDL)
    x_ptrs = X_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
    w_ptrs = W_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k + offs_k) < k_hi
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 dots are wrong: fp32 there
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        # fp32 partial sums (SPLIT_K, M, N), contiguous; the reduction pass finishes them.
        part = PART_ptr + (s.to(tl.int64) * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
        if SERIAL:
            # The tile's last program to arrive reduces it. Every thread's partial is stored before one
            # thread's release (the barrier); the counter's acquire makes the other programs' partials
            # visible to the reducer, whose loads skip L1 (not coherent across SMs). It puts the counter
            # back to zero for the next launch (or graph replay).
            splits = tl.num_programs(1)
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNT_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                rows = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
                slice_size = M.to(tl.int64) * N
                total = tl.load(PART_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")
                for t in range(1, splits):
                    total += tl.load(PART_ptr + t * slice_size + rows, mask=mask, other=0.0, cache_modifier=".cg")
                _linear_epilogue(total, BIAS_ptr, Y_ptr, offs_m, offs_n, n_ok, mask, stride_ym, stride_yn, HAS_BIAS,
                                 GELU)
                tl.atomic_xchg(COUNT_ptr + pid, 0, sem="relaxed", scope="gpu")
    else:
        _linear_epilogue(acc, BIAS_ptr, Y_ptr, offs_m, offs_n, n_ok, mask, stride_ym, stride_yn, HAS_BIAS, GELU)


@triton.jit
def _linear_reduce_kernel(PART_ptr, BIAS_ptr, Y_ptr, M, N, stride_ym, stride_yn, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
    """``y = act(Σ_s PART[s] + bias)``, the slices summed in order s = 0, 1, ... (deterministic)."""
    wait_previous_kernel(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.load(PART_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(PART_ptr + s * M * N + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + col, mask=ok, other=0.0).to(tl.float32)
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(Y_ptr + row * stride_ym + col * stride_yn, acc.to(Y_ptr.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    return type(_linear_kernel).__name__ == "InterpretedFunction"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the GPU autotunes over per plan. Few rows: 64-row
# tiles keep the M-tiles few and the N-tiles many; 128 × 64 halves the weight tile per program.
_CONFIGS = ((64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (128, 64, 64, 8, 3))
_INTERPRETER_CONFIG = (16, 16, 16, 4, 1)
_REDUCE_BLOCK = 1024
_AUTOTUNE_KEY = ["M", "N", "K", "k_per_split"]


@functools.cache
def _tuned_kernel():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in _CONFIGS]
    if os.environ.get("ARD_KERNELS_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    from ._rows import _tuning_bench

    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY, do_bench=_tuning_bench)(_linear_kernel)


def _k_per_split(K: int, split_k: int, block_k: int) -> int:
    """The K-slice of each of ``split_k`` programs: a multiple of ``block_k`` (every config's BLOCK_K
    divides it), covering K."""
    return cdiv(cdiv(K, split_k), block_k) * block_k


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
                  split_k: int = 1, serial: bool = False) -> torch.Tensor:
    """``y = act(x·Wᵀ + b)`` in Triton, K split over ``split_k`` slices (partials reduced in a fixed order).

    x: (M, K), weight: (N, K), bias: (N,) or None, one float dtype, any strides; ``gelu``: DiT's
    tanh-approximate GELU on the result; ``serial``: the last program of each output tile reduces it (one
    launch; the same bits), except inside a CUDA-graph capture for a tile count not run before it, which
    takes the two-pass reduction. Returns y (M, N) contiguous in x's dtype (fp32 accumulation).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return F.gelu(y, approximate="tanh") if gelu else y
    interp = _interpreting()
    max_bk = _INTERPRETER_CONFIG[2] if interp else max(c[2] for c in _CONFIGS)
    k_per_split = _k_per_split(K, split_k, max_bk)
    splits = cdiv(K, k_per_split)  # no empty slice: a slice count that K allows
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
    bias_arg = bias if bias is not None else y
    # Counters for the smallest tiles any config uses (more tiles than a larger config has: it uses a prefix).
    min_bm, min_bn = (_INTERPRETER_CONFIG[:2] if interp else (min(c[0] for c in _CONFIGS), min(c[1] for c in _CONFIGS)))
    counters = (arrival_counters(x.device, cdiv(M, min_bm) * cdiv(N, min_bn))
                if serial and splits > 1 else None)
    serial = counters is not None
    pdl = pdl_meta(x.device)  # both kernels' launch keywords
    meta = dict(HAS_BIAS=bias is not None, GELU=gelu, SPLIT=splits > 1, SERIAL=serial, UPCAST=interp,
                DOT_PREC="ieee" if (interp or x.dtype == torch.float32) else "tf32", **pdl)
    if pdl["USE_PDL"]:
        meta["LINE"] = 128 // weight.element_size()  # elements per 128-byte line: the prefetch's stride
    args = (x, weight, bias_arg, y, part, counters if serial else y, M, N, K, k_per_split, *x.stride(),
            *weight.stride(), *y.stride())
    with launch_device(x):
        if interp:
            bm, bn, bk, w, st = _INTERPRETER_CONFIG
            _linear_kernel[(cdiv(M, bm) * cdiv(N, bn), splits)](
                *args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        else:
            grid = lambda cfg: (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), splits)  # noqa: E731
            launch_autotuned(_tuned_kernel(), grid, args, meta)
        if splits > 1 and not serial:
            _linear_reduce_kernel[(cdiv(M * N, _REDUCE_BLOCK),)](
                part, bias_arg, y, M, N, *y.stride(), SPLIT_K=splits, HAS_BIAS=bias is not None,
                GELU=gelu, BLOCK=_REDUCE_BLOCK, num_warps=4, **pdl)
    return y


def _cublas(x, weight, bias, gelu):
    """cuBLAS(Lt): the GELU as the GEMM's epilogue where it can (CUDA, a bias, one dtype, nothing for
    autograd to track: the epilogue op has no derivative), else after it."""
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias) if t is not None)
    if gelu and bias is not None and x.is_cuda and x.dtype == weight.dtype == bias.dtype and not tracked:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return linear_ref(x, weight, bias, gelu)


def split_candidates(M: int, N: int, K: int, sms: int) -> tuple:
    """The K-split counts worth timing for an (M, N, K) GEMM on ``sms`` SMs: 1 (no split), and the
    powers of two (at most 16) while the programs stay within four per SM at 64 × 64 output tiles and each
    slice at least 256 deep. DiT-XL/2 at batch 1 on an H100: qkv (1, 2), proj and fc2 (1, 2, 4), fc1 (1,)."""
    tiles = cdiv(M, 64) * cdiv(N, 64)
    out, split = [1], 2
    while split <= 16 and K // split >= 256 and tiles * split <= 4 * sms:
        out.append(split)
        split *= 2
    return tuple(out)


# Per (M, N, K, dtype, gelu, has_bias, device): the plan the first call's timing chose, 0 = cuBLAS, s >= 1 =
# Triton with s K-slices reduced by a second pass, -s = the serial plan of s slices (reduced in the GEMM)
# (backend="triton" keys start with "triton": cuBLAS was not a candidate there).
_PLANS: dict = {}
_MAX_ROWS = int(os.environ.get("ARD_KERNELS_LINEAR_MAX_ROWS", "4096"))
# Under PDL, the rows up to which a GEMM reads more weight bytes than it has FLOPs per byte to hide them behind
# (an H100 does ~300 FLOP per byte of DRAM; a GEMM does M FLOPs per weight byte): there the Triton plans, whose
# weight prefetch overlaps the previous kernel, are timed without cuBLAS.
_PDL_TRITON_ROWS = 512


def _choose(x, weight, bias, gelu, with_cublas: bool = True) -> int:
    """Time cuBLAS (unless ``with_cublas`` is False) and each split-K plan on these arguments (warm, median of
    triton's do_bench) and return the fastest; the Triton plans' own tile autotuning runs in their first
    call, before the timing."""
    import triton.testing

    M, K = x.shape
    N = weight.shape[0]
    times = {}
    if with_cublas:
        times[0] = triton.testing.do_bench(lambda: _cublas(x, weight, bias, gelu), warmup=5, rep=25)
    for split in split_candidates(M, N, K, sm_count(x.device)):
        for plan in ((split, -split) if split > 1 else (split,)):
            linear_triton(x, weight, bias, gelu, abs(plan), plan < 0)  # compile and tune its tiles
            times[plan] = triton.testing.do_bench(lambda p=plan: linear_triton(x, weight, bias, gelu, abs(p), p < 0),
                                                  warmup=5, rep=25)
    best = min(times, key=times.get)
    us = {plan_name(s): round(t * 1e3, 2) for s, t in times.items()}
    log_once(f"linear-plan-{M}-{N}-{K}-{x.dtype}-{gelu}-{with_cublas}",
             f"ard_kernels.linear: (M={M}, N={N}, K={K}, {x.dtype}{', gelu' if gelu else ''}) runs "
             f"{'cuBLAS' if best == 0 else 'Triton ' + plan_name(best)} (us: {us})", logging.INFO)
    return best


def chosen_plans() -> dict:
    """``{"M N K [gelu] dtype": plan name}`` of every shape timed in this process (what the model ran)."""
    out = {}
    for key, plan in _PLANS.items():
        forced = key[0] == "triton"
        m, n, k, dtype, gelu = key[1:6] if forced else key[:5]
        out[f"M{m} N{n} K{k}{' gelu' if gelu else ''} {str(dtype).replace('torch.', '')}"
            + (" (triton only)" if forced else "") + (" (pdl)" if not forced and key[-1] else "")] = plan_name(plan)
    return out


def plan_name(plan: int) -> str:
    """"cublas", "split<s>" (two passes) or "serial<s>" (one launch) for a plan number of :data:`_PLANS`."""
    return "cublas" if plan == 0 else (f"split{plan}" if plan > 0 else f"serial{-plan}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           backend: str = "auto") -> torch.Tensor:
    """``y = act(x·Wᵀ + b)`` for inference, on whichever of cuBLAS and the Triton split-K plans is fastest.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; one dtype, one device.
        gelu: apply DiT's tanh-approximate GELU to the result (fc1's activation).
        backend: "auto" (CUDA bf16/fp16 inputs of at most ARD_KERNELS_LINEAR_MAX_ROWS rows, default 4096,
            without autograd: the plan timed fastest on the first call of each shape, else PyTorch),
            "torch" (cuBLAS / PyTorch), "triton" (the split-K kernel, its slices chosen by timing on the
            GPU; one slice under the interpreter). With programmatic dependent launch on
            (:mod:`ard_kernels.ops._pdl`) "auto" times the Triton plans only for at most 512 rows: their
            weight prefetch overlaps the previous kernel, which a GEMM timed on its own cannot show.

    Returns:
        (..., N) in x's dtype. Never timed inside a CUDA-graph capture: a shape first seen there runs
        cuBLAS (logged once), so warm a captured model up eagerly.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    lead, K = x.shape[:-1], x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight: expected (N, {K}) to match x's last dim, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected ({weight.shape[0]},), got {tuple(bias.shape)}")
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if backend == "torch":
        return _cublas(rows, weight, bias, gelu).reshape(*lead, -1)
    if backend == "triton":
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            raise RuntimeError("backend: 'triton' linear is inference-only (no autograd); run under torch.no_grad()")
        if x.is_cuda and not torch.cuda.is_current_stream_capturing():
            key = ("triton", M, weight.shape[0], K, x.dtype, gelu, bias is not None, x.device)
            if key not in _PLANS:
                _PLANS[key] = _choose(rows, weight, bias, gelu, with_cublas=False)
            plan = _PLANS[key]
        else:
            plan = 1
        return linear_triton(rows, weight, bias, gelu, abs(plan), plan < 0).reshape(*lead, -1)
    # Traced (torch.compile), under a dispatch mode (FakeTensorMode, FlopCounterMode, the op census) or on
    # tensor subclasses: cuBLAS, the op everything knows; timing needs real tensors and kernels.
    usable = (not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
              and type(x) is torch.Tensor and type(weight) is torch.Tensor
              and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
              and (bias is None or bias.dtype == x.dtype) and 0 < M <= _MAX_ROWS and K > 0
              and not torch.is_grad_enabled() and os.environ.get("ARD_KERNELS_FAST_LINEAR", "1") != "0")
    if not usable:
        return _cublas(rows, weight, bias, gelu).reshape(*lead, -1)
    # Under PDL (:mod:`._pdl`) the Triton plans prefetch their weights into L2 while the previous kernel runs, which
    # a GEMM timed on its own cannot show, and a cuBLAS GEMM would break the chain of early launches: where the
    # weights bound the GEMM (few rows) the plans are timed among themselves.
    pdl = pdl_active(x.device)
    key = (M, weight.shape[0], K, x.dtype, gelu, bias is not None, x.device, pdl)
    plan = _PLANS.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            log_once(f"linear-capture-{key[:3]}", f"ard_kernels.linear: (M, N, K) = {key[:3]} first seen inside a "
                     "CUDA-graph capture: cuBLAS (warm up eagerly to time the split-K plans)")
            return _cublas(rows, weight, bias, gelu).reshape(*lead, -1)
        plan = _PLANS[key] = _choose(rows, weight, bias, gelu, with_cublas=not (pdl and M <= _PDL_TRITON_ROWS))
    if plan == 0:
        return _cublas(rows, weight, bias, gelu).reshape(*lead, -1)
    return linear_triton(rows, weight, bias, gelu, abs(plan), plan < 0).reshape(*lead, -1)


def aot_specs():
    """GPU configurations for ``python -m ard_kernels.aot_check``: every tile, split or not, GELU or not."""
    from ..aot_check import make_signature

    specs = []
    # (split, gelu, serial, PDL): PDL (the weight prefetch and the wait) on bf16, as the B1 sampler would run it.
    variants = ((False, False, False, False), (False, True, False, False), (True, False, False, False),
                (True, True, True, False), (False, True, False, True), (True, False, True, True))
    for dtype in ("bf16", "fp16"):
        for bm, bn, bk, w, st in _CONFIGS:
            for split, gelu, serial, pdl in variants:
                if pdl and dtype != "bf16":
                    continue
                specs.append({
                    "name": f"linear_{dtype}_{bm}x{bn}x{bk}_w{w}s{st}" + ("_split" if split else "")
                            + ("_serial" if serial else "") + ("_gelu" if gelu else "") + ("_pdl" if pdl else ""),
                    "kernel": _linear_kernel,
                    "signature": make_signature(_linear_kernel, dtype, {"PART_ptr": "*fp32", "COUNT_ptr": "*i32"}),
                    "constexprs": {"HAS_BIAS": True, "GELU": gelu, "SPLIT": split, "SERIAL": serial, "UPCAST": False,
                                   "DOT_PREC": "tf32",
                                   "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "stride_xk": 1, "stride_wk": 1,
                                   "stride_yn": 1, "USE_PDL": pdl, "LINE": 64},
                    "divisible": ("K", "N", "stride_xm", "stride_wn", "stride_ym", "k_per_split"),
                    "num_warps": w,
                    "num_stages": st,
                    **({"archs": (90,)} if pdl else {}),  # griddepcontrol: sm_90 and later
                })
    specs.append({
        "name": "linear_reduce_bf16_pdl",
        "kernel": _linear_reduce_kernel,
        "signature": make_signature(_linear_reduce_kernel, "bf16", {"PART_ptr": "*fp32"}),
        "constexprs": {"SPLIT_K": 2, "HAS_BIAS": True, "GELU": False, "BLOCK": _REDUCE_BLOCK, "stride_yn": 1,
                       "USE_PDL": True},
        "divisible": ("N", "stride_ym"),
        "num_warps": 4,
        "archs": (90,),
    })
    return specs
