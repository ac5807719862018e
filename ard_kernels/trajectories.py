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
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .diffusion import DEFAULT_RECORD_INDICES, RECORD_KINDS, SPACINGS, DDIMSampler

SCHEMA = "ard-trajectories/1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrajectoryConfig:
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

    def shards(self) -> list[tuple[int, int]]:
        """[(shard index j, number of samples in it)] for all shards of the dataset."""
        n = math.ceil(self.num / self.shard_size)
        return [(j, min(self.shard_size, self.num - j * self.shard_size)) for j in range(n)]

    def validate(self) -> None:
        if self.num < 1:
            raise ValueError(f"num: expected a positive number of samples, got {self.num}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size: expected a positive int, got {self.shard_size}")
        if self.record not in RECORD_KINDS:
            raise ValueError(f"record: expected one of {RECORD_KINDS}, got {self.record!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {self.spacing!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed: expected 0 <= seed < 2**31, got {self.seed}")
        DDIMSampler(self.steps, self.spacing).check_indices(self.record_indices)

    def shapes(self, n: int) -> dict[str, tuple]:
        c, s = self.in_channels, self.input_size
        return {"x_T": (n, c, s, s), "targets": (n, self.K, c, s, s), "labels": (n,)}


def shard_path(out_dir, j: int) -> Path:
    return Path(out_dir) / f"shard-{j:06d}.safetensors"


def shard_inputs(cfg: TrajectoryConfig, j: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (n, C, H, W) fp32 and labels (n,) int64 of shard j, from a CPU generator seeded by (seed, j)."""
    g = torch.Generator().manual_seed((cfg.seed << 32) + j)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g, dtype=torch.int64)
    noise = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    return noise, labels


def generate_shard(model: Callable, cfg: TrajectoryConfig, j: int, n: int, device="cpu", batch_size: int = 64,
                   precision: str = "fp32", on_batch: Callable[[int], None] | None = None) -> dict:
    """Run the teacher on shard j's inputs: {"x_T", "targets", "labels"} CPU tensors in cfg.dtype."""
    sampler = DDIMSampler(cfg.steps, cfg.spacing)
    noise, labels = shard_inputs(cfg, j, n)
    targets = torch.empty((n, cfg.K, *noise.shape[1:]), dtype=torch.float32)
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


def write_shard(path: Path, tensors: dict, cfg: TrajectoryConfig, j: int) -> None:
    """Write atomically: a temp file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"ard": json.dumps(asdict(cfg)), "shard": str(j)}
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; shards are meant to be shared
    os.replace(tmp, path)


def verify_shard(path: Path, cfg: TrajectoryConfig, j: int, n: int) -> None:
    """Reload shard j and check its config, keys, shapes, dtypes and that every value is finite.

    Raises:
        ValueError: naming the shard and what is wrong.
    """
    want = cfg.shapes(n)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        got_cfg = json.loads(meta.get("ard", "{}"))
        if got_cfg != asdict(cfg):
            diff = {k: (got_cfg.get(k), v) for k, v in asdict(cfg).items() if got_cfg.get(k) != v}
            raise ValueError(f"{path}: made with a different config (field: (shard, requested)) {diff}; "
                             f"use another --out directory")
        if meta.get("shard") != str(j):
            raise ValueError(f"{path}: expected shard index {j}, metadata says {meta.get('shard')}")
        if set(f.keys()) != set(want):
            raise ValueError(f"{path}: expected keys {sorted(want)}, got {sorted(f.keys())}")
        for key, shape in want.items():
            t = f.get_tensor(key)
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: {key} expected shape {shape}, got {tuple(t.shape)}")
            if key == "labels":
                if t.dtype != torch.int64 or (t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.num_classes)):
                    raise ValueError(f"{path}: labels expected int64 in [0, {cfg.num_classes}), got {t.dtype}")
            elif t.dtype != STORAGE_DTYPES[cfg.dtype] or not torch.isfinite(t).all():
                raise ValueError(f"{path}: {key} expected finite {cfg.dtype} values, got {t.dtype} "
                                 f"with {int((~torch.isfinite(t)).sum())} non-finite")


def shard_done(path: Path, cfg: TrajectoryConfig, j: int, n: int) -> bool:
    """True when shard j exists and verifies; a shard of another config is an error, not redone."""
    if not path.exists():
        return False
    try:
        verify_shard(path, cfg, j, n)
    except ValueError as e:
        if "different config" in str(e):
            raise
        return False  # truncated or corrupt (cannot happen with the atomic rename, but be safe): redo
    except Exception:  # safetensors raises its own error type on an unreadable header
        return False
    return True


def generate(model: Callable, cfg: TrajectoryConfig, out_dir, rank: int = 0, world_size: int = 1, device="cpu",
             batch_size: int = 64, precision: str = "fp32", progress: bool = True) -> list[Path]:
    """Make and verify this rank's missing shards (j ≡ rank mod world_size); return this rank's paths."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [(j, n) for j, n in cfg.shards() if j % world_size == rank]
    todo = [(j, n) for j, n in mine if not shard_done(shard_path(out, j), cfg, j, n)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(n for _, n in mine), initial=sum(n for _, n in mine) - sum(n for _, n in todo),
                   desc=f"trajectories[rank {rank}]", unit="img", position=rank, disable=rank != 0)
    for j, n in todo:
        tensors = generate_shard(model, cfg, j, n, device, batch_size, precision,
                                 on_batch=bar.update if bar is not None else None)
        path = shard_path(out, j)
        write_shard(path, tensors, cfg, j)
        verify_shard(path, cfg, j, n)
    if bar is not None:
        bar.close()
    return [shard_path(out, j) for j, _ in mine]


def write_manifest(cfg: TrajectoryConfig, out_dir) -> Path:
    """Verify every shard of the dataset and write ``manifest.json`` (atomically)."""
    out = Path(out_dir)
    shards = []
    for j, n in cfg.shards():
        path = shard_path(out, j)
        if not path.exists():
            raise ValueError(f"{path}: shard {j} is missing; rerun the generator to finish it")
        verify_shard(path, cfg, j, n)
        shards.append({"file": path.name, "num": n})
    manifest = {**asdict(cfg), "K": cfg.K, "shards": shards}
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def load_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"data: no {MANIFEST} in {data_dir}; generate it with "
                                f"python -m ard_kernels.trajectories "
                                f"(a rerun skips finished shards and writes the manifest)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"data: expected schema {SCHEMA}, {path} has {manifest.get('schema')!r}")
    return manifest


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
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="teacher batch per rank")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="teacher compute (bf16: autocast)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
    if world > 1:
        import datetime

        import torch.distributed as dist
        # gloo only for the barrier: works on CPU and GPU; teachers can run for hours, hence the timeout.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        dist.barrier()
    if rank == 0:
        path = write_manifest(cfg, args.out)
        print(f"wrote {cfg.num} samples in {len(cfg.shards())} shards; manifest {path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
