"""End-to-end sampling latency: ARD N=6 and step distillation N=0 (K=4 steps), the teacher's 25-step DDIM.

``ms`` = median time of one whole sampling call for a batch (noise in, final latent out, no VAE),
``ms_per_img`` = ms / B. Stacks, all on the same weights:

- ``published``: :class:`benchmarks.published_ard.PublishedARD` — the published code's formulation
  (per-token adaLN rows, SDPA with float masks, ``torch.cat`` history cache);
- ``eager``: :meth:`ard_kernels.models.ARDiT.sample`, backends "auto" (Triton on CUDA);
- ``graphs``: the same with ``use_cuda_graphs=True`` (CUDA only);
- ``graphs-pdl``: ``graphs`` with programmatic dependent launch (:func:`ard_kernels.ops.programmatic_launch`,
  Hopper and later; opt-in until measured): each kernel of ours starts while the previous one runs, and the
  Linears of up to 512 rows (batch 1, 2 with guidance) run the split-K plans, which prefetch their weights into
  L2 meanwhile;
- ``compile``: opt-in (``--compile``), each step's forward through ``torch.compile``;
- ``recompute``: opt-in (``--stacks ...,recompute``), the same outputs without the KV cache
  (:func:`ard_kernels.sampling.sample_recomputing_history`: every step rebuilds the history's keys and
  values), what the cache saves in time; its FLOPs are ``flops``' "no cache" variant.

The teacher (``ard_kernels.models.DiT`` + :class:`ard_kernels.diffusion.DDIMSampler`, no guidance)
runs once per batch under the ``eager`` stack. ``vs_N0_%`` = time of N=6 over N=0 in the same stack
and batch. ``TFLOP/s`` uses the analytic FLOPs of :mod:`ard_kernels.flops` (per-block conditioning
for every stack: the useful work, not what the published formulation spends).

Order (what a ``--time-budget-s`` run keeps when it stops early): batches in the order given
(CUDA default 1, 64, 8: the two targets first), and per batch each stack's N=0 then N=6 back to
back (so ``vs_N0_%`` compares like with like); the teacher last, at ``--teacher-batches``.

Run: ``python benchmarks/bench_e2e.py`` (DiT-XL/2 bf16, B 1/64/8 on CUDA, the teacher at B 1/8/64 under
run_all's GPU arguments; DiT-S/4 fp32, B 1/4 on CPU). Writes results/e2e.json after every measurement.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "e2e"
CPU_ARGV = ["--config", "DiT-S/4", "--batches", "1,4", "--teacher-steps", "25"]
QUICK_ARGV = ["--config", "DiT-tiny/2", "--batches", "1", "--teacher-steps", "2", "--history-layers", "2"]
# The teacher's batches smallest first: B64 (~2 s a sample) is the one a short budget drops.
GPU_ARGV: list[str] = ["--batches", "1,64,8", "--teacher-batches", "1,8,64"]
GPU_BUDGET_S = 80
BUDGET_ARG = "--time-budget-s"
STACKS = ("published", "eager", "graphs", "graphs-pdl", "compile", "recompute")


def _parse(argv: Sequence[str] | None):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="DiT-XL/2" if gpu else "DiT-S/4")
    p.add_argument("--batches", default="1,64,8" if gpu else "1,4", help="comma-separated batch sizes, run in order")
    p.add_argument("--history-layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=25, help="0 skips the teacher")
    p.add_argument("--teacher-batches", default=None, help="batch sizes of the teacher (default: --batches)")
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--stacks", default="eager,graphs,graphs-pdl,published",
                   help=f"comma-separated subset of {STACKS}, run in order")
    p.add_argument("--compile", action="store_true", help="add the torch.compile stack")
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--out", default=None, help="directory of e2e.json (default $ARD_BENCH_OUT or results/)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=gpu,
                   help="profile one sample (N = --history-layers) of the first batch per student stack and of "
                        "the largest batch in the graphs stack: the kernels by time and how busy the device was, "
                        "to e2e_profile.json (default on CUDA)")
    common.add_budget_arg(p)
    return p.parse_args(argv)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _build(config: str, n: int, steps: int, device, dtype, stacks: Sequence[str]) -> dict[str, torch.nn.Module]:
    """ARDiT (+ the published formulation on its weights) with history_layers n."""
    from ard_kernels.models import ARDiT

    with torch.device(device):
        ard = ARDiT(config, history_layers=n, steps=steps).eval()
    _randomise(ard)
    # .to(device) as well: a constructor may make some tensors on the host whatever the default device
    # (PublishedARD's pos_embed comes from numpy); built under the device context, this copies nothing else.
    models = {"ard": ard.to(device=device, dtype=dtype)}
    if "published" in stacks:
        from benchmarks.published_ard import PublishedARD

        with torch.device(device):
            pub = PublishedARD(config, history_layers=n, steps=steps, input_size=ard.input_size).eval()
        missing = pub.load_state_dict(ard.state_dict(), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise RuntimeError(f"published formulation does not load the ARDiT weights: {missing}")
        models["published"] = pub.to(device=device, dtype=dtype)
    return models


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """Small random weights everywhere (adaLN-Zero and the zero heads would make every step trivial)."""
    gens = {}
    for name, p in model.named_parameters():
        if name != "pos_embed":
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(0))
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.02)


def _runner(stack: str, models, noise, y) -> Callable[[], object]:
    if stack == "published":
        return lambda: models["published"].sample(noise, y)
    ard = models["ard"]
    if stack == "eager":
        return lambda: ard.sample(noise, y)
    if stack == "graphs":
        return lambda: ard.sample(noise, y, use_cuda_graphs=True)
    if stack == "graphs-pdl":
        from ard_kernels.ops import programmatic_launch

        def run_pdl():
            with programmatic_launch(True):
                return ard.sample(noise, y, use_cuda_graphs=True)
        return run_pdl
    if stack == "recompute":
        from ard_kernels.sampling import sample_recomputing_history

        return lambda: sample_recomputing_history(ard, noise, y)
    if stack == "compile":
        compiled = getattr(ard, "_bench_compiled_step", None)
        if compiled is None:
            compiled = torch.compile(ard.forward_step, dynamic=False)
            ard._bench_compiled_step = compiled

        def run():  # the compiled step shadows the method only during this stack's calls
            ard.forward_step = compiled
            try:
                return ard.sample(noise, y)
            finally:
                del ard.forward_step
        return run
    raise ValueError(f"stacks: expected names from {STACKS}, got {stack!r}")


def _teacher(config, input_size, device, dtype):
    from ard_kernels.models import DiT

    with torch.device(device):
        dit = DiT(config, input_size=input_size).eval()
    _randomise(dit)
    return dit.to(device=device, dtype=dtype)


def _teacher_runner(dit, noise, y, steps):
    try:
        from ard_kernels.diffusion import DDIMSampler
    except ImportError:  # pragma: no cover - the sampler ships with the package
        DDIMSampler = None
    device = noise.device
    if DDIMSampler is not None:
        sampler = DDIMSampler(steps)
        return lambda: sampler.sample(dit, noise, y, cfg_scale=1.0, record_indices=(0,))
    ts = torch.linspace(999, 0, steps, device=device)

    def loop():  # a minimal DDIM-shaped loop: the same S forwards
        x = noise
        for t in ts:
            x = x - 0.01 * dit(x, t.expand(x.shape[0]), y)[:, : x.shape[1]]
        return x

    return loop


def _inputs(b, input_size, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(b)
    noise = torch.randn(b, 4, input_size, input_size, generator=g).to(device, dtype)
    return noise, torch.randint(0, 1000, (b,), generator=g).to(device)


def run(args, on_rows=None) -> list[dict]:
    """Rows in measurement order; ``on_rows(rows)`` after each one (incremental JSON)."""
    from ard_kernels import flops

    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    batches = [int(b) for b in str(args.batches).split(",") if b]
    teacher_batches = [int(b) for b in str(args.teacher_batches or args.batches).split(",") if b]
    stacks = [s for s in args.stacks.split(",") if s] + (["compile"] if args.compile else [])
    if device.type != "cuda":
        stacks = [s for s in stacks if s not in ("graphs", "graphs-pdl", "compile")]
    shape = flops.shape_from_config(args.config)
    ns = sorted({0, args.history_layers})
    gflop = {n: flops.gflops(flops.ard_macs(shape, n, args.steps)) for n in ns}
    gflop_teacher = flops.gflops(flops.teacher_macs(shape, args.teacher_steps)) if args.teacher_steps else 0.0
    budget = common.Budget(getattr(args, "time_budget_s", 0.0))
    keys = ("stack", "variant", "batch", "ms", "ms_per_img", "vs_N0_%")
    rows: list[dict] = []

    def add(row):
        rows.append(row)
        common.emit(row, keys)
        if on_rows:
            on_rows(rows)

    def variant(n):
        return f"ARD N={n}" if n else "N=0 (step distillation)"

    # Both students (and their published twins) up front: each batch then measures N=0 and N=6
    # back to back, and a run cut short by its budget still has matched pairs.
    models: dict[int, dict] = {}
    for n in ns:
        try:
            models[n] = _build(args.config, n, args.steps, device, dtype, stacks)
        except Exception as exc:  # e.g. the published twin failing: keep what can run
            add({"config": args.config, "variant": variant(n), "error": "build: " + common.error_text(exc)})
            try:
                models[n] = _build(args.config, n, args.steps, device, dtype, [])
            except Exception as exc2:  # noqa: BLE001
                add({"config": args.config, "variant": variant(n), "error": "build: " + common.error_text(exc2)})
    base: dict[tuple, float] = {}
    for b in batches:
        noise, y = _inputs(b, shape.input_size, device, dtype)
        for stack in stacks:
            if not budget.allows():
                for n in ns:
                    add(common.skipped(config=args.config, stack=stack, variant=variant(n), batch=b))
                continue
            for n in ns:
                row = {"config": args.config, "dtype": args.dtype, "stack": stack, "variant": variant(n),
                       "steps": args.steps, "batch": b}
                if n not in models or (stack == "published" and "published" not in models[n]):
                    add({**row, "error": "model not built"})
                    continue
                try:
                    ms = common.time_ms(_runner(stack, models[n], noise, y), device)
                except Exception as exc:  # one stack failing must not hide the others
                    add({**row, "error": common.error_text(exc)})
                    common.free_device_memory(device)
                    continue
                base.setdefault((stack, b, n), ms)
                row.update(ms=ms, ms_per_img=ms / b, **{"TFLOP/s": gflop[n] * b / ms})
                if n and (stack, b, 0) in base:
                    row["vs_N0_%"] = 100.0 * (ms / base[(stack, b, 0)] - 1.0)
                add(row)
        del noise, y
    if args.profile and batches and args.history_layers in models and budget.allows():
        students = [s for s in stacks if s != "published"]
        # the first batch in every student stack (B1: where launches dominate), then the largest in the
        # fastest stack only (B64: where the GPU time goes, the same kernels whatever the stack)
        plan = [(batches[0], students)]
        if max(batches) != batches[0] and students:
            plan.append((max(batches), ["graphs"] if "graphs" in students else students[-1:]))
        _profile(args, models[args.history_layers], plan, shape.input_size, device, dtype, budget)
    del models
    common.free_device_memory(device)
    if args.teacher_steps:
        teacher = f"teacher DDIM {args.teacher_steps}"
        dit = None
        for b in teacher_batches:
            row = {"config": args.config, "dtype": args.dtype, "stack": "eager", "variant": teacher,
                   "steps": args.teacher_steps, "batch": b}
            if not budget.allows():
                add(common.skipped(**row))
                continue
            try:
                dit = dit or _teacher(args.config, shape.input_size, device, dtype)
                noise, y = _inputs(b, shape.input_size, device, dtype)
                ms = common.time_ms(_teacher_runner(dit, noise, y, args.teacher_steps), device, warmup=5, rep=20,
                                    min_reps=3)
                row.update(ms=ms, ms_per_img=ms / b, **{"TFLOP/s": gflop_teacher * b / ms})
            except Exception as exc:
                row["error"] = common.error_text(exc)
            add(row)
    return rows


def _profile(args, models, plan, input_size, device, dtype, budget) -> list[dict]:
    """:func:`common.kernel_profile` of one sample per (batch, stack) of ``plan`` ([(batch, stacks)]):
    e2e_profile.json and a printed table.

    Where a latency target is lost shows here: the kernel count per sample, the busy share of the
    wall time (launch-bound when low) and the kernels that dominate. A later batch of the plan is
    left out when the time budget is spent.
    """
    rows: list[dict] = []
    variant = f"ARD N={args.history_layers}"
    for i, (batch, stacks) in enumerate(plan):
        if i and not budget.allows():
            break
        noise, y = _inputs(batch, input_size, device, dtype)
        for stack in stacks:
            try:
                run = _runner(stack, models, noise, y)
            except Exception as exc:  # noqa: BLE001 - a diagnostic, never a reason to lose the timings
                rows.append({"stack": stack, "variant": variant, "batch": batch, "error": common.error_text(exc)})
                continue
            rows += common.kernel_profile(run, device, stack=stack, variant=variant, batch=batch)
        del noise, y
        common.free_device_memory(device)
    print(f"bench_e2e kernel profile ({args.config}, {args.dtype}, one sample per batch and stack):")
    print(common.markdown_table(rows), flush=True)
    if not args.no_json:
        common.write_json("e2e_profile", rows, args.out)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return common.run_and_save(NAME, _parse(argv), run, argv)


if __name__ == "__main__":
    print(common.markdown_table(main(sys.argv[1:])))
