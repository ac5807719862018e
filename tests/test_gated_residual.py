"""Gated residual with per-block gates (Triton) against the reference and the per-token form.

CPU: fp32 (and bf16/fp16 storage) through the Triton interpreter on tiny grids: outputs, all
gradients, strided inputs, the in-place inference variant and its refusal under autograd,
determinism, custom-op registration. GPU (``cuda``): DiT sizes in bf16/fp16/fp32 and
torch.compile(fullgraph=True).
"""

import pytest
import torch
from _modulation_helpers import CPU_SHAPES, CUDA_SHAPES, assert_lowp_close, assert_repeatable, grads, grads32

import ard_kernels as ak
from ard_kernels.ops.gated_residual import gated_residual_triton
from ard_kernels.reference import _per_token, gated_residual_ref


def make_inputs(b, n, c, block_size, dtype=torch.float32, device="cpu", requires_grad=True):
    nb = -(-n // block_size)
    x = torch.randn(b, n, c, device=device).to(dtype)
    y = torch.randn(b, n, c, device=device).to(dtype)
    gate = torch.randn(b, nb, c, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, y, gate)]


def per_token(x, y, gate, block_size):
    """The published form: gate repeated per token, ``x + gate·y``."""
    return x + _per_token(gate, x.shape[1], block_size) * y


@pytest.mark.parametrize("b,n,c,block_size", CPU_SHAPES)
def test_matches_reference_and_per_token(b, n, c, block_size, triton_device):
    inputs = make_inputs(b, n, c, block_size, device=triton_device)
    dout = torch.randn(b, n, c, device=triton_device)
    ours = grads(lambda *a: gated_residual_triton(*a, block_size), inputs, dout)
    ref = grads(lambda *a: gated_residual_ref(*a, block_size), inputs, dout)
    tok = grads(lambda *a: per_token(*a, block_size), inputs, dout)
    for name, o, r, t in zip(["out", "dx", "dy", "dgate"], ours, ref, tok):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name} vs ref: {m}")
        torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name} vs per-token: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_interpreted(dtype, tol, triton_device):
    inputs = make_inputs(2, 7, 72, 3, dtype=dtype, device=triton_device)
    dout = torch.randn(2, 7, 72, device=triton_device).to(dtype)
    ours = grads(lambda *a: gated_residual_triton(*a, 3), inputs, dout)
    ref32 = grads32(lambda *a: gated_residual_ref(*a, 3), inputs, dout)
    for o, r in zip(ours, ref32):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_api(backend, triton_device):
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    dout = torch.randn(2, 7, 72, device=triton_device)
    ours = grads(lambda *a: ak.gated_residual(*a, 3, backend=backend), inputs, dout)
    ref = grads(lambda *a: gated_residual_ref(*a, 3), inputs, dout)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_strided_inputs(triton_device):
    """x and y as transposed views, the gate as a chunk of one adaLN output."""
    b, n, c, block_size, nb = 2, 7, 80, 3, 3
    x = torch.randn(b, c, n, device=triton_device).requires_grad_()
    y = torch.randn(b, c, n, device=triton_device).requires_grad_()
    mod = torch.randn(b, nb, 6 * c, device=triton_device).requires_grad_()
    dout = torch.randn(b, c, n, device=triton_device).transpose(1, 2)

    def run(fn):
        gate = mod.chunk(6, dim=-1)[2]
        out = fn(x.transpose(1, 2), y.transpose(1, 2), gate, block_size)
        return [out, *torch.autograd.grad(out, (x, y, mod), dout)]

    for o, r in zip(run(gated_residual_triton), run(gated_residual_ref)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["direct", "triton"])
def test_inplace(backend, triton_device):
    x, y, gate = make_inputs(2, 7, 72, 3, device=triton_device, requires_grad=False)
    expected = gated_residual_ref(x, y, gate, 3)
    with torch.no_grad():
        xs = x.clone()
        if backend == "direct":
            out = gated_residual_triton(xs, y, gate, 3, inplace=True)
        else:
            out = ak.gated_residual(xs, y, gate, 3, inplace=True, backend="triton")
    assert out is xs
    torch.testing.assert_close(xs, expected, atol=1e-5, rtol=1e-5)
    # A strided x is updated through its strides.
    base = x.transpose(1, 2).contiguous()
    xs = base.transpose(1, 2)
    gated_residual_triton(xs, y, gate, 3, inplace=True)
    torch.testing.assert_close(base.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


def test_inplace_refuses_grad(triton_device):
    x, y, gate = make_inputs(1, 4, 64, 2, device=triton_device)
    with pytest.raises(RuntimeError, match="inplace"):
        gated_residual_triton(x.detach().clone(), y, gate, 2, inplace=True)


def test_backward_is_deterministic(triton_device):
    inputs = make_inputs(1, 9, 72, 4, device=triton_device)
    dout = torch.randn(1, 9, 72, device=triton_device)
    assert_repeatable(lambda *a: gated_residual_triton(*a, 4), inputs, dout)


@pytest.mark.cuda
def test_cuda_deterministic_large():
    inputs = make_inputs(2, 4 * 256, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    assert_repeatable(lambda *a: gated_residual_triton(*a, 256), inputs, dout)


def test_opcheck_and_fullgraph_trace(triton_device):
    x, y, gate = make_inputs(1, 5, 64, 2, device=triton_device)
    torch.library.opcheck(torch.ops.ard_kernels.gated_residual_fwd.default, (x, y, gate, 2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    xd, yd, gd = (t.detach() for t in (x, y, gate))
    torch.library.opcheck(torch.ops.ard_kernels.gated_residual_inplace.default, (xd.clone(), yd, gd, 2),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, b, g: gated_residual_triton(a, b, g, 2), backend="aot_eager", fullgraph=True)
    dout = torch.randn_like(x)
    for o, r in zip(grads(fn, [x, y, gate], dout), grads(lambda *a: gated_residual_ref(*a, 2), [x, y, gate], dout)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,n,c,block_size", CUDA_SHAPES)
def test_cuda_dtypes(dtype, b, n, c, block_size):
    inputs = make_inputs(b, n, c, block_size, dtype=dtype, device="cuda")
    dout = torch.randn(b, n, c, device="cuda").to(dtype)
    ours = grads(lambda *a: gated_residual_triton(*a, block_size), inputs, dout)
    ref32 = grads32(lambda *a: gated_residual_ref(*a, block_size), inputs, dout)
    lowp = grads(lambda *a: per_token(*a, block_size), inputs, dout)
    for name, o, r, t in zip(["out", "dx", "dy", "dgate"], ours, ref32, lowp):
        assert o.dtype == dtype, name
        assert_lowp_close(name, o, r, t)


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_inplace():
    inputs = make_inputs(2, 1024, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda a, b, g: ak.gated_residual(a, b, g, 256, backend="triton") * 2, fullgraph=True)
    ours = grads(fn, inputs, dout)
    eager = grads(lambda a, b, g: gated_residual_triton(a, b, g, 256) * 2, inputs, dout)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, atol=0, rtol=0)
    x, y, gate = (t.detach() for t in inputs)
    inplace = torch.compile(lambda a, b, g: ak.gated_residual(a, b, g, 256, inplace=True, backend="triton"),
                            fullgraph=True)
    with torch.no_grad():
        xs = x.clone()
        inplace(xs, y, gate)
    torch.testing.assert_close(xs, gated_residual_triton(x, y, gate, 256), atol=0, rtol=0)


@pytest.mark.parametrize("prefetch", [True, False])
def test_gpu_tiling_forced(monkeypatch, triton_device, prefetch):
    """The GPU tiling (C-chunks with a masked last chunk, several row groups per block), forced here, with
    the backward loading each tile ahead of the one being worked on (bf16/fp16 on the GPU) and not (fp32)."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import gated_residual as gr

    monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
    monkeypatch.setattr(gr, "_tile", lambda c, bs, device: (2, 32, 4))
    monkeypatch.setattr(gr, "_FORCE_NO_PREFETCH", not prefetch)
    inputs = make_inputs(1, 20, 72, 11, device=triton_device)
    dout = torch.randn(1, 20, 72, device=triton_device)
    ours = grads(lambda *a: gated_residual_triton(*a, 11), inputs, dout)
    ref = grads(lambda *a: gated_residual_ref(*a, 11), inputs, dout)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
