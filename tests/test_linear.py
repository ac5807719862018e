"""The few-row inference linear (ard_kernels/ops/linear.py): Triton split-K GEMM against F.linear.

CPU: the kernel through the interpreter (fp32, tiny tiles) on odd shapes, every split count, with and
without bias and GELU, strided inputs; the dispatcher's choices and errors. GPU (``cuda``): bf16/fp16 at
DiT-XL/2's batch-1 shapes, every tile config and split, judged against fp32 with PyTorch's own bf16 error
as the yardstick; the timed plan cached per shape; CUDA-graph capture.
"""

import pytest
import torch
import torch.nn.functional as F

from ard_kernels import ops
from ard_kernels.ops import linear as lin
from ard_kernels.reference import linear_ref


def _inputs(m, n, k, dtype=torch.float32, device="cpu", bias=True):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


def _peer(x, w, b, gelu):
    """An independent oracle: fp64 matmul and the tanh-GELU formula written out."""
    y = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    if gelu:
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    return y


@pytest.mark.parametrize("m,n,k,split", [(1, 16, 16, 1), (5, 7, 40, 2), (17, 33, 70, 3), (3, 5, 100, 8),
                                         (20, 48, 64, 4), (2, 9, 17, 2)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_and_fp64(m, n, k, split, gelu, bias, triton_device):
    x, w, b = _inputs(m, n, k, device=triton_device, bias=bias)
    y = lin.linear_triton(x, w, b, gelu, split)
    assert y.shape == (m, n) and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, linear_ref(x, w, b, gelu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), _peer(x, w, b, gelu), atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_split_determinism(triton_device):
    """x a column slice of a wider tensor and W a transposed view: strides taken as they are; a split plan
    gives the same bits on every call (the slices summed in a fixed order)."""
    x_wide = torch.randn(6, 50, device=triton_device)
    x = x_wide[:, 3:43]
    w = torch.randn(40, 12, device=triton_device).t()  # (12, 40), stride (1, 12)
    b = torch.randn(12, device=triton_device)
    y = lin.linear_triton(x, w, b, True, 2)
    torch.testing.assert_close(y, linear_ref(x, w, b, True), atol=1e-5, rtol=1e-5)
    assert torch.equal(y, lin.linear_triton(x, w, b, True, 2))


@pytest.mark.parametrize("m,n,k,split", [(5, 7, 40, 2), (17, 33, 70, 3), (3, 5, 100, 8), (20, 48, 64, 4)])
@pytest.mark.parametrize("gelu", [False, True])
def test_serial_plan_gives_the_two_pass_bits_and_resets_its_counters(m, n, k, split, gelu, triton_device):
    """The serial plan (each tile's last program reduces it) against the two-pass one: the same bits (the same
    fixed order of slices), the arrival counters back at zero after every launch, so the next call is right."""
    x, w, b = _inputs(m, n, k, device=triton_device)
    two_pass = lin.linear_triton(x, w, b, gelu, split)
    for _ in range(2):
        y = lin.linear_triton(x, w, b, gelu, split, serial=True)
        assert torch.equal(y, two_pass)
        assert all(int(c.abs().sum()) == 0 for c in ops._COUNTERS.values())
    torch.testing.assert_close(y.double(), _peer(x, w, b, gelu), atol=1e-5, rtol=1e-5)


def test_serial_plan_runs_one_launch(triton_device, monkeypatch):
    """Serial: the GEMM alone; two-pass: the GEMM and the reduction; one slice: the GEMM alone, never serial."""
    launched = []
    real_reduce = lin._linear_reduce_kernel

    class Counting:
        def __getitem__(self, grid):
            launched.append("reduce")
            return real_reduce[grid]

    monkeypatch.setattr(lin, "_linear_reduce_kernel", Counting())
    x, w, b = _inputs(9, 20, 64, device=triton_device)
    lin.linear_triton(x, w, b, False, 2, serial=True)
    lin.linear_triton(x, w, b, False, 1, serial=True)
    assert launched == []
    lin.linear_triton(x, w, b, False, 2)
    assert launched == ["reduce"]
    assert [lin.plan_name(p) for p in (0, 1, 4, -4)] == ["cublas", "split1", "split4", "serial4"]


def test_chosen_plans_name_each_timed_shape(monkeypatch):
    """What benchmarks record of the model's Linears (benchmarks/common.kernel_choices)."""
    monkeypatch.setattr(lin, "_PLANS", {(256, 1152, 1152, torch.bfloat16, False, True, "cuda:0", False): -2,
                                        (256, 1152, 1152, torch.bfloat16, False, True, "cuda:0", True): 4,
                                        ("triton", 256, 4608, 1152, torch.bfloat16, True, True, "cuda:0"): 1,
                                        (8, 16, 32, torch.float16, False, False, "cuda:0", False): 0})
    assert lin.chosen_plans() == {"M256 N1152 K1152 bfloat16": "serial2",
                                  "M256 N1152 K1152 bfloat16 (pdl)": "split4",
                                  "M256 N4608 K1152 gelu bfloat16 (triton only)": "split1",
                                  "M8 N16 K32 float16": "cublas"}


def test_gelu_saturates_without_overflow(triton_device):
    """Large pre-activations: GELU(x) = x far right, 0 far left (e^{2u} clamped, never inf/NaN)."""
    x = torch.tensor([[1.0], [-1.0]], device=triton_device)
    w = torch.tensor([[300.0], [-300.0], [0.5]], device=triton_device)
    y = lin.linear_triton(x, w, None, True, 1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, linear_ref(x, w, None, True), atol=1e-5, rtol=1e-5)


def test_empty_and_zero_depth(triton_device):
    x, w, b = _inputs(0, 8, 16, device=triton_device)
    assert lin.linear_triton(x, w, b).shape == (0, 8)
    x, w, b = torch.empty(3, 0, device=triton_device), torch.empty(4, 0, device=triton_device), torch.randn(4)
    torch.testing.assert_close(lin.linear_triton(x, w, b.to(triton_device), True),
                               F.gelu(b.to(triton_device).expand(3, 4), approximate="tanh"))


def test_split_candidates_for_dit_xl_at_batch_1():
    sms = 132  # H100
    assert lin.split_candidates(256, 3456, 1152, sms) == (1, 2)  # qkv
    assert lin.split_candidates(256, 1152, 1152, sms) == (1, 2, 4)  # proj
    assert lin.split_candidates(256, 4608, 1152, sms) == (1,)  # fc1: 288 tiles already
    assert lin.split_candidates(256, 1152, 4608, sms) == (1, 2, 4)  # fc2
    assert lin.split_candidates(16384, 1152, 1152, sms) == (1,)  # B64: many tiles, no split
    assert lin.split_candidates(4, 16, 300, sms) == (1,)  # slices would be under 256 deep


def test_dispatch(triton_device):
    """backend="auto" off the fast path (CPU, fp32, autograd) is PyTorch's own result, bit for bit; "triton"
    runs the kernel (one slice off the GPU); bad arguments name themselves."""
    x, w, b = _inputs(4, 8, 16, device=triton_device)
    for gelu in (False, True):
        assert torch.equal(lin.linear(x, w, b, gelu), linear_ref(x, w, b, gelu))
        with torch.no_grad():
            torch.testing.assert_close(lin.linear(x.reshape(2, 2, 16), w, b, gelu, backend="triton"),
                                       linear_ref(x, w, b, gelu).reshape(2, 2, 8), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        lin.linear(x, w, b, backend="cublas")
    with pytest.raises(ValueError, match="weight"):
        lin.linear(x, w[:, :8], b)
    with pytest.raises(ValueError, match="bias"):
        lin.linear(x, w, b[:4])
    with pytest.raises(RuntimeError, match="inference-only"):
        lin.linear(x, w.requires_grad_(), b, backend="triton")
    # auto with autograd on: PyTorch's differentiable ops (never the GELU epilogue, which has no derivative)
    y = lin.linear(x, w, b, gelu=True)
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_benchmark_runs_on_the_cpu(triton_device):
    """benchmarks/bench_linear.py end to end on a tiny layer: every provider times, one layer row per stack."""
    from benchmarks import bench_linear

    rows = bench_linear.main(["--no-json", "--hidden", "16", "--tokens", "4", "--device", str(triton_device)])
    assert all("error" not in r for r in rows), rows
    assert {r["provider"] for r in rows if r["op"] == "linear"} == {"cublas", "split1", "split2", "serial2"}
    assert [r["provider"] for r in rows if r["op"] == "linear_layer"] == ["cublas"]
    assert all(r["us"] > 0 for r in rows)


# --------------------------------------------------------------------------------------- GPU
DIT_B1 = [(256, 3456, 1152, False), (256, 1152, 1152, False), (256, 4608, 1152, True), (256, 1152, 4608, False)]


def _assert_lowp_close(y, x, w, b, gelu):
    """Our error against fp32 at most 2× cuBLAS's own at this dtype, plus one unit in the last place of the
    largest output (on a handful of outputs cuBLAS's worst rounding may be far below its bound)."""
    ref = linear_ref(x.float(), w.float(), None if b is None else b.float(), gelu)
    err = (y.float() - ref).abs().max().item()
    base = (lin._cublas(x, w, b, gelu).float() - ref).abs().max().item()
    ulp = torch.finfo(y.dtype).eps * max(1.0, ref.abs().max().item())
    assert y.dtype == x.dtype and err <= 2 * base + ulp, f"error {err:.3g} vs cuBLAS {base:.3g} (ulp {ulp:.3g})"


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k,gelu", DIT_B1)
def test_cuda_every_split_and_tile(monkeypatch, m, n, k, gelu):
    """bf16, each tile config pinned in turn (the autotuner keeps one: a wrong one must not hide behind a
    faster right one), split 1 to 4 (3: a slice count that does not divide K's tiles evenly)."""
    x, w, b = _inputs(m, n, k, torch.bfloat16, "cuda")
    for config in lin._CONFIGS:
        monkeypatch.setattr(lin, "_CONFIGS", (config,))
        lin._tuned_kernel.cache_clear()
        for split in (1, 2, 3, 4):
            y = lin.linear_triton(x, w, b, gelu, split)
            _assert_lowp_close(y, x, w, b, gelu)
            if split > 1:  # the serial plan: the same bits, launch after launch (its counters reset)
                for _ in range(3):
                    assert torch.equal(lin.linear_triton(x, w, b, gelu, split, serial=True), y)
    lin._tuned_kernel.cache_clear()


@pytest.mark.cuda
@pytest.mark.parametrize("gelu", [False, True])
def test_cuda_fp16_and_odd_shapes(gelu):
    """fp16, the autotuned tile; rows, columns and depth off every tile size, no bias."""
    for m, n, k, bias in ((256, 1152, 4608, True), (37, 100, 392, False), (1, 8, 1000, True)):
        x, w, b = _inputs(m, n, k, torch.float16, "cuda", bias=bias)
        for split in lin.split_candidates(m, n, k, 132) + (3,):
            _assert_lowp_close(lin.linear_triton(x, w, b, gelu, split), x, w, b, gelu)


@pytest.mark.cuda
def test_cuda_auto_times_once_and_replays_in_a_graph():
    """The first call per shape times cuBLAS and the split plans and keeps one; later calls, a CUDA graph's
    capture included, reuse it; inside a capture a new shape runs cuBLAS."""
    x, w, b = _inputs(256, 1152, 4608, torch.bfloat16, "cuda")
    with torch.no_grad():
        y = lin.linear(x, w, b)
        key = (256, 1152, 4608, torch.bfloat16, False, True, x.device)
        assert key in lin._PLANS
        _assert_lowp_close(y, x, w, b, False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lin.linear(x, w, b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        x2 = x[:200].clone()
        with torch.cuda.graph(graph):
            out = lin.linear(x, w, b)
            out2 = lin.linear(x2, w, b)  # unseen shape: cuBLAS inside the capture
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, lin.linear(x, w, b))
        assert (200, 1152, 4608, torch.bfloat16, False, True, x.device) not in lin._PLANS
        _assert_lowp_close(out2, x2, w, b, False)
