"""Teacher trajectories for ARD: ``python -m ard_kernels.trajectories --model DiT-XL/2 --ckpt PATH --num N --out DIR``.

Every sample is ``x_T ~ N(0, I)``, a class label ``y``, and the K states the teacher's DDIM sampler
(:mod:`ard_kernels.diffusion`) records at the chosen step indices (default: the x0-predictions at
25-step indices 15, 10, 5 and the final sample, as the ARD reference trains on).

Shard schema (``shard-{j:06d}.safetensors``, shard j holds global samples ``j·shard_size …``):

===========  ==================  ============================================================
key          shape               meaning
===========  ==================  ============================================================
x_T          (n, C, H, W)        the initial noise (storage dtype, default float32)
targets      (n, K, C, H, W)     recorded states, target k = what student head k predicts
labels       (n,)   int64        class labels in [0, num_classes)
===========  ==================  ============================================================

The safetensors metadata ``"ard"`` holds the generating config as JSON; ``manifest.json`` lists
all shards with their sample counts once every shard is written and verified.

Noise and labels of shard j come from a CPU generator seeded with ``(seed, j)``, so the data do
not depend on the device, the batch size or how many ranks (``torchrun``: RANK, WORLD_SIZE; rank r
makes the shards ``j ≡ r mod WORLD_SIZE``) produced them. Finished shards are skipped on a rerun;
each shard is written to a temp file and renamed, so a killed run leaves no half-written shard.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _shards
from ._shards import MANIFEST, verify_shard, write_manifest  # noqa: F401 - part of this module's API
from .diffusion import DEFAULT_RECORD_INDICES, RECORD_KINDS, SPACINGS, DDIMSampler

SCHEMA = "ard-trajectories/1"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrajectoryConfig(_shards.ShardedConfig):
    """What a trajectory dataset was generated with; stored in every shard and in the manifest."""

    model: str
    num: int
    shard_size: int = 1000
    steps: int = 25
    spacing: str = "ddim"
    cfg_scale: float = 1.5
    guidance_channels: int | None = None
    record: str = "x0"
    record_indices: list = field(default_factory=lambda: list(DEFAULT_RECORD_INDICES))
    seed: int = 0
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    dtype: str = "float32"
    schema: str = SCHEMA

    @property
    def K(self) -> int:  # noqa: N802 - the paper's symbol
        return len(self.record_indices)

    def manifest_extra(self) -> dict:
        return {"K": self.K}

    def validate(self) -> None:
        self.check_common()
        if self.record not in RECORD_KINDS:
            raise ValueError(f"record: expected one of {RECORD_KINDS}, got {self.record!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {self.spacing!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(STORAGE_DTYPES)}, got {self.dtype!r}")
        DDIMSampler(self.steps, self.spacing).check_indices(self.record_indices)

    def layout(self, n: int) -> dict[str, tuple[tuple, torch.dtype]]:
        c, s, dt = self.in_channels, self.input_size, STORAGE_DTYPES[self.dtype]
        return {"x_T": ((n, c, s, s), dt), "targets": ((n, self.K, c, s, s), dt), "labels": ((n,), torch.int64)}


def shard_path(out_dir, j: int) -> Path:
    return Path(out_dir) / f"{TrajectoryConfig.stem}-{j:06d}.safetensors"


def shard_inputs(cfg: TrajectoryConfig, j: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (n, C, H, W) fp32 and labels (n,) int64 of shard j, from a CPU generator seeded by (seed, j)."""
    g = cfg.shard_generator(j)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g, dtype=torch.int64)
    noise = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    return noise, labels


def generate_shard(model: Callable, cfg: TrajectoryConfig, j: int, n: int, device="cpu", batch_size: int = 64,
                   precision: str = "fp32", on_batch: Callable[[int], None] | None = None) -> dict:
    """Run the teacher on shard j's inputs: {"x_T", "targets", "labels"} CPU tensors in cfg.dtype."""
    _shards.check_batch_size(batch_size)
    sampler = DDIMSampler(cfg.steps, cfg.spacing)
    noise, labels = shard_inputs(cfg, j, n)
    # NaN until written: a target never filled fails the shard's finite check instead of passing as zeros
    targets = torch.full((n, cfg.K, *noise.shape[1:]), float("nan"), dtype=torch.float32)
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        with autocast:
            _, rec = sampler.sample(model, noise[lo:hi].to(dev), labels[lo:hi].to(dev), cfg.cfg_scale,
                                    cfg.record_indices, cfg.record, num_classes=cfg.num_classes,
                                    guidance_channels=cfg.guidance_channels)
        targets[lo:hi] = rec.float().cpu()
        if on_batch is not None:
            on_batch(hi - lo)
    dt = STORAGE_DTYPES[cfg.dtype]
    return {"x_T": noise.to(dt).contiguous(), "targets": targets.to(dt).contiguous(), "labels": labels}


def generate(model: Callable, cfg: TrajectoryConfig, out_dir, rank: int = 0, world_size: int = 1, device="cpu",
             batch_size: int = 64, precision: str = "fp32", progress: bool = True) -> list[Path]:
    """Make and verify this rank's missing shards (j ≡ rank mod world_size); return this rank's paths."""
    cfg.validate()

    def make(j, n, on_batch):
        return generate_shard(model, cfg, j, n, device, batch_size, precision, on_batch)

    return _shards.make_shards(cfg, out_dir, make, rank, world_size, progress, desc="trajectories")


def load_manifest(data_dir) -> dict:
    return _shards.load_manifest(data_dir, SCHEMA, "python -m ard_kernels.trajectories")


def load_teacher(name: str, ckpt: str | None, input_size: int, in_channels: int, num_classes: int,
                 learn_sigma: bool = True):
    """A DiT in eval mode, random or from a checkpoint (.safetensors, DiT's .pt, {"ema": ...} unwrapped)."""
    from .models import DiT, read_state_dict

    model = DiT(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                learn_sigma=learn_sigma)
    if ckpt is not None:
        model.load_state_dict(read_state_dict(ckpt))
    return model.eval()


def resolve_device(device_arg: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` (default ``cuda:LOCAL_RANK`` if available, else cpu; a bare ``cuda`` gets LOCAL_RANK).

    A CUDA device is also made the current one, so that whatever follows the current device rather
    than the tensors' (``"cuda"`` allocations, streams, NCCL's device, CUDA-graph pools) runs on rank
    r's own GPU ``cuda:r``, never on ``cuda:0``.
    """
    device = torch.device(device_arg or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _parse_indices(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ard_kernels.trajectories", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="teacher DiT config, e.g. DiT-XL/2")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="teacher weights (.safetensors, or DiT's .pt)")
    src.add_argument("--random-init", action="store_true", help="random teacher (tests, benchmarks)")
    # torchrun's own parser reads a bare "--num" as an abbreviation of its --numa-binding, even after
    # the module name: under torchrun spell it --num-samples.
    p.add_argument("--num", "--num-samples", dest="num", type=int, required=True,
                   help="number of samples in the dataset (--num-samples under torchrun)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps S")
    p.add_argument("--spacing", choices=SPACINGS, default="ddim")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="ε channels guided (default: the model's; DiT's own forward_with_cfg guides 3)")
    p.add_argument("--record", choices=RECORD_KINDS, default="x0", help="x0-predictions or the states x_t")
    p.add_argument("--record-indices", type=_parse_indices, default=list(DEFAULT_RECORD_INDICES),
                   help="step indices, decreasing, S-1..0 (default 15,10,5,0)")
    p.add_argument("--input-size", type=int, default=32, help="latent size H = W")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-learn-sigma", dest="learn_sigma", action="store_false")
    p.add_argument("--dtype", choices=tuple(STORAGE_DTYPES), default="float32", help="storage dtype of the states")
    _shards.add_run_arguments(p, batch_help="teacher batch per rank")
    return p


def main(argv=None) -> int:
    args = _shards.parse_run_args(build_parser(), argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    cfg = TrajectoryConfig(model=args.model, num=args.num, shard_size=args.shard_size, steps=args.steps,
                           spacing=args.spacing, cfg_scale=args.cfg_scale,
                           guidance_channels=args.guidance_channels, record=args.record,
                           record_indices=args.record_indices, seed=args.seed, input_size=args.input_size,
                           in_channels=args.in_channels, num_classes=args.num_classes, dtype=args.dtype)
    cfg.validate()
    torch.manual_seed(args.seed)  # a random-init teacher must be the same on every rank; noise has its own generators
    model = load_teacher(args.model, args.ckpt, args.input_size, args.in_channels, args.num_classes,
                         args.learn_sigma).to(device)
    generate(model, cfg, args.out, rank, world, device, args.batch_size, args.precision, args.progress)

    def finish():
        path = write_manifest(cfg, args.out)
        print(f"wrote {cfg.num} samples in {len(cfg.shards())} shards; manifest {path}")

    _shards.distributed_barrier_then(rank, world, finish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
