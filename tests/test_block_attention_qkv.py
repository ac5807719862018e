"""block_attention_qkv: attention on a packed QKV projection, against block_attention on its views.

CPU: the Triton kernels through the interpreter (fp32, tiny grids): outputs and the one qkv
gradient, every named pattern and a table, odd block sizes, head dims 72 and 16, and that the
Triton path copies nothing (O and dqkv come out in the packed layouts). Every other backend is
block_attention on the three views. GPU (``cuda``): bf16 at DiT's size, and torch.compile.
"""

import pytest
import torch
from _attention_helpers import attention_in_dtype, flash_rule

import ard_kernels as ak
from ard_kernels import masks
from ard_kernels.reference import block_attention_ref


def unpacked(qkv, heads, block_size, pattern, backend="reference"):
    """The same attention written out: split the projection, attend, lay O out as (B, N, H·D)."""
    b, n, width = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    if backend == "reference":
        o = block_attention_ref(q, k, v, block_size, pattern)
    else:
        o = ak.block_attention(q, k, v, block_size, pattern, backend=backend)
    return o.transpose(1, 2).reshape(b, n, width // 3)


def unpacked_in_dtype(qkv, heads, block_size, pattern):
    """:func:`unpacked` in PyTorch ops at qkv's dtype (no upcast): the low-precision peer."""
    b, n, width = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    o = attention_in_dtype(q, k, v, masks.dense_mask(pattern, n, n, block_size, device=qkv.device))
    return o.transpose(1, 2).reshape(b, n, width // 3)


def out_and_grad(fn, qkv, dout):
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    return out, torch.autograd.grad(out, qkv, dout)[0]


@pytest.mark.parametrize("b,n,heads,d,block_size,pattern", [
    (2, 12, 2, 72, 4, "causal"),
    (1, 9, 3, 16, 4, "diagonal"),
    (2, 10, 1, 24, 3, "window"),
    (1, 7, 2, 32, 7, "first"),
    (1, 8, 2, 16, 2, "table"),
])
def test_triton_matches_the_unpacked_reference(b, n, heads, d, block_size, pattern, triton_device):
    if pattern == "table":
        pattern = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    qkv = torch.randn(b, n, 3 * heads * d, device=triton_device)
    dout = torch.randn(b, n, heads * d, device=triton_device)
    out, dqkv = out_and_grad(lambda t: ak.block_attention_qkv(t, heads, block_size, pattern, backend="triton"),
                             qkv, dout)
    ref_out, ref_dqkv = out_and_grad(lambda t: unpacked(t, heads, block_size, pattern), qkv, dout)
    assert out.shape == (b, n, heads * d) and out.is_contiguous() and dqkv.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_other_backends_are_block_attention_on_the_views(backend):
    qkv = torch.randn(2, 12, 3 * 2 * 16)
    dout = torch.randn(2, 12, 2 * 16)
    ref_out, ref_dqkv = out_and_grad(lambda t: unpacked(t, 2, 4, "causal"), qkv, dout)
    if backend == "flex":  # FlexAttention has no backward on the CPU
        with torch.no_grad():
            torch.testing.assert_close(ak.block_attention_qkv(qkv, 2, 4, "causal", backend=backend), ref_out,
                                       atol=2e-5, rtol=1e-4)
        return
    out, dqkv = out_and_grad(lambda t: ak.block_attention_qkv(t, 2, 4, "causal", backend=backend), qkv, dout)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=1e-4, rtol=1e-4)


def test_triton_path_copies_nothing(triton_device, monkeypatch):
    """The kernels receive views of qkv itself and write O and dqkv in place: no copy kernels around them."""
    from ard_kernels.ops import block_attention as ba

    seen = {}
    fwd, bwd = ba.block_attention_fwd, ba._block_attention_bwd

    def spy_fwd(q, k, v, *args, out=None, **kwargs):
        seen["fwd"] = (q, k, v, out)
        return fwd(q, k, v, *args, out=out, **kwargs)

    def spy_bwd(do, q, k, v, out, *args, grads=None, **kwargs):
        seen["bwd"] = (do, out, grads)
        return bwd(do, q, k, v, out, *args, grads=grads, **kwargs)

    monkeypatch.setattr(ba, "block_attention_fwd", spy_fwd)
    monkeypatch.setattr(ba, "_block_attention_bwd", spy_bwd)
    qkv = torch.randn(1, 8, 3 * 2 * 16, device=triton_device, requires_grad=True)
    out = ak.block_attention_qkv(qkv, 2, 4, backend="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    q, k, v, o = seen["fwd"]
    assert all(t.data_ptr() == qkv.data_ptr() + i * 32 * qkv.element_size() for i, t in enumerate((q, k, v)))
    assert o.data_ptr() == out.data_ptr()
    do, o_saved, grads = seen["bwd"]
    assert o_saved.data_ptr() == out.data_ptr()
    assert [g.data_ptr() for g in grads] == [dqkv.data_ptr() + i * 32 * dqkv.element_size() for i in range(3)]


def test_opcheck_and_fullgraph_trace(triton_device):
    qkv = torch.randn(1, 8, 3 * 2 * 16, device=triton_device, requires_grad=True)
    torch.library.opcheck(torch.ops.ard_kernels.block_attention_qkv_fwd.default, (qkv, 2, 2, [1, 3], 4, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    fn = torch.compile(lambda t: ak.block_attention_qkv(t, 2, 4, "causal", backend="triton"), backend="aot_eager",
                       fullgraph=True)
    dout = torch.randn(1, 8, 32, device=triton_device)
    out, dqkv = out_and_grad(fn, qkv, dout)
    ref_out, ref_dqkv = out_and_grad(lambda t: unpacked(t, 2, 4, "causal"), qkv, dout)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(qkv=torch.randn(2, 8, 3, 16)), ValueError, "qkv: expected a 3-D tensor"),
    (dict(qkv=torch.randn(2, 8, 95)), ValueError, r"qkv: expected a last axis of 3·num_heads·D"),
    (dict(num_heads=0), ValueError, "num_heads: expected an int >= 1"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(pattern="banded"), ValueError, "pattern: expected one of"),
    (dict(qkv=torch.randn(2, 8, 96).double()), TypeError, "qkv: expected dtype in"),
])
def test_input_errors(kwargs, error, match):
    args = dict(qkv=torch.randn(2, 8, 96), num_heads=2, block_size=4, pattern="causal", backend="reference")
    with pytest.raises(error, match=match):
        ak.block_attention_qkv(**{**args, **kwargs})


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_cuda_bf16_dit_shape_and_compile():
    """DiT-XL/2's attention (H 16, D 72) over 4 blocks of 256 in bf16: as the unpacked Triton op, also compiled."""
    qkv = torch.randn(4, 1024, 3 * 16 * 72, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(4, 1024, 16 * 72, device="cuda", dtype=torch.bfloat16)
    out, dqkv = out_and_grad(lambda t: ak.block_attention_qkv(t, 16, 256, "causal", backend="triton"), qkv, dout)
    ref_out, ref_dqkv = out_and_grad(lambda t: unpacked(t, 16, 256, "causal", backend="triton"), qkv, dout)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # the same kernel and config on the same views
    # the backward writes other strides (one dqkv): the autotuner may pick another tile, another sum order
    torch.testing.assert_close(dqkv, ref_dqkv, atol=2e-2, rtol=2e-2)
    # and against fp32 PyTorch, by the flash-attention rule (the comparisons above share our kernels)
    low = out_and_grad(lambda t: unpacked_in_dtype(t, 16, 256, "causal"), qkv, dout)
    ref = out_and_grad(lambda t: unpacked(t, 16, 256, "causal"), qkv.float(), dout.float())
    for name, got, lo, want in zip(("out", "dqkv"), (out, dqkv), low, ref):
        flash_rule(name, got, lo, want)
    fn = torch.compile(lambda t: ak.block_attention_qkv(t, 16, 256, "causal", backend="triton"), fullgraph=True)
    c_out, c_dqkv = out_and_grad(fn, qkv, dout)
    torch.testing.assert_close(c_out, out, atol=0, rtol=0)
    torch.testing.assert_close(c_dqkv, dqkv, atol=0, rtol=0)
