"""GPU smoke test of the attention kernels at DiT-XL/2's shape, TMA configs included (gpu_check.sh).

One forward and backward of B4 H16 D72 4×256 causal in bf16 through the autotuner (every tuned
config runs once), checked against the fp32 reference, in both layouts the package feeds the kernels:
contiguous (B, H, N, D) tensors, and the strided views of a packed QKV projection that the model's
attention passes (``block_attention_qkv``). Then B1's KV-cached step (256 queries over 1024 keys: a grid under
one wave, whose autotuner also runs the split-KV configs), with the TMA configs left out so that a failure there
points at the split-KV ones. Exit status 0 when everything agrees; bit 1 (1) for the first two checks, bit 2 (2)
for the cached step: gpu_check.sh then runs the rest with ARD_KERNELS_TMA=0, ARD_KERNELS_SPLIT_KV=0 or both.
"""

import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (gpu_check.sh), with nothing installed: the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ard_kernels as ak  # noqa: E402
from ard_kernels.reference import block_attention_ref  # noqa: E402


def _check(name, run, q, k, v, leaves) -> bool:
    try:
        out = run()
        out.float().square().mean().backward()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported as this check's failure; a later one may still run
        print(f"tma_smoke {name}: {type(exc).__name__}: {str(exc)[:300]}")
        return False
    ref = block_attention_ref(q.detach(), k.detach(), v.detach(), 256, "causal")
    if out.dim() == 3:  # the packed op's (B, N, H·D) layout
        ref = ref.transpose(1, 2).reshape(out.shape)
    err = (out.detach().float() - ref.float()).abs().max().item()
    finite = all(torch.isfinite(t.grad).all().item() for t in leaves)
    print(f"tma_smoke {name}: max |out - fp32 reference| = {err:.3e}, finite gradients: {finite}")
    return err < 5e-2 and finite


def main() -> int:
    if not torch.cuda.is_available():
        print("tma_smoke: needs a CUDA GPU")
        return 1
    q, k, v = (torch.randn(4, 16, 1024, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    ok = _check("(B, H, N, D)", lambda: ak.block_attention(q, k, v, 256, "causal", backend="triton"), q, k, v,
                (q, k, v))
    qkv = torch.randn(4, 1024, 3 * 16 * 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    views = qkv.detach().reshape(4, 1024, 3, 16, 72).permute(2, 0, 3, 1, 4).unbind(0)
    ok &= _check("packed qkv", lambda: ak.block_attention_qkv(qkv, 16, 256, "causal", backend="triton"), *views,
                 (qkv,))
    q1 = torch.randn(1, 16, 256, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k1, v1 = (torch.randn(1, 16, 1024, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    tma = os.environ.get("ARD_KERNELS_TMA")
    os.environ["ARD_KERNELS_TMA"] = "0"  # read per launch: the cached step's configs without the TMA ones
    try:
        step_ok = _check("B1 cached step (split-KV)",
                         lambda: ak.block_attention(q1, k1, v1, 256, "causal", backend="triton"), q1, k1, v1,
                         (q1, k1, v1))
    finally:
        if tma is None:
            del os.environ["ARD_KERNELS_TMA"]
        else:
            os.environ["ARD_KERNELS_TMA"] = tma
    return (0 if ok else 1) | (0 if step_ok else 2)


if __name__ == "__main__":
    sys.exit(main())
