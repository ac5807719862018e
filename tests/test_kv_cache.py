"""HistoryKVCache and the CUDA kv_append / qkv_split_append kernels against the PyTorch path.

CPU: the cache's semantics (per-step views, overflow raises and writes nothing, reset, the
device-offset mode). CUDA (``cuda`` marker): the kernels against kv_append_ref /
qkv_split_append_ref for bf16/fp16/fp32, D 72/128 and odd n, overflow flagged without a write
out of bounds, CUDA-graph capture and replay of 4 steps.
"""

import pytest
import torch

from ard_kernels import _ext
from ard_kernels.kv_cache import HistoryKVCache
from ard_kernels.reference import kv_append_ref, qkv_split_append_ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_cache(device="cpu", backend="auto", layers=2, b=2, h=3, d=8, block=5, blocks=3, dtype=torch.float32,
               **kw):
    return HistoryKVCache(layers, b, h, d, block, blocks, dtype=dtype, device=device, backend=backend, **kw)


def random_qkv(cache, n, device=None):
    return torch.randn(cache.batch_size, n, 3 * cache.num_heads * cache.head_dim, device=device or cache.device,
                       dtype=torch.float32).to(cache.dtype)


def run_steps(cache, steps, n, seed=0, method="split_append"):
    """Drive the cache as the sampler does (``method``: split_append, or append_qkv, q left in qkv); returns
    (q, k_all, v_all) per step and layer, and the qkvs."""
    g = torch.Generator().manual_seed(seed)
    out, qkvs = [], []
    for _ in range(steps):
        row = []
        for layer in range(cache.num_layers):
            qkv = torch.randn(cache.batch_size, n, 3 * cache.num_heads * cache.head_dim, generator=g)
            qkv = qkv.to(cache.dtype).to(cache.device)
            qkvs.append(qkv)
            q, k_all, v_all = getattr(cache, method)(layer, qkv)
            row.append((q.clone(), k_all.clone(), v_all.clone()))
        cache.advance(n)
        out.append(row)
    return out, qkvs


# ----------------------------------------------------------------------------- CPU semantics
@pytest.mark.parametrize("method", ["split_append", "append_qkv"])
@pytest.mark.parametrize("n", [5, 3])
def test_split_append_steps_match_reference(n, method):
    cache = make_cache()
    out, qkvs = run_steps(cache, steps=3, n=n, method=method)
    kc = torch.zeros(cache.batch_size, cache.num_heads, cache.capacity, cache.head_dim)
    refs = [(kc.clone(), kc.clone()) for _ in range(cache.num_layers)]
    for step in range(3):
        for layer in range(cache.num_layers):
            k_ref, v_ref = refs[layer]
            # the split written out (DiT's qkv Linear: [q | k | v] × (H, D)), not reference.split_qkv
            qkv = qkvs[step * cache.num_layers + layer]
            parts = qkv.reshape(qkv.shape[0], n, 3, cache.num_heads, cache.head_dim).permute(2, 0, 3, 1, 4)
            end = (step + 1) * n
            q_ref, k_ref[:, :, step * n:end], v_ref[:, :, step * n:end] = parts[0], parts[1], parts[2]
            q, k_all, v_all = out[step][layer]
            assert k_all.shape == (cache.batch_size, cache.num_heads, end, cache.head_dim)
            torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
            torch.testing.assert_close(k_all, k_ref[:, :, :end], rtol=0, atol=0)
            torch.testing.assert_close(v_all, v_ref[:, :, :end], rtol=0, atol=0)
    assert cache.length == 3 * n


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_append_qkv_leaves_q_in_qkv(backend):
    """append_qkv's q is a view of qkv (the attention reads it in place): the same values as split_append's
    contiguous q, no copy."""
    cache, twin = make_cache(backend=backend), make_cache(backend=backend)
    qkv = random_qkv(cache, 4)
    q, k_all, v_all = cache.append_qkv(0, qkv)
    q_copy, k_twin, v_twin = twin.split_append(0, qkv)
    assert q.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() and not q.is_contiguous()
    assert torch.equal(q, q_copy) and torch.equal(k_all, k_twin) and torch.equal(v_all, v_twin)


def test_append_returns_views_of_the_valid_prefix():
    cache = make_cache()
    k = torch.randn(2, 3, 4, 8)
    v = torch.randn(2, 3, 4, 8)
    k_all, v_all = cache.append(1, k, v)
    assert k_all.shape == (2, 3, 4, 8) and k_all.data_ptr() == cache.k[1].data_ptr()
    torch.testing.assert_close(v_all, v, rtol=0, atol=0)
    cache.advance(4)
    k2 = torch.randn(2, 3, 2, 8)
    k_all, v_all = cache.append(1, k2, k2)
    torch.testing.assert_close(k_all, torch.cat([k, k2], dim=2), rtol=0, atol=0)
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_overflow_raises_and_writes_nothing():
    cache = make_cache(block=4, blocks=2)  # capacity 8
    run_steps(cache, steps=1, n=6)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError, match="capacity"):
        cache.split_append(0, random_qkv(cache, 3))
    with pytest.raises(ValueError, match="capacity"):
        cache.append(1, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="capacity"):
        cache.advance(3)
    assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
    assert cache.length == 6
    qkv = random_qkv(cache, 2)
    q, k_all, _ = cache.split_append(0, qkv)  # exactly full is fine, and written
    k_new = qkv.reshape(2, 2, 3, 3, 8)[:, :, 1].transpose(1, 2)
    assert k_all.shape[2] == cache.capacity and torch.equal(k_all[:, :, 6:], k_new)
    assert torch.equal(k_all[:, :, :6], before_k[0, :, :, :6])
    cache.advance(2)
    assert cache.length == cache.capacity


def test_reset_starts_over():
    cache = make_cache()
    first, _ = run_steps(cache, steps=2, n=5, seed=1)
    cache.reset()
    assert cache.length == 0
    again, _ = run_steps(cache, steps=2, n=5, seed=1)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            for s, t in zip(x, y):
                assert torch.equal(s, t)


def test_device_offset_mode_flags_instead_of_raising():
    cache = make_cache(block=4, blocks=2, device_offset=True)
    host = make_cache(block=4, blocks=2)
    out, _ = run_steps(cache, steps=2, n=4)
    ref, _ = run_steps(host, steps=2, n=4)
    assert int(cache.offset) == 8 and cache.length == 8
    # the second step fills the cache exactly: written, not refused
    assert torch.equal(cache.k, host.k) and torch.equal(cache.v, host.v) and cache.k[:, :, :, 4:].abs().sum() > 0
    for a, b in zip(out, ref):
        for x, y in zip(a, b):
            for s, t in zip(x, y):
                assert torch.equal(s, t)
    cache.check()  # nothing was refused
    before = cache.k.clone()
    cache.offset.fill_(6)  # as a stale graph replay would leave it
    cache.split_append(0, random_qkv(cache, 3))
    assert torch.equal(cache.k, before)
    with pytest.raises(ValueError, match="nothing was written"):
        cache.check()
    cache.check()  # the flag was cleared


def test_device_offset_mode_never_reads_the_device_on_the_host():
    """The torch backend with a device offset is sync-free (capturable): no .item(), same result as host mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    device, host = make_cache(device_offset=True), make_cache()
    with Reads():
        out, _ = run_steps(device, steps=3, n=4)
        device.offset.fill_(13)  # a step past the capacity (15): refused on the device
        device.split_append(0, random_qkv(device, 3))
        device.offset.fill_(-1)
        device.append(1, torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))
    assert not reads
    ref, _ = run_steps(host, steps=3, n=4)
    for a, b in zip(out, ref):
        for x, y in zip(a, b):
            for s, t in zip(x, y):
                assert torch.equal(s, t)
    assert torch.equal(device.k, host.k) and torch.equal(device.v, host.v)
    with pytest.raises(ValueError, match="nothing was written"):
        device.check()


def test_cache_built_in_inference_mode_is_writable_outside_it():
    """A cache kept between calls is written under whichever mode the caller uses."""
    with torch.inference_mode():
        cache = make_cache()
    run_steps(cache, steps=1, n=5)
    with torch.no_grad():
        cache.reset()
        run_steps(cache, steps=1, n=5)
    with torch.inference_mode():
        cache.reset()
        run_steps(cache, steps=2, n=5)
    assert cache.length == 10 and not cache.k.is_inference()


def test_validation_messages():
    cache = make_cache()
    with pytest.raises(ValueError, match="qkv"):
        cache.split_append(0, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="float32"):
        cache.split_append(0, random_qkv(cache, 5).half())
    with pytest.raises(IndexError, match="layer"):
        cache.split_append(2, random_qkv(cache, 5))
    with pytest.raises(ValueError, match="backend"):
        make_cache(backend="triton")
    with pytest.raises(ValueError, match="CUDA device"):
        make_cache(backend="cuda")


def test_backend_is_visible():
    cache = make_cache()
    assert cache.backend == "torch" and "torch" in repr(cache)


# ----------------------------------------------------------------------------- CUDA kernels
EXACT = dict(rtol=0, atol=0)  # the kernels only move bytes: every dtype must match bit for bit


cuda_ext = pytest.mark.usefixtures("cuda_extension")  # fails on a GPU machine without it (conftest)


@pytest.mark.cuda
@cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [72, 128])
@pytest.mark.parametrize("b,h,n,offset", [(2, 3, 7, 5), (1, 16, 256, 0), (3, 2, 1, 30)])
def test_cuda_kv_append_matches_reference(dtype, d, b, h, n, offset):
    cap = 40 if n < 40 else n
    kc = torch.randn(b, h, cap, d, device="cuda").to(dtype)
    vc = torch.randn(b, h, cap, d, device="cuda").to(dtype)
    k = torch.randn(b, h, n, d, device="cuda").to(dtype)
    v = torch.randn(b, h, n, d, device="cuda").to(dtype)
    kr, vr = kc.clone(), vc.clone()
    kv_append_ref(kr, vr, k, v, offset)
    _ext.kv_append(kc, vc, k, v, offset)
    torch.testing.assert_close(kc, kr, **EXACT)
    torch.testing.assert_close(vc, vr, **EXACT)
    kc2, vc2 = kr.clone().zero_(), vr.clone().zero_()  # device-tensor offset
    kr2, vr2 = kc2.clone(), vc2.clone()
    kv_append_ref(kr2, vr2, k, v, offset)
    _ext.kv_append(kc2, vc2, k, v, torch.tensor([offset], device="cuda"))
    torch.testing.assert_close(kc2, kr2, **EXACT)
    torch.testing.assert_close(vc2, vr2, **EXACT)


@pytest.mark.cuda
@cuda_ext
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [72, 128])
@pytest.mark.parametrize("b,h,n,offset", [(2, 3, 7, 5), (1, 16, 256, 0), (3, 2, 1, 30), (2, 16, 33, 3)])
def test_cuda_split_append_matches_reference(dtype, d, b, h, n, offset, with_q):
    """qkv_split_append, and qkv_append (the same caches, no q written anywhere, qkv untouched)."""
    cap = max(40, n + offset)
    kc = torch.randn(b, h, cap, d, device="cuda").to(dtype)
    vc = torch.randn(b, h, cap, d, device="cuda").to(dtype)
    qkv = torch.randn(b, n, 3 * h * d, device="cuda").to(dtype)
    kr, vr = kc.clone(), vc.clone()
    q_ref = qkv_split_append_ref(qkv, kr, vr, offset, h)
    before = qkv.clone()
    offset_t = torch.tensor([offset], device="cuda")
    if with_q:
        torch.testing.assert_close(_ext.qkv_split_append(qkv, kc, vc, offset_t, h), q_ref, **EXACT)
    else:
        assert _ext.qkv_append(qkv, kc, vc, offset_t, h) is None
        with pytest.raises(ValueError, match="overflows"):
            _ext.qkv_append(qkv, kc.clone(), vc.clone(), cap - n + 1, h)  # host offset: raised before the launch
    torch.testing.assert_close(kc, kr, **EXACT)
    torch.testing.assert_close(vc, vr, **EXACT)
    assert torch.equal(qkv, before)


@pytest.mark.cuda
@cuda_ext
def test_cuda_misaligned_inputs_use_narrow_chunks():
    """A contiguous tensor whose storage starts 2 bytes in: the kernel must fall back, not fault."""
    b, h, n, d = 2, 4, 9, 72
    kc = torch.zeros(b, h, 16, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    flat = torch.randn(1 + 2 * b * h * n * d, device="cuda").to(torch.bfloat16)
    k = flat[1:1 + b * h * n * d].view(b, h, n, d)
    v = flat[1 + b * h * n * d:].view(b, h, n, d)
    _ext.kv_append(kc, vc, k, v, 4)
    torch.testing.assert_close(kc[:, :, 4:4 + n], k, rtol=0, atol=0)
    torch.testing.assert_close(vc[:, :, 4:4 + n], v, rtol=0, atol=0)


@pytest.mark.cuda
@cuda_ext
@pytest.mark.parametrize("offset", [38, -1, 1000])
def test_cuda_overflow_is_flagged_without_writes(offset):
    b, h, cap, d, n = 2, 3, 40, 72, 7
    # Guard rows after each cache: an out-of-bounds write would land there.
    kbuf = torch.zeros(2, b, h, cap, d, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.zeros_like(kbuf)
    kc, vc = kbuf[0], vbuf[0]
    qkv = torch.randn(b, n, 3 * h * d, device="cuda").to(torch.bfloat16)
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    off = torch.tensor([offset], device="cuda")
    q = _ext.qkv_split_append(qkv, kc, vc, off, h, status=status, check=False)
    torch.ops.ard_kernels.kv_append(kc, vc, qkv[:, :, :h * d].reshape(b, h, n, d).contiguous(),
                                    qkv[:, :, :h * d].reshape(b, h, n, d).contiguous(), off, 0, status,
                                    _ext.current_stream(kc.device))
    torch.cuda.synchronize()
    assert int(status.item()) == 1
    assert kbuf.abs().sum() == 0 and vbuf.abs().sum() == 0
    torch.testing.assert_close(q, qkv.reshape(b, n, 3, h, d)[:, :, 0].transpose(1, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="nothing was written"):
        _ext.qkv_split_append(qkv, kc, vc, off, h)
    with pytest.raises(ValueError, match="overflows"):
        _ext.kv_append(kc, vc, q, q, 36)  # host offset: raised before the launch


def _bad_append_calls(device):
    """(name, call, error type, message) of bad arguments the _ext wrappers refuse before any launch."""
    kc = torch.zeros(1, 2, 16, 72, device=device, dtype=torch.float16)
    k = torch.zeros(1, 2, 2, 72, device=device, dtype=torch.float16)
    qkv = torch.randn(1, 4, 3 * 2 * 72, device=device).half()
    strided = torch.randn(1, 3 * 2 * 72, 4, device=device).half().transpose(1, 2)
    k70 = kc[..., :70].contiguous()
    cases = [
        ("qkv dtype", lambda: _ext.qkv_split_append(qkv.float(), kc, kc.clone(), 0, 2), TypeError,
         r"qkv: expected dtype torch.float16 \(as k_cache\), got torch.float32"),
        ("qkv layout", lambda: _ext.qkv_split_append(strided, kc, kc.clone(), 0, 2), ValueError,
         r"qkv: expected a contiguous tensor, got shape \(1, 4, 432\)"),
        ("num_heads", lambda: _ext.qkv_split_append(qkv, kc, kc.clone(), 0, 3), ValueError,
         "num_heads: expected the cache's H = 2, got 3"),
        ("qkv width", lambda: _ext.qkv_split_append(qkv[..., :-8].contiguous(), kc, kc.clone(), 0, 2), ValueError,
         r"qkv: expected shape \(1, 4, 432\), got \(1, 4, 424\)"),
        ("head dim", lambda: _ext.kv_append(k70, k70.clone(), k70[:, :, :2].contiguous(),
                                            k70[:, :, :2].contiguous(), 0), ValueError,
         "k_cache: head dim D must be a multiple of 8, got 70"),
        ("v_cache shape", lambda: _ext.kv_append(kc, kc[:, :1].contiguous(), k, k, 0), ValueError,
         r"v_cache: expected shape \(1, 2, 16, 72\)"),
        ("k shape", lambda: _ext.kv_append(kc, kc.clone(), k[:, :1].contiguous(), k, 0), ValueError,
         r"k: expected shape \(1, 2, 2, 72\), got \(1, 1, 2, 72\)"),
        ("v layout", lambda: _ext.kv_append(kc, kc.clone(), k, kc[:, :, :2], 0), ValueError,
         "v: expected a contiguous tensor"),
        ("v dtype", lambda: _ext.kv_append(kc, kc.clone(), k, k.float(), 0), TypeError,
         "v: expected dtype torch.float16"),
        ("offset dtype", lambda: _ext.kv_append(kc, kc.clone(), k, k, torch.ones(1, device=device)), ValueError,
         "offset: expected an int64 tensor of 1 element, got torch.float32"),
        ("status dtype", lambda: _ext.kv_append(kc, kc.clone(), k, k, 0, status=torch.zeros(1, device=device)),
         ValueError, "status: expected a contiguous int32 tensor"),
    ]
    if device != "cpu":  # checked after the devices
        cases.append(("host overflow", lambda: _ext.kv_append(kc, kc.clone(), k, k, 15), ValueError,
                      "appending 2 tokens at offset 15 overflows the cache capacity 16"))
    return cases


@pytest.mark.parametrize("case", [c[0] for c in _bad_append_calls("cpu")])
def test_wrappers_name_the_bad_argument_before_any_launch(case):
    (call, error, match), = [c[1:] for c in _bad_append_calls("cpu") if c[0] == case]
    with pytest.raises(error, match=match):
        call()


def test_wrappers_refuse_cpu_tensors_by_name():
    kc = torch.zeros(1, 2, 16, 72)
    with pytest.raises(ValueError, match=r"k_cache: expected a CUDA tensor .*HistoryKVCache\(backend='torch'\)"):
        _ext.kv_append(kc, kc.clone(), kc[:, :, :2].contiguous(), kc[:, :, :2].contiguous(), 0)
    with pytest.raises(ValueError, match="k_cache: expected a CUDA tensor"):
        _ext.qkv_split_append(torch.zeros(1, 2, 3 * 2 * 72), kc, kc.clone(), 0, 2)


@pytest.mark.cuda
@cuda_ext
def test_cuda_op_checks():
    for _name, call, error, match in _bad_append_calls("cuda"):
        with pytest.raises(error, match=match):
            call()
    kc = torch.zeros(1, 2, 16, 72, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="k: expected a CUDA tensor"):
        _ext.kv_append(kc, kc.clone(), kc[:, :, :2].cpu(), kc[:, :, :2].cpu(), 0)
    with pytest.raises(ValueError, match="status: expected a CUDA tensor"):
        _ext.kv_append(kc, kc.clone(), kc[:, :, :2].contiguous(), kc[:, :, :2].contiguous(), 0,
                       status=torch.zeros(1, dtype=torch.int32))


# Each binding's own checks, called directly on CUDA tensors, in a child process: on the first GPU run a
# binding error whose message held an integer killed the process (SIGSEGV) instead of raising.
_BINDING_ERRORS = """
import torch
from ard_kernels import _ext
assert _ext.extension_available(), _ext.extension_error()
kc = torch.zeros(1, 2, 16, 72, device="cuda", dtype=torch.float16)
k = torch.zeros(1, 2, 2, 72, device="cuda", dtype=torch.float16)
st = torch.zeros(1, dtype=torch.int32, device="cuda")
qkv = torch.zeros(1, 4, 432, device="cuda", dtype=torch.float16)
ops = torch.ops.ard_kernels
calls = [
    lambda: ops.qkv_split_append(qkv, kc, kc.clone(), None, 0, st, 3, -1),
    lambda: ops.qkv_split_append(qkv.float(), kc, kc.clone(), None, 0, st, 2, -1),
    lambda: ops.qkv_split_append(qkv.view(1, 432, 4).transpose(1, 2), kc, kc.clone(), None, 0, st, 2, -1),
    lambda: ops.kv_append(kc, kc.clone(), k[:, :1].contiguous(), k, None, 0, st, -1),
    lambda: ops.kv_append(kc[..., :70].contiguous(), kc[..., :70].contiguous(), k[..., :70].contiguous(),
                          k[..., :70].contiguous(), None, 0, st, -1),
    lambda: ops.kv_append(kc, kc.clone(), k, k, None, 15, st, -1),
    lambda: ops.kv_append(kc, kc.clone(), k, k, torch.ones(2, dtype=torch.int64, device="cuda"), 0, st, -1),
    lambda: ops.kv_append(kc, kc.clone(), k, k.cpu(), None, 0, st, -1),
]
for call in calls:
    try:
        call()
        print("NO ERROR")
    except (RuntimeError, ValueError) as e:
        print(type(e).__name__, str(e).splitlines()[0])
"""


@pytest.mark.cuda
@cuda_ext
def test_cuda_binding_errors_raise_and_name_the_numbers():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BINDING_ERRORS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = run.stdout.splitlines()
    assert lines == [
        "RuntimeError ard_kernels.qkv_split_append: num_heads is 3, expected the cache's H = 2",
        "RuntimeError ard_kernels.qkv_split_append: qkv has dtype Float, expected Half",
        "RuntimeError ard_kernels.qkv_split_append: qkv must be contiguous (shape [1, 4, 432], strides [1728, 1, 4])",
        "RuntimeError ard_kernels.kv_append: k must be (B, H, n, D) = (1, 2, n, 72), got [1, 1, 2, 72]",
        "RuntimeError ard_kernels.kv_append: head dim D must be a multiple of 8, got 70",
        "ValueError ard_kernels.kv_append: appending 2 tokens at offset 15 overflows the cache capacity 16",
        "RuntimeError ard_kernels.kv_append: offset must be an int64 tensor with 1 element, got Long of shape [2]",
        "RuntimeError ard_kernels.kv_append: expected CUDA tensors; use the PyTorch path (v is on cpu)",
    ], run.stdout


@pytest.mark.cuda
@cuda_ext
@pytest.mark.parametrize("method", ["split_append", "append_qkv"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cache_matches_torch_backend(dtype, method):
    kw = dict(layers=3, b=2, h=4, d=72, block=9, blocks=4, dtype=dtype)
    fast, slow = make_cache("cuda", "cuda", **kw), make_cache("cuda", "torch", **kw)
    assert fast.backend == "cuda" and slow.backend == "torch"
    out_fast, _ = run_steps(fast, steps=4, n=9, method=method)
    out_slow, _ = run_steps(slow, steps=4, n=9, method=method)
    for a, b in zip(out_fast, out_slow):
        for x, y in zip(a, b):
            for s, t in zip(x, y):
                assert torch.equal(s, t)
    with pytest.raises(ValueError, match="capacity"):
        fast.split_append(0, random_qkv(fast, 1))


def _graph_capture_replay_four_steps(backend, method="split_append"):
    """One graph (all layers' split_append, or append_qkv, + advance) replayed 4 times fills the cache as eager
    does."""
    kw = dict(layers=2, b=2, h=4, d=72, block=16, blocks=4, dtype=torch.bfloat16)
    cache = make_cache("cuda", backend, device_offset=True, **kw)
    eager = make_cache("cuda", backend, **kw)
    qkv_in = torch.zeros(2, 16, 3 * 4 * 72, device="cuda", dtype=torch.bfloat16)
    q_out = [None] * 2

    def step():
        for layer in range(2):
            q_out[layer], _, _ = getattr(cache, method)(layer, qkv_in)
        cache.advance(16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (lazy module loading)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cache.reset()
    for _ in range(4):
        qkv = torch.randn_like(qkv_in)
        qkv_in.copy_(qkv)
        graph.replay()
        for layer in range(2):
            q_ref, _, _ = eager.split_append(layer, qkv)
            torch.testing.assert_close(q_out[layer], q_ref, rtol=0, atol=0)
        eager.advance(16)
    torch.cuda.synchronize()
    assert int(cache.offset.item()) == 64
    assert torch.equal(cache.k, eager.k) and torch.equal(cache.v, eager.v)
    cache.check()
    graph.replay()  # a 5th step overflows: flagged, nothing written
    torch.cuda.synchronize()
    assert torch.equal(cache.k, eager.k)
    with pytest.raises(ValueError):
        cache.check()


@pytest.mark.cuda
@cuda_ext
@pytest.mark.parametrize("method", ["split_append", "append_qkv"])
def test_cuda_graph_capture_replay_four_steps(method):
    _graph_capture_replay_four_steps("cuda", method)


@pytest.mark.cuda
def test_cuda_graph_capture_replay_four_steps_torch_backend():
    """The same with the PyTorch path (no extension needed): the device-offset writes are capturable too."""
    _graph_capture_replay_four_steps("torch")


@pytest.mark.cuda
@cuda_ext
def test_cuda_stream_minus_one_uses_torchs_current_stream():
    """stream=-1 (what traced code passes) runs on torch's current stream, here a side stream."""
    b, h, n, d = 2, 4, 5, 72
    kc = torch.zeros(b, h, 8, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    qkv = torch.randn(b, n, 3 * h * d, device="cuda").to(torch.bfloat16)
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = torch.ops.ard_kernels.qkv_split_append(qkv, kc, vc, None, 2, status, h, -1)
    torch.cuda.current_stream().wait_stream(side)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    q_ref = qkv_split_append_ref(qkv, kr, vr, 2, h)
    assert torch.equal(q, q_ref) and torch.equal(kc, kr) and torch.equal(vc, vr)
