"""Every bad input to the public ops gets an error that names the argument and what was expected."""

import pytest
import torch

import ard_kernels as ak
from ard_kernels import _backends


def qkv(lq=8, lk=8, d=16, **kw):
    return torch.randn(1, 2, lq, d, **kw), torch.randn(1, 2, lk, d, **kw), torch.randn(1, 2, lk, d, **kw)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected a 4-D tensor, got shape \(2, 8, 16\)"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k: expected dtype in"),
    (lambda q, k, v: (q, k.half(), v), TypeError, r"k: expected dtype torch.float32 \(as q\)"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, r"v: expected shape \(1, 2, 8, 16\)"),
    (lambda q, k, v: (q[..., :8], k, v), ValueError, r"k: expected shape \(1, 2, 8, 8\)"),
    (lambda q, k, v: (q, k, v.repeat(1, 2, 1, 1)), ValueError, "v: expected shape"),
    (lambda q, k, v: (torch.cat([q, q], 2), k, v), ValueError, "1 <= Lq <= Lk"),
    (lambda q, k, v: ([1.0], k, v), TypeError, "q: expected a torch.Tensor, got list"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v: expected device cpu"),
])
def test_block_attention_input_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        ak.block_attention(*mutate(*qkv()), 4, backend="reference")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(block_size=0), ValueError, "block_size: expected a positive int, got 0"),
    (dict(block_size=-3), ValueError, "block_size"),
    (dict(block_size=2.0), ValueError, "block_size"),
    (dict(block_size=4, pattern="banded"), ValueError, "pattern: expected one of"),
    (dict(block_size=4, pattern=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"shape \(2, 2\)"),
    (dict(block_size=4, scale=-1.0), ValueError, "scale: expected a positive number"),
    (dict(block_size=4, backend="cudnn"), ValueError, "backend: expected one of"),
    (dict(block_size=4, backend="sdpa", return_lse=True), ValueError, "return_lse"),
])
def test_block_attention_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ak.block_attention(*qkv(), **kwargs)


def test_triton_head_dim_limit_is_named():
    with pytest.raises(ValueError, match=r"backend 'triton' takes head dims that are multiples of 8 .* got D=12"):
        ak.block_attention(*qkv(d=12), 4, backend="triton")


def cond(b=2, n=7, c=8, nb=3):
    return torch.randn(b, n, c), torch.randn(b, nb, c), torch.randn(b, nb, c)


@pytest.mark.parametrize("args,error,match", [
    (lambda x, s, c: (x[0], s, c, 3), ValueError, "x: expected a 3-D tensor"),
    (lambda x, s, c: (x, s[:, :2], c, 3), ValueError, r"shift: expected shape \(2, 3, 8\), got \(2, 2, 8\)"),
    (lambda x, s, c: (x, s, c[..., :4], 3), ValueError, r"scale: expected shape \(2, 3, 8\)"),
    (lambda x, s, c: (x, s, c, 0), ValueError, "block_size"),
    (lambda x, s, c: (x, s, c, 2), ValueError, r"shift: expected shape \(2, 4, 8\)"),
    (lambda x, s, c: (x, s.to("meta"), c, 3), ValueError, r"shift: expected device cpu \(as x\)"),
    (lambda x, s, c: (x, s.long(), c, 3), TypeError, "shift: expected dtype in"),
    (lambda x, s, c: (x.long(), s, c, 3), TypeError, "x: expected dtype in"),
])
def test_modulated_layer_norm_errors(args, error, match):
    with pytest.raises(error, match=match):
        ak.modulated_layer_norm(*args(*cond()), backend="reference")


def test_modulated_layer_norm_eps_and_backend_errors():
    x, s, c = cond()
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        ak.modulated_layer_norm(x, s, c, 3, eps=0.0)
    with pytest.raises(ValueError, match="'sdpa' serves block_attention only"):
        ak.modulated_layer_norm(x, s, c, 3, backend="sdpa")


def test_gated_residual_errors():
    x, g, _ = cond()
    with pytest.raises(ValueError, match=r"y: expected shape \(2, 7, 8\)"):
        ak.gated_residual(x, x[:, :3], g, 3)
    with pytest.raises(ValueError, match=r"gate: expected shape \(2, 3, 8\)"):
        ak.gated_residual(x, x, g[:, :1], 3)
    with pytest.raises(RuntimeError, match="inplace: .* requires grad"):
        ak.gated_residual(x, x.clone().requires_grad_(), g, 3, inplace=True)


@pytest.mark.parametrize("args,error,match", [
    ((torch.ones(3), 0), ValueError, "dim: expected an int >= 1, got 0"),
    ((torch.ones(3), 4.0), ValueError, "dim: expected an int"),
    (([1.0], 4), TypeError, "t: expected a torch.Tensor"),
    ((torch.ones(3, dtype=torch.bool), 4), TypeError, "t: expected a real dtype"),
])
def test_timestep_embedding_errors(args, error, match):
    with pytest.raises(error, match=match):
        ak.timestep_embedding(*args)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(_backends, "_INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ak.modulated_layer_norm(*cond(), 3, backend="triton")
