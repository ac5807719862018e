"""Run every benchmark that fits this machine; write JSON, a markdown summary and plots.

``python benchmarks/run_all.py [--gpu|--cpu] [--only e2e,attention] [--quick] [--out results]``
(``make bench``). Discovers ``benchmarks/bench_*.py``; each exposes ``main(argv) -> list[dict]``.
The argv a module gets: its ``GPU_ARGV`` on CUDA, its ``CPU_ARGV`` on the CPU, its ``QUICK_ARGV``
with ``--quick`` (each defaults to ``[]``: the module then sizes itself from the device). Every
module runs in its own try/except, so one failure is reported and the suite goes on.

Writes to ``--out``: ``<name>.json`` per benchmark (unless the module wrote it itself during the
run), ``flops.json`` (the analytic/measured FLOP model), ``SUMMARY.md`` (one table per benchmark,
the failures, the environment), ``<name>_tflops.png`` (TFLOP/s per shape and provider) and
``<name>_latency.png`` (latency against batch size) where the rows carry those columns. Exit
status 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script (make bench)
    sys.path.insert(0, str(HERE.parent))


def discover(only: Sequence[str] | None = None) -> list[str]:
    """Names ``x`` of ``benchmarks/bench_x.py``, sorted, filtered by ``only``."""
    names = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    if only:
        unknown = [o for o in only if o not in names]
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    return names


def _argv_for(module, gpu: bool, quick: bool) -> list[str]:
    if quick and hasattr(module, "QUICK_ARGV"):
        return list(module.QUICK_ARGV)
    return list(getattr(module, "GPU_ARGV" if gpu else "CPU_ARGV", []))


def _flops_rows(quick: bool) -> list[dict]:
    from ard_kernels import flops

    config = "DiT-tiny/2" if quick else "DiT-XL/2"
    history = (0, 1, 2, 4) if quick else flops.TABLE_HISTORY_LAYERS
    rows = flops.table(config, 4, history, device="meta")
    for r in rows:
        r["model"] = config
    return rows


def run_suite(names: Sequence[str], out: Path, gpu: bool, quick: bool, flops_table: bool = True) -> dict:
    """Run the named benchmarks; returns {"results": {name: rows}, "failures": {name: traceback}}."""
    from benchmarks import common

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bar is a nicety
        tqdm = None
    out.mkdir(parents=True, exist_ok=True)
    results, failures, timings = {}, {}, {}
    env = common.env_info()
    tasks = (["flops"] if flops_table else []) + list(names)
    bar = tqdm(tasks, desc="benchmarks", unit="bench") if tqdm else tasks
    for name in bar:
        if tqdm:
            bar.set_postfix_str(name)
        t0 = time.time()
        json_path = out / f"{name}.json"
        try:
            if name == "flops":
                rows = _flops_rows(quick)
            else:
                module = importlib.import_module(f"benchmarks.bench_{name}")
                rows = module.main(_argv_for(module, gpu, quick))
            rows = [dict(r) for r in (rows or [])]
            results[name] = rows
            if not (json_path.exists() and json_path.stat().st_mtime >= t0):
                common.write_json(name, rows, out)
        except BaseException as exc:  # noqa: B036 - a benchmark calling sys.exit must not end the suite
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures[name] = traceback.format_exc(limit=8)
            print(f"[run_all] {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        timings[name] = time.time() - t0
        # rewritten after every benchmark, so a suite killed by a timeout still leaves its summary
        summary = render_summary(results, failures, timings, env)
        (out / "SUMMARY.md").write_text(summary)
    for name, rows in results.items():
        _plots(name, rows, out)
    summary = render_summary(results, failures, timings, env)
    (out / "SUMMARY.md").write_text(summary)
    return {"results": results, "failures": failures, "timings": timings, "summary": summary}


def _plots(name: str, rows: list[dict], out: Path) -> None:
    from benchmarks import common

    if not rows:
        return
    cols = common.columns_of(rows)
    try:
        if any("tflop" in c.lower() for c in cols) and any(c in cols for c in ("shape", "case")):
            common.plot_tflops(rows, out / f"{name}_tflops.png", title=name)
        if "batch" in cols:
            y = "ms_per_img" if "ms_per_img" in cols else next((c for c in cols if c.startswith("ms")), None)
            if y:
                common.plot_latency(rows, out / f"{name}_latency.png", title=name, y_key=y)
    except Exception as exc:  # a plot must never sink the results
        print(f"[run_all] plot of {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def render_summary(results: dict, failures: dict, timings: dict, env: dict) -> str:
    from benchmarks import common

    lines = ["# Benchmark summary", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
             f"Command: `{' '.join(['python', 'benchmarks/run_all.py'] + sys.argv[1:])}`", ""]
    for name, rows in results.items():
        lines += [f"## {name} ({timings.get(name, 0):.0f} s)", "", common.markdown_table(rows)]
    if failures:
        lines += ["## Failures", ""]
        for name, tb in failures.items():
            lines += [f"### {name}", "", "```", tb.rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_all", description=__doc__.split("\n")[0])
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true", help="GPU sizes (requires CUDA)")
    dev.add_argument("--cpu", action="store_true", help="CPU sizes even if CUDA is present")
    p.add_argument("--only", default="", help="comma-separated benchmark names (bench_<name>.py)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-model table")
    p.add_argument("--out", default=str(HERE.parent / "results"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; --quick: 1)")
    a = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not a.cpu
    if a.gpu and not gpu:
        raise SystemExit("--gpu: no CUDA device visible")
    if not gpu:  # Triton kernels on CPU only run interpreted; must be set before any kernel is defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    threads = a.threads or (1 if a.quick else 0)
    if threads:  # small CPU ops on a shared machine: spinning OpenMP workers cost more than they give
        torch.set_num_threads(threads)
    os.environ["ARD_BENCH_OUT"] = str(Path(a.out).resolve())  # modules' own write_json lands here too
    names = discover([n for n in a.only.split(",") if n])
    report = run_suite(names, Path(a.out), gpu, a.quick, flops_table=not a.no_flops)
    print(report["summary"])
    print(json.dumps({"ok": sorted(report["results"]), "failed": sorted(report["failures"])}))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
