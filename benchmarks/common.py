"""Shared benchmark helpers: timing, environment, JSON results, markdown tables, plots.

Every ``benchmarks/bench_*.py`` exposes ``main(argv) -> list[dict]`` (one dict per measured row);
these helpers keep timing and reporting uniform across them:

- :func:`time_ms` — median milliseconds of a call: ``triton.testing.do_bench`` on CUDA (it flushes
  the L2 and synchronises), a ``perf_counter`` loop on the CPU.
- :func:`write_json` — ``{"benchmark", "env", "rows"}`` to ``<out>/<name>.json``; ``out`` defaults to
  ``$ARD_BENCH_OUT`` (set by ``run_all.py --out``), else ``results/``.
- :func:`markdown_table` — any rows, columns = the union of their keys in first-seen order.
- :func:`plot_tflops`, :func:`plot_latency` — PNGs with matplotlib's Agg backend (no display).
- :class:`Budget` and :func:`add_budget_arg` — ``--time-budget-s``: a module stops *starting* cases
  once its budget is spent and lists the rest as skipped rows (``run_all.py --deadline-s`` passes
  each module its share), so a suite never loses its finished rows to a timeout.
- :func:`emit` — one row as one flushed line while a benchmark runs (logs of killed runs keep it).
- :func:`kernel_profile` — the kernels one call runs, by time, and how busy the device was.
- :func:`raise_recompile_limits`, :func:`free_device_memory` — long GPU suites: many shapes through
  one ``torch.compile``'d function, and no memory carried from one shape to the next.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def sync(device=None) -> None:
    if torch.device(device or default_device()).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device=None, warmup: int = 25, rep: int = 100,
            cpu_budget_s: float = 1.0, cpu_max_iters: int = 20, min_reps: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")`` (``warmup``/``rep`` in
    ms of device time), ``rep`` raised to ``min_reps`` calls: do_bench times ``rep / estimate``
    calls, which is ONE for anything slower than ``rep`` (a B64 sample, a teacher), and one call
    cannot tell a 3% difference from noise. Calls over 50 ms: the median of ``min_reps`` calls timed
    by CUDA events (after a warm-up and an estimate). CPU: one warm-up call, then as many calls as fit in
    ``cpu_budget_s`` (at least 3, at most ``cpu_max_iters``), median of their ``perf_counter`` times.
    """
    device = torch.device(device or default_device())
    if device.type == "cuda":
        import triton.testing

        fn()  # compiles, autotunes, captures: not part of the estimate
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        estimate_ms = 1e3 * (time.perf_counter() - t0)
        if estimate_ms > 50.0:
            # A slow call (a B64 sample, a teacher): do_bench's 5-call estimate, warm-up and L2 flushes would
            # take longer than the measurement; ``min_reps`` calls timed by CUDA events say as much.
            times = []
            for _ in range(min_reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            return float(statistics.median(times))
        # + 0.5: do_bench's own estimate includes an L2 flush per call, so its floor(rep / estimate) would
        # often come out one short
        rep = max(rep, (min_reps + 0.5) * estimate_ms)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    n = max(3, min(cpu_max_iters, int(cpu_budget_s / max(est, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_profile(fn: Callable[[], object], device=None, top: int = 12, **fields) -> list[dict]:
    """Where one call of ``fn`` (after a warm-up call) spends its time, from ``torch.profiler``.

    CUDA: the GPU kernels (and memcpy/memset), CUDA-graph replays included; CPU: the top-level
    operators. Rows ``{**fields, "kernel", "calls", "ms", "%"}`` for the ``top`` names by total time,
    then one ``"kernel": "(all)"`` row with the launch count, the busy time, the profiled call's
    wall time (``wall_ms``) and ``busy_%`` (busy / wall: far below 100 on the GPU means launch- or
    host-bound). A profiler failure gives one row with ``error`` instead of raising.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device or default_device())
    cuda = device.type == "cuda"
    try:
        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall_ms = 1e3 * (time.perf_counter() - t0)
        per_name: dict[str, list] = {}
        for e in prof.events():
            if e.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU):
                continue
            if not cuda and e.cpu_parent is not None:  # CPU: top-level operators only, not their children
                continue
            entry = per_name.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1e3
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the benchmark its rows
        return [{**fields, "kernel": "(profile failed)", "error": f"{type(exc).__name__}: {str(exc)[:160]}"}]
    busy = sum(ms for _, ms in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])
    rows = [{**fields, "kernel": name[:90], "calls": calls, "ms": ms, "%": 100.0 * ms / busy if busy else None}
            for name, (calls, ms) in ranked[:top]]
    rows.append({**fields, "kernel": "(all)", "calls": sum(c for c, _ in per_name.values()), "ms": busy,
                 "%": 100.0 if busy else None, "wall_ms": wall_ms,
                 "busy_%": 100.0 * busy / wall_ms if wall_ms else None})
    return rows


def git_commit() -> str:
    """HEAD's short hash (with ``+dirty`` for local changes); ``$ARD_BENCH_COMMIT`` wins (a copied tree
    without ``.git``, as on a device machine, says which commit it is that way)."""
    if os.environ.get("ARD_BENCH_COMMIT"):
        return os.environ["ARD_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (no git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(init_cuda: bool = True) -> dict[str, str]:
    """Date, commit and software/hardware versions to stamp on every result.

    ``init_cuda=False`` names the GPU only if this process already uses CUDA (a suite runner that
    leaves the GPU to its child processes should not hold a context of its own).
    """
    gpu = on_gpu()
    if gpu and (init_cuda or torch.cuda.is_initialized()):
        device = torch.cuda.get_device_name()
    elif gpu:
        device = "CUDA (name not queried)"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    if gpu:
        info["cuda"] = str(torch.version.cuda)
    return info


_ENV: dict | None = None


def write_json(name: str, rows: list[dict], out_dir: os.PathLike | None = None, complete: bool = True,
               **extra) -> Path:
    """Write ``{"benchmark", "env", "complete", "rows", **extra}`` to ``out_dir/name.json``.

    Benchmarks call it after every case with ``complete=False`` and once at the end, so a run
    killed by a timeout still leaves its finished rows. Written to a temporary name, then renamed:
    a reader never sees half a file.
    """
    global _ENV
    if _ENV is None:
        _ENV = env_info()
    out = Path(out_dir or os.environ.get("ARD_BENCH_OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "env": _ENV, "complete": complete, "rows": rows, **extra},
                              indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: os.PathLike) -> dict | None:
    """The object :func:`write_json` wrote, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- budgets


def add_budget_arg(parser) -> None:
    parser.add_argument("--time-budget-s", type=float, default=0.0,
                        help="start no new case after this many seconds (0: no limit); the cases left "
                             "out are listed as skipped rows")


class Budget:
    """Seconds a benchmark may spend starting cases: ``allows()`` before each case (0 = unlimited)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = float(seconds or 0.0)
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - self.elapsed()

    def allows(self, need_s: float = 0.0) -> bool:
        """True while ``need_s`` more seconds fit in the budget."""
        return self.left() >= need_s


def error_text(exc: BaseException) -> str:
    """A failed case's ``error`` cell: the exception's type and the first line of its message (160 characters)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def skipped(reason: str = "time budget", **fields) -> dict:
    """A row for a case that was not run, so tables say what is missing rather than hide it."""
    return {**fields, "skipped": reason}


def emit(row: dict, keys: Sequence[str] | None = None, prefix: str = "") -> None:
    """Print one row as one line, flushed (``key=value`` pairs; floats with 4 significant digits)."""
    keys = list(keys) if keys else list(row)
    parts = [f"{k}={_fmt(row[k])}" for k in keys if k in row and row[k] is not None]
    parts += [f"{k}={_fmt(row[k])}" for k in ("error", "skipped", "note") if k in row and k not in keys]
    print(prefix + "  ".join(parts), flush=True)


def raise_recompile_limits(limit: int = 256) -> None:
    """Let one ``torch.compile``'d function (FlexAttention, a reference) serve many static shapes.

    Dynamo stops compiling a function after ``recompile_limit`` (8) variants and silently runs it
    eagerly from then on: for FlexAttention that is the unfused path, slow and memory-hungry.
    """
    try:
        import torch._dynamo.config as cfg
    except ImportError:  # pragma: no cover - every torch this package supports has dynamo
        return
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name, limit) < limit:
        setattr(cfg, name, limit)
    if getattr(cfg, "accumulated_recompile_limit", 4 * limit) < 4 * limit:
        cfg.accumulated_recompile_limit = 4 * limit


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set the environment variable ``name`` to ``value`` for the block (``value`` None: leave it as it is)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def free_device_memory(device=None) -> None:
    """Collect garbage and return cached blocks, so one case's tensors never crowd the next one."""
    gc.collect()
    if torch.device(device or default_device()).type == "cuda":
        torch.cuda.empty_cache()


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.2f}"
        return f"{v:.3g}"
    return str(v).replace("|", "\\|")


def columns_of(rows: Iterable[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order (benchmarks may differ in their columns)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; missing cells show "–"."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns) if columns else columns_of(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_key(row: dict, candidates: Sequence[str], contains: Sequence[str] = ()) -> str | None:
    for c in candidates:
        if c in row:
            return c
    for k in row:
        if any(s in k.lower() for s in contains):
            return k
    return None


def plot_tflops(rows: Sequence[dict], path: os.PathLike, title: str = "") -> Path | None:
    """Grouped bars: TFLOP/s (any key containing "tflop") per shape (x) and provider (colour)."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return None
    val = _first_key(rows[0], ("tflops", "TFLOP/s"), ("tflop",))
    shape = _first_key(rows[0], ("shape", "case", "config"))
    prov = _first_key(rows[0], ("provider", "backend", "stack", "impl"))
    if not (val and shape and prov):
        return None
    shapes = list(dict.fromkeys(str(r.get(shape)) for r in rows))
    provs = list(dict.fromkeys(str(r.get(prov)) for r in rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) * max(1, len(provs)) / 3), 4))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        ys = []
        for s in shapes:
            hit = [r.get(val) for r in rows if str(r.get(shape)) == s and str(r.get(prov)) == p]
            ys.append(hit[0] if hit and isinstance(hit[0], (int, float)) else 0.0)
        ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(val)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_latency(rows: Sequence[dict], path: os.PathLike, title: str = "",
                 y_key: str = "ms_per_img") -> Path | None:
    """Lines: ``y_key`` against batch size (log-log), one line per (stack, variant)."""
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get(y_key), (int, float))]
    if not rows:
        return None
    bkey = _first_key(rows[0], ("batch", "B"))
    if not bkey:
        return None
    label_keys = [k for k in ("stack", "variant", "provider", "shape") if k in rows[0]]
    lines: dict[str, list] = {}
    for r in rows:
        lines.setdefault(" / ".join(str(r[k]) for k in label_keys) or "rows", []).append((r[bkey], r[y_key]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(y_key)
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def kernel_choices() -> dict:
    """What the GPU chose at run time in this process: the attention configs per launch plan, the linear plans
    per shape, the row kernels' tiles per key (from the op modules already imported: this imports none)."""
    sources = (("attention", "ard_kernels.ops.block_attention", "chosen_configs"),
               ("linear", "ard_kernels.ops.linear", "chosen_plans"), ("rows", "ard_kernels.ops._rows", "row_choices"))
    out = {}
    for kind, module_name, reader in sources:
        module = sys.modules.get(module_name)
        choices = getattr(module, reader)() if module is not None else None
        if choices:
            out[kind] = choices
    return out


def run_and_save(name: str, args, run, argv) -> list[dict]:
    """``run(args, on_rows=...)`` with its rows written to ``<name>.json`` after every case (marked
    incomplete) and once more at the end, unless ``args.no_json``: the shared ``main`` of the
    benchmarks whose whole work is one ``run``. The file also records :func:`kernel_choices`."""
    extra = {"argv": list(argv or [])}

    def save(rows, complete=False):
        write_json(name, rows, args.out, complete=complete, kernel_choices=kernel_choices(), **extra)

    rows = run(args, on_rows=None if args.no_json else save)
    if not args.no_json:
        save(rows, complete=True)
    return rows
