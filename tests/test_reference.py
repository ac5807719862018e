"""The references against independent formulations, and the public API's dispatch.

block attention: vs SDPA with a dense bool mask (built here from first principles, not by
masks.dense_mask) and vs FlexAttention's unfused path; modulation: vs DiT's per-token
``modulate`` on conditioning repeated per token.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ard_kernels as ak
from ard_kernels import masks, reference

PATTERNS = ["causal", "diagonal", "window", "first"]


def allowed(pattern, qb, kb):
    """The paper's definitions, written independently of masks.pattern_table."""
    return {
        "causal": kb <= qb,
        "diagonal": kb == qb,
        "window": qb - 1 <= kb <= qb,
        "first": kb == qb or kb == 0,
    }[pattern]


def loop_mask(pattern, lq, lk, block_size):
    mask = torch.zeros(lq, lk, dtype=torch.bool)
    for r in range(lq):
        for c in range(lk):
            qb = (lk - lq + r) // block_size
            kb = c // block_size
            mask[r, c] = bool(pattern[qb, kb]) if isinstance(pattern, torch.Tensor) else allowed(pattern, qb, kb)
    return mask


def random_table(nb, generator=None):
    table = torch.rand(nb, nb, generator=generator) < 0.5
    table[torch.arange(nb), torch.randint(0, nb, (nb,), generator=generator)] = True  # no empty row
    return table


def qkv(b, h, lq, lk, d, dtype=torch.float32):
    return (torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, h, lk, d, dtype=dtype),
            torch.randn(b, h, lk, d, dtype=dtype))


@pytest.mark.parametrize("pattern", PATTERNS + ["table"])
@pytest.mark.parametrize("block_size,nb,lq_blocks", [(100, 3, 3), (7, 3, 1), (5, 4, 2), (16, 1, 1), (9, 5, 5)])
@pytest.mark.parametrize("partial", [0, 3])
def test_block_attention_ref_vs_sdpa_dense_mask(pattern, block_size, nb, lq_blocks, partial):
    d = 72
    lk = nb * block_size - (partial if nb * block_size > partial + block_size else 0)
    lq = min(lk, lq_blocks * block_size)
    if pattern == "table":
        pattern = random_table(masks.num_blocks(lk, block_size))
    q, k, v = qkv(2, 3, lq, lk, d, torch.float64)
    mask = loop_mask(pattern, lq, lk, block_size)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, lse = reference.block_attention_ref(q, k, v, block_size, pattern, return_lse=True)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~mask, -math.inf), -1).float())


@pytest.mark.parametrize("pattern", PATTERNS + ["table"])
@pytest.mark.parametrize("lq", [12, 5])
def test_block_attention_ref_vs_flex_unfused(pattern, lq):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_size, lk = 5, 12
    if pattern == "table":
        pattern = random_table(3)
    q, k, v = qkv(1, 2, lq, lk, 16)
    mask = loop_mask(pattern, lq, lk, block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, None, lq, lk, device="cpu")
    expected = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(reference.block_attention_ref(q, k, v, block_size, pattern), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "reference"])
@pytest.mark.parametrize("pattern", PATTERNS + ["table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_attention_backends_agree(backend, pattern, dtype):
    block_size, lk, lq = 6, 16, 10
    if pattern == "table":
        pattern = random_table(3)
    grad = backend != "flex"  # FlexAttention has no backward on the CPU
    q, k, v = (t.requires_grad_(grad) for t in qkv(2, 2, lq, lk, 24, dtype))
    out = ak.block_attention(q, k, v, block_size, pattern, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference.block_attention_ref(q.detach().double(), k.detach().double(), v.detach().double(),
                                             block_size, pattern)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    if grad:
        out.float().square().sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_block_attention_sdpa_fast_paths_match_reference():
    q, k, v = qkv(2, 2, 8, 24, 16)
    # a cached step: the last block sees every key (no mask needed)
    torch.testing.assert_close(ak.block_attention(q, k, v, 8, "causal", backend="sdpa"),
                               reference.block_attention_ref(q, k, v, 8, "causal"))
    # block-diagonal with whole blocks: folded into the batch
    q, k, v = qkv(2, 2, 24, 24, 16)
    torch.testing.assert_close(ak.block_attention(q, k, v, 8, "diagonal", backend="sdpa"),
                               reference.block_attention_ref(q, k, v, 8, "diagonal"))


def test_block_attention_accepts_bnhd_strides():
    b, n, h, d = 2, 15, 3, 16
    q, k, v = (torch.randn(b, n, h, d).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = ak.block_attention(q, k, v, 5, "causal", backend="sdpa")
    torch.testing.assert_close(out, reference.block_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(),
                                                                  5, "causal"))


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.integers(1, 9),
    nb=st.integers(1, 5),
    trim=st.integers(0, 8),
    lq_frac=st.floats(0.05, 1.0),
    pattern=st.sampled_from(PATTERNS + ["table"]),
    seed=st.integers(0, 2**16),
)
def test_block_attention_property(block_size, nb, trim, lq_frac, pattern, seed):
    """Over shapes, block sizes and patterns: reference == SDPA on a loop-built dense mask."""
    lk = max(1, nb * block_size - min(trim, block_size - 1))
    lq = max(1, int(lk * lq_frac))
    gen = torch.Generator().manual_seed(seed)
    if pattern == "table":
        pattern = random_table(masks.num_blocks(lk, block_size), gen)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64) for n in (lq, lk, lk))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=loop_mask(pattern, lq, lk, block_size))
    torch.testing.assert_close(ak.block_attention(q.float(), k.float(), v.float(), block_size, pattern,
                                                  backend="reference").double(), expected, atol=1e-5, rtol=1e-5)


def dit_modulate(x, shift, scale):
    """DiT's per-token form: LN then x·(1 + scale) + shift with conditioning on every token."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def repeat_per_token(cond, n, block_size):
    return cond.repeat_interleave(block_size, dim=1)[:, :n]


@pytest.mark.parametrize("b,n,c,block_size", [(2, 7, 72, 3), (1, 1024, 64, 256), (3, 10, 1152, 10), (2, 5, 100, 8)])
def test_modulated_layer_norm_ref_vs_per_token(b, n, c, block_size):
    nb = masks.num_blocks(n, block_size)
    x = torch.randn(b, n, c, dtype=torch.float64) * 3 + 1
    shift, scale = torch.randn(b, nb, c, dtype=torch.float64), torch.randn(b, nb, c, dtype=torch.float64)
    expected = dit_modulate(x, repeat_per_token(shift, n, block_size), repeat_per_token(scale, n, block_size))
    got = reference.modulated_layer_norm_ref(x, shift, scale, block_size)
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("b,n,c,block_size", [(2, 7, 72, 3), (1, 9, 64, 4)])
def test_gated_residual_ref_vs_per_token(b, n, c, block_size):
    nb = masks.num_blocks(n, block_size)
    x, y = torch.randn(b, n, c), torch.randn(b, n, c)
    gate = torch.randn(b, nb, c)
    expected = x + repeat_per_token(gate, n, block_size) * y
    torch.testing.assert_close(reference.gated_residual_ref(x, y, gate, block_size), expected)
    out = ak.gated_residual(x.clone(), y, gate, block_size, inplace=True, backend="reference")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dim", [256, 7, 1])
def test_timestep_embedding_ref_matches_dit_formula(dim):
    t = torch.tensor([0.0, 1.0, 249.75, 999.0])
    half = dim // 2
    expected = torch.zeros(4, dim)
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000) * j / half)
            expected[i, j] = math.cos(ti * f)
            expected[i, half + j] = math.sin(ti * f)
    # fp32 arguments near t = 999 carry ~6e-5 of rounding: the tolerance is the fp32 spacing there
    torch.testing.assert_close(ak.timestep_embedding(t, dim, backend="reference"), expected, atol=1e-4, rtol=0)
    assert ak.timestep_embedding(t.reshape(2, 2), dim).shape == (2, 2, dim)


def test_kv_append_ref_writes_and_refuses_overflow():
    kc, vc = torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    assert reference.kv_append_ref(kc, vc, k, v, 3) == 7
    torch.testing.assert_close(kc[:, :, 3:7], k)
    assert kc[:, :, :3].abs().sum() == 0 and kc[:, :, 7:].abs().sum() == 0
    before = kc.clone()
    with pytest.raises(ValueError, match="overflows the cache capacity 10"):
        reference.kv_append_ref(kc, vc, k, v, 7)
    torch.testing.assert_close(kc, before)


def test_qkv_split_append_ref_matches_dit_layout():
    b, n, h, d = 2, 5, 3, 8
    qkv_out = torch.randn(b, n, 3 * h * d)
    kc, vc = torch.zeros(b, h, 12, d), torch.zeros(b, h, 12, d)
    q = reference.qkv_split_append_ref(qkv_out, kc, vc, 4, h)
    split = qkv_out.reshape(b, n, 3, h, d)
    torch.testing.assert_close(q, split[:, :, 0].transpose(1, 2))
    torch.testing.assert_close(kc[:, :, 4:9], split[:, :, 1].transpose(1, 2))
    torch.testing.assert_close(vc[:, :, 4:9], split[:, :, 2].transpose(1, 2))


def test_available_backends_on_cpu():
    names = ak.available_backends("cpu")
    assert names[:2] == ["reference", "sdpa"]
    assert ("triton" in names) == (__import__("os").environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lq", [16, 4])
def test_block_attention_sdpa_compiles_without_graph_breaks(pattern, lq):
    """The model calls block_attention inside torch.compile: the SDPA path's host decisions must trace."""
    q, k, v = qkv(1, 2, lq, 16, 8)
    fn = torch.compile(lambda q, k, v: ak.block_attention(q, k, v, 4, pattern, backend="sdpa"),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), reference.block_attention_ref(q, k, v, 4, pattern))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "triton"])
@pytest.mark.parametrize("pattern", ["causal", "first"])
def test_block_attention_custom_scale(backend, pattern):
    """A non-default softmax scale reaches every backend (every other test uses 1/sqrt(D), so a backend that
    ignored ``scale`` would pass them). Oracle: SDPA on the loop-built mask with that scale, fp64."""
    block_size, lk, lq, d, scale = 4, 11, 7, 16, 0.9
    q, k, v = qkv(1, 2, lq, lk, d)
    mask = loop_mask(pattern, lq, lk, block_size)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    out = ak.block_attention(q, k, v, block_size, pattern, scale=scale, backend=backend)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (expected - F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
            ).abs().max() > 1e-2  # the scale matters here
    if backend != "sdpa":  # SDPA has no lse
        _, lse = ak.block_attention(q, k, v, block_size, pattern, scale=scale, return_lse=True, backend=backend)
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        torch.testing.assert_close(lse.double(), torch.logsumexp(s.masked_fill(~mask, -math.inf), -1),
                                   atol=1e-5, rtol=1e-5)
