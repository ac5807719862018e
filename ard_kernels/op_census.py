"""What a model sends to the GPU, counted without one: ``python -m ard_kernels.op_census``.

``launches(step k) = Σ_op [op is not a view] · count(op)``: the ARD sampler (or the teacher's DDIM
sampler, or the training forward) runs on fake CUDA tensors (torch's ``FakeTensorMode``: shapes, dtypes
and devices, no memory and no kernels), and a dispatch mode records every op that reaches the
dispatcher, tagged with the sampling step it belongs to. On a GPU every op that is not a view or an
allocation is one kernel launch, give or take (a cuBLAS GEMM, a Triton op, an extension op, an
elementwise op; SDPA is counted as its one fused kernel): the counts are the launch plan of a step,
what a CUDA graph replays, what ``bench_e2e --profile`` counts on a GPU. They show, on a machine
without a GPU, that:

* each cached step costs one history-cache launch per history layer (``qkv_append``: k and v into
  the cache, q read in place by the attention) and copies nothing else;
* ARD's history (N layers) adds exactly N launches per step over step distillation (N = 0);
* every attention and LayerNorm of the trunk is one fused ard_kernels op.

Needs a CUDA build of torch (the CPU build cannot make fake CUDA convolutions); no GPU, no driver.
With ``device="cpu"`` it counts the CPU path instead (any torch). The model is built on the meta
device, so even DiT-XL/2 takes seconds and no memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import sys
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or describe but launch nothing (views are recognised by their schema).
_NO_LAUNCH = {
    "prim.device.default", "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.detach.default", "aten._unsafe_view.default",
    "aten.lift_fresh.default", "aten._local_scalar_dense.default", "aten.sym_size.int", "aten.sym_stride.int",
    "aten.sym_numel.default", "aten.is_same_size.default",
}
SDPA = "aten.scaled_dot_product_attention (one fused kernel)"
# The kind of each launching op, by name prefix; the first match wins, anything else is "other".
_KINDS = (
    ("gemm", ("aten.addmm.", "aten.mm.", "aten.bmm.", "aten._addmm_activation.", "aten.baddbmm.",
              "aten.convolution.", "aten.linear.")),
    ("attention", ("ard_kernels.block_attention", "aten._scaled_dot_product", "aten.scaled_dot_product_attention",
                   "aten._flash_attention",
                   "aten._efficient_attention", "higher_order.flex_attention")),
    ("norm", ("ard_kernels.modulated_layer_norm", "ard_kernels.gated_residual", "aten.native_layer_norm.")),
    ("kv_cache", ("ard_kernels.kv_append", "ard_kernels.qkv_split_append", "ard_kernels.qkv_append")),
    ("copy", ("aten.clone.", "aten.copy_.", "aten.cat.", "aten.stack.", "aten._to_copy.", "aten.index_put_.",
              "aten.slice_scatter.")),
)


def launches_op(func) -> bool:
    """Whether op overload ``func`` launches a kernel on a GPU (not a view, not an allocation)."""
    return not getattr(func, "is_view", False) and str(func) not in _NO_LAUNCH


def kind_of(name: str) -> str:
    """The kind of launching op ``name`` ("aten.addmm.default" → "gemm"): gemm, attention, norm,
    kv_cache, copy or other."""
    for kind, prefixes in _KINDS:
        if name.startswith(prefixes):
            return kind
    return "other"


class OpRecorder(TorchDispatchMode):
    """Counts the launching ops dispatched while active, per phase (:meth:`phase` switches it)."""

    def __init__(self):
        super().__init__()
        self.current = "prelude"
        self.phases: dict[str, Counter] = {"prelude": Counter()}

        self.muted = 0

    def phase(self, name: str) -> None:
        self.current = name
        self.phases.setdefault(name, Counter())

    def count(self, name: str) -> None:
        if not self.muted:
            self.phases[self.current][name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_op(func):
            self.count(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def fused_sdpa(self):
        """``F.scaled_dot_product_attention`` counted as the one kernel it is on a GPU (flash, efficient or
        cuDNN): on fake tensors torch cannot query the device to pick one and runs its math decomposition
        (matmuls, softmax, casts), which would be counted instead."""
        original = F.scaled_dot_product_attention

        def sdpa(*args, **kwargs):
            self.count(SDPA)
            self.muted += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.muted -= 1

        with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
            yield


def summarize(ops: Counter) -> dict:
    """``{"launches": n, "by_kind": {kind: n}, "ops": {op: n}}`` of one phase's op counts."""
    by_kind = Counter()
    for name, n in ops.items():
        by_kind[kind_of(name)] += n
    return {"launches": sum(ops.values()), "by_kind": dict(sorted(by_kind.items())),
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))}


@contextlib.contextmanager
def _fake_device(device: torch.device):
    """Fake tensors on ``device``; on CUDA the KV cache's stream lookup (a driver call) answers -1,
    the ops' "torch's current stream" sentinel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import _ext

    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(mock.patch.object(_ext, "current_stream", lambda device: -1))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


def _meta_model(cls, dtype, **kwargs):
    """The model on the meta device (built outside the fake mode: its constructor reads its own tables)."""
    with torch.device("meta"):
        return cls(**kwargs).to(dtype).eval()


def _step_phases(recorder: OpRecorder, model):
    """Each patch embedding (one per sampling step, in every sampler here) opens phase "step k" of ``recorder``:
    a forward pre-hook on ``model.x_embedder``; returns its handle."""
    count = itertools.count()
    return model.x_embedder.register_forward_pre_hook(lambda module, args: recorder.phase(f"step {next(count)}"))


def _report(config: dict, recorder: OpRecorder, steps: int, **extra) -> dict:
    phases = {name: summarize(ops) for name, ops in recorder.phases.items()}
    return {"config": config, **extra, "phases": phases,
            "per_step_launches": [phases[f"step {k}"]["launches"] for k in range(steps)]}


def sampler_census(config: str = "DiT-XL/2", history_layers: int = 6, steps: int = 4, batch: int = 1,
                   cfg_scale: float = 1.0, device="cuda", dtype=torch.bfloat16, input_size: int = 32,
                   cache_backend: str | None = None, model_cls=None) -> dict:
    """The ops of one ``ARDiT.sample`` call, eager: per phase ("prelude": conditioning, every layer's
    modulations, the cache; "step k": step k's forward and its guidance), summarized.

    Args:
        config, history_layers, steps, input_size: the student (random weights never exist: meta).
        batch, cfg_scale: the call (guidance doubles the batch).
        device, dtype: where and in what the model "runs"; ``cache_backend``: the KV cache's
            backend (None: the model's default, the extension when it loads).
        model_cls: another student class taking ARDiT's constructor arguments, with ``sample(noise, y,
            cfg_scale=)`` and an ``x_embedder`` (e.g. benchmarks/published_ard.py's ``PublishedARD``, the
            published code's formulation); default :class:`~ard_kernels.models.ARDiT`.

    Returns:
        ``{"config": {...}, "cache_backend": str or None, "phases": {phase: summarize(...)},
        "per_step_launches": [n_0, …]}``.
    """
    from .kv_cache import _resolve_backend
    from .models import ARDiT

    device = torch.device(device)
    model = _meta_model(model_cls or ARDiT, dtype, config=config, history_layers=history_layers, steps=steps,
                        input_size=input_size)
    with _fake_device(device):
        model = model.to_empty(device=device)
        if cache_backend is not None:
            model.set_backends(cache=cache_backend)
        noise = torch.zeros(batch, model.in_channels, input_size, input_size, device=device, dtype=dtype)
        y = torch.zeros(batch, device=device, dtype=torch.long)
        recorder = OpRecorder()
        hook = _step_phases(recorder, model)
        with recorder, recorder.fused_sdpa():
            model.sample(noise, y, cfg_scale=cfg_scale)
        hook.remove()
    config = {"model": config, "history_layers": history_layers, "steps": steps, "batch": batch,
              "cfg_scale": cfg_scale, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "class": type(model).__name__}
    # The backend the sampler's cache resolved to (what HistoryKVCache itself decides: the extension where it loads).
    backend = getattr(model, "cache_backend", None)  # other classes (the published one) keep no HistoryKVCache
    cache = _resolve_backend(backend, device, model.config.head_dim) if history_layers and backend else None
    return _report(config, recorder, steps, cache_backend=cache)


def teacher_census(config: str = "DiT-XL/2", steps: int = 25, batch: int = 1, cfg_scale: float = 1.5,
                   device="cuda", dtype=torch.bfloat16, input_size: int = 32) -> dict:
    """The ops of the teacher's DDIM sampling (``DDIMSampler(steps).sample``, the trajectory generator's),
    per step as :func:`sampler_census` (a step's phase runs from its patch embedding to the next one's, so
    the doubling of the batch for the next step's guidance counts in the step before)."""
    from .diffusion import DEFAULT_RECORD_INDICES, DDIMSampler
    from .models import DiT

    device = torch.device(device)
    model = _meta_model(DiT, dtype, config=config, input_size=input_size)
    sampler = DDIMSampler(steps)
    # The schedule as Python numbers: in the fake mode every tensor op is faked, and the sampler reads
    # its schedule's values (a fake tensor has none).
    for name in ("timesteps", "alphas_cumprod", "alphas_cumprod_prev"):
        setattr(sampler, name, getattr(sampler, name).tolist())
    with _fake_device(device):
        model = model.to_empty(device=device)
        noise = torch.zeros(batch, model.in_channels, input_size, input_size, device=device, dtype=dtype)
        y = torch.zeros(batch, device=device, dtype=torch.long)
        recorder = OpRecorder()
        hook = _step_phases(recorder, model)
        with recorder, recorder.fused_sdpa(), torch.no_grad():
            # What the trajectory generator records (x0 at steps 15, 10, 5, 0) where S allows, else the sample.
            record = DEFAULT_RECORD_INDICES if steps > max(DEFAULT_RECORD_INDICES) else (0,)
            sampler.sample(model, noise, y, cfg_scale=cfg_scale, record_indices=record, num_classes=model.num_classes)
        hook.remove()
    config = {"model": config, "teacher_steps": steps, "batch": batch, "cfg_scale": cfg_scale, "device": str(device),
              "dtype": str(dtype).replace("torch.", "")}
    return _report(config, recorder, steps)


def train_census(config: str = "DiT-XL/2", history_layers: int = 6, steps: int = 4, batch: int = 2,
                 device="cuda", dtype=torch.bfloat16, input_size: int = 32, backward: bool = False,
                 backend: str | None = None) -> dict:
    """The ops of one ``ARDiT.forward_train`` with autograd recording, as in a training step, and with
    ``backward`` those of the backward of ``mean(pred²)``, summarized per phase ("forward_train",
    "backward"). Label dropout is off (eval mode): it draws random numbers, which fake tensors cannot.

    A backward needs ``device="cpu"``: on fake CUDA tensors the autograd engine asks the driver for a
    device context. With ``backend="triton"`` (set TRITON_INTERPRET=1) the CPU path dispatches the same
    custom ops as the CUDA path (their fake implementations run, not the interpreter), so its counts are
    the CUDA plan's but for device-specific kernels (cuBLAS, cuDNN) counted as their aten ops.
    """
    from .models import ARDiT

    device = torch.device(device)
    if backward and device.type == "cuda":
        raise ValueError("backward: fake CUDA tensors cannot run a backward (the autograd engine asks the driver "
                         "for a context); count it on device='cpu' with backend='triton' (TRITON_INTERPRET=1)")
    model = _meta_model(ARDiT, dtype, config=config, history_layers=history_layers, steps=steps,
                        input_size=input_size)
    with _fake_device(device):
        model = model.to_empty(device=device)
        if backend is not None:
            model.set_backends(attn=backend, mod=backend)
        states = torch.zeros(batch, steps, model.in_channels, input_size, input_size, device=device, dtype=dtype)
        y = torch.zeros(batch, device=device, dtype=torch.long)
        recorder = OpRecorder()
        recorder.phase("forward_train")
        model.requires_grad_(True)
        with recorder, recorder.fused_sdpa():
            pred = model.forward_train(states, y)
        if backward:
            loss = pred.float().square().mean()
            recorder.phase("backward")
            with recorder:
                loss.backward()
    config = {"model": config, "history_layers": history_layers, "steps": steps, "batch": batch,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend}
    return {"config": config, "phases": {name: summarize(ops) for name, ops in recorder.phases.items()
                                         if name != "prelude"}}


def _table(result: dict) -> str:
    kinds = sorted({k for p in result["phases"].values() for k in p["by_kind"]})
    lines = ["| phase | launches | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['launches']} | " + " | ".join(str(p["by_kind"].get(k, 0)) for k in kinds) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ard_kernels.op_census", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--history-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda (needs a CUDA build of torch, not a GPU) or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cache-backend", default=None, help="the KV cache's backend (default: the model's)")
    parser.add_argument("--train", action="store_true", help="count ARDiT.forward_train instead of sampling")
    parser.add_argument("--backward", action="store_true",
                        help="with --train, also the backward (--device cpu --backend triton, TRITON_INTERPRET=1)")
    parser.add_argument("--backend", default=None, help="attention and modulation backend (default: the model's)")
    parser.add_argument("--teacher", type=int, default=0, metavar="S",
                        help="count the teacher's S-step DDIM sampling (guidance --cfg-scale) instead")
    parser.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                        help="sample with another student class taking ARDiT's arguments, e.g. "
                             "benchmarks.published_ard:PublishedARD (run from a checkout)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and torch.version.cuda is None:
        parser.error("--device cuda: this torch is a CPU build (fake CUDA tensors need a CUDA build); "
                     "use --device cpu")
    if args.backward and (not args.train or args.device.startswith("cuda")):
        parser.error("--backward: needs --train and --device cpu (fake CUDA tensors cannot run a backward)")
    common = dict(config=args.model, history_layers=args.history_layers, steps=args.steps, batch=args.batch,
                  device=args.device, dtype=getattr(torch, args.dtype), input_size=args.input_size)
    if args.teacher:
        common.pop("history_layers")
        common["steps"] = args.teacher
        result = teacher_census(cfg_scale=args.cfg_scale, **common)
    elif args.train:
        result = train_census(backward=args.backward, backend=args.backend, **common)
    else:
        model_cls = None
        if args.model_class:
            module, _, name = args.model_class.partition(":")
            model_cls = getattr(importlib.import_module(module), name)
        result = sampler_census(cfg_scale=args.cfg_scale, cache_backend=args.cache_backend, model_cls=model_cls,
                                **common)
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
