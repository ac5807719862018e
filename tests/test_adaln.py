"""The per-block adaLN path equals the published per-token formulation.

A small random DiT layer (the attention and MLP replaced by token-wise Linear maps, which this
path does not care about): modulation Linear on the B·nb block rows + our fused kernels vs the
conditioning repeated per token, the Linear on all B·N rows and DiT's ``modulate``. Outputs and
the gradients in x, c and every weight.
"""

import pytest
import torch
import torch.nn as nn

from ard_kernels.adaln import (
    adaln_layer,
    adaln_layer_per_token,
    adaln_modulation,
    adaln_modulation_per_token,
    repeat_per_token,
)


def small_layer(c, device):
    linear = nn.Linear(c, 6 * c).to(device)
    nn.init.normal_(linear.weight, std=0.2)  # adaLN-Zero starts at 0; random weights test more
    attn = nn.Linear(c, c).to(device)
    mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(approximate="tanh"), nn.Linear(2 * c, c)).to(device)
    return linear, attn, mlp


@pytest.mark.parametrize("b,n,c,block_size", [(2, 7, 64, 3), (1, 8, 72, 4)])
def test_modulation_rows_equal_per_token_rows(b, n, c, block_size):
    nb = -(-n // block_size)
    linear = nn.Linear(c, 6 * c)
    c_blocks = torch.randn(b, nb, c)
    per_block = adaln_modulation(c_blocks, linear)
    per_token = adaln_modulation_per_token(c_blocks, linear, n, block_size)
    assert len(per_block) == 6
    for blk, tok in zip(per_block, per_token):
        assert blk.shape == (b, nb, c) and tok.shape == (b, n, c)
        torch.testing.assert_close(repeat_per_token(blk, n, block_size), tok, atol=1e-6, rtol=1e-6)


def test_modulation_rejects_bad_input():
    with pytest.raises(ValueError, match="c_blocks"):
        adaln_modulation(torch.randn(4, 8), nn.Linear(8, 48))
    with pytest.raises(ValueError, match="chunks"):
        adaln_modulation(torch.randn(1, 2, 8), nn.Linear(8, 20), chunks=6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("b,n,c,block_size", [(2, 7, 64, 3), (1, 5, 72, 2)])
def test_layer_equals_per_token_formulation(backend, b, n, c, block_size, triton_device):
    linear, attn, mlp = small_layer(c, triton_device)
    nb = -(-n // block_size)
    x = torch.randn(b, n, c, device=triton_device).requires_grad_()
    c_blocks = torch.randn(b, nb, c, device=triton_device).requires_grad_()
    dout = torch.randn(b, n, c, device=triton_device)
    params = [x, c_blocks, linear.weight, linear.bias, attn.weight, mlp[0].weight]

    def run(layer, **kw):
        out = layer(x, c_blocks, linear, attn, mlp, block_size, **kw)
        return [out, *torch.autograd.grad(out, params, dout)]

    ours = run(adaln_layer, backend=backend)
    published = run(adaln_layer_per_token)
    for name, o, p in zip(["out", "dx", "dc", "dW_ada", "db_ada", "dW_attn", "dW_mlp"], ours, published):
        torch.testing.assert_close(o, p, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.cuda
def test_cuda_dit_xl_layer_bf16():
    """DiT-XL/2 width, 4×256 tokens, bf16: the per-block path and the published path agree to bf16 noise."""
    b, n, c, block_size = 2, 1024, 1152, 256
    linear, attn, mlp = (m.to(torch.bfloat16) for m in small_layer(c, "cuda"))
    x = torch.randn(b, n, c, device="cuda", dtype=torch.bfloat16)
    c_blocks = torch.randn(b, 4, c, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ours = adaln_layer(x, c_blocks, linear, attn, mlp, block_size, backend="triton").float()
        published = adaln_layer_per_token(x, c_blocks, linear, attn, mlp, block_size).float()
        ref = adaln_layer(x.float(), c_blocks.float(), linear.float(), attn.float(), mlp.float(), block_size,
                          backend="reference")
    err = (ours - ref).abs().max().item()
    base = (published - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"error {err:.3g} vs the published bf16 path's {base:.3g}"
