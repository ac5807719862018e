"""ARD student training: ``python -m ard_kernels.train --model DiT-XL/2 --data DIR --out DIR [--init-from CKPT]``.

Each step: a batch of trajectories ``(x_T, targets (B, K, C, H, W), y)``, teacher-forced states
``[x_T, target_1, …, target_{K−1}]``, ``pred = student.forward_train(states, y)``, the ARD loss
(:func:`ard_kernels.training.ard_loss`), AdamW (lr 1e-4, weight decay 0), gradient clipping (1.0),
then the EMA (0.9999). bf16 autocast on CUDA, fp32 on CPU (``--precision``).

Distributed: launch with ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK); NCCL on CUDA, gloo on CPU.
The student is wrapped in DDP, or with ``--fsdp`` sharded by FSDP2 (``fully_shard`` per transformer
block, then the whole student) for students too large to replicate. ``--batch-size`` is the global
batch, split evenly over the ranks; the data are split by a ``DistributedSampler``.

Checkpoints: ``OUT/checkpoints/step-XXXXXXX/`` holds ``model.safetensors`` (the student, loadable by
``ARDiT.load_state_dict``), ``ema.safetensors`` (same keys), ``optimizer.safetensors`` (AdamW state
flattened to ``state/<param>/<key>`` tensors, the param groups as JSON metadata) and ``state.json``
(step, EMA count, arguments). A directory is renamed into place when complete; a rerun with the
same ``--out`` resumes from the newest one (model, EMA, optimizer, step, data order).
Logs: ``OUT/log.jsonl`` (step, loss, per-head losses, images/s) and a tqdm bar on rank 0.

``--compile``: the student's training forward through ``torch.compile`` (its backward through AOTAutograd):
one traced graph for the whole trunk (the ops are custom ops with fake implementations, so no graph breaks;
tested), fused elementwise work and less host time per step, after a first step that compiles (minutes at
DiT-XL/2). Works under DDP, FSDP and with ``--cuda-graphs``; checkpoints are written from the uncompiled
module, so their keys do not change.

``--cuda-graphs`` (one GPU, no DDP/FSDP, no activation checkpointing): the forward, loss and backward are
captured once as a CUDA graph at the first step (after two eager warm-up runs of that batch, whose
gradients are discarded) and replayed at every step (:class:`ard_kernels.training.graphed_step.GraphedStep`);
the clipping, AdamW and the EMA stay eager. The same arithmetic as without (tested bit for bit with the
capture stood in for), without the host's per-launch time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from . import graphs
from .sampling import check_capturable
from .training import ModelEMA, ShardedEMA, TrajectoryDataset, ard_loss, teacher_forced_states
from .training.ema import clean_name
from .training.graphed_step import GraphedStep
from .trajectories import resolve_device

PREFIX = "student."


class StudentTrainStep(nn.Module):
    """``forward(states, y, drop) = student.forward_train(states, y, drop)``, so DDP / FSDP hooks see it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, states, y, force_drop_ids=None):
        return self.student.forward_train(states, y, force_drop_ids)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose current epoch can start at index ``start`` (resuming mid-epoch)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return super().__len__() - self.start


# ------------------------------------------------------------------------------------------- setup
def setup_distributed(device_arg):
    """(rank, world_size, device); initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    # DDP's device_ids need an index: a bare "cuda" becomes cuda:LOCAL_RANK, made the current device.
    device = resolve_device(device_arg, int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def device_policy(device: torch.device, precision: str, fsdp: bool) -> dict:
    """What the device decides, in one place (the GPU choices are testable without a GPU).

    Returns {"precision": "bf16" | "fp32" (``auto`` resolved: bf16 on CUDA), "fused_adamw" (CUDA,
    unsharded), "pin_memory" (CUDA), "tf32" (CUDA: fp32 matmuls and convolutions in TF32),
    "ddp_kwargs" (``device_ids`` on CUDA; gradients as bucket views)}.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    policy = {"precision": precision, "fused_adamw": cuda and not fsdp, "pin_memory": cuda, "tf32": cuda,
              "ddp_kwargs": {"device_ids": [device.index]} if cuda else {}}
    # DDP's gradients as views into its allreduce buckets: no copy of every gradient into its bucket
    # and back each step (2 × 2.7 GB of fp32 at DiT-XL/2), and no second copy of them in memory.
    policy["ddp_kwargs"]["gradient_as_bucket_view"] = True
    return policy


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for fp32 matmuls inside the block (``set_float32_matmul_precision("high")``), restored after.

    Restored because ``train`` is also called in-process (tests, notebooks): fp32 work after it must
    stay fp32. The one global setter keeps torch's legacy flags and its newer per-backend
    ``fp32_precision`` settings consistent: setting only the latter makes every later read of the
    former (``torch.get_float32_matmul_precision()``, which inductor calls when it compiles, so
    torch.compile and FlexAttention) raise "mix of the legacy and new APIs". cuDNN convolutions (the
    patch embedding) use TF32 by default already.
    """
    if not enabled:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def build_student(args, ds: TrajectoryDataset):
    """The ARDiT student, from the teacher checkpoint (``--init-from``) or random; shapes from the data."""
    from .models import ARDiT

    kw = dict(history_layers=args.history_layers, steps=ds.K, pattern=args.pattern, t_max=args.t_max)
    if args.init_from:
        student = ARDiT.from_dit(args.init_from, config=args.model, **kw)
    else:
        student = ARDiT(args.model, input_size=ds.input_size, in_channels=ds.in_channels,
                        num_classes=ds.num_classes, **kw)
    if args.class_dropout > 0 and student.y_embedder.embedding_table.num_embeddings <= student.num_classes:
        raise ValueError(f"class_dropout: {args.class_dropout} needs a null-class row in the label table, and this "
                         f"student has {student.num_classes} rows for {student.num_classes} classes")
    got = (student.input_size, student.in_channels, student.num_classes)
    want = (ds.input_size, ds.in_channels, ds.num_classes)
    if got != want:
        raise ValueError(f"init_from: the student's (input_size, in_channels, num_classes) {got} do not match the "
                         f"data's {want}")
    return student


def apply_activation_checkpointing(model: nn.Module, student: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (non-reentrant ``torch.utils.checkpoint``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )

    blocks = {id(b) for b in student.blocks}
    apply_ac(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
             check_fn=lambda m: id(m) in blocks)


def apply_fsdp(model: StudentTrainStep, bf16: bool, device: torch.device) -> None:
    """FSDP2: one ``fully_shard`` unit per transformer block, the rest (embedders, heads) in the root unit.

    With ``bf16`` the gathered parameters are bf16 (half the all-gather traffic) while the sharded
    master weights, the gradient reduction and the optimizer stay fp32. The residual stream stays
    fp32 as under DDP + autocast: FSDP does not cast the units' inputs, and the fixed ``pos_embed``
    table is left out of FSDP (an fp32 replica per rank), since a bf16 copy added to the patch
    embedding would make the whole stream bf16.

    The device mesh is built on the training ``device``: ``fully_shard``'s default mesh is on the
    machine's accelerator, which would move a ``--device cpu`` student onto the GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              cast_forward_inputs=False)
    for block in model.student.blocks:
        fully_shard(block, **kw)
    fixed = {p for p in model.parameters() if not p.requires_grad}
    fully_shard(model, ignored_params=fixed or None, **kw)


# ------------------------------------------------------------------------------------ checkpoints
def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def latest_checkpoint(out) -> Path | None:
    dirs = _checkpoint_dirs(Path(out))
    return dirs[-1] if dirs else None


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state/{clean_name(name, PREFIX)}/{key}"] = t.detach().cpu().contiguous()
    groups = [{**g, "params": [clean_name(p, PREFIX) for p in g["params"]]} for g in osd["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups)}


def _unflatten_optimizer(tensors: dict, meta: dict, prefix: str) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, name, field = key.split("/")
        state.setdefault(prefix + name, {})[field] = value
    groups = json.loads(meta["param_groups"])
    for g in groups:
        g["params"] = [prefix + p for p in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: Path, step: int, model, optimizer, ema, args, rank: int, keep: int) -> Path | None:
    """Write ``OUT/checkpoints/step-{step}`` (all ranks take part in the gathers, rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_sd = ema.state_dict(model) if isinstance(ema, ShardedEMA) else ema.state_dict()
    if rank != 0:
        return None
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_sd = {clean_name(k, PREFIX): v.detach().cpu().contiguous() for k, v in msd.items()}
    save_file(model_sd, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema_sd.items()}, str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(osd)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata=opt_meta)
    (tmp / "state.json").write_text(json.dumps({"step": step, "ema_updates": ema.num_updates, "args": vars(args)},
                                               indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, ema) -> int:
    """Restore model, optimizer and EMA from a checkpoint directory on every rank; returns its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / "state.json").read_text())
    model_sd = {PREFIX + k: v for k, v in load_file(str(path / "model.safetensors")).items()}
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        opt_tensors = {k: f.get_tensor(k) for k in f.keys()}
        opt_meta = f.metadata()
    osd = _unflatten_optimizer(opt_tensors, opt_meta, PREFIX)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))
    ema_sd = load_file(str(path / "ema.safetensors"))
    if isinstance(ema, ShardedEMA):
        ema.load_state_dict(model, ema_sd, state["ema_updates"])
    else:
        ema.load_state_dict(ema_sd, state["ema_updates"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------- train
def _batches(loader: DataLoader, sampler: ResumableSampler, start_step: int, per_rank_batch: int):
    steps_per_epoch = len(loader)
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = skip * per_rank_batch
        yield from loader
        epoch, skip = epoch + 1, 0


def train(args) -> dict:
    """Run the training loop; returns {"step", "log" (list of logged dicts), "student", "ema"}."""
    rank, world, device = setup_distributed(args.device)
    policy = device_policy(device, args.precision, args.fsdp)
    with tf32_matmuls(policy["tf32"]):
        return _train(args, rank, world, device, policy)


def check_cuda_graphs(args, world: int, device: torch.device) -> None:
    """Raise ValueError unless ``--cuda-graphs`` can run here: a CUDA device, one process, no FSDP, no
    activation checkpointing (see :mod:`ard_kernels.training.graphed_step`). The student's attention backend
    is checked once it is built (:func:`ard_kernels.sampling.check_capturable`)."""
    if device.type not in graphs.GraphRunner.device_types:
        raise ValueError(f"cuda_graphs: needs a CUDA device, got {device}")
    if world > 1 or args.fsdp:
        raise ValueError(f"cuda_graphs: one process only (got world size {world}{', --fsdp' if args.fsdp else ''}): "
                         "DDP's and FSDP's gradient communication is not captured; drop --cuda-graphs to scale out")
    if args.activation_checkpointing:
        raise ValueError("cuda_graphs: not with --activation-checkpointing (its RNG-state bookkeeping reads the "
                         "generator on the host, which a capture cannot hold)")


def _train(args, rank: int, world: int, device: torch.device, policy: dict) -> dict:
    out = Path(args.out)
    if args.cuda_graphs:
        check_cuda_graphs(args, world, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if args.batch_size % world:
        raise ValueError(f"batch_size: expected a multiple of the world size {world}, got {args.batch_size}")
    per_rank = args.batch_size // world
    precision = policy["precision"]

    ds = TrajectoryDataset(args.data, in_memory=args.in_memory)
    if len(ds) < args.batch_size:
        raise ValueError(f"batch_size: the dataset holds {len(ds)} samples, fewer than one batch of {args.batch_size}")
    torch.manual_seed(args.seed)  # identical initial student on every rank (FSDP needs it; DDP broadcasts anyway)
    student = build_student(args, ds).to(device).train()
    if args.cuda_graphs:
        check_capturable(student, device, training=True)
    model = StudentTrainStep(student)
    ema = None if args.fsdp else ModelEMA(student, args.ema)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model, student)
    if args.fsdp:
        if world == 1 and not dist.is_initialized():
            raise ValueError("fsdp: needs a process group; launch with torchrun (any --nproc_per_node)")
        apply_fsdp(model, bf16=precision == "bf16", device=device)
        ema = ShardedEMA(model, args.ema, prefix=PREFIX)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model, **policy["ddp_kwargs"])
    train_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(train_params, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=policy["fused_adamw"])

    start = 0
    resume = latest_checkpoint(out) if args.resume else None
    if resume is not None:
        start = load_checkpoint(resume, model, optimizer, ema)
    drop_gen = torch.Generator()

    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=policy["pin_memory"], persistent_workers=False)
    if len(sampler) < per_rank:
        raise ValueError(f"batch_size: each of {world} ranks gets {len(sampler)} samples, fewer than {per_rank}")
    batches = _batches(loader, sampler, start, per_rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    # The compiled module shares the parameters of `model`, which keeps serving state dicts and hooks.
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    graphed = None
    if args.cuda_graphs:
        def loss_of_batch(x_t, targets, y, drop):
            return ard_loss(forward(teacher_forced_states(x_t, targets), y, drop), targets, return_per_head=True)

        graphed = GraphedStep(loss_of_batch, train_params, device,
                              autocast_dtype=torch.bfloat16 if precision == "bf16" else None)

    bar = None
    if rank == 0 and args.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
    log, window_loss, window_heads, window_n = [], 0.0, None, 0
    t0 = time.perf_counter()
    step = start
    while step < args.steps:
        batch = next(batches)
        x_t = batch["x_T"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        # Label dropout drawn here, never inside the model (DiT's own draws from the global RNG): a CPU
        # generator seeded by (seed, step, rank) makes a resumed run drop exactly the same labels.
        drop_gen.manual_seed((args.seed << 40) + step * world + rank)
        drop = (torch.rand(y.shape, generator=drop_gen) < args.class_dropout).long()
        # from pinned memory without blocking: a pageable copy would wait for the previous step on the GPU
        drop = drop.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else drop.to(device)
        if graphed is not None:  # forward, loss and backward in one replay; it sets the gradients
            loss, per_head = graphed(x_t, targets, y, drop)
        else:
            with autocast:
                pred = forward(teacher_forced_states(x_t, targets), y, drop)
            loss, per_head = ard_loss(pred, targets, return_per_head=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(train_params, args.grad_clip)
        optimizer.step()
        ema.update(model if isinstance(ema, ShardedEMA) else student)
        step += 1
        window_loss = loss.detach() + window_loss
        window_heads = per_head if window_heads is None else window_heads + per_head
        window_n += 1
        if step % args.log_every == 0 or step == args.steps:
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            stats = torch.cat([window_loss.reshape(1) / window_n, window_heads / window_n,
                               gn.detach().float().reshape(1).to(device)])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            # Reading the stats waits for the GPU: only then does the clock measure finished steps
            # (CUDA launches return at once, so without the wait images/s counts launches).
            stats = stats.tolist()
            elapsed = time.perf_counter() - t0
            rec = {"step": step, "loss": stats[0], "head_losses": stats[1:-1],
                   "grad_norm": stats[-1], "images_per_s": args.batch_size * window_n / elapsed,
                   "lr": optimizer.param_groups[0]["lr"]}
            log.append(rec)
            if rank == 0:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
            window_loss, window_heads, window_n = 0.0, None, 0
            t0 = time.perf_counter()
        if bar is not None:
            bar.update(1)
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out, step, model, optimizer, ema, args, rank, args.keep)
            if window_n == 0:
                t0 = time.perf_counter()  # images/s measures training, not checkpoint writing
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    return {"step": step, "log": log, "student": student, "ema": ema}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ard_kernels.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="student DiT config, e.g. DiT-XL/2")
    p.add_argument("--data", required=True, help="trajectory directory (python -m ard_kernels.trajectories)")
    p.add_argument("--out", required=True, help="output directory: checkpoints/, log.jsonl")
    p.add_argument("--init-from", default=None, help="teacher DiT checkpoint to initialise the student from")
    p.add_argument("--steps", type=int, default=300_000, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--history-layers", type=int, default=6, help="N lower layers with history attention")
    p.add_argument("--pattern", default="causal", choices=("causal", "diagonal", "window", "first"))
    p.add_argument("--t-max", type=float, default=999.0)
    p.add_argument("--class-dropout", type=float, default=0.0, help="label dropout probability (null class)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay")
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (and so its backward); the first step compiles")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend with --compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay forward + loss + backward as one CUDA graph (one GPU, no DDP/FSDP)")
    p.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 instead of DDP")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--in-memory", action="store_true", help="load all shards into memory")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(args)
        if int(os.environ.get("RANK", 0)) == 0 and result["log"]:
            last = result["log"][-1]
            print(f"step {last['step']}: loss {last['loss']:.5f}, {last['images_per_s']:.1f} images/s")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
