"""Shared by the tests of the per-(sample, block) row ops (modulated LayerNorm, gated residual).

Shapes, output-and-gradient collection, and the low-precision rule: a bf16/fp16 kernel is judged
by the error PyTorch itself makes computing the same thing in that dtype.
"""

import torch

# (B, N, C, block_size): odd widths (masked tiles), partial last blocks, nb = 1, block_size = 1.
CPU_SHAPES = [(2, 7, 72, 3), (1, 5, 100, 8), (2, 6, 64, 2), (1, 4, 1152, 3), (2, 5, 96, 1)]
# DiT-XL/2 and text-to-image widths, a partial last block, an odd width with small blocks.
CUDA_SHAPES = [(2, 1024, 1152, 256), (1, 1000, 2048, 256), (3, 700, 384, 256), (1, 300, 8192, 128), (2, 77, 100, 10)]


def grads(fn, inputs, dout):
    """``[fn(*inputs), *d(fn·dout)/d(inputs)]``."""
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, dout)]


def grads32(fn, inputs, dout):
    """Output and gradients of ``fn`` on fp32 copies of the inputs: the fp32 oracle."""
    return grads(fn, [t.detach().float().requires_grad_() for t in inputs], dout.float())


def assert_lowp_close(name, ours, ref32, torch_lowp):
    """Our error vs the fp32 reference is at most 2× PyTorch's own low-precision error + 1e-5
    (relative to the largest value: in fp32 PyTorch's block sums can match the reference
    exactly while ours sum in another order)."""
    err = (ours.float() - ref32.float()).abs().max().item()
    base = (torch_lowp.float() - ref32.float()).abs().max().item()
    slack = 1e-5 * max(1.0, ref32.float().abs().max().item())
    assert err <= 2 * base + slack, f"{name}: error {err:.3g} vs PyTorch low-precision error {base:.3g}"


def assert_repeatable(fn, inputs, dout):
    """Two runs give bitwise-equal outputs and gradients (the block reductions are deterministic)."""
    for first, second in zip(grads(fn, inputs, dout), grads(fn, inputs, dout)):
        assert torch.equal(first, second)


def pinned_backward_configs(monkeypatch, configs, plan):
    """Yield (row config, column-sum config or None) so that a test pins each row backward config in turn
    and, in the split plan, each column-sum config too (cycled beside the row configs); the column-sum
    autotuner is rebuilt over the one pinned config each time."""
    from ard_kernels.ops import _rows

    columns = _rows._COLUMN_SUM_CONFIGS if plan == "split" else (None,)
    for i in range(max(len(configs), len(columns))):
        column = columns[i % len(columns)]
        if column is not None:
            monkeypatch.setattr(_rows, "_COLUMN_SUM_CONFIGS", (column,))
            _rows._column_sums_tuner.cache_clear()
        yield configs[i % len(configs)], column
    _rows._column_sums_tuner.cache_clear()  # monkeypatch restores the configs; the next tuner sees them all
