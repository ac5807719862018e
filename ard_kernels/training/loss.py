"""The ARD loss: ``L = (1/K)·Σ_k mean((out_k[:, :C] − target_k)²)``."""

from __future__ import annotations

import torch


def ard_loss(pred: torch.Tensor, targets: torch.Tensor, return_per_head: bool = False):
    """``L = (1/K)·Σ_k MSE(pred[:, k, :C], targets[:, k])``, C = targets' channel count.

    The student's K heads output C' ≥ C channels (learn_sigma: 2C, prediction then variance);
    only the first C are supervised. Computed in fp32 whatever the autocast dtype of ``pred``.

    Args:
        pred: (B, K, C', H, W) student outputs, C' ≥ C.
        targets: (B, K, C, H, W) teacher states.
        return_per_head: also return the K per-head MSEs (detached, fp32) for logging.

    Returns:
        Scalar fp32 loss, and with ``return_per_head`` a (K,) tensor.
    """
    if pred.dim() != 5 or targets.dim() != 5:
        raise ValueError(f"pred, targets: expected (B, K, C, H, W) tensors, got {tuple(pred.shape)} and "
                         f"{tuple(targets.shape)}")
    b, k, c = targets.shape[:3]
    if pred.shape[:2] != (b, k) or pred.shape[3:] != targets.shape[3:] or pred.shape[2] < c:
        raise ValueError(f"pred: expected (B={b}, K={k}, C'>={c}, {targets.shape[3]}, {targets.shape[4]}), "
                         f"got {tuple(pred.shape)}")
    per_head = (pred[:, :, :c].float() - targets.float()).square().mean(dim=(0, 2, 3, 4))
    loss = per_head.mean()
    return (loss, per_head.detach()) if return_per_head else loss
