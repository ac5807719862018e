"""Sharded safetensors datasets made by many ranks: shard files, their checks, resume, the manifest.

A dataset is described by a config dataclass that mixes in :class:`ShardedConfig`: its fields go, as
JSON, into every shard's metadata and into ``manifest.json``, so a directory never mixes datasets
made with different settings. ``layout(n)`` says what a shard of ``n`` samples holds (key → shape,
dtype). Shard ``j`` holds the global samples ``j·shard_size …``; under ``torchrun`` rank r makes the
shards ``j ≡ r mod WORLD_SIZE``. Each shard is written to a temp file and renamed, then re-read and
checked, so a killed run leaves no half-written shard and a rerun skips the finished ones.

Used by :mod:`ard_kernels.trajectories` (teacher trajectories) and :mod:`ard_kernels.samples`
(student samples for evaluation).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"


class ShardedConfig:
    """Mixin for a dataclass with ``num``, ``shard_size``, ``seed``, ``num_classes`` and ``schema`` fields."""

    stem: ClassVar[str] = "shard"  # shard files are ``{stem}-{j:06d}.safetensors``

    def shards(self) -> list[tuple[int, int]]:
        """[(shard index j, number of samples in it)] for all shards of the dataset."""
        n = math.ceil(self.num / self.shard_size)
        return [(j, min(self.shard_size, self.num - j * self.shard_size)) for j in range(n)]

    def layout(self, n: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """{key: (shape, dtype)} of a shard of ``n`` samples."""
        raise NotImplementedError

    def manifest_extra(self) -> dict:
        """Derived values the manifest lists beside the config's fields."""
        return {}

    def shard_path(self, out_dir, j: int) -> Path:
        return Path(out_dir) / f"{self.stem}-{j:06d}.safetensors"

    def check_common(self) -> None:
        """The checks every sharded config shares: sample count, shard size, seed."""
        if self.num < 1:
            raise ValueError(f"num: expected a positive number of samples, got {self.num}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size: expected a positive int, got {self.shard_size}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed: expected 0 <= seed < 2**31, got {self.seed}")

    def shard_generator(self, j: int) -> torch.Generator:
        """Shard j's CPU generator, seeded by (seed, j): its data depend on neither device nor rank count."""
        return torch.Generator().manual_seed((self.seed << 32) + j)


def write_shard(path: Path, tensors: dict, cfg: ShardedConfig, j: int) -> None:
    """Write atomically: a temp file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"ard": json.dumps(asdict(cfg)), "shard": str(j)}
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; shards are meant to be shared
    os.replace(tmp, path)


def verify_shard(path: Path, cfg: ShardedConfig, j: int, n: int) -> None:
    """Reload shard j and check its config, keys, shapes, dtypes, label range, finite float values.

    Raises:
        ValueError: naming the shard and what is wrong.
    """
    want = cfg.layout(n)
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
        for key, (shape, dtype) in want.items():
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: {key} expected shape {tuple(shape)}, got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise ValueError(f"{path}: {key} expected dtype {dtype}, got {t.dtype}")
            if key == "labels":
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.num_classes):
                    raise ValueError(f"{path}: labels expected in [0, {cfg.num_classes}), got "
                                     f"[{int(t.min())}, {int(t.max())}]")
            elif t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{path}: {key} expected finite values, got {int((~torch.isfinite(t)).sum())} "
                                 f"non-finite")


def shard_done(path: Path, cfg: ShardedConfig, j: int, n: int) -> bool:
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


def make_shards(cfg: ShardedConfig, out_dir, make_shard: Callable, rank: int = 0, world_size: int = 1,
                progress: bool = True, desc: str = "shards", unit: str = "img") -> list[Path]:
    """Make, write and verify this rank's missing shards; return this rank's shard paths.

    ``make_shard(j, n, on_batch)`` returns shard j's tensors (``cfg.layout(n)``) and calls
    ``on_batch(count)`` as samples are done (the progress bar; rank 0 shows it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [(j, n) for j, n in cfg.shards() if j % world_size == rank]
    todo = [(j, n) for j, n in mine if not shard_done(cfg.shard_path(out, j), cfg, j, n)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(n for _, n in mine), initial=sum(n for _, n in mine) - sum(n for _, n in todo),
                   desc=f"{desc}[rank {rank}]", unit=unit, position=rank, disable=rank != 0)
    for j, n in todo:
        tensors = make_shard(j, n, bar.update if bar is not None else None)
        path = cfg.shard_path(out, j)
        write_shard(path, tensors, cfg, j)
        verify_shard(path, cfg, j, n)
    if bar is not None:
        bar.close()
    return [cfg.shard_path(out, j) for j, _ in mine]


def write_manifest(cfg: ShardedConfig, out_dir) -> Path:
    """Verify every shard of the dataset and write ``manifest.json`` (atomically)."""
    out = Path(out_dir)
    shards = []
    for j, n in cfg.shards():
        path = cfg.shard_path(out, j)
        if not path.exists():
            raise ValueError(f"{path}: shard {j} is missing; rerun the generator to finish it")
        verify_shard(path, cfg, j, n)
        shards.append({"file": path.name, "num": n})
    manifest = {**asdict(cfg), **cfg.manifest_extra(), "shards": shards}
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def load_manifest(data_dir, schema: str, made_by: str) -> dict:
    """The manifest of a finished dataset of ``schema``; ``made_by`` names the command that writes it."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"data: no {MANIFEST} in {data_dir}; generate it with {made_by} "
                                f"(a rerun skips finished shards and writes the manifest)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != schema:
        raise ValueError(f"data: expected schema {schema}, {path} has {manifest.get('schema')!r}")
    return manifest


def add_run_arguments(parser, batch_help: str) -> None:
    """The options every shard-generating CLI shares: seed, shard size, batch size, precision, device, progress."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64, help=batch_help)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="compute (bf16: autocast)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def check_batch_size(batch_size) -> None:
    """A batch size below 1 would make no call at all and write the shard's buffers unfilled."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


def parse_run_args(parser, argv):
    """``parser.parse_args(argv)``, the shared options checked (a batch size < 1 would write no sample)."""
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected >= 1, got {args.batch_size}")
    return args


def distributed_barrier_then(rank: int, world_size: int, rank0_work: Callable[[], None]) -> None:
    """After every rank's shards exist, run ``rank0_work`` on rank 0 while the others wait.

    gloo only for the barriers (works on CPU and GPU); the generators can run for hours, hence the timeout.
    """
    if world_size > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        dist.barrier()
    if rank == 0:
        rank0_work()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
