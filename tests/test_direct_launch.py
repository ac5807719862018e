"""Plain eager calls that need no autograd launch the kernels directly (ard_kernels.ops.direct_launch_ok);
everything else goes through the torch custom ops. Both give the same results."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import ard_kernels as ak
from ard_kernels import ops


def test_when_the_custom_op_is_skipped():
    x = torch.randn(2, 3)
    assert ops.direct_launch_ok(x)
    w = torch.randn(2, 3, requires_grad=True)
    assert not ops.direct_launch_ok(x, w)  # autograd needs the op's registered backward
    with torch.no_grad():
        assert ops.direct_launch_ok(x, w)
    assert not ops.direct_launch_ok(torch.empty(2, 3, device="meta"))
    with FakeTensorMode():
        assert not ops.direct_launch_ok(torch.empty(2, 3))
    with FlopCounterMode(display=False):  # a dispatch mode counts the ops it sees
        assert not ops.direct_launch_ok(x)
    seen = []
    torch.vmap(lambda t: seen.append(ops.direct_launch_ok(t)) or t)(x)
    assert seen == [False]
    compiled = torch.compile(lambda t: t + int(ops.direct_launch_ok(t)), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x)  # traced: the custom op


def test_switch_off(monkeypatch):
    monkeypatch.setattr(ops, "_DIRECT_LAUNCH", False)
    assert not ops.direct_launch_ok(torch.randn(2))


def _calls(device):
    """(name, fn) of public calls on small inputs; each returns a tuple of tensors."""
    g = torch.Generator().manual_seed(0)
    b, h, d, bs, nb, c = 1, 2, 16, 4, 3, 32

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rnd(b, h, nb * bs, d), rnd(b, h, nb * bs, d), rnd(b, h, nb * bs, d)
    qkv = rnd(b, nb * bs, 3 * h * d)
    x, y = rnd(b, nb * bs, c), rnd(b, nb * bs, c)
    gate, shift, scale = rnd(b, nb, c), rnd(b, nb, c), rnd(b, nb, c)
    return [
        ("block_attention", lambda: (ak.block_attention(q, k, v, bs, "causal", backend="triton", return_lse=True))),
        ("block_attention cached step", lambda: (ak.block_attention(q[:, :, -bs:], k, v, bs, backend="triton"),)),
        ("block_attention_qkv", lambda: (ak.block_attention_qkv(qkv, h, bs, "causal", backend="triton"),)),
        ("modulated_layer_norm", lambda: (ak.modulated_layer_norm(x, shift, scale, bs, backend="triton"),)),
        ("fused residual + LN", lambda: ak.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, bs,
                                                                                backend="triton")),
        ("fused residual + LN in place", lambda: (*ak.gated_residual_modulated_layer_norm(
            x.clone(), y, gate, shift, scale, bs, inplace=True, backend="triton"),)),
    ]


@pytest.mark.parametrize("case", [name for name, _ in _calls("cpu")])
def test_direct_launch_gives_what_the_custom_op_gives(case, monkeypatch, triton_device):
    (fn,) = [f for name, f in _calls(triton_device) if name == case]
    with torch.no_grad():
        direct = fn()
        monkeypatch.setattr(ops, "_DIRECT_LAUNCH", False)
        through_op = fn()
    for a, b in zip(direct, through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_in_place_bumps_the_version_counter(triton_device):
    """As the mutating custom op's dispatch does: autograd then notices x changed under a saved tensor."""
    x, y = torch.randn(1, 8, 32, device=triton_device), torch.randn(1, 8, 32, device=triton_device)
    gate, shift, scale = (torch.randn(1, 2, 32, device=triton_device) for _ in range(3))
    before = x._version
    with torch.no_grad():
        out, _ = ak.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, 4, inplace=True, backend="triton")
    assert out is x and x._version == before + 1


def test_attention_launch_memo(monkeypatch):
    """After an autotuned attention launch, the same launch plan reuses the chosen config straight on the JIT
    function (no autotuner on the call path; a pointer config gets no TMA descriptors), compiling that variant
    at once by one more launch; inside a CUDA-graph capture, or with the memo off, the autotuned path runs.
    Simulated (the interpreter has no autotuner): a stand-in autotuner records what reaches it."""
    from types import SimpleNamespace

    import triton

    from ard_kernels.ops import block_attention as ba

    calls = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, args, kwargs))

    class Tuned(Launcher):
        fn = Launcher("jit")
        best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "SLOT": 1, "USE_TMA": False}, num_warps=4,
                                    num_stages=2)

    L = SimpleNamespace(kernel=Tuned("tuned"), kind="fwd", interp=False, Lq=256, Lk=1024, pat_key=7, grid_key=0,
                        d0=64, d1=8, dot_prec="tf32", align=8, tma=True, constexprs=lambda: {"D0": 64, "ALIGN": 8})
    L.memo_key = lambda q: ba._Launch.memo_key(L, q)

    def descriptors(config):
        if config is None:
            return ("desc",) * 6  # the autotuned path: every config gets descriptors
        return ("desc",) * 6 if config["USE_TMA"] else (None,) * 6

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(ba, "_CHOSEN", {})
    q = torch.zeros(1)

    def launch():
        calls.clear()
        ba._launch(L, None, ("head",), ("tail",), q, descriptors)
        return calls[:]

    monkeypatch.setattr(ba, "_LAST_CONFIG", {})
    first = launch()
    assert [c[0] for c in first] == ["tuned", "jit"]  # autotuned, then the memo variant compiled at once
    assert ba.last_configs(clear=True) == {"fwd": "64x32 w4s2"}  # what benchmarks record of the choice
    assert ba.last_configs() == {}
    assert first[0][1] == ("head", *("desc",) * 6, "tail") and first[0][2] == {"D0": 64, "ALIGN": 8}
    assert first[1][1] == ("head", *(None,) * 6, "tail")  # a pointer config won: no descriptors
    assert first[1][2] == {"D0": 64, "ALIGN": 8, **Tuned.best_config.all_kwargs()}
    assert {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2}.items() <= first[1][2].items()
    assert [c[0] for c in launch()] == ["jit"]  # from now on the memo path alone
    capturing[0] = True
    assert [c[0] for c in launch()] == ["tuned"]  # a capture sees only what the warm-up compiled
    capturing[0] = False
    L.align = 1  # another specialisation of the same autotuning key: its own entry
    assert [c[0] for c in launch()] == ["tuned", "jit"]
    monkeypatch.setattr(ba, "_LAUNCH_MEMO", False)
    assert [c[0] for c in launch()] == ["tuned"]
    L.kernel.best_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "SLOT": 0, "USE_TMA": True}, num_warps=8)
    monkeypatch.setattr(ba, "_LAUNCH_MEMO", True)
    monkeypatch.setattr(ba, "_CHOSEN", {})
    assert launch()[1][1] == ("head", *("desc",) * 6, "tail")  # a TMA config keeps its descriptors
    assert ba.last_configs() == {"fwd": "128x64 w8s3 tma"}
    # benchmarks record every settled launch plan (common.kernel_choices)
    Tuned.fn.__name__ = "_block_attention_fwd_kernel"
    assert ba.chosen_configs() == {"fwd_kernel Lq256 Lk1024 occ0 D72 float32 tma-offered": "128x64 w8s3 tma"}


def test_launch_device_switches_only_off_the_current_device(monkeypatch):
    """ops.launch_device: a kernel on another GPU than the current one runs there (Triton launches on the current
    device); on the current one, and on the CPU, nothing is switched."""
    import contextlib

    class OnGpu:  # a stand-in for a CUDA tensor (no GPU here)
        is_cuda = True

        def __init__(self, index):
            self.index, self.device = index, torch.device("cuda", index)

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(ops.launch_device(OnGpu(0)), contextlib.nullcontext)
    switch = ops.launch_device(OnGpu(1))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1
    assert isinstance(ops.launch_device(torch.zeros(1)), contextlib.nullcontext)


def test_autotuned_launch_memo(monkeypatch):
    """ops.launch_autotuned: an autotuned kernel's first launch of an autotuning key goes through its autotuner, later
    ones launch the JIT function with the config it chose; a new key value or a new tensor dtype (both in Triton's
    autotuning key) goes through the autotuner again; a key argument passed as a keyword counts; with the memo off,
    always the autotuner. Simulated (the interpreter has no autotuner), with a stand-in that picks by N."""
    import triton

    calls = []

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("jit", grid, args, kwargs))

    class Tuner:
        keys = ["N", "SUMS"]
        arg_names = ["X_ptr", "N", "C", "SUMS"]
        fn = Jit()
        best_config = None

        hooked = False

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.best_config = triton.Config({"BLOCK_M": 4 if args[1] < 100 else 8}, num_warps=4,
                                                 pre_hook=(lambda nargs: None) if self.hooked else None)
                calls.append(("tuner", grid, args, kwargs))
            return run

    monkeypatch.setattr(ops, "_TUNED", {})
    monkeypatch.setattr(ops, "_TUNED_KEY_INDEX", {})
    tuner, grid = Tuner(), (lambda meta: (1,))
    x16, x32 = torch.zeros(2, dtype=torch.float16), torch.zeros(2)

    def launch(x, n, c=3, sums=True):
        calls.clear()
        ops.launch_autotuned(tuner, grid, (x, n, c), {"SUMS": sums, "USE_PDL": False})
        return calls[0]

    assert launch(x16, 64)[0] == "tuner"
    kind, g, args, kwargs = launch(x16, 64, c=5)  # C is not in the key: the memo
    assert kind == "jit" and g is grid and args == (x16, 64, 5)
    assert kwargs == {"SUMS": True, "USE_PDL": False, **triton.Config({"BLOCK_M": 4}, num_warps=4).all_kwargs()}
    assert launch(x16, 256)[0] == "tuner"  # another key value
    assert launch(x16, 256)[3]["BLOCK_M"] == 8  # ... with its own config
    assert launch(x32, 64)[0] == "tuner"  # another dtype
    assert launch(x16, 64, sums=False)[0] == "tuner"  # a keyword key argument
    assert launch(x16, 64, sums=False)[0] == "jit"
    tuner.hooked = True  # a config with its own pre-hook: its autotuner runs it at every launch
    assert [launch(x16, 512)[0] for _ in range(2)] == ["tuner", "tuner"]
    tuner.hooked = False
    monkeypatch.setattr(ops, "_LAUNCH_MEMO", False)
    assert launch(x16, 64)[0] == "tuner"


# ------------------------------------------------------------------------ differentiable calls: the eager route
def _grad_calls(device):
    """(name, leaves, fn(*leaves) -> outputs, which outputs the loss reads) of the differentiable public calls."""
    g = torch.Generator().manual_seed(1)
    b, h, d, bs, nb, c = 2, 2, 16, 4, 3, 32

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    def qkv_leaves():
        return leaf(b, h, nb * bs, d), leaf(b, h, nb * bs, d), leaf(b, h, nb * bs, d)

    def rows():
        return leaf(b, nb * bs, c), leaf(b, nb * bs, c), leaf(b, nb, c), leaf(b, nb, c), leaf(b, nb, c)

    return [
        ("block_attention out+lse", qkv_leaves(),
         lambda q, k, v: ak.block_attention(q, k, v, bs, "causal", backend="triton", return_lse=True), (0, 1)),
        ("block_attention lse only", qkv_leaves(),
         lambda q, k, v: ak.block_attention(q, k, v, bs, "window", backend="triton", return_lse=True), (1,)),
        ("block_attention_qkv", (leaf(b, nb * bs, 3 * h * d),),
         lambda qkv: (ak.block_attention_qkv(qkv, h, bs, "causal", backend="triton"),), (0,)),
        ("modulated_layer_norm", (leaf(b, nb * bs, c), leaf(b, nb, c), leaf(b, nb, c)),
         lambda x, shift, scale: (ak.modulated_layer_norm(x, shift, scale, bs, backend="triton"),), (0,)),
        ("gated_residual", rows()[:3],
         lambda x, y, gate: (ak.gated_residual(x, y, gate, bs, backend="triton"),), (0,)),
        ("fused residual + LN", rows(),
         lambda *t: ak.gated_residual_modulated_layer_norm(*t, bs, backend="triton"), (0, 1)),
        ("fused residual + LN, h only", rows(),
         lambda *t: ak.gated_residual_modulated_layer_norm(*t, bs, backend="triton"), (1,)),
        ("timestep_embedding", (torch.rand(5, generator=g).mul(999).to(device).requires_grad_(),),
         lambda t: (ak.timestep_embedding(t, 32, backend="triton"),), (0,)),
    ]


def _forward_backward(leaves, fn, used):
    for t in leaves:
        t.grad = None
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(2)
    loss = sum((outs[i].float() * torch.randn(outs[i].shape, generator=gen).to(outs[i].device)).sum() for i in used)
    loss.backward()
    return [o.detach().clone() for o in outs], [t.grad.clone() for t in leaves], outs[used[0]].grad_fn


@pytest.mark.parametrize("case", [name for name, *_ in _grad_calls("cpu")])
def test_eager_autograd_route_gives_what_the_custom_op_gives(case, monkeypatch, triton_device):
    """A plain eager call that needs gradients runs the launchers through a torch.autograd.Function (less host
    time than the custom op's autograd layer): the same outputs and every gradient bit for bit, unused outputs
    included; with direct launches off, the custom op's registered autograd runs instead."""
    (leaves, fn, used), = [rest for name, *rest in _grad_calls(triton_device) if name == case]
    eager_outs, eager_grads, eager_node = _forward_backward(leaves, fn, used)
    assert type(eager_node).__name__.endswith("EagerFunctionBackward"), type(eager_node).__name__
    monkeypatch.setattr(ops, "_DIRECT_LAUNCH", False)
    op_outs, op_grads, op_node = _forward_backward(leaves, fn, used)
    assert not type(op_node).__name__.endswith("EagerFunctionBackward")
    for a, b in zip(eager_outs + eager_grads, op_outs + op_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # every leaf gets a gradient, but v through the lse alone (it does not depend on v)
    nonzero = [bool(g.abs().sum() > 0) for g in eager_grads]
    assert nonzero == ([True, True, False] if case == "block_attention lse only" else [True] * len(leaves))


def test_eager_route_leaves_modes_and_compile_to_the_custom_op(triton_device):
    """Under a dispatch mode (here FlopCounterMode) a differentiable call keeps the custom op (the mode sees it)."""
    x = torch.randn(1, 8, 32, device=triton_device, requires_grad=True)
    shift, scale = (torch.randn(1, 2, 32, device=triton_device) for _ in range(2))
    with FlopCounterMode(display=False):
        y = ak.modulated_layer_norm(x, shift, scale, 4, backend="triton")
    assert not type(y.grad_fn).__name__.endswith("EagerFunctionBackward")
    assert type(ak.modulated_layer_norm(x, shift, scale, 4, backend="triton").grad_fn).__name__.endswith(
        "EagerFunctionBackward")
