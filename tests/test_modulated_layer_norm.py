"""Fused LayerNorm + per-block modulation (Triton) against the reference and DiT's per-token form.

CPU: fp32 through the Triton interpreter on tiny grids (odd C, N not a multiple of the block,
strided inputs, determinism, custom-op registration, a fullgraph trace). GPU (``cuda``): bf16/
fp16/fp32 at DiT sizes, judged by the error of PyTorch's own low-precision computation, and
torch.compile(fullgraph=True) through forward and backward.
"""

import pytest
import torch
import torch.nn.functional as F
from _modulation_helpers import (
    CPU_SHAPES,
    CUDA_SHAPES,
    assert_lowp_close,
    assert_repeatable,
    grads,
    grads32,
    pinned_backward_configs,
)

import ard_kernels as ak
from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_triton
from ard_kernels.reference import _per_token, modulated_layer_norm_ref

EPS = 1e-6


def make_inputs(b, n, c, block_size, dtype=torch.float32, device="cpu", requires_grad=True):
    nb = -(-n // block_size)
    x = torch.randn(b, n, c, device=device).mul(2).add(0.5).to(dtype)
    shift = torch.randn(b, nb, c, device=device).to(dtype)
    scale = torch.randn(b, nb, c, device=device).mul(0.5).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, shift, scale)]


def per_token(x, shift, scale, block_size):
    """DiT's modulate on conditioning repeated per token, in fp32."""
    n = x.shape[1]
    xf = F.layer_norm(x.float(), (x.shape[-1],), eps=EPS)
    return xf * (1 + _per_token(scale.float(), n, block_size)) + _per_token(shift.float(), n, block_size)


@pytest.mark.parametrize("b,n,c,block_size", CPU_SHAPES)
def test_matches_reference_and_per_token(b, n, c, block_size, triton_device, row_bwd_plan,
                                         row_remainder):
    inputs = make_inputs(b, n, c, block_size, device=triton_device)
    dy = torch.randn(b, n, c, device=triton_device)
    ours = grads(lambda *a: modulated_layer_norm_triton(*a, block_size, EPS), inputs, dy)
    ref = grads(lambda *a: modulated_layer_norm_ref(*a, block_size, EPS), inputs, dy)
    tok = grads(lambda *a: per_token(*a, block_size), inputs, dy)
    for name, o, r, t in zip(["y", "dx", "dshift", "dscale"], ours, ref, tok):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name} vs ref: {m}")
        torch.testing.assert_close(o, t, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name} vs per-token: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_interpreted(dtype, tol, triton_device, row_bwd_plan):
    """bf16/fp16 storage, fp32 math: within about one ulp of the fp32 reference (the interpreter
    truncates fp32 -> bf16 instead of rounding, hence one ulp rather than half)."""
    inputs = make_inputs(2, 7, 72, 3, dtype=dtype, device=triton_device)
    dy = torch.randn(2, 7, 72, device=triton_device).to(dtype)
    ours = grads(lambda *a: modulated_layer_norm_triton(*a, 3, EPS), inputs, dy)
    ref32 = grads32(lambda *a: modulated_layer_norm_ref(*a, 3, EPS), inputs, dy)
    for o, r in zip(ours, ref32):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_api(backend, triton_device):
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    dy = torch.randn(2, 7, 72, device=triton_device)
    ours = grads(lambda *a: ak.modulated_layer_norm(*a, 3, eps=EPS, backend=backend), inputs, dy)
    ref = grads(lambda *a: modulated_layer_norm_ref(*a, 3, EPS), inputs, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)


def test_strided_inputs(triton_device, row_bwd_plan):
    """x as a transposed view, shift/scale as chunks of one adaLN output: no copies needed."""
    b, n, c, block_size, nb = 2, 7, 80, 3, 3
    x = torch.randn(b, c, n, device=triton_device).requires_grad_()
    mod = torch.randn(b, nb, 6 * c, device=triton_device).requires_grad_()
    dy = torch.randn(b, c, n, device=triton_device).transpose(1, 2)

    def run(fn):
        shift, scale = mod.chunk(6, dim=-1)[:2]
        assert not x.transpose(1, 2).is_contiguous() and not shift.is_contiguous()
        y = fn(x.transpose(1, 2), shift, scale, block_size, EPS)
        return [y, *torch.autograd.grad(y, (x, mod), dy)]

    for o, r in zip(run(modulated_layer_norm_triton), run(modulated_layer_norm_ref)):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)


def test_backward_is_deterministic(triton_device, row_bwd_plan):
    inputs = make_inputs(1, 9, 72, 4, device=triton_device)
    dy = torch.randn(1, 9, 72, device=triton_device)
    assert_repeatable(lambda *a: modulated_layer_norm_triton(*a, 4, EPS), inputs, dy)


def test_row_kernels_reduce_without_atomics():
    """Deterministic by construction: no row-op kernel accumulates with atomics. (The interpreter runs programs
    one after another, so the repeat tests, here and in the other row ops' files, cannot see a race on the CPU;
    their ``cuda`` versions can.)"""
    import inspect

    from ard_kernels.ops import _rows, gated_residual, gated_residual_modulated_layer_norm, modulated_layer_norm

    for module in (_rows, gated_residual, gated_residual_modulated_layer_norm, modulated_layer_norm):
        assert "atomic_" not in inspect.getsource(module), module.__name__


def test_opcheck_and_fullgraph_trace(triton_device):
    """Schema, fake and autograd registrations agree with the kernel; a fullgraph trace has no break."""
    x, shift, scale = make_inputs(1, 5, 64, 2, device=triton_device)
    for out_dtype in (torch.float32, torch.bfloat16):  # the fake gives y the requested dtype
        torch.library.opcheck(torch.ops.ard_kernels.modulated_layer_norm_fwd.default,
                              (x, shift, scale, 2, EPS, out_dtype),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    fn = torch.compile(lambda a, s, k: modulated_layer_norm_triton(a, s, k, 2, EPS), backend="aot_eager",
                       fullgraph=True)
    dy = torch.randn_like(x)
    ours = grads(fn, [x, shift, scale], dy)
    ref = grads(lambda *a: modulated_layer_norm_ref(*a, 2, EPS), [x, shift, scale], dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,n,c,block_size", CUDA_SHAPES)
def test_cuda_dtypes(dtype, b, n, c, block_size, row_bwd_plan):
    inputs = make_inputs(b, n, c, block_size, dtype=dtype, device="cuda")
    dy = torch.randn(b, n, c, device="cuda").to(dtype)
    ours = grads(lambda *a: modulated_layer_norm_triton(*a, block_size, EPS), inputs, dy)
    ref32 = grads32(lambda *a: modulated_layer_norm_ref(*a, block_size, EPS), inputs, dy)
    lowp = grads(lambda a, s, k: F.layer_norm(a, (c,), eps=EPS) * (1 + _per_token(k, n, block_size))
                 + _per_token(s, n, block_size), inputs, dy)
    for name, o, r, t in zip(["y", "dx", "dshift", "dscale"], ours, ref32, lowp):
        assert o.dtype == dtype, name
        assert_lowp_close(name, o, r, t)


@pytest.mark.cuda
@pytest.mark.parametrize("c", [1152, 2048])
def test_cuda_every_backward_config(monkeypatch, c, row_bwd_plan, row_remainder):
    """Each tile the GPU backward autotunes over (with and without prefetch), pinned in turn, in each plan (the
    split one also pins each column-sum tile) and with each remainder width: the autotuner keeps one of them,
    and a wrong one must not hide behind a faster right one."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import modulated_layer_norm as mln

    configs = _rows.backward_configs(*[mln.row_tile(c, 256, torch.device("cuda"), 4096)[i] for i in (0, 3)],
                                     torch.device("cuda"))
    assert len(configs) >= 2
    inputs = make_inputs(2, 600, c, 256, dtype=torch.bfloat16, device="cuda")  # a partial last block
    dy = torch.randn(2, 600, c, device="cuda").to(torch.bfloat16)
    ref32 = grads32(lambda *a: modulated_layer_norm_ref(*a, 256, EPS), inputs, dy)
    lowp = grads(lambda a, s, k: F.layer_norm(a, (c,), eps=EPS) * (1 + _per_token(k, 600, 256))
                 + _per_token(s, 600, 256), inputs, dy)
    for config, column_config in pinned_backward_configs(monkeypatch, configs, row_bwd_plan):
        monkeypatch.setattr(_rows, "backward_configs", lambda bm, w, device, config=config, **_: (config,))
        ours = grads(lambda *a: modulated_layer_norm_triton(*a, 256, EPS), inputs, dy)
        for name, o, r, t in zip(["y", "dx", "dshift", "dscale"], ours, ref32, lowp):
            assert_lowp_close(f"{name} {config} {column_config}", o, r, t)


@pytest.mark.cuda
def test_cuda_every_forward_config(monkeypatch, row_remainder):
    """Each forward config the GPU autotunes over at DiT-XL's width (one tile per program, shorter tiles, a
    run of prefetched tiles), pinned in turn with each remainder width, against the fp32 reference by
    PyTorch's own bf16 error."""
    from ard_kernels.ops import modulated_layer_norm as mln

    cuda = torch.device("cuda")
    block_m, c0, c1p, warps = mln.row_tile(1152, 256, cuda, 8192)
    configs = mln.forward_configs_with_runs(block_m, warps, c0 + c1p, 256, cuda)
    assert any(c[2] > 1 for c in configs)
    inputs = make_inputs(2, 600, 1152, 256, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    ref32 = modulated_layer_norm_ref(*[t.float() for t in inputs], 256, EPS)
    lowp = F.layer_norm(inputs[0], (1152,), eps=EPS) * (1 + _per_token(inputs[2], 600, 256)) + _per_token(
        inputs[1], 600, 256)
    for config in configs:
        monkeypatch.setattr(mln, "forward_configs_with_runs", lambda *a, config=config: (config,))
        assert_lowp_close(f"y {config}", modulated_layer_norm_triton(*inputs, 256, EPS), ref32, lowp)


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    inputs = make_inputs(2, 1024, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda a, s, k: ak.modulated_layer_norm(a, s, k, 256, backend="triton") * 2, fullgraph=True)
    ours = grads(fn, inputs, dy)
    eager = grads(lambda a, s, k: modulated_layer_norm_triton(a, s, k, 256, EPS) * 2, inputs, dy)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_deterministic_large(row_bwd_plan):
    inputs = make_inputs(1, 4 * 256, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(1, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    assert_repeatable(lambda *a: modulated_layer_norm_triton(*a, 256, EPS), inputs, dy)


@pytest.mark.parametrize("prefetch", [False, True])
def test_many_row_groups(monkeypatch, triton_device, prefetch, row_bwd_plan):
    """The GPU split of a block's rows over several programs (partial sums per group), forced here, with and
    without loading each tile ahead of the one being worked on."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import modulated_layer_norm as mln

    monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
    monkeypatch.setattr(mln, "row_tile", lambda c, bs, device, target: (2, *_rows.row_split(c), 4))
    monkeypatch.setattr(_rows, "backward_configs", lambda bm, w, device, **_: ((bm, w, prefetch),))
    assert _rows.row_groups(11, 2, 2, triton_device) == (2, 6)  # two groups of 6 rows (3 tiles)
    _assert_grads_match_reference(1, 20, 72, 11, triton_device)


def _assert_grads_match_reference(b, n, c, block_size, device):
    inputs = make_inputs(b, n, c, block_size, device=device)
    dy = torch.randn(b, n, c, device=device)
    ours = grads(lambda *a: modulated_layer_norm_triton(*a, block_size, EPS), inputs, dy)
    ref = grads(lambda *a: modulated_layer_norm_ref(*a, block_size, EPS), inputs, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)



@pytest.mark.parametrize("tiles", [3, 4])
def test_forward_runs_of_tiles(monkeypatch, triton_device, tiles):
    """The GPU forward's run configs (several row tiles per program, each loaded ahead of the previous
    one's math), forced here: 2-row tiles, blocks of 11 rows (6 tiles: runs of 3 fit, runs of 4 overhang
    the block), a partial last block."""
    from ard_kernels.ops import modulated_layer_norm as mln

    monkeypatch.setattr(mln, "forward_configs_with_runs", lambda bm, w, width, bs, device: ((2, 4, tiles),))
    _assert_grads_match_reference(2, 20, 72, 11, triton_device)


@pytest.mark.parametrize("prefetch", [False, True])
def test_backward_tile_shorter_than_the_row_groups(monkeypatch, triton_device, prefetch, row_bwd_plan):
    """On the GPU the backward autotunes over tiles of different heights, its row groups sized for the
    tallest: the shorter tile's loop must stop at its group's end (here 1-row tiles in 4-row-aligned groups;
    with prefetch, the load ahead of the group's last tile must load nothing)."""
    from ard_kernels.ops import _rows

    monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
    monkeypatch.setattr(_rows, "backward_configs", lambda bm, w, device, **_: ((1, 4, prefetch), (4, 4, prefetch)))
    assert _rows.row_groups(11, 4, 2, triton_device) == (2, 8)  # two groups of 8 rows: 8 one-row tiles each
    _assert_grads_match_reference(2, 20, 72, 11, triton_device)


@pytest.mark.parametrize("groups", ["several", "one"])
@pytest.mark.parametrize("gated", [None, "with dout", "without dout"])
def test_block_column_sums(monkeypatch, triton_device, gated, groups):
    """The split plan's column-parallel sums against float64 sums: Σ a, Σ a·x̂ per sample and block, and for the
    gated residual Σ g·y with g = dout + rstd·(a·(1 + scale) − x̂·c1 − c2) rebuilt from the per-row terms.
    Several row groups per block (forced: a partial last group) summed after the kernel in fp32, or one (the
    kernel stores the sums in the dtypes asked for, here bf16); a partial last block, two column chunks with
    a partial second, strided inputs."""
    from ard_kernels.ops import _rows

    b, n, c, block_size = 2, 23, 100, 10
    nb = -(-n // block_size)
    monkeypatch.setattr(_rows, "_COLUMN_SUM_INTERPRETER", (2, 64, 4))
    if groups == "several":
        monkeypatch.setattr(_rows, "_COLUMN_SUM_MIN_ROWS", 3)
        monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
        assert _rows.row_groups(block_size, 1, b * nb * 2, triton_device, min_rows=3) == (4, 3)  # 3+3+3+1 rows
    else:
        assert _rows.row_groups(block_size, 1, b * nb * 2, triton_device, min_rows=32)[0] == 1
    dtype = torch.float32 if groups == "several" else torch.bfloat16
    a, dout, y = (torch.randn(b, n, c, device=triton_device) for _ in range(3))
    x = torch.randn(b, c, n, device=triton_device).transpose(1, 2)  # column stride n
    mean, rstd = torch.randn(b, n, device=triton_device), torch.rand(b, n, device=triton_device) + 0.5
    scale = torch.randn(b, nb, c, device=triton_device)
    c1, c2 = torch.randn(b, n, device=triton_device), torch.randn(b, n, device=triton_device)
    dout = dout if gated == "with dout" else None
    count = 2 if gated is None else 3
    sums = _rows.block_column_sums(a, x, mean, rstd, block_size, nb,
                                   None if gated is None else (scale, c1, c2, dout, y),
                                   None if groups == "several" else (dtype,) * count)
    assert len(sums) == count
    d = {name: t.double() for name, t in (("a", a), ("x", x), ("y", y), ("c1", c1), ("c2", c2))}
    xhat = (d["x"] - mean.double()[..., None]) * rstd.double()[..., None]
    terms = [d["a"], d["a"] * xhat]
    if gated is not None:
        gain = 1 + scale.double().repeat_interleave(block_size, dim=1)[:, :n]
        g = (d["a"] * gain - xhat * d["c1"][..., None] - d["c2"][..., None]) * rstd.double()[..., None]
        terms.append((g + (0 if dout is None else dout.double())) * d["y"])
    pad = nb * block_size - n
    for got, term in zip(sums, terms):
        want = F.pad(term, (0, 0, 0, pad)).unflatten(1, (nb, block_size)).sum(dim=2)
        assert got.dtype == dtype and got.shape == (b, nb, c)
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: one ulp (the interpreter truncates)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_row_backward_plan_choice(monkeypatch, triton_device):
    """Which plan a row backward runs: forced by ARD_KERNELS_ROW_BWD (anything else is refused, naming the
    variable), fused off the GPU, and a ``plan`` argument checked; both plans give the reference's gradients."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import modulated_layer_norm as mln

    ran = []
    monkeypatch.delenv("ARD_KERNELS_ROW_BWD", raising=False)
    assert _rows.row_backward_plan("op", (1,), torch.device("cpu"), ran.append) == "fused" and not ran
    for forced in _rows.ROW_BACKWARD_PLANS:
        monkeypatch.setenv("ARD_KERNELS_ROW_BWD", forced)
        assert _rows.row_backward_plan("op", (1,), torch.device("cpu"), ran.append) == forced and not ran
    monkeypatch.setenv("ARD_KERNELS_ROW_BWD", "fast")
    with pytest.raises(ValueError, match="ARD_KERNELS_ROW_BWD"):
        _rows.row_backward_plan("op", (1,), torch.device("cpu"), ran.append)
    monkeypatch.delenv("ARD_KERNELS_ROW_BWD")
    x, shift, scale = (t.detach() for t in make_inputs(1, 9, 72, 4, device=triton_device))
    y, mean, rstd = mln.modulated_layer_norm_fwd(x, shift, scale, 4, EPS, x.dtype)
    dy = torch.randn_like(x)
    with pytest.raises(ValueError, match="plan"):
        mln.modulated_layer_norm_bwd(dy, x, scale, mean, rstd, 4, x.dtype, plan="both")
    ref = grads(lambda *a: modulated_layer_norm_ref(*a, 4, EPS), [t.requires_grad_() for t in (x, shift, scale)],
                dy)[1:]
    for plan in _rows.ROW_BACKWARD_PLANS:
        for got, want in zip(mln.modulated_layer_norm_bwd(dy, x, scale, mean, rstd, 4, x.dtype, plan=plan), ref):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m, plan=plan: f"{plan}: {m}")


def test_row_backward_plan_timing_logic(monkeypatch):
    """The GPU's choice, with the timing stood in for: the faster plan wins, is kept per key (no second
    timing), shows in row_choices; a key first seen inside a CUDA-graph capture runs fused without being
    kept; running out of memory while timing keeps fused."""
    import triton.testing

    from ard_kernels.ops import _rows

    monkeypatch.delenv("ARD_KERNELS_ROW_BWD", raising=False)
    monkeypatch.setattr(_rows, "_ROW_BWD_CHOICES", {})
    cuda = torch.device("cuda")
    speed = {"fused": 3.0, "split": 1.0}
    ran, timed = [], []

    def fake_bench(fn, **_):
        fn()
        timed.append(ran[-1])
        return speed[ran[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert _rows.row_backward_plan("op", (2, 8), cuda, ran.append) == "split"
    assert sorted(timed) == ["fused", "split"]
    ran.clear(), timed.clear()
    assert _rows.row_backward_plan("op", (2, 8), cuda, ran.append) == "split" and not ran and not timed
    assert _rows.row_choices()["op backward plan"] == {"2, 8, cuda": "split"}
    capturing[0] = True
    assert _rows.row_backward_plan("op", (4, 8), cuda, ran.append) == "fused" and not ran
    assert ("op", 4, 8, "cuda") not in _rows._ROW_BWD_CHOICES
    capturing[0] = False

    def oom(fn, **_):
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(triton.testing, "do_bench", oom)
    assert _rows.row_backward_plan("op", (5, 8), cuda, ran.append) == "fused"
    assert _rows._ROW_BWD_CHOICES[("op", 5, 8, "cuda")] == "fused"


@pytest.mark.cuda
def test_cuda_row_backward_plan_is_timed_once_and_reported(monkeypatch):
    """On the GPU the first backward of a shape times both plans and keeps one (reported by row_choices, which
    the benchmarks record); the next call of that shape reuses it without timing."""
    from ard_kernels.ops import _rows

    monkeypatch.delenv("ARD_KERNELS_ROW_BWD", raising=False)
    inputs = make_inputs(2, 512, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(2, 512, 1152, device="cuda", dtype=torch.bfloat16)
    grads(lambda *a: modulated_layer_norm_triton(*a, 256, EPS), inputs, dy)
    plans = _rows.row_choices()["modulated_layer_norm backward plan"]
    key = next(k for k in plans if k.startswith("2, 512, 1152, 256"))
    assert plans[key] in _rows.ROW_BACKWARD_PLANS
    timed = []
    monkeypatch.setattr(_rows, "_ROW_BWD_CHOICES", dict(_rows._ROW_BWD_CHOICES))
    monkeypatch.setattr("triton.testing.do_bench", lambda *a, **k: timed.append(1) or 1.0)
    grads(lambda *a: modulated_layer_norm_triton(*a, 256, EPS), inputs, dy)
    assert not timed


def test_autotune_candidates():
    """GPU: the heuristic tile first; forwards add shorter tiles down to one row (each over the fewest warps
    giving a thread at most 16 values, 8 for the fused forward), backwards the same tile with prefetch and
    half its rows over half its warps with prefetch; the keys name arguments of the kernels;
    ARD_KERNELS_AUTOTUNE=0 keeps the heuristic alone."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import gated_residual_modulated_layer_norm as fused
    from ard_kernels.ops import modulated_layer_norm as mln

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    width = sum(_rows.row_split(1152))  # DiT: 1024 + 128
    assert _rows.backward_configs(2, 8, cuda) == ((2, 8, False), (2, 8, True), (1, 4, True))
    assert _rows.backward_configs(8, 8, cuda) == ((8, 8, False), (8, 8, True), (4, 4, True))
    assert _rows.backward_configs(1, 8, cuda) == ((1, 8, False), (1, 8, True))  # one row: nothing to halve
    assert _rows.backward_configs(2, 4, cuda) == ((2, 4, False), (2, 4, True))  # already the fewest warps
    assert _rows.backward_configs(2, 8, cuda, prefetch=False) == ((2, 8, False),)
    assert _rows.prefetch_fits(2, 8, width, 2) and _rows.prefetch_fits(1, 4, width, 2)
    assert not _rows.prefetch_fits(2, 8, width, 4)  # fp32: twice the registers a value
    assert not _rows.prefetch_fits(1, 16, sum(_rows.row_split(8192)), 2)  # 16 values a thread
    assert _rows.backward_configs(2, 8, cpu) == ((2, 8, True),)
    assert _rows.forward_configs(4, 16, width, cuda) == ((4, 16), (2, 8), (1, 4))
    assert _rows.forward_configs(4, 16, width, cuda, values_per_thread=8) == ((4, 16), (2, 16), (1, 8))
    assert _rows.forward_configs(1, 16, sum(_rows.row_split(8192)), cuda) == ((1, 16),)
    assert _rows.forward_configs(4, 16, width, cpu) == ((4, 16),)
    assert mln.forward_configs_with_runs(4, 16, width, 256, cuda) == ((4, 16, 1), (2, 8, 1), (1, 4, 1), (2, 8, 4))
    assert mln.forward_configs_with_runs(4, 16, width, 6, cuda) == ((4, 16, 1), (2, 8, 1), (1, 4, 1))  # 3 tiles
    assert mln.forward_configs_with_runs(4, 16, width, 256, cpu) == ((4, 16, 1),)
    cases = ((mln._modulated_layer_norm_bwd_kernel, _rows.BACKWARD_AUTOTUNE_KEY, ()),
             (fused._gated_residual_modulated_layer_norm_bwd_kernel, _rows.BACKWARD_AUTOTUNE_KEY, ()),
             (mln._modulated_layer_norm_fwd_kernel, _rows.FORWARD_AUTOTUNE_KEY, ()),
             (fused._gated_residual_modulated_layer_norm_fwd_kernel, _rows.FORWARD_AUTOTUNE_KEY, ("OUT_ptr",)))
    for kernel, key, restore in cases:
        _rows.autotuned_rows.cache_clear()
        if key == _rows.BACKWARD_AUTOTUNE_KEY:
            configs, names = ((2, 8, False), (1, 4, True)), ("PREFETCH",)
        elif kernel is mln._modulated_layer_norm_fwd_kernel:
            configs, names = ((2, 8, 1), (4, 16, 4)), ("TILES",)
        else:
            configs, names = ((2, 8), (1, 16)), ()
        tuned = _rows.autotuned_rows(kernel, configs, key, restore, names)
        assert [(c.kwargs["BLOCK_M"], c.num_warps, *[c.kwargs[n] for n in names])
                for c in tuned.configs] == list(configs)
        assert all(set(c.kwargs) <= set(tuned.arg_names) for c in tuned.configs)  # meta-parameters of the kernel
        assert list(tuned.keys) == list(key)
        assert set(key) <= set(tuned.arg_names)
        assert list(tuned.restore_value) == list(restore)
        assert tuned.do_bench is _rows._tuning_bench  # short timings: tuning at every new shape stays cheap
        assert tuned in _rows._AUTOTUNERS
        # what benchmarks record (common.kernel_choices): the config each autotuning key settled on
        tuned.cache[(256, 1152, "torch.bfloat16")] = tuned.configs[-1]
        described = _rows.row_choices()[tuned.fn.__name__]["256, 1152, torch.bfloat16"]
        assert described.startswith(f"BLOCK_M={configs[-1][0]}") and described.endswith(f"w{configs[-1][1]}")
        tuned.cache.clear()
    _rows.autotuned_rows.cache_clear()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_eps_is_applied_inside_the_root(backend, triton_device):
    """A large eps and rows of tiny variance, where eps dominates: at the default 1e-6 and unit variance an
    ignored or misplaced eps changes y by ~1e-6, below every tolerance above. Oracle: F.layer_norm."""
    b, n, c, block_size, eps = 2, 7, 72, 3, 0.25
    x, shift, scale = make_inputs(b, n, c, block_size, device=triton_device, requires_grad=False)
    x = x.clone()
    x[:, 1] = x[:, 1] * 1e-2  # variance 4e-4 << eps: y there is mostly eps's doing
    inputs = [t.requires_grad_() for t in (x, shift, scale)]
    dy = torch.randn(b, n, c, device=triton_device)

    def oracle(x, shift, scale):
        return (F.layer_norm(x, (c,), eps=eps) * (1 + _per_token(scale, n, block_size))
                + _per_token(shift, n, block_size))

    ours = grads(lambda *a: ak.modulated_layer_norm(*a, block_size, eps=eps, backend=backend), inputs, dy)
    want = grads(oracle, inputs, dy)
    for name, o, r in zip(["y", "dx", "dshift", "dscale"], ours, want):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    default = ak.modulated_layer_norm(*inputs, block_size, backend=backend)
    assert (default - ours[0]).abs().max() > 0.1  # eps moved the result: the case can tell them apart


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_dtype_writes_what_autocast_would_cast_to(backend, triton_device):
    """fp32 x, y in bf16 (what a Linear under autocast reads): y is the fp32 result rounded once, and the
    bf16 upstream gradient gives the fp32 gradients the cast's backward would."""
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    dy = torch.randn(2, 7, 72, device=triton_device).bfloat16()
    ours = grads(lambda *a: ak.modulated_layer_norm(*a, 3, eps=EPS, out_dtype=torch.bfloat16, backend=backend),
                 inputs, dy)
    cast = grads(lambda *a: modulated_layer_norm_ref(*a, 3, EPS).bfloat16(), inputs, dy)
    assert ours[0].dtype == torch.bfloat16 and [g.dtype for g in ours[1:]] == [torch.float32] * 3
    # one bf16 ulp (the interpreter truncates where the GPU rounds); the gradients see the same dy
    torch.testing.assert_close(ours[0].float(), cast[0].float(), atol=1.6e-2, rtol=1.6e-2)
    for name, o, r in zip(["dx", "dshift", "dscale"], ours[1:], cast[1:]):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_out_dtype_is_validated():
    x, shift, scale = make_inputs(1, 4, 8, 2, requires_grad=False)
    with pytest.raises(TypeError, match="out_dtype: expected None or a dtype in"):
        ak.modulated_layer_norm(x, shift, scale, 2, out_dtype=torch.int32, backend="reference")


def test_remainder_configs(monkeypatch):
    """The row's remainder width joins each launch's configs: exact everywhere, and on the GPU a padded copy of the
    first config (as wide as the main segment: its register layout) where the row is at most 2·1024 wide and its
    remainder wider than 16 columns."""
    from ard_kernels.ops import _rows

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    configs = ((4, 16, 1), (2, 8, 1), (1, 4, 1))
    got, names = _rows.remainder_configs(configs, ("TILES",), 1024, 128, cuda)
    assert names == ("TILES", "C1P")
    assert got == ((4, 16, 1, 128), (2, 8, 1, 128), (1, 4, 1, 128), (4, 16, 1, 1024))
    assert _rows.remainder_configs(configs, ("TILES",), 1024, 128, cpu)[0] == tuple((*c, 128) for c in configs)
    assert _rows.remainder_configs(((2, 8),), ("PREFETCH",), 1024, 128, cuda) == (((2, 8, 128), (2, 8, 1024)), ("C1P",))
    for c0, c1p in ((2048, 1024), (64, 64), (1024, 16)):  # too wide to pad; already as wide; a power of two
        assert _rows.remainder_configs(configs, ("TILES",), c0, c1p, cuda)[0] == tuple((*c, c1p) for c in configs)
    monkeypatch.setattr(_rows, "_ROW_REMAINDER", "exact")
    assert _rows.remainder_configs(configs, ("TILES",), 1024, 128, cuda)[0] == tuple((*c, 128) for c in configs)
    monkeypatch.setattr(_rows, "_ROW_REMAINDER", "padded")
    assert _rows.remainder_configs(configs, ("TILES",), 1024, 128, cpu)[0] == tuple((*c, 1024) for c in configs)
    monkeypatch.setattr(_rows, "_ROW_REMAINDER", "wide")
    with pytest.raises(ValueError, match="ARD_KERNELS_ROW_REMAINDER: expected one of"):
        _rows.remainder_configs(configs, ("TILES",), 1024, 128, cuda)
