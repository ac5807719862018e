"""GPU smoke test of the attention kernels at DiT-XL/2's shape, TMA configs included (gpu_check.sh).

One forward and backward of B4 H16 D72 4×256 causal in bf16 through the autotuner (every tuned
config runs once), checked against the fp32 reference. Exit status 0 when they agree.
"""

import sys

import torch

import ard_kernels as ak
from ard_kernels.reference import block_attention_ref


def main() -> int:
    if not torch.cuda.is_available():
        print("tma_smoke: needs a CUDA GPU")
        return 1
    q, k, v = (torch.randn(4, 16, 1024, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = ak.block_attention(q, k, v, 256, "causal", backend="triton")
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    ref = block_attention_ref(q.detach(), k.detach(), v.detach(), 256, "causal")
    err = (out.detach().float() - ref.float()).abs().max().item()
    finite = all(torch.isfinite(t.grad).all().item() for t in (q, k, v))
    print(f"tma_smoke: max |out - fp32 reference| = {err:.3e}, finite gradients: {finite}")
    return 0 if err < 5e-2 and finite else 1


if __name__ == "__main__":
    sys.exit(main())
