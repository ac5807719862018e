"""Sinusoidal timestep embedding (one Triton kernel) against the reference.

ARD's token-wise times (t_k = 999·(1 − k/4) per (sample, block)), any t shape and dtype, odd
widths, the gradient in t, the custom-op registration; on GPU the same at DiT's width 256.
"""

import pytest
import torch

import ard_kernels as ak
from ard_kernels.ops.timestep_embedding import timestep_embedding_triton
from ard_kernels.reference import timestep_embedding_ref

ARD_TIMES = torch.tensor([999.0, 749.25, 499.5, 249.75])


def atol_for(t):
    # One fp32 ulp of a frequency (the references may round exp differently) moves t·f by
    # about |t|·6e-8.
    return 1e-6 + 1.2e-7 * float(t.abs().max())


@pytest.mark.parametrize("dim", [256, 7, 2, 1, 300])
def test_matches_reference(dim, triton_device):
    t = torch.stack([ARD_TIMES, torch.tensor([0.0, 1.0, 3.5, 998.0])]).to(triton_device)  # (B, nb)
    out = timestep_embedding_triton(t, dim)
    ref = timestep_embedding_ref(t, dim)
    assert out.shape == (2, 4, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=atol_for(t), rtol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 2)])
def test_dtypes_and_shapes(dtype, shape, triton_device):
    t = (torch.rand(shape, device=triton_device) * 999).to(dtype)
    out = timestep_embedding_triton(t, 64, max_period=1000.0)
    ref = timestep_embedding_ref(t, 64, max_period=1000.0)
    assert out.shape == (*shape, 64)
    torch.testing.assert_close(out, ref, atol=atol_for(t.float()), rtol=0)


def test_non_contiguous_t(triton_device):
    t = (torch.rand(4, 3, device=triton_device) * 999).t()
    out = timestep_embedding_triton(t, 32)
    torch.testing.assert_close(out, timestep_embedding_ref(t, 32), atol=atol_for(t), rtol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_api(backend, triton_device):
    t = ARD_TIMES.to(triton_device)
    out = ak.timestep_embedding(t, 256, backend=backend)
    torch.testing.assert_close(out, timestep_embedding_ref(t, 256), atol=atol_for(t), rtol=0)


def test_gradient_in_t(triton_device):
    t = torch.tensor([[3.0, 0.5], [10.0, 2.25]], dtype=torch.float64, device=triton_device).requires_grad_()
    g = torch.randn(2, 2, 16, device=triton_device)
    ours = torch.autograd.grad(timestep_embedding_triton(t, 16), t, g)[0]
    ref = torch.autograd.grad(timestep_embedding_ref(t, 16), t, g)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_opcheck_and_fullgraph_trace(triton_device):
    t = ARD_TIMES.to(triton_device)
    torch.library.opcheck(torch.ops.ard_kernels.timestep_embedding.default, (t, 8, 10000.0),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda x: timestep_embedding_triton(x, 8) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(t), timestep_embedding_ref(t, 8) + 1, atol=atol_for(t), rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [256, 257, 1024])
def test_cuda(dim):
    t = torch.cat([ARD_TIMES, torch.rand(1000) * 999]).cuda().reshape(-1, 4)
    out = timestep_embedding_triton(t, dim)
    torch.testing.assert_close(out, timestep_embedding_ref(t, dim), atol=atol_for(t), rtol=0)
    fn = torch.compile(lambda x: ak.timestep_embedding(x, dim, backend="triton") * 2, fullgraph=True)
    torch.testing.assert_close(fn(t), 2 * out, atol=0, rtol=0)
