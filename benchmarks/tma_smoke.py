"""GPU smoke test of the attention kernels at DiT-XL/2's shape, TMA configs included (gpu_check.sh).

One forward and backward of B4 H16 D72 4×256 causal in bf16 through the autotuner (every tuned
config runs once), checked against the fp32 reference, in both layouts the package feeds the kernels:
contiguous (B, H, N, D) tensors, and the strided views of a packed QKV projection that the model's
attention passes (``block_attention_qkv``). Exit status 0 when both agree.
"""

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (gpu_check.sh), with nothing installed: the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ard_kernels as ak  # noqa: E402
from ard_kernels.reference import block_attention_ref  # noqa: E402


def _check(name, run, q, k, v, leaves) -> bool:
    out = run()
    out.float().square().mean().backward()
    torch.cuda.synchronize()
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
