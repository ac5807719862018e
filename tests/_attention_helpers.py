"""Judging low-precision attention on the GPU (shared by the attention test files)."""

import math

import torch


def flash_rule(name, got, low, ref):
    """The flash-attention rule: |got − ref|_max <= 2·|low − ref|_max + 1e-5, low = PyTorch's result in the same
    dtype, ref the fp32 result."""
    err = (got.float() - ref.float()).abs().max().item()
    bound = 2 * (low.float() - ref.float()).abs().max().item() + 1e-5
    assert err <= bound, f"{name}: error {err:.3e} > 2 × PyTorch's {bound:.3e}"


def attention_in_dtype(q, k, v, mask):
    """The same computation in PyTorch ops at the inputs' dtype (no upcast): the low-precision peer."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
