"""Programmatic dependent launch of the inference kernels (ard_kernels/ops/_pdl.py).

CPU: the switch and what launches get from it (never PDL off a Hopper GPU or under the interpreter), the
environment variable's check. The compiled code (the wait before every memory access) is checked without a
GPU in test_aot_compile.py. GPU (``cuda``, compute capability 9.0 and later): every PDL kernel gives the bits
it gives launched plainly, back to back and inside a captured CUDA graph.
"""

import os
import subprocess
import sys

import pytest
import torch

from ard_kernels.ops import _pdl, programmatic_launch, programmatic_launch_enabled, set_programmatic_launch


@pytest.fixture
def pdl_off():
    previous = set_programmatic_launch(False)
    yield
    set_programmatic_launch(previous)


def test_off_by_default_and_never_on_the_cpu(pdl_off):
    assert not programmatic_launch_enabled()
    assert _pdl.pdl_meta(torch.device("cpu")) == {"USE_PDL": False}
    with programmatic_launch():
        assert programmatic_launch_enabled()
        assert _pdl.pdl_meta(torch.device("cpu")) == {"USE_PDL": False}  # the interpreter runs no inline PTX
    assert not programmatic_launch_enabled()


def test_only_hopper_and_later_launch_with_pdl(pdl_off, monkeypatch):
    majors = {0: 9, 1: 8}
    monkeypatch.setattr(_pdl, "_capability_major", lambda index: majors[index])
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    assert _pdl.pdl_meta(hopper) == {"USE_PDL": False}
    with programmatic_launch(True):
        assert _pdl.pdl_meta(hopper) == {"USE_PDL": True, "launch_pdl": True}
        assert _pdl.pdl_meta(ampere) == {"USE_PDL": False}
        with programmatic_launch(False):
            assert _pdl.pdl_meta(hopper) == {"USE_PDL": False}
        assert _pdl.pdl_active(hopper)


def test_the_switch_restores_itself_and_checks_its_argument(pdl_off):
    with pytest.raises(RuntimeError, match="inside"):
        with programmatic_launch(True):
            raise RuntimeError("inside")
    assert not programmatic_launch_enabled()
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        set_programmatic_launch(1)


@pytest.mark.parametrize("value,ok", [("1", True), ("0", True), ("yes", False)])
def test_environment_variable(value, ok):
    env = {**os.environ, "ARD_KERNELS_PDL": value}
    proc = subprocess.run([sys.executable, "-c", "from ard_kernels.ops import programmatic_launch_enabled as e; "
                           "print(e())"], capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(value == "1")
    else:
        assert proc.returncode != 0 and "ARD_KERNELS_PDL: expected one of ('0', '1'), got 'yes'" in proc.stderr


# ------------------------------------------------------------------------------------------------ GPU
def _hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")


def _chain(x, w, b, shift, scale, gate, block_size):
    """A sampler layer's kernels back to back, each consuming the previous one's output at once: modulated
    LayerNorm → split-K linear (serial) → block attention → linear (two-pass) → fused residual + LayerNorm →
    gated residual."""
    from ard_kernels.ops.block_attention import block_attention_fwd
    from ard_kernels.ops.block_schedule import encode_pattern
    from ard_kernels.ops.gated_residual import gated_residual_fwd
    from ard_kernels.ops.gated_residual_modulated_layer_norm import gated_residual_modulated_layer_norm_fwd
    from ard_kernels.ops.linear import linear_triton
    from ard_kernels.ops.modulated_layer_norm import modulated_layer_norm_fwd

    B, N, C = x.shape
    nb = N // block_size
    h = modulated_layer_norm_fwd(x, shift, scale, block_size, 1e-6, x.dtype)[0]
    qkv = linear_triton(h.reshape(B * N, C), w[0], b[0], False, 2, True).reshape(B, N, 3, 4, C // 4)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o = block_attention_fwd(q, k, v, nb, encode_pattern("causal", nb), block_size, (C // 4) ** -0.5)[0]
    y = linear_triton(o.transpose(1, 2).reshape(B * N, C), w[1], b[1], False, 2, False).reshape(B, N, C)
    out, h2, _, _ = gated_residual_modulated_layer_norm_fwd(x, y, gate, shift, scale, block_size, 1e-6, x.dtype)
    return gated_residual_fwd(out, h2, gate, block_size)


@pytest.mark.cuda
def test_pdl_kernels_give_the_plain_bits_eager_and_in_a_graph():
    _hopper()
    torch.manual_seed(0)
    B, N, C, bs = 2, 512, 288, 256
    x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16)
    w = [torch.randn(n, C, device="cuda", dtype=torch.bfloat16) / C ** 0.5 for n in (3 * C, C)]
    b = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (3 * C, C)]
    shift, scale, gate = (torch.randn(B, N // bs, C, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in range(3))
    args = (x, w, b, shift, scale, gate, bs)
    plain = _chain(*args)
    with programmatic_launch(True):
        for _ in range(3):  # back to back: each launch overlaps the previous one's tail
            assert torch.equal(_chain(*args), plain)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _chain(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _chain(*args)
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, plain)
    x.add_(1.0)  # new inputs: the replays follow them
    graph.replay()
    assert torch.equal(captured, _chain(*args))
