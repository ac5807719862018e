"""Triton block attention (forward, lse and dq/dk/dv) against the reference and SDPA with a dense mask.

On CPU the kernels run under the Triton interpreter (tiny grids, 16×16 tiles, fp32 math); on GPU
(``cuda`` marker) bf16/fp16 are judged by the flash-attention rule: the kernel's error against an
fp32 reference is at most twice the error of the same computation done by PyTorch in that dtype,
plus 1e-5.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
from _attention_helpers import attention_in_dtype, flash_rule

import ard_kernels
from ard_kernels import masks
from ard_kernels.ops import block_attention as ba
from ard_kernels.ops import block_schedule
from ard_kernels.reference import block_attention_ref


def _inputs(b, h, lq, lk, d, device, dtype=torch.float32, bnhd=False):
    """q (B,H,Lq,D), k, v (B,H,Lk,D); with ``bnhd`` they are (B,N,H,D) tensors viewed by transpose."""
    def make(n):
        if bnhd:
            return torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=device, dtype=dtype)

    return [make(n).requires_grad_() for n in (lq, lk, lk)]


def _run(fn, q, k, v):
    """Output, lse and (dq, dk, dv) of a loss that uses both the output and the lse."""
    out, lse = fn(q, k, v)
    gen = torch.Generator().manual_seed(1)  # the same cotangents for every implementation compared
    g_out = torch.randn(out.shape, generator=gen).to(out.device)
    g_lse = torch.randn(lse.shape, generator=gen).to(lse.device)
    loss = (out.float() * g_out).sum() + (lse * g_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads


def _random_table(nb, gen):
    table = torch.rand(nb, nb, generator=gen) < 0.5
    table[torch.arange(nb), torch.randint(nb, (nb,), generator=gen)] = True  # no empty row
    return table


# (B, H, block_size, Lk, Lq, D, pattern); "random" draws a bool table.
CASES = [
    (1, 2, 7, 21, 21, 72, "causal"),
    (2, 1, 5, 13, 8, 16, "window"),       # partial last block, Lq < Lk
    (1, 2, 13, 39, 13, 24, "causal"),     # KV-cached step: one block of queries, all keys
    (1, 1, 7, 21, 21, 16, "diagonal"),
    (1, 1, 7, 20, 17, 72, "first"),
    (1, 2, 6, 24, 19, 24, "random"),
    (1, 1, 1, 40, 37, 16, "random"),      # 40 blocks: the table is gathered per element, not as bit masks
    (1, 1, 2, 64, 64, 16, "random"),      # 32 blocks: bit 31 of the row masks is the sign bit
    (1, 1, 20, 20, 20, 16, "causal"),     # a single block
    (1, 1, 5, 15, 5, 16, "diagonal"),     # keys no query sees: dk = dv = 0 there
    (1, 1, 16, 48, 48, 16, "causal"),     # block boundaries on tile edges: no masked tile at all
    (1, 1, 100, 300, 300, 72, "causal"),  # the odd block size, three blocks
]


@pytest.mark.parametrize("b,h,bs,lk,lq,d,pattern", CASES)
def test_matches_reference(b, h, bs, lk, lq, d, pattern, triton_device):
    if pattern == "random":
        pattern = _random_table(masks.num_blocks(lk, bs), torch.Generator().manual_seed(lk))
    q, k, v = _inputs(b, h, lq, lk, d, triton_device)
    table = masks.pattern_table(pattern, masks.num_blocks(lk, bs))
    scale = 1.0 / math.sqrt(d)

    out, lse, grads = _run(lambda *a: ba.block_attention_triton(*a, bs, table, scale, True), q, k, v)
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, bs, pattern, return_lse=True), q, k, v)

    assert out.shape == (b, h, lq, d) and out.dtype == q.dtype
    assert lse.shape == (b, h, lq) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("pattern", ["causal", "window", "first", "diagonal"])
def test_matches_sdpa_with_dense_mask(pattern, triton_device):
    bs, lk, lq, d = 6, 17, 11, 24
    q, k, v = _inputs(1, 2, lq, lk, d, triton_device)
    mask = masks.dense_mask(pattern, lq, lk, bs, device=triton_device)

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        return out, torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)

    def ours(q, k, v):
        return ard_kernels.block_attention(q, k, v, bs, pattern, return_lse=True, backend="triton")

    out, lse, grads = _run(ours, q, k, v)
    ref_out, ref_lse, ref_grads = _run(sdpa, q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [16, 24, 40, 64, 72, 80, 96, 120, 128, 136, 200, 256])
def test_head_dims(d, triton_device):
    """Every head-dim split: D0 = 2^k and a masked power-of-two remainder (or none)."""
    q, k, v = _inputs(1, 1, 10, 12, d, triton_device)
    out, lse, grads = _run(lambda *a: ard_kernels.block_attention(*a, 4, "causal", return_lse=True,
                                                                  backend="triton"), q, k, v)
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, 4, "causal", return_lse=True), q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_output_is_token_major_so_the_projection_input_is_a_view(triton_device):
    """Contiguous (B, H, N, D) inputs: O is still laid out (B, N, H, D), so (B, N, H·D) costs no copy."""
    q, k, v = _inputs(2, 3, 9, 14, 24, triton_device)
    out = ard_kernels.block_attention(q, k, v, 5, "causal", backend="triton")
    tokens = out.transpose(1, 2).reshape(2, 9, 3 * 24)
    assert tokens.data_ptr() == out.data_ptr() and tokens.is_contiguous()
    torch.testing.assert_close(out, block_attention_ref(q, k, v, 5, "causal"), atol=2e-5, rtol=1e-4)


def test_bnhd_strides_and_layout(triton_device):
    """(B, N, H, D) tensors viewed as (B, H, N, D): no copy needed, output keeps that layout."""
    q, k, v = _inputs(2, 3, 9, 14, 24, triton_device, bnhd=True)
    assert not q.is_contiguous()
    out, lse, grads = _run(lambda *a: ard_kernels.block_attention(*a, 5, "causal", return_lse=True,
                                                                  backend="triton"), q, k, v)
    assert out.stride() == q.stride()  # the output is always token-major: q's layout here
    assert grads[0].stride() == q.stride() and grads[1].stride() == k.stride()
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, 5, "causal", return_lse=True), q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unaligned_strides(triton_device):
    """Head dim not unit-stride (a (B, H, D, N) tensor transposed): the kernels' alignment hint is off."""
    q, k, v = (torch.randn(1, 2, 24, n, device=triton_device).transpose(-1, -2).requires_grad_() for n in (11, 13, 13))
    align, strides = ba._aligned_strides(q, k, v)
    assert align == 1 and strides[:4] == q.stride()  # strides passed as they are
    aligned = torch.empty(2, 3, 8, 16)
    assert ba._aligned_strides(aligned, aligned[:, :, :4]) == (8, (48, 16, 2, 1) * 2)  # (B, H, rows) strides / 8
    out, lse, grads = _run(lambda *a: ard_kernels.block_attention(*a, 4, "window", return_lse=True,
                                                                  backend="triton"), q, k, v)
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, 4, "window", return_lse=True), q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, triton_device):
    """bf16/fp16 in and out (the interpreter computes in fp32; its fp32→bf16 cast truncates)."""
    q, k, v = _inputs(1, 2, 14, 14, 72, triton_device, dtype=dtype)
    out = ard_kernels.block_attention(q, k, v, 7, "causal", backend="triton")
    ref = block_attention_ref(q.float(), k.float(), v.float(), 7, "causal")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    dq_ref, = torch.autograd.grad(block_attention_ref(q, k, v, 7, "causal").float().sum(), (q,))
    assert dq.dtype == dtype
    torch.testing.assert_close(dq.float(), dq_ref.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bm,bn", [(16, 16), (64, 32), (32, 128)])
def test_schedule_classifies_tiles(seed, bm, bn):
    """Full tiles hold only allowed pairs, skipped tiles none, masked tiles some (token-level check)."""
    rng = np.random.default_rng(seed)
    bs = int(rng.integers(1, 40))
    lk = int(rng.integers(1, 200))
    lq = int(rng.integers(1, lk + 1))
    nb = masks.num_blocks(lk, bs)
    table = _random_table(nb, torch.Generator().manual_seed(seed))
    dense = masks.dense_mask(table, lq, lk, bs).numpy()
    full, masked = block_schedule.classify_tiles(table.numpy(), lq, lk, bs, bm, bn)
    for m in range(full.shape[0]):
        for n in range(full.shape[1]):
            tile = np.zeros((bm, bn), dtype=bool)
            part = dense[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
            tile[:part.shape[0], :part.shape[1]] = part
            rows = part.shape[0]
            assert full[m, n] == tile[:rows].all()
            assert masked[m, n] == (tile.any() and not tile[:rows].all())


@pytest.mark.parametrize("pattern", ["causal", "diagonal", "window", "first"])
@pytest.mark.parametrize("nb", [1, 2, 4, 5])
@pytest.mark.parametrize("bm,bn", [(128, 64), (64, 64), (128, 128)])
def test_work_scales_with_allowed_block_pairs(pattern, nb, bm, bn):
    """ARD's whole 256-token blocks: every scheduled tile is unmasked, and there are exactly
    (allowed block pairs)·(256/BLOCK_M)·(256/BLOCK_N) of them, in training and at a cached step."""
    table = masks.pattern_table(pattern, nb).numpy()
    per_pair = (256 // bm) * (256 // bn)
    full, masked = block_schedule.classify_tiles(table, nb * 256, nb * 256, 256, bm, bn)
    assert not masked.any()
    assert full.sum() == masks.allowed_block_pairs(pattern, nb) * per_pair
    full, masked = block_schedule.classify_tiles(table, 256, nb * 256, 256, bm, bn)  # the last block's step
    assert not masked.any()
    assert full.sum() == table[-1].sum() * per_pair


@pytest.mark.parametrize("nb,lq,lk,bs,pairs,expected", [
    (4, 1024, 1024, 256, ((128, 64), (64, 64), (128, 128)), False),  # ARD training: tiles inside blocks
    (4, 256, 1024, 256, ((128, 64), (64, 64)), False),               # the cached step's last block
    (3, 300, 300, 100, ((16, 16),), True),                            # odd blocks straddle tiles
    (4, 1000, 1024, 256, ((128, 64),), True),                         # queries start mid-tile
    (2, 64, 64, 32, ((16, 16), (64, 64)), True),                      # one tiling straddles: all compile it
])
def test_masked_loop_is_compiled_only_where_a_tile_straddles(nb, lq, lk, bs, pairs, expected, triton_device):
    rows = tuple(block_schedule.encode_pattern("causal", nb))
    assert block_schedule.has_masked_tiles(rows, nb, lq, lk, bs, pairs) is expected
    q, k = torch.empty(1, 1, lq, 16, device=triton_device), torch.empty(1, 1, lk, 16, device=triton_device)
    launch = ba._Launch(q, k, nb, rows, bs, 1.0, "fwd")
    assert launch.constexprs()["MASKED_TILES"] is block_schedule.has_masked_tiles(rows, nb, lq, lk, bs,
                                                                                  launch_pairs(launch))


def launch_pairs(launch):
    """The (BLOCK_M, BLOCK_N) tilings a launch's schedule holds."""
    return ba._INTERPRETER_PAIRS if launch.interp else ba._tuned(launch.kind, launch.width > 128, False,
                                                                   launch.extra_configs())[1]


def test_schedule_is_cached_and_small():
    table = masks.pattern_table("causal", 4)
    key = (tuple(block_schedule.encode_pattern("causal", 4)), 4, 1024, 1024, 256, ((128, 64),))
    s1 = block_schedule.schedule_host(*key)
    assert s1 is block_schedule.schedule_host(*key)
    assert s1.dtype == torch.int32 and s1.numel() < 300
    # 4×256 causal, 128×64 tiles: every visited tile is whole (no masked tile), 10 block pairs × 8.
    full, masked = block_schedule.classify_tiles(table.numpy(), 1024, 1024, 256, 128, 64)
    assert not masked.any() and full.sum() == 10 * 2 * 4


def test_device_schedules_are_never_evicted():
    """A captured CUDA graph reads its schedules by address: a bounded cache would free one under it."""
    first = block_schedule.schedule_on(tuple(block_schedule.encode_pattern("causal", 2)), 2, 8, 8, 4, ((4, 4),), "cpu")
    for lk in range(16, 16 + 4 * 300, 4):  # more distinct shapes than any LRU bound would keep
        block_schedule.schedule_on(tuple(block_schedule.encode_pattern("causal", 2)), 2, lk, lk, lk // 2, ((4, 4),),
                                   "cpu")
    assert block_schedule.schedule_on.cache_parameters()["maxsize"] is None
    again = block_schedule.schedule_on(tuple(block_schedule.encode_pattern("causal", 2)), 2, 8, 8, 4, ((4, 4),), "cpu")
    assert again is first
    from ard_kernels.ops import attention_peers  # FlexAttention's block masks, captured the same way

    assert attention_peers._block_mask.cache_parameters()["maxsize"] is None


def test_host_schedule_stays_on_the_host_under_a_default_device():
    with torch.device("meta"):  # e.g. a model built on meta: the schedule is host data all the same
        s = block_schedule.schedule_host(tuple(block_schedule.encode_pattern("window", 3)), 3, 12, 12, 4, ((4, 4),))
    assert s.device.type == "cpu"


@pytest.mark.parametrize("nb", [5, 32, 40])  # bit-mask table (bit 31 = the sign at 32), dense table
def test_schedule_layout(nb):
    """The packed schedule decodes as block_schedule's docstring says, for every slot and direction."""
    bs, lk, lq = 3, 3 * nb - 1, 2 * nb
    table = _random_table(nb, torch.Generator().manual_seed(nb)).numpy()
    pairs = ((16, 16), (32, 16))
    s = block_schedule.schedule_host(tuple(block_schedule.encode_pattern(table, nb)), nb, lq, lk, bs, pairs).tolist()
    tab = s[s[0]:]
    if nb <= block_schedule.SMALL_NB:
        decoded = [[(tab[i] >> j) & 1 == 1 for j in range(nb)] for i in range(nb)]
    else:
        decoded = [[tab[i * nb + j] == 1 for j in range(nb)] for i in range(nb)]
    assert np.array_equal(np.array(decoded), table)
    for slot, (bm, bn) in enumerate(pairs):
        full, masked = block_schedule.classify_tiles(table, lq, lk, bs, bm, bn)
        for direction, (f, m) in enumerate(((full, masked), (full.T, masked.T))):
            at = s[1 + 2 * slot + direction]
            for row in range(f.shape[0]):
                assert s[s[at + 2 * row]:s[at + 2 * row + 1]] == np.flatnonzero(f[row]).tolist()
                assert s[s[at + 2 * row + 1]:s[at + 2 * row + 2]] == np.flatnonzero(m[row]).tolist()


@pytest.mark.parametrize("nb", [1, 2, 5, 32, 61, 62, 63, 124, 130])
def test_pattern_encoding_round_trips(nb):
    """Named patterns (closed forms, plain Python) and tables encode to the same ints, and decode back."""
    w = block_schedule.words_per_row(nb)
    for pattern in masks.PATTERNS:
        table = masks.pattern_table(pattern, nb)
        rows = block_schedule.encode_pattern(pattern, nb)
        assert all(type(r) is int and 0 <= r < 2**block_schedule.WORD_BITS for r in rows)
        assert len(rows) == nb * w
        assert rows == block_schedule.encode_pattern(table, nb) == block_schedule.encode_pattern(table.numpy(), nb)
        decoded = block_schedule.decode_pattern(nb, rows)
        assert np.array_equal(decoded, table.numpy())
        assert all(decoded[i, j] == masks.block_visible(pattern, i, j) for i in range(nb) for j in range(nb))
    table = _random_table(nb, torch.Generator().manual_seed(nb))
    assert np.array_equal(block_schedule.decode_pattern(nb, block_schedule.encode_pattern(table, nb)), table.numpy())
    with pytest.raises(ValueError, match="rows: expected"):
        block_schedule.decode_pattern(nb, [1] * (nb * w + 1))
    with pytest.raises(ValueError, match="pattern: expected"):
        block_schedule.encode_pattern("banded", nb)


def test_custom_op_fake_and_compile(triton_device):
    """torch.compile(fullgraph=True) traces the custom op and its autograd without breaks."""
    torch.library.opcheck(
        torch.ops.ard_kernels.block_attention_fwd,
        (*(t.detach() for t in _inputs(1, 1, 5, 9, 16, triton_device)), 3, block_schedule.encode_pattern("causal", 3),
         3, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )
    q, k, v = _inputs(1, 2, 9, 9, 16, triton_device)

    def f(q, k, v):
        return ard_kernels.block_attention(q, k, v, 3, "causal", backend="triton")

    backend = "aot_eager" if triton_device.type == "cpu" else "inductor"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out = compiled(q, k, v)
    dq, = torch.autograd.grad(out.sum(), (q,))
    ref = block_attention_ref(q, k, v, 3, "causal")
    dq_ref, = torch.autograd.grad(ref.sum(), (q,))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dq, dq_ref, atol=1e-4, rtol=1e-4)


def test_opcheck_autograd(triton_device):
    """The int-encoded pattern passes opcheck's autograd and AOT-dispatch checks too (forward and backward)."""
    q, k, v = _inputs(1, 1, 5, 9, 16, triton_device)
    torch.library.opcheck(torch.ops.ard_kernels.block_attention_fwd,
                          (q, k, v, 3, block_schedule.encode_pattern("window", 3), 3, 0.25),
                          test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


# Ops that would build the pattern as a (CPU) tensor inside the graph: masks.pattern_table's and friends.
_TABLE_OPS = ("arange", "le", "ge", "eq", "bitwise_and", "bitwise_or", "logical_and", "logical_or", "unsqueeze",
              "lift_fresh_copy", "_to_copy", "scalar_tensor", "tensor")


def _op_name(target) -> str:
    """``aten.arange.start`` -> ``arange``; a Python callable -> its ``__name__``."""
    name = getattr(target, "_opname", None) or getattr(target, "__name__", "")
    return name.split(".")[0]


@pytest.mark.parametrize("pattern", ["causal", "first"])
def test_compile_graph_holds_no_pattern_tensor(pattern, triton_device):
    """Under torch.compile a named pattern reaches the ops as int constants: no table tensor in the graphs.

    Checked on the graphs AOT autograd hands the compiler (what inductor and CUDA-graph trees see):
    forward and backward hold the custom ops with ``nb`` and ``rows`` as plain ints, no tensor
    constant, no op that builds a table, every tensor on q's device. Outputs and gradients match eager.
    """
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {}

    def record(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    dynamo_graphs = []
    aot = aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    bs, lk, lq = 3, 9, 7
    nb = masks.num_blocks(lk, bs)
    q, k, v = _inputs(1, 2, lq, lk, 16, triton_device)

    def f(q, k, v):
        return ard_kernels.block_attention(q, k, v, bs, pattern, return_lse=True, backend="triton")

    out, lse, grads = _run(torch.compile(f, fullgraph=True, backend=backend), q, k, v)
    ref_out, ref_lse, ref_grads = _run(f, q, k, v)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    assert len(dynamo_graphs) == 1 and set(graphs) == {"fw", "bw"}
    rows = block_schedule.encode_pattern(pattern, nb)
    (op,) = [n for n in dynamo_graphs[0].graph.nodes if n.target is torch.ops.ard_kernels.block_attention_fwd]
    assert op.args[3:5] == (nb, rows)  # constants, not graph values
    for name, gm in graphs.items():
        ops = [n for n in gm.graph.nodes if n.op == "call_function"]
        target = getattr(torch.ops.ard_kernels, f"block_attention_{name}d").default
        (call,) = [n for n in ops if n.target is target]
        assert call.args[-4:-2] == (nb, rows), name
        assert not [n for n in gm.graph.nodes if n.op == "get_attr"], f"{name}: a tensor constant in the graph"
        built = [n for n in ops if _op_name(n.target) in _TABLE_OPS]
        assert not built, f"{name}: ops that build a pattern tensor: {built}"
        for n in gm.graph.nodes:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                assert val.device == q.device, f"{name}: {n} on {val.device}"


def test_compile_user_table_matches(triton_device):
    """A user bool table is data: read on the host (a graph break under torch.compile), still right."""
    bs, lk, lq = 3, 9, 9
    table = _random_table(masks.num_blocks(lk, bs), torch.Generator().manual_seed(3))
    q, k, v = _inputs(1, 1, lq, lk, 16, triton_device)

    def f(q, k, v):
        return ard_kernels.block_attention(q, k, v, bs, table, return_lse=True, backend="triton")

    torch._dynamo.reset()
    out, lse, grads = _run(torch.compile(f, backend="aot_eager"), q, k, v)
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, bs, table, return_lse=True), q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The Hopper (TMA) forward: kernel through the interpreter's descriptor emulation, host logic
# (eligibility, descriptors, pre-hook, config lists) directly; the GPU compile is test_aot_compile's.
# ---------------------------------------------------------------------------------------------

def _assert_triton_matches_reference(q, k, v, bs, table, pattern):
    """Output, lse and gradients of the Triton path against the reference, fp32 tolerances."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse, grads = _run(lambda *a: ba.block_attention_triton(*a, bs, table, scale, True), q, k, v)
    ref_out, ref_lse, ref_grads = _run(lambda *a: block_attention_ref(*a, bs, pattern, return_lse=True), q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


TMA_CASES = [
    (1, 2, 7, 21, 21, 72, "causal", False),   # 72 = 64 + 16: the "1" descriptors zero-fill columns 72..79
    (2, 2, 5, 13, 8, 24, "window", True),     # (B, N, H, D) strides, Lq < Lk, tiles overhanging both ends
    (1, 1, 7, 20, 17, 16, "first", False),    # no remainder: the "1" descriptors are None
    (1, 1, 100, 300, 300, 72, "causal", False),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="forces the TMA path in the interpreter")
@pytest.mark.parametrize("b,h,bs,lk,lq,d,pattern,bnhd", TMA_CASES)
def test_tma_path_matches_reference(b, h, bs, lk, lq, d, pattern, bnhd, monkeypatch):
    monkeypatch.setattr(ba, "_INTERPRETER_TMA", True)
    q, k, v = _inputs(b, h, lq, lk, d, "cpu", bnhd=bnhd)
    table = masks.pattern_table(pattern, masks.num_blocks(lk, bs))
    nb = masks.num_blocks(lk, bs)
    assert ba._Launch(q, k, nb, block_schedule.encode_pattern(table, nb), bs, 1.0, "fwd", v).tma
    _assert_triton_matches_reference(q, k, v, bs, table, pattern)


# The overlapped full-tile loops of the forward, dQ and dK/dV (one tile ahead): pointer and TMA loads, with and
# without a remainder, masked tiles after them, a tile with a single full tile (the loop body never runs),
# keys past Lk, query tiles past Lq.
OVERLAP_CASES = [
    (1, 2, 7, 21, 21, 72, "causal", False),
    (1, 1, 16, 48, 48, 16, "causal", False),  # no masked tile, no remainder
    (2, 1, 13, 39, 13, 24, "causal", True),   # the cached step, (B, N, H, D) strides
    (1, 2, 6, 24, 19, 72, "random", False),
    (1, 1, 100, 300, 300, 72, "causal", False),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="forces the overlapped loop in the interpreter")
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("b,h,bs,lk,lq,d,pattern,bnhd", OVERLAP_CASES)
def test_overlapped_loop_matches_reference(b, h, bs, lk, lq, d, pattern, bnhd, use_tma, monkeypatch):
    monkeypatch.setattr(ba, "_INTERPRETER_OVERLAP", True)
    monkeypatch.setattr(ba, "_INTERPRETER_TMA", use_tma)
    if pattern == "random":
        pattern = _random_table(masks.num_blocks(lk, bs), torch.Generator().manual_seed(lk))
    q, k, v = _inputs(b, h, lq, lk, d, "cpu", bnhd=bnhd)
    table = masks.pattern_table(pattern, masks.num_blocks(lk, bs))
    launch = ba._Launch(q, k, table.shape[0], block_schedule.encode_pattern(table, table.shape[0]), bs, 1.0, "fwd", v)
    assert launch.constexprs()["OVERLAP"] and launch.tma == use_tma
    _assert_triton_matches_reference(q, k, v, bs, table, pattern)


# The split-KV forward (grid axis 1 splits each query tile's key list; the last split to finish merges): full and
# masked tiles in one split, splits with no tile at all (more splits than tiles), keys past Lk, query tiles past Lq,
# (B, N, H, D) strides, head dims with and without a remainder.
SPLIT_CASES = [
    (1, 2, 7, 21, 21, 72, "causal", False),
    (1, 1, 16, 64, 64, 16, "causal", False),  # full tiles only
    (2, 1, 13, 39, 13, 24, "causal", True),   # the cached step
    (1, 2, 6, 24, 19, 72, "random", False),
    (1, 1, 5, 20, 20, 40, "diagonal", False),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="forces the split-KV forward in the interpreter")
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("b,h,bs,lk,lq,d,pattern,bnhd", SPLIT_CASES)
def test_split_kv_forward_matches_reference(b, h, bs, lk, lq, d, pattern, bnhd, splits, monkeypatch):
    from ard_kernels import ops

    monkeypatch.setattr(ba, "_INTERPRETER_SPLITS", splits)
    if pattern == "random":
        pattern = _random_table(masks.num_blocks(lk, bs), torch.Generator().manual_seed(lk + 1))
    q, k, v = _inputs(b, h, lq, lk, d, "cpu", bnhd=bnhd)
    table = masks.pattern_table(pattern, masks.num_blocks(lk, bs))
    launch = ba._Launch(q, k, table.shape[0], block_schedule.encode_pattern(table, table.shape[0]), bs, 1.0, "fwd", v)
    assert launch.constexprs()["SPLITS"] == splits
    _assert_triton_matches_reference(q, k, v, bs, table, pattern)
    assert ops._COUNTERS and all(int(c.abs().sum()) == 0 for c in ops._COUNTERS.values())  # left at zero


def test_split_kv_configs_only_on_grids_under_one_wave(monkeypatch):
    """The split-KV configs join the small-grid ones (grids under one wave, head width up to 128) and nowhere
    else; the autotuner's grid has SPLITS programs along axis 1 for them."""
    extra = ba._extra_configs("fwd", 80, True, False, True, small_grid=True)
    split = [c for c in extra if len(c) > 6]
    assert [c[6] for c in split] == [c[4] for c in ba._SPLIT_KV_CONFIGS[96]] and all(c[6] > 1 for c in split)
    wide = [c for c in ba._extra_configs("fwd", 128, False, False, True, small_grid=True) if len(c) > 6]
    assert wide and all(c[0] == 32 for c in wide)  # the 64-row split tile spills at width 128
    assert not any(len(c) > 6 for c in ba._extra_configs("fwd", 80, True, True, True))
    assert not any(len(c) > 6 for c in ba._extra_configs("fwd", 144, True, False, True, small_grid=True))
    kernel, _ = ba._tuned("fwd", False, False, extra)
    assert sorted({c.kwargs["SPLITS"] for c in kernel.configs}) == [1, 2, 4]
    assert ba._grid(256, "BLOCK_M", 16)({"BLOCK_M": 32, "SPLITS": 4}) == (128, 4)
    monkeypatch.setenv("ARD_KERNELS_SPLIT_KV", "0")
    assert not any(len(c) > 6 for c in ba._extra_configs("fwd", 80, True, False, True, small_grid=True))
    assert ba._grid(256, "BLOCK_N", 16)({"BLOCK_N": 64}) == (64, 1)


def test_tma_eligibility():
    """Hopper, half precision, widths <= 128 and TMA-legal strides only; everything else keeps pointers."""
    q = torch.empty(2, 3, 40, 72, dtype=torch.bfloat16)
    bnhd = torch.empty(2, 40, 3, 72, dtype=torch.bfloat16).transpose(1, 2)
    assert ba._tma_eligible(torch.bfloat16, 80, (9, 0), q, q, bnhd)
    assert ba._tma_eligible(torch.float16, 128, (10, 0), q)
    assert not ba._tma_eligible(torch.bfloat16, 80, (8, 0), q)           # Ampere: no copy engine
    assert not ba._tma_eligible(torch.float32, 80, (9, 0), q.float())    # fp32 keeps its exact config
    assert not ba._tma_eligible(torch.bfloat16, 256, (9, 0), q)          # wide heads: not tuned
    head_major = torch.empty(2, 3, 72, 40, dtype=torch.bfloat16).transpose(-1, -2)
    assert not ba._tma_eligible(torch.bfloat16, 80, (9, 0), head_major)  # head dim not unit-stride
    odd_rows = torch.empty(2, 3, 40, 76, dtype=torch.bfloat16)[..., :72]
    assert not ba._tma_eligible(torch.bfloat16, 80, (9, 0), odd_rows)    # rows 152 B apart: not 16-aligned
    shifted = torch.empty(2 * 3 * 40 * 72 + 1, dtype=torch.bfloat16)[1:].view(2, 3, 40, 72)
    assert not ba._tma_eligible(torch.bfloat16, 80, (9, 0), shifted)     # base not 16-byte aligned


def test_tma_descriptors_and_pre_hook():
    """Descriptors span the whole (B, H, L, D) tensor; the pre-hook sets each config's tile boxes."""
    q = torch.empty(2, 40, 3, 72, dtype=torch.bfloat16).transpose(1, 2)
    k = v = torch.empty(2, 3, 56, 72, dtype=torch.bfloat16)
    descs = ba._fwd_descriptors(q, k, v, 64, 16, True, 128, 128)
    for desc, t in zip(descs, (q, q, k, k, v, v)):
        assert desc.base is t and list(desc.shape) == list(t.shape) and list(desc.strides) == list(t.stride())
    nargs = dict(zip(ba._FWD_DESCS, descs), BLOCK_M=128, BLOCK_N=64, D0=64, DP1=16)
    ba._set_fwd_desc_blocks(nargs)
    assert [d.block_shape for d in descs] == [[1, 1, 128, 64], [1, 1, 128, 16], [1, 1, 64, 64], [1, 1, 64, 16],
                                              [1, 1, 64, 64], [1, 1, 64, 16]]
    no_rest = ba._fwd_descriptors(k[..., :64], k[..., :64], k[..., :64], 64, 16, False, 128, 64)
    assert no_rest[1] is no_rest[3] is no_rest[5] is None
    ba._set_fwd_desc_blocks(dict(zip(ba._FWD_DESCS, no_rest), BLOCK_M=64, BLOCK_N=32, D0=64, DP1=16))
    assert no_rest[0].block_shape == [1, 1, 64, 64] and no_rest[2].block_shape == [1, 1, 32, 64]
    assert ba._Launch(q, k, 1, block_schedule.encode_pattern("causal", 1), 64, 1.0, "fwd", v).fwd_descriptors(
        q, k, v) == \
        (None,) * 6  # not Hopper (or interpreter without the tests' flag): pointer path, no descriptors


@pytest.mark.parametrize("width", [16, 80, 96, 128])
def test_tma_configs_join_the_pointer_configs(width):
    """At most 6 extra forward configs (first-call compile time), all with the pre-hook, overlapped ones only
    with a head-dim remainder; the pointer configs stay, first, none overlapped."""
    tma = ba._tma_configs(width, remainder=True)
    assert 0 < len(tma) <= 6
    assert not any(c[4] for c in ba._tma_configs(width))
    pointer = ba._CONFIGS[("fwd", False)]
    extra = ba._extra_configs("fwd", width, True, True, True)
    assert extra == tuple((*c[:4], True, c[4]) for c in tma)
    assert ba._extra_configs("fwd", width, True, False, True) == ()
    kernel, pairs = ba._tuned("fwd", False, False, extra)
    flags = [c.kwargs["USE_TMA"] for c in kernel.configs]
    assert flags == [False] * len(pointer) + [True] * len(tma)
    assert [c.kwargs["OVERLAP"] for c in kernel.configs] == [False] * len(pointer) + [c[4] for c in tma]
    assert all(c.pre_hook is ba._set_fwd_desc_blocks for c in kernel.configs)
    for c in kernel.configs:
        assert pairs[c.kwargs["SLOT"]] == (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
    plain, _ = ba._tuned("fwd", False, False)
    assert not any(c.kwargs["USE_TMA"] or c.pre_hook for c in plain.configs)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in plain.configs] == \
        list(pointer)



def test_small_grid_forward_configs():
    """Grids under one wave (GRID_KEY 0) add the 32-row forward tiles, pointer loads, in an autotuner of their
    own (its slots hold their tiling); larger grids, the backward kernels and wide heads do not."""
    small = (tuple((*c, False, False) for c in ba._SMALL_GRID_CONFIGS)
             + tuple((*c[:4], False, False, c[4]) for c in ba._SPLIT_KV_CONFIGS[96]))
    assert small and all(c[0] == 32 for c in small[:len(ba._SMALL_GRID_CONFIGS)])
    assert ba._extra_configs("fwd", 80, True, False, True, small_grid=True) == small
    assert ba._extra_configs("fwd", 80, True, True, True, small_grid=True)[-len(small):] == small
    assert ba._extra_configs("fwd", 80, True, False, True) == ()
    assert ba._extra_configs("fwd", 144, True, False, True, small_grid=True) == ()
    assert ba._extra_configs("dq", 64, False, False, True, small_grid=True) == ()
    kernel, pairs = ba._tuned("fwd", False, False, small)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kernel.configs][-len(small):] == [c[:2] for c in small]
    for c in kernel.configs:
        assert pairs[c.kwargs["SLOT"]] == (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
    assert kernel is not ba._tuned("fwd", False, False)[0]


@pytest.mark.parametrize("kind", ["dq", "dkdv"])
def test_overlapped_backward_configs_only_on_hopper_in_half_precision_with_a_remainder(kind):
    extra = ba._extra_configs(kind, 80, True, False, True)
    assert extra and all(c[4] is False and c[5] is True for c in extra)  # pointer loads, overlapped
    assert ba._extra_configs(kind, 80, True, False, False) == ()   # Ampere, or fp32
    assert ba._extra_configs(kind, 64, False, False, True) == ()   # no remainder: nothing to overlap with
    assert ba._extra_configs(kind, 144, True, False, True) == ()   # wide heads: not tuned
    kernel, _ = ba._tuned(kind, False, False, extra)
    pointer = ba._CONFIGS[(kind, False)]
    assert [c.kwargs["OVERLAP"] for c in kernel.configs] == [False] * len(pointer) + [True] * len(extra)
    assert not any(c.pre_hook for c in kernel.configs)


@pytest.mark.parametrize("rows,bh,sms,expected", [
    (256, 16, 132, 0),     # B1's KV-cached step: 2 query tiles x 16 heads = 32 programs
    (1024, 16, 132, 0),    # B1, 4 blocks: 128 programs, under one wave
    (1024, 17, 132, 1),    # 136 programs
    (256, 128, 132, 1),    # B8's cached step: 256 programs
    (1024, 64, 132, 1),    # 512 programs, just under 4 waves
    (1024, 66, 132, 2),    # 528 = 4 waves
    (4096, 1024, 132, 2),  # B64 training
])
def test_occupancy_class(rows, bh, sms, expected):
    assert ba._occupancy_class(rows, bh, sms) == expected


def test_autotune_key_separates_occupancy_classes():
    """The autotuner keys on GRID_KEY, an argument of every tuned kernel (not specialised on its value)."""
    import inspect

    assert "GRID_KEY" in ba._AUTOTUNE_KEY
    for kernel in (ba._block_attention_fwd_kernel, ba._block_attention_bwd_dkdv_kernel,
                   ba._block_attention_bwd_dq_kernel):
        while hasattr(kernel, "fn"):  # Autotuner / JITFunction / the interpreter's wrapper
            kernel = kernel.fn
        names = list(inspect.signature(kernel).parameters)
        assert "GRID_KEY" in names and names.index("GRID_KEY") == names.index("PAT_KEY") + 1

_SPECS_SUMMARY = """
import json
from ard_kernels.ops import block_attention as ba
print(json.dumps([dict(name=s["name"], archs=list(s["archs"]), sig=s["signature"]["desc_k0"],
                       const=repr(s["constexprs"].get("desc_k0", "absent")), use_tma=s["constexprs"]["USE_TMA"],
                       bn=s["constexprs"]["BLOCK_N"])
                  for s in ba.aot_specs() if s["name"].startswith("block_attention_fwd_bf16_D72")]))
"""


def test_aot_specs_offer_tma_on_hopper_only():
    """sm_90 forward specs carry descriptor arguments (as the launch passes them there), sm_80 ones None.

    In a subprocess: aot_specs() needs the compiled kernels, which the interpreter replaces."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SPECS_SUMMARY], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    specs = json.loads(proc.stdout)
    tma = [s for s in specs if s["name"].endswith("_tma")]
    assert tma and all(s["archs"] == [90] and s["use_tma"] for s in tma)
    assert any(not s["use_tma"] and s["archs"] == [90] for s in specs)  # pointer configs stay on Hopper
    for s in specs:
        if 90 in s["archs"]:
            assert s["sig"] == f"tensordesc<bf16[1, 1, {s['bn']}, 64]>" and s["const"] == "'absent'"
        else:
            assert s["const"] == "None" and not s["use_tma"]


# ---------------------------------------------------------------------------------------------
# GPU: low precision by the flash-attention rule, the ARD shapes, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,bs,nb,lq_blocks,d,pattern", [
    (4, 16, 256, 4, 4, 72, "causal"),
    (2, 16, 256, 4, 1, 72, "causal"),
    (4, 16, 256, 4, 4, 72, "diagonal"),
    (2, 4, 256, 4, 4, 128, "window"),
    (2, 4, 256, 4, 4, 128, "first"),
    (2, 4, 100, 3, 3, 80, "causal"),
    (1, 2, 1024, 4, 4, 128, "causal"),
])
def test_cuda_flash_rule(b, h, bs, nb, lq_blocks, d, pattern, dtype):
    lk, lq = bs * nb, bs * lq_blocks
    q, k, v = _inputs(b, h, lq, lk, d, "cuda", dtype=dtype, bnhd=True)
    g = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)

    def run(fn, *inputs):
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, g.to(out.dtype)))

    ours = run(lambda *a: ard_kernels.block_attention(*a, bs, pattern, backend="triton"), q, k, v)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = run(lambda *a: block_attention_ref(*a, bs, pattern), *f32)
    mask = masks.dense_mask(pattern, lq, lk, bs, device="cuda")
    low = run(lambda *a: attention_in_dtype(*a, mask), q, k, v)
    for name, got, lo, want in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        assert got.dtype == dtype
        flash_rule(name, got, lo, want)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("bs,nb,batch,heads", [(256, 4, 2, 16), (100, 3, 2, 16), (256, 1, 1, 16)])
def test_cuda_every_tuned_config_obeys_the_flash_rule(bs, nb, batch, heads, kind, monkeypatch):
    """Each config the autotuner may choose for ``kind``, pinned in turn (the autotuner alone would only ever run
    its winner; the other kernels pinned to their first config), forward and backward on DiT's shape: bf16, head
    dim 72, four 256-token blocks (the masked loop compiled out), one odd block size (with it), and B1's
    one-block step (a grid under one wave: the forward's small-grid configs too)."""
    real_tuned = ba._tuned
    choice = {"fwd": 0, "dkdv": 0, "dq": 0}

    def pinned(kind_, wide, fp32, extra=()):
        kernel, pairs = real_tuned(kind_, wide, fp32, extra)
        config = kernel.configs[choice[kind_] % len(kernel.configs)]
        return triton.autotune(configs=[config], key=ba._AUTOTUNE_KEY)(kernel.fn), pairs

    monkeypatch.setattr(ba, "_tuned", pinned)
    lq = lk = bs * nb
    q, k, v = _inputs(batch, heads, lq, lk, 72, "cuda", dtype=torch.bfloat16, bnhd=True)
    g = torch.randn(batch, heads, lq, 72, device="cuda", dtype=torch.bfloat16)

    def run(fn, *inputs):
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, g.to(out.dtype)))

    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = run(lambda *a: block_attention_ref(*a, bs, "causal"), *f32)
    mask = masks.dense_mask("causal", lq, lk, bs, device="cuda")
    low = run(lambda *a: attention_in_dtype(*a, mask), q, k, v)
    launch = ba._Launch(q, k, nb, block_schedule.encode_pattern("causal", nb), bs, 1.0, kind, v)
    assert launch.grid_key == 0 or batch > 1  # B1's step: under one wave
    count = len(real_tuned(kind, False, False, launch.extra_configs())[0].configs)
    for i in range(count):
        choice[kind] = i
        monkeypatch.setattr(ba, "_CHOSEN", {})  # no memo of an earlier pin
        ours = run(lambda *a: ard_kernels.block_attention(*a, bs, "causal", backend="triton"), q, k, v)
        for name, got, lo, want in zip(("out", "dq", "dk", "dv"), ours, low, ref):
            flash_rule(f"{name} ({kind} config {i})", got, lo, want)


@pytest.mark.cuda
def test_cuda_graph_capture_of_forward_and_backward():
    """The training path in one CUDA graph: forward and backward (whose dK/dV and dQ schedules are made on
    the first backward: the warm-up's), replayed on new inputs written in place."""
    q, k, v = _inputs(2, 4, 512, 512, 72, "cuda", dtype=torch.bfloat16, bnhd=True)
    g = torch.randn(2, 4, 512, 72, device="cuda", dtype=torch.bfloat16)

    def step():
        out = ard_kernels.block_attention(q, k, v, 256, "causal", backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and schedule copies happen here, never in the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            for t in (q, k, v, g):
                t.copy_(torch.randn_like(t))
        graph.replay()
        eager = step()
        for name, got, want in zip(("out", "dq", "dk", "dv"), captured, eager):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.cuda
def test_cuda_lse_and_fp32():
    q, k, v = _inputs(2, 4, 256, 768, 72, "cuda")
    out, lse = ard_kernels.block_attention(q, k, v, 256, "causal", return_lse=True, backend="triton")
    ref_out, ref_lse = block_attention_ref(q, k, v, 256, "causal", return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    q, k, v = _inputs(2, 4, 512, 512, 72, "cuda", dtype=torch.bfloat16, bnhd=True)
    g = torch.randn(2, 4, 512, 72, device="cuda")  # a loss whose gradients are O(1), not O(1/numel)

    def f(q, k, v):
        return (ard_kernels.block_attention(q, k, v, 256, "causal", backend="triton").float() * g).sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_gradient_through_the_lse_alone(triton_device):
    """Only the lse used: the backward gets no output gradient (grads are not materialised)."""
    q, k, v = (torch.randn(1, 2, 10, 16, device=triton_device, requires_grad=True) for _ in range(3))
    _, lse = ard_kernels.block_attention(q, k, v, 5, "first", return_lse=True, backend="triton")
    got = torch.autograd.grad(lse.sum(), (q, k))
    _, lse_ref = block_attention_ref(q, k, v, 5, "first", return_lse=True)
    want = torch.autograd.grad(lse_ref.sum(), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
