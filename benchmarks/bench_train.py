"""ARD training step: images/s of a student's forward + backward (+ AdamW), ours against the published formulation.

``images_per_s = B / (ms / 1000)``. Modes: ``fwd_bwd`` (forward, ARD loss, backward) and ``step``
(the whole training step of :mod:`ard_kernels.train`: zero_grad, forward, loss, backward, gradient
clipping at 1.0, AdamW). Providers, built one at a time on the same shapes:

- ``published``: :class:`benchmarks.published_ard.PublishedARD` — per-token adaLN rows, SDPA with
  float masks (the published code's formulation);
- ``ardit-<backend>``: :class:`ard_kernels.models.ARDiT` with attention backend ``<backend>``
  ("auto", "flex", "sdpa", "triton", …) and the modulation ops on "auto";
- ``ardit-<backend>-graphs``: the same student with forward, loss and backward replayed as one CUDA graph
  (:class:`ard_kernels.training.graphed_step.GraphedStep`, what ``train --cuda-graphs`` runs; CUDA only):
  the kernels of ``ardit-<backend>`` without the host's launch time;
- ``ardit-auto-compile``: opt-in (``--compile``), the training forward through ``torch.compile``.

bf16 autocast on CUDA (as the trainer), fp32 on the CPU. Inputs: random states (B, K, 4, H, W),
random labels; weights random (zero-initialised adaLN would be as fast).

Run: ``python benchmarks/bench_train.py`` (CUDA: DiT-XL/2, N 6, K 4 × 256 tokens, B 16, ours eager and
graphed, then the published formulation; ``--providers published,ardit-auto,ardit-auto-graphs,ardit-flex``
for all; CPU: DiT-tiny/2 at 16×16, B 4, so ``make bench`` prints something). ``--time-budget-s``: no
provider starts once it is spent. Writes results/train.json after every provider.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "ard_kernels" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "train"
CPU_ARGV = ["--config", "DiT-tiny/2", "--input-size", "16", "--batch", "4", "--history-layers", "2"]
QUICK_ARGV = ["--config", "DiT-tiny/2", "--input-size", "8", "--batch", "2", "--history-layers", "2",
              "--modes", "step"]
GPU_ARGV: list[str] = ["--providers", "ardit-auto,ardit-auto-graphs,published", "--modes", "step,fwd_bwd",
                       "--rep-ms", "600"]
GPU_BUDGET_S = 60
BUDGET_ARG = "--time-budget-s"
MODES = ("fwd_bwd", "step")


def _parse(argv: Sequence[str] | None):
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="DiT-XL/2" if gpu else "DiT-tiny/2")
    p.add_argument("--input-size", type=int, default=32 if gpu else 16, help="latent side (32: 256 tokens at p2)")
    p.add_argument("--batch", type=int, default=16 if gpu else 4)
    p.add_argument("--history-layers", type=int, default=6 if gpu else 2)
    p.add_argument("--steps", type=int, default=4, help="K blocks")
    p.add_argument("--providers",
                   default="published,ardit-auto,ardit-auto-graphs,ardit-flex" if gpu else "published,ardit-auto",
                   help="comma-separated: published, ardit-<attention backend>[-graphs]")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--compile", action="store_true", help="add ardit-auto-compile")
    p.add_argument("--device", default=str(common.default_device()))
    p.add_argument("--rep-ms", type=float, default=2000.0, help="CUDA: do_bench's timed milliseconds per mode")
    p.add_argument("--out", default=None, help="directory of train.json (default $ARD_BENCH_OUT or results/)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=gpu,
                   help="profile one fwd_bwd per provider after its timings: the kernels by time, to "
                        "train_profile.json (default on CUDA)")
    common.add_budget_arg(p)
    return p.parse_args(argv)


def _build(provider: str, args, device):
    """(model, forward(states, y) -> (B, K, C_out, H, W)) for one provider."""
    if provider == "published":
        from benchmarks.published_ard import PublishedARD

        with torch.device(device):  # built in place: initialising DiT-XL/2 on the host takes seconds
            model = PublishedARD(args.config, history_layers=args.history_layers, steps=args.steps,
                                 input_size=args.input_size)
        model.to(device)  # its pos_embed is made from numpy, on the host, whatever the default device
        return model, model.forward_train
    from ard_kernels.models import ARDiT

    name = provider[len("ardit-"):]
    compiled = name.endswith("-compile")
    backend = name.removesuffix("-compile").removesuffix("-graphs")
    with torch.device(device):
        model = ARDiT(args.config, history_layers=args.history_layers, steps=args.steps,
                      input_size=args.input_size)
    model.to(device)
    model.set_backends(attn=backend)
    with torch.no_grad():  # random heads and adaLN, so no branch sees all-zero operands
        for p in model.parameters():
            if p.requires_grad and p.dim() > 1 and not p.abs().sum():
                p.normal_(std=0.02)
    fwd = model.forward_train
    if compiled:
        fwd = torch.compile(fwd)
    return model, fwd


def _measure(provider: str, args, device, profile_rows=None, on_measured=None, budget=None) -> list[dict]:
    """Time each mode of ``provider``; hand the rows to ``on_measured`` (saved) before the optional
    kernel profile, which runs only while ``budget`` allows, so a run killed in the profile keeps them."""
    from ard_kernels.training import ard_loss

    model, fwd = _build(provider, args, device)
    model.train()
    b, k, s = args.batch, args.steps, args.input_size
    gen = torch.Generator(device=device).manual_seed(0)
    states = torch.randn((b, k, 4, s, s), device=device, generator=gen)
    targets = torch.randn((b, k, 4, s, s), device=device, generator=gen)
    y = torch.randint(0, 1000, (b,), device=device, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    graphed = None
    if provider.endswith("-graphs"):
        from ard_kernels.training.graphed_step import GraphedStep

        # Captured at the first call (after two eager warm-up runs); each call copies the batch into the
        # graph's static inputs and replays: forward, loss and backward, the gradients set in place.
        graphed = GraphedStep(lambda s, t, labels: ard_loss(fwd(s, labels), t), params, device,
                              autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)

    def fwd_bwd():
        if graphed is not None:
            return graphed(states, targets, y)[0]
        with autocast:
            pred = fwd(states, y)
        loss = ard_loss(pred, targets)
        loss.backward()
        return loss

    def step():
        if graphed is None:  # the graph sets the gradients itself
            opt.zero_grad(set_to_none=True)
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def fwd_bwd_only():
        if graphed is None:
            for p in params:
                p.grad = None
        fwd_bwd()

    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: expected a subset of {MODES}, got {mode!r}")
        fn = step if mode == "step" else fwd_bwd_only
        ms = common.time_ms(fn, device, warmup=max(100, args.rep_ms / 4), rep=args.rep_ms, cpu_budget_s=2.0,
                            cpu_max_iters=5)
        shape = f"{args.config} N{args.history_layers} B{b} {k}x{model_tokens(args)}"
        row = {"op": "ard_train_step", "shape": shape, "provider": provider, "mode": mode,
               "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "ms": ms,
               "images_per_s": b / (ms / 1e3)}
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        rows.append(row)
        common.emit(row, ("provider", "mode", "ms", "images_per_s", "peak_gib"))
    if on_measured is not None:
        on_measured(rows)
    # The graphed provider runs the eager provider's kernels: its profile would repeat that one.
    if profile_rows is not None and graphed is None and (budget is None or budget.allows()):
        # where the step's time goes: attention, GEMMs, elementwise passes
        profile_rows += common.kernel_profile(fwd_bwd_only, device, top=15, provider=provider, mode="fwd_bwd")
    return rows


def model_tokens(args) -> int:
    from ard_kernels.models import get_config

    return (args.input_size // get_config(args.config).patch_size) ** 2


def run(args, on_rows=None) -> list[dict]:
    device = torch.device(args.device)
    providers = [p for p in args.providers.split(",") if p]
    if args.compile:
        providers.append("ardit-auto-compile")
    budget = common.Budget(getattr(args, "time_budget_s", 0.0))
    rows: list[dict] = []
    profile_rows: list[dict] | None = [] if args.profile else None
    for provider in providers:
        if not budget.allows():
            rows.append(common.skipped(op="ard_train_step", provider=provider))
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            rows += _measure(provider, args, device, profile_rows, budget=budget,
                             on_measured=(lambda measured, done=rows: on_rows(done + measured)) if on_rows else None)
        except Exception as e:  # one provider failing (e.g. a backend absent here) must not hide the others
            rows.append({"op": "ard_train_step", "provider": provider, "error": f"{type(e).__name__}: {e}"[:300]})
            common.emit(rows[-1])
        # the provider's model and optimizer state (and a failure's traceback frames) go before the next one
        common.free_device_memory(device)
        if on_rows:
            on_rows(rows)
        if profile_rows and not args.no_json:
            common.write_json("train_profile", profile_rows, args.out)
    if profile_rows:
        print("bench_train kernel profile (one fwd_bwd per provider):")
        print(common.markdown_table(profile_rows), flush=True)
    base = {r["mode"]: r["ms"] for r in rows if r.get("provider") == "published" and "ms" in r}
    for r in rows:
        if "ms" in r and r["mode"] in base:
            r["speedup_vs_published"] = base[r["mode"]] / r["ms"]
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return common.run_and_save(NAME, _parse(argv), run, argv)


if __name__ == "__main__":
    print(common.markdown_table(main(sys.argv[1:])))
