"""DiT's sinusoidal timestep embedding in one Triton kernel.

``emb[..., i] = cos(t·f_i)``, ``emb[..., half + i] = sin(t·f_i)``,
``f_i = exp(−ln(max_period)·i / half)``, ``half = dim // 2`` (odd dim: a trailing zero column).

In ARD every (sample, block) has its own t, so t is typically (B, nb); the kernel takes t of any
shape (flattened) and any real dtype. The frequencies are rounded to fp32 like the reference's,
and ``t·f_i`` is formed in fp32 as there; cos/sin of that fp32 argument are evaluated in fp64
and rounded, because the fast fp32 GPU instructions lose accuracy for arguments in the
hundreds (t goes up to 999). The embedding is tiny (B·nb·dim values), so fp64 costs nothing.

Registered as the ``ard_kernels::timestep_embedding`` custom op (fake implementation; autograd
in t for floating t).
"""

import math

import torch
import triton
import triton.language as tl

from . import cdiv, differentiable_call, launch_device, next_power_of_2


@triton.jit
def _timestep_embedding_fwd_kernel(
    T_ptr, OUT_ptr, M, dim, half, neg_log_max_period,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    t = tl.load(T_ptr + rows, mask=row_ok, other=0).to(tl.float32)

    is_cos = cols < half
    i = tl.where(is_cos, cols, cols - half)
    # fp32 product and fp32-rounded exponent like the reference; exp and the division in fp64
    # so both are correctly rounded (fp32 `/` and exp are approximate on the GPU).
    expo = (neg_log_max_period * i.to(tl.float32)).to(tl.float64) / half
    freq = tl.exp(expo.to(tl.float32).to(tl.float64)).to(tl.float32)
    arg = (t[:, None] * freq[None, :]).to(tl.float64)
    val = tl.where(is_cos[None, :], tl.cos(arg), tl.sin(arg)).to(tl.float32)
    val = tl.where((cols < 2 * half)[None, :], val, 0.0)

    mask = row_ok[:, None] & (cols < dim)[None, :]
    tl.store(OUT_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], val, mask=mask)


_CUDA_ELEMS_PER_PROGRAM = 512


def timestep_embedding_fwd(t, dim, max_period):
    """Launch the kernel: (*t.shape, dim) fp32 contiguous. t is flattened (a copy if it is non-contiguous)."""
    flat = t.reshape(-1)
    M = flat.numel()
    out = torch.empty((M, dim), dtype=torch.float32, device=t.device)
    if dim < 2:  # no frequencies: only the zero column of an odd width
        out.zero_()
    elif M:
        block_d = min(next_power_of_2(dim), 256)
        if t.device.type == "cuda":
            # fp64 sin/cos take many registers: 2048 elements per program spill (ptxas), 512 do not
            block_m = max(1, _CUDA_ELEMS_PER_PROGRAM // block_d)
        else:  # interpreter: cost is per program
            block_m = min(next_power_of_2(M), 64)
        grid = (cdiv(M, block_m), cdiv(dim, block_d))
        with launch_device(flat):
            _timestep_embedding_fwd_kernel[grid](
                flat, out, M, dim, dim // 2, -math.log(max_period),
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
            )
    return out.reshape(*t.shape, dim)


@torch.library.custom_op("ard_kernels::timestep_embedding", mutates_args=())
def _fwd_op(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    return timestep_embedding_fwd(t, dim, max_period)


@_fwd_op.register_fake
def _fwd_fake(t, dim, max_period):
    return t.new_empty((*t.shape, dim), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    t, dim, max_period = inputs
    ctx.save_for_backward(t)
    ctx.dim, ctx.max_period = dim, max_period


def _backward(ctx, grad):
    # d/dt [cos(t f), sin(t f)] = [−f sin(t f), f cos(t f)]; rarely needed, so plain PyTorch.
    (t,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    half = ctx.dim // 2
    freqs = torch.exp(-math.log(ctx.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    g = grad.float()
    dt = (g[..., half:2 * half] * torch.cos(args) - g[..., :half] * torch.sin(args)) @ freqs
    return dt.to(t.dtype), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def timestep_embedding_triton(t, dim: int, max_period: float = 10000.0):
    """``emb = [cos(t·f_i), sin(t·f_i)]``, ``f_i = exp(−ln(max_period)·i/(dim//2))`` (Triton, one kernel).

    Args:
        t: any shape, any real dtype (fractional timesteps allowed); flattened, so a
            non-contiguous t is copied first (it is tiny).
        dim: embedding width (odd: trailing zero column).
        max_period: the longest period.

    Returns:
        (*t.shape, dim) fp32, contiguous. Differentiable in a floating t.
    """
    return differentiable_call(torch.ops.ard_kernels.timestep_embedding, timestep_embedding_fwd, _setup_context,
                               _backward, t, int(dim), float(max_period))


def aot_specs():
    """GPU configuration for ``python -m ard_kernels.aot_check`` (fp32 and integer timesteps)."""
    from ..aot_check import make_signature

    return [{
        "name": f"timestep_embedding_t{t_dtype}",
        "kernel": _timestep_embedding_fwd_kernel,
        "signature": make_signature(_timestep_embedding_fwd_kernel, "fp32", {"T_ptr": f"*{t_dtype}"},
                                    floats=("neg_log_max_period",)),
        "constexprs": {"BLOCK_M": _CUDA_ELEMS_PER_PROGRAM // 256, "BLOCK_D": 256},
        "num_warps": 4,
    } for t_dtype in ("fp32", "i64")]
