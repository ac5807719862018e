"""A tiny teacher's trajectory shards for the training tests (one definition, three test files)."""

import torch

from ard_kernels.models import DiT
from ard_kernels.trajectories import TrajectoryConfig, generate, write_manifest


def write_tiny_trajectories(out, num: int = 12, shard_size: int = 5):
    """DiT-tiny/2 (8×8 latents, 10 classes), 6 DDIM steps, K = 4 recorded states, into ``out``.

    The teacher's zero-initialised output layers get small random weights, so the targets are not
    all the same function of x_T. Returns ``out``.
    """
    torch.manual_seed(0)
    teacher = DiT("DiT-tiny/2", input_size=8, num_classes=10).eval()
    with torch.no_grad():
        for head in (teacher.final_layer.linear, teacher.final_layer.adaLN_modulation[-1]):
            head.weight.normal_(std=0.02)
    cfg = TrajectoryConfig(model="DiT-tiny/2", num=num, shard_size=shard_size, steps=6,
                           record_indices=[4, 2, 1, 0], input_size=8, num_classes=10)
    generate(teacher, cfg, out, progress=False)
    write_manifest(cfg, out)
    return out
