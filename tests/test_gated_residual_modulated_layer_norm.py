"""Gated residual fused with the next modulated LayerNorm (Triton) against the reference, the two
separate kernels and the per-token form.

CPU: fp32 (and bf16/fp16 storage) through the Triton interpreter on tiny grids: both outputs and
all five gradients, with either output unused, strided inputs, mixed dtypes (autocast), the
in-place inference variant and its refusal under autograd, determinism, custom-op registration,
the GPU tiling forced. GPU (``cuda``): DiT sizes in bf16/fp16/fp32 and torch.compile(fullgraph=True).
"""

import pytest
import torch
import torch.nn.functional as F
from _modulation_helpers import CPU_SHAPES, CUDA_SHAPES, assert_lowp_close, assert_repeatable, pinned_backward_configs

import ard_kernels as ak
from ard_kernels.ops.gated_residual import gated_residual_triton
from ard_kernels.ops.gated_residual_modulated_layer_norm import gated_residual_modulated_layer_norm_triton
from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_triton
from ard_kernels.reference import _per_token, gated_residual_modulated_layer_norm_ref, modulated_layer_norm_ref

EPS = 1e-6
NAMES = ["out", "h", "dx", "dy", "dgate", "dshift", "dscale"]


def make_inputs(b, n, c, block_size, dtype=torch.float32, device="cpu", requires_grad=True):
    """x, y, gate, shift, scale: the stream away from zero mean, so the LayerNorm does real work."""
    nb = -(-n // block_size)
    x = torch.randn(b, n, c, device=device).mul(2).add(0.5).to(dtype)
    y = torch.randn(b, n, c, device=device).to(dtype)
    gate, shift = (torch.randn(b, nb, c, device=device).to(dtype) for _ in range(2))
    scale = torch.randn(b, nb, c, device=device).mul(0.5).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, y, gate, shift, scale)]


def fused(block_size):
    return lambda *a: gated_residual_modulated_layer_norm_triton(*a, block_size, EPS)


def reference(block_size):
    return lambda *a: gated_residual_modulated_layer_norm_ref(*a, block_size, EPS)


def separate(block_size):
    """The two Triton kernels one after the other: what the fused one replaces."""
    def run(x, y, gate, shift, scale):
        out = gated_residual_triton(x, y, gate, block_size)
        return out, modulated_layer_norm_triton(out, shift, scale, block_size, EPS)
    return run


def per_token(block_size):
    """The published form: conditioning repeated per token, eager ops."""
    def run(x, y, gate, shift, scale):
        n = x.shape[1]
        out = x + _per_token(gate, n, block_size) * y
        h = F.layer_norm(out, (out.shape[-1],), eps=EPS)
        return out, h * (1 + _per_token(scale, n, block_size)) + _per_token(shift, n, block_size)
    return run


def grads2(fn, inputs, dout, dh):
    """``[out, h, *d(out·dout + h·dh)/d(inputs)]``; a None cotangent leaves that output unused."""
    out, h = fn(*inputs)
    outs, cots = zip(*[(o, c) for o, c in ((out, dout), (h, dh)) if c is not None])
    # materialize_grads: with h unused, shift/scale get zeros (the reference's graph skips them).
    return [out, h, *torch.autograd.grad(outs, inputs, cots, allow_unused=True, materialize_grads=True)]


def assert_all_close(ours, want, tol, what):
    for name, o, w in zip(NAMES, ours, want):
        assert o.shape == w.shape and o.dtype == w.dtype, f"{name} vs {what}"
        torch.testing.assert_close(o, w, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name} vs {what}: {m}")


@pytest.mark.parametrize("b,n,c,block_size", CPU_SHAPES)
def test_matches_reference_separate_ops_and_per_token(b, n, c, block_size, triton_device, row_bwd_plan,
                                                      row_remainder):
    inputs = make_inputs(b, n, c, block_size, device=triton_device)
    dout, dh = torch.randn(b, n, c, device=triton_device), torch.randn(b, n, c, device=triton_device)
    ours = grads2(fused(block_size), inputs, dout, dh)
    assert_all_close(ours, grads2(reference(block_size), inputs, dout, dh), 2e-5, "reference")
    assert_all_close(ours, grads2(separate(block_size), inputs, dout, dh), 2e-5, "separate kernels")
    assert_all_close(ours, grads2(per_token(block_size), inputs, dout, dh), 2e-5, "per-token")


@pytest.mark.parametrize("used", ["h only", "out only"])
def test_one_output_unused(used, triton_device, row_bwd_plan):
    """A None cotangent (autograd's "unused output") on either side gives the right gradients."""
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    dout = None if used == "h only" else torch.randn(2, 7, 72, device=triton_device)
    dh = None if used == "out only" else torch.randn(2, 7, 72, device=triton_device)
    assert_all_close(grads2(fused(3), inputs, dout, dh), grads2(reference(3), inputs, dout, dh), 2e-5, "reference")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_interpreted(dtype, tol, triton_device, row_bwd_plan):
    """bf16/fp16 storage, fp32 math: within about one ulp of the fp32 oracle (the interpreter
    truncates fp32 -> bf16 rather than rounding)."""
    inputs = make_inputs(2, 7, 72, 3, dtype=dtype, device=triton_device)
    dout, dh = (torch.randn(2, 7, 72, device=triton_device).to(dtype) for _ in range(2))
    ours = grads2(fused(3), inputs, dout, dh)
    ref32 = grads2(reference(3), [t.detach().float().requires_grad_() for t in inputs], dout.float(), dh.float())
    for name, o, r in zip(NAMES, ours, ref32):
        assert o.dtype == dtype, name
        # h normalises `out` as stored in low precision, like the separate ops: compare with the
        # oracle's h on that rounded stream rather than on the fp32 one.
        if name == "h":
            r = modulated_layer_norm_ref(ours[0].float(), inputs[3].float(), inputs[4].float(), 3, EPS)
        torch.testing.assert_close(o.float(), r.detach(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_mixed_dtypes_like_autocast(triton_device, row_bwd_plan):
    """fp32 stream with bf16 branch output and conditioning (autocast): results in the stream's dtype."""
    x = torch.randn(2, 7, 64, device=triton_device).requires_grad_()
    y, gate, shift, scale = (t.bfloat16().requires_grad_() for t in make_inputs(2, 7, 64, 3, device=triton_device,
                                                                                 requires_grad=False)[1:])
    dout, dh = torch.randn(2, 7, 64, device=triton_device), torch.randn(2, 7, 64, device=triton_device)
    inputs = [x, y, gate, shift, scale]
    ours = grads2(lambda *a: ak.gated_residual_modulated_layer_norm(*a, 3, backend="triton"), inputs, dout, dh)
    ref = grads2(lambda *a: ak.gated_residual_modulated_layer_norm(*a, 3, backend="reference"), inputs, dout, dh)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert [g.dtype for g in ours[2:]] == [torch.float32] + [torch.bfloat16] * 4
    for name, o, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(o.float(), r.float(), atol=1e-2, rtol=1e-2, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_api(backend, triton_device):
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    dout, dh = torch.randn(2, 7, 72, device=triton_device), torch.randn(2, 7, 72, device=triton_device)
    ours = grads2(lambda *a: ak.gated_residual_modulated_layer_norm(*a, 3, eps=EPS, backend=backend), inputs, dout, dh)
    assert_all_close(ours, grads2(reference(3), inputs, dout, dh), 2e-5, "reference")


def test_strided_inputs(triton_device, row_bwd_plan):
    """x and y as transposed views, the conditioning as chunks of one adaLN output (no copies)."""
    b, n, c, block_size, nb = 2, 7, 80, 3, 3
    x = torch.randn(b, c, n, device=triton_device).requires_grad_()
    y = torch.randn(b, c, n, device=triton_device).requires_grad_()
    mod = torch.randn(b, nb, 6 * c, device=triton_device).requires_grad_()
    dout, dh = (torch.randn(b, c, n, device=triton_device).transpose(1, 2) for _ in range(2))

    def run(fn):
        _, _, gate, shift, scale, _ = mod.chunk(6, dim=-1)
        out, h = fn(x.transpose(1, 2), y.transpose(1, 2), gate, shift, scale)
        return [out, h, *torch.autograd.grad((out, h), (x, y, mod), (dout, dh))]

    for name, o, r in zip(["out", "h", "dx", "dy", "dmod"], run(fused(block_size)), run(reference(block_size))):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["direct", "triton", "reference"])
def test_inplace(backend, triton_device):
    x, y, gate, shift, scale = make_inputs(2, 7, 72, 3, device=triton_device, requires_grad=False)
    want_out, want_h = gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, 3, EPS)
    with torch.no_grad():
        xs = x.clone()
        if backend == "direct":
            out, h = gated_residual_modulated_layer_norm_triton(xs, y, gate, shift, scale, 3, EPS, inplace=True)
        else:
            out, h = ak.gated_residual_modulated_layer_norm(xs, y, gate, shift, scale, 3, eps=EPS, inplace=True,
                                                            backend=backend)
    assert out is xs
    torch.testing.assert_close(xs, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=2e-5, rtol=2e-5)
    # A strided x is updated through its strides.
    base = x.transpose(1, 2).contiguous()
    xs = base.transpose(1, 2)
    _, h = gated_residual_modulated_layer_norm_triton(xs, y, gate, shift, scale, 3, EPS, inplace=True)
    torch.testing.assert_close(base.transpose(1, 2), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("entry", ["direct", "api"])
def test_inplace_refuses_grad(entry, triton_device):
    x, y, gate, shift, scale = make_inputs(1, 4, 64, 2, device=triton_device)
    with pytest.raises(RuntimeError, match="inplace"):
        if entry == "direct":
            gated_residual_modulated_layer_norm_triton(x.detach().clone(), y, gate, shift, scale, 2, inplace=True)
        else:
            ak.gated_residual_modulated_layer_norm(x.detach().clone(), y, gate, shift, scale, 2, inplace=True,
                                                   backend="triton")


def test_backward_is_deterministic(triton_device, row_bwd_plan):
    inputs = make_inputs(1, 9, 72, 4, device=triton_device)
    dout, dh = torch.randn(1, 9, 72, device=triton_device), torch.randn(1, 9, 72, device=triton_device)
    fn = fused(4)
    first, second = grads2(fn, inputs, dout, dh), grads2(fn, inputs, dout, dh)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert_repeatable(lambda *a: fn(*a)[1], inputs, dh)  # the shared helper, on h alone


@pytest.mark.cuda
def test_cuda_deterministic_large(row_bwd_plan):
    inputs = make_inputs(2, 4 * 256, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    dh = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16)
    fn = fused(256)
    first, second = grads2(fn, inputs, dout, dh), grads2(fn, inputs, dout, dh)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_opcheck_and_fullgraph_trace(triton_device):
    inputs = make_inputs(1, 5, 64, 2, device=triton_device)
    detached = [t.detach() for t in inputs]
    for h_dtype in (torch.float32, torch.bfloat16):  # the fakes give h the requested dtype
        torch.library.opcheck(torch.ops.ard_kernels.gated_residual_modulated_layer_norm_fwd.default,
                              (*inputs, 2, EPS, h_dtype),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        torch.library.opcheck(torch.ops.ard_kernels.gated_residual_modulated_layer_norm_inplace.default,
                              (detached[0].clone(), *detached[1:], 2, EPS, h_dtype),
                              test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(fused(2), backend="aot_eager", fullgraph=True)
    dout, dh = torch.randn(1, 5, 64, device=triton_device), torch.randn(1, 5, 64, device=triton_device)
    assert_all_close(grads2(fn, inputs, dout, dh), grads2(reference(2), inputs, dout, dh), 2e-5, "reference")


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("with_dout", [True, False])
def test_gpu_tiling_forced(monkeypatch, triton_device, prefetch, with_dout, row_bwd_plan):
    """The GPU tiling (2-row tiles, several row groups per block, a partial last block), forced here, with
    and without loading each tile ahead of the one being worked on, with and without the stream's own
    gradient (``out`` also used downstream, or only through h)."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import gated_residual_modulated_layer_norm as fused_module

    monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
    monkeypatch.setattr(fused_module, "row_tile", lambda c, bs, device, target: (2, *_rows.row_split(c), 4))
    monkeypatch.setattr(_rows, "backward_configs", lambda bm, w, device, **_: ((bm, w, prefetch),))
    inputs = make_inputs(1, 20, 72, 11, device=triton_device)
    dh = torch.randn(1, 20, 72, device=triton_device)
    dout = torch.randn(1, 20, 72, device=triton_device) if with_dout else None  # None: HAS_DOUT off
    assert_all_close(grads2(fused(11), inputs, dout, dh), grads2(reference(11), inputs, dout, dh), 2e-5, "reference")



@pytest.mark.parametrize("prefetch", [False, True])
def test_backward_tile_shorter_than_the_row_groups(monkeypatch, triton_device, prefetch):
    """The GPU's autotuned backward may run tiles shorter than the row groups are aligned to (1-row tiles
    in groups sized for 4-row ones), forced here."""
    from ard_kernels.ops import _rows

    monkeypatch.setattr(_rows, "programs_target", lambda device: 64)
    monkeypatch.setattr(_rows, "backward_configs",
                        lambda bm, w, device, **_: ((1, 4, prefetch), (4, 4, prefetch)))
    inputs = make_inputs(2, 20, 72, 11, device=triton_device)
    dout, dh = torch.randn(2, 20, 72, device=triton_device), torch.randn(2, 20, 72, device=triton_device)
    assert_all_close(grads2(fused(11), inputs, dout, dh), grads2(reference(11), inputs, dout, dh), 2e-5, "reference")


def test_in_place_forward_asks_the_autotuner_to_restore_x(monkeypatch, triton_device):
    """In place the forward writes X: on the GPU the autotuner's repeated timing runs would apply the
    residual again and again, so the launch names OUT (= X) to be restored; out of place it does the same,
    so that one autotuner (one tile, one rounding) serves both."""
    from ard_kernels.ops import gated_residual_modulated_layer_norm as fused_module

    asked = []
    launch = fused_module.launch_rows

    def recording(kernel, grid, args, configs, device, key, restore=(), **constexprs):
        if kernel is fused_module._gated_residual_modulated_layer_norm_fwd_kernel:
            asked.append(restore)
        return launch(kernel, grid, args, configs, device, key, restore, **constexprs)

    monkeypatch.setattr(fused_module, "launch_rows", recording)
    x, y, gate, shift, scale = make_inputs(1, 6, 72, 3, device=triton_device, requires_grad=False)
    ak.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, 3, backend="triton")
    with torch.no_grad():
        ak.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, 3, inplace=True, backend="triton")
    assert asked == [("OUT_ptr",), ("OUT_ptr",)]

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_dtype_gives_h_what_autocast_would_cast_to(backend, inplace, triton_device):
    """fp32 stream, h in bf16 (a Linear under autocast reads it so): out stays fp32, h is the fp32 h
    rounded once, and bf16 dh gives the gradients the cast's backward would."""
    inputs = make_inputs(2, 7, 72, 3, device=triton_device, requires_grad=not inplace)

    def ours(*a):
        return ak.gated_residual_modulated_layer_norm(*a, 3, eps=EPS, inplace=inplace, out_dtype=torch.bfloat16,
                                                      backend=backend)

    def cast(*a):
        out, h = reference(3)(*a)
        return out, h.bfloat16()

    if inplace:
        with torch.no_grad():
            want = cast(*inputs)
            got = ours(inputs[0].clone(), *inputs[1:])
    else:
        dout, dh = torch.randn(2, 7, 72, device=triton_device), torch.randn(2, 7, 72, device=triton_device).bfloat16()
        got, want = grads2(ours, inputs, dout, dh), grads2(cast, inputs, dout, dh)
        assert [g.dtype for g in got[2:]] == [torch.float32] * 5
        for name, g, w in zip(NAMES[2:], got[2:], want[2:]):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=1.6e-2, rtol=1.6e-2)  # one bf16 ulp


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: {**a, "y": a["y"][:, :5]}, ValueError, r"y: expected shape \(2, 7, 8\)"),
    (lambda a: {**a, "gate": a["gate"][:, :2]}, ValueError, r"gate: expected shape \(2, 3, 8\)"),
    (lambda a: {**a, "shift": a["shift"][0]}, ValueError, "shift: expected a 3-D tensor"),
    (lambda a: {**a, "scale": a["scale"].to("meta")}, ValueError, "scale: expected device cpu"),
    (lambda a: {**a, "block_size": 0}, ValueError, "block_size: expected a positive int"),
    (lambda a: {**a, "eps": 0.0}, ValueError, "eps"),
    (lambda a: {**a, "backend": "sdpa"}, ValueError, "backend: 'sdpa' serves block_attention only"),
    (lambda a: {**a, "out_dtype": torch.float64}, TypeError, "out_dtype: expected None or a dtype in"),
])
def test_input_errors(mutate, error, match):
    x, y, gate, shift, scale = make_inputs(2, 7, 8, 3, requires_grad=False)
    args = dict(x=x, y=y, gate=gate, shift=shift, scale=scale, block_size=3, eps=EPS, backend="reference")
    with pytest.raises(error, match=match):
        ak.gated_residual_modulated_layer_norm(**mutate(args))


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,n,c,block_size", CUDA_SHAPES)
def test_cuda_dtypes(dtype, b, n, c, block_size, row_bwd_plan):
    inputs = make_inputs(b, n, c, block_size, dtype=dtype, device="cuda")
    dout, dh = (torch.randn(b, n, c, device="cuda").to(dtype) for _ in range(2))
    ours = grads2(fused(block_size), inputs, dout, dh)
    ref32 = grads2(reference(block_size), [t.detach().float().requires_grad_() for t in inputs], dout.float(),
                   dh.float())
    lowp = grads2(per_token(block_size), inputs, dout, dh)
    for name, o, r, t in zip(NAMES, ours, ref32, lowp):
        assert o.dtype == dtype, name
        assert_lowp_close(name, o, r, t)


@pytest.mark.cuda
@pytest.mark.parametrize("with_dout", [True, False])
def test_cuda_every_backward_config(monkeypatch, with_dout, row_bwd_plan, row_remainder):
    """Each tile the GPU backward autotunes over at DiT-XL's width (with and without prefetch), pinned in
    turn, in each plan (the split one also pins each column-sum tile) and with each remainder width: the
    autotuner keeps one of them, and a wrong one must not hide behind a faster right one."""
    from ard_kernels.ops import _rows
    from ard_kernels.ops import gated_residual_modulated_layer_norm as fused_module

    cuda = torch.device("cuda")
    tile = fused_module._bwd_tile(1152, 256, cuda)
    configs = _rows.backward_configs(tile[0], tile[3], cuda)
    assert len(configs) >= 2
    b, n, c = 2, 600, 1152  # a partial last block
    inputs = make_inputs(b, n, c, 256, dtype=torch.bfloat16, device="cuda")
    dh = torch.randn(b, n, c, device="cuda").to(torch.bfloat16)
    dout = torch.randn(b, n, c, device="cuda").to(torch.bfloat16) if with_dout else None
    ref32 = grads2(reference(256), [t.detach().float().requires_grad_() for t in inputs],
                   None if dout is None else dout.float(), dh.float())
    lowp = grads2(per_token(256), inputs, dout, dh)
    for config, column_config in pinned_backward_configs(monkeypatch, configs, row_bwd_plan):
        monkeypatch.setattr(_rows, "backward_configs", lambda bm, w, device, config=config, **_: (config,))
        ours = grads2(fused(256), inputs, dout, dh)
        for name, o, r, t in zip(NAMES, ours, ref32, lowp):
            assert_lowp_close(f"{name} {config} {column_config}", o, r, t)


@pytest.mark.cuda
def test_cuda_matches_separate_kernels_forward():
    """At DiT's size the fused forward gives what the two kernels give: ``out`` bitwise (an elementwise
    sum), ``h`` to its last bit. Each kernel autotunes its own row tile, which sets the order of the fp32
    row sums behind the mean and variance, so ``h`` may round the other way now and then."""
    inputs = make_inputs(2, 1024, 1152, 256, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    (out, h), (out_sep, h_sep) = fused(256)(*inputs), separate(256)(*inputs)
    torch.testing.assert_close(out, out_sep, atol=0, rtol=0)
    torch.testing.assert_close(h, h_sep, atol=1e-5, rtol=2 ** -7)  # one bf16 ulp
    assert (h != h_sep).float().mean() < 0.01


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_inplace():
    inputs = make_inputs(2, 1024, 1152, 256, dtype=torch.bfloat16, device="cuda")
    dout, dh = (torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fn = torch.compile(lambda *a: ak.gated_residual_modulated_layer_norm(*a, 256, backend="triton"), fullgraph=True)
    for o, e in zip(grads2(fn, inputs, dout, dh), grads2(fused(256), inputs, dout, dh)):
        torch.testing.assert_close(o, e, atol=0, rtol=0)
    x, *rest = (t.detach() for t in inputs)
    inplace = torch.compile(lambda *a: ak.gated_residual_modulated_layer_norm(*a, 256, inplace=True, backend="triton"),
                            fullgraph=True)
    with torch.no_grad():
        xs = x.clone()
        _, h = inplace(xs, *rest)
    want_out, want_h = fused(256)(x, *rest)
    torch.testing.assert_close(xs, want_out, atol=0, rtol=0)
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)


def test_wide_rows_take_the_separate_backwards(monkeypatch, triton_device):
    """Above _FUSED_BWD_MAX_C (8192-wide rows on the GPU) the backward is the two ops' own: same gradients."""
    from ard_kernels.ops import gated_residual_modulated_layer_norm as fused_module
    from ard_kernels.ops import modulated_layer_norm as mln_module

    monkeypatch.setattr(fused_module, "_FUSED_BWD_MAX_C", 32)
    separate = []
    mln_bwd = mln_module.modulated_layer_norm_bwd
    monkeypatch.setattr(mln_module, "modulated_layer_norm_bwd", lambda *a: separate.append(1) or mln_bwd(*a))
    inputs = make_inputs(2, 7, 72, 3, device=triton_device)
    for used in ("both", "h only"):
        dout = None if used == "h only" else torch.randn(2, 7, 72, device=triton_device)
        dh = torch.randn(2, 7, 72, device=triton_device)
        assert_all_close(grads2(fused(3), inputs, dout, dh), grads2(reference(3), inputs, dout, dh), 2e-5,
                         f"reference ({used})")
    assert len(separate) == 2  # the separate backwards ran, once per case
