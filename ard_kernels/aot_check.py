"""Compile every Triton kernel of the package for real GPUs, on a machine that has none.

``python -m ard_kernels.aot_check [--arch 90 80] [--json]`` runs Triton's full pipeline
(TTIR → TTGIR → LLVM → PTX → cubin through ptxas) for each kernel configuration that the op
modules list in their ``aot_specs()``. The Triton interpreter, which runs the kernels on the CPU
in tests, accepts code that the GPU compiler rejects (shapes, dtypes of ``tl.dot`` operands,
layouts); this check catches those before a GPU ever sees the code, and reports what the
compiled kernel looks like: shared memory, registers, spills, and whether Hopper's ``wgmma``
(``warp_group_dot``) carries the matrix products.

A spec is a dict: ``name``, ``kernel`` (a ``@triton.jit`` function, possibly wrapped by
``autotune``/``heuristics``), ``signature`` ({arg: "*bf16" | "i32" | "fp32" | "constexpr" or a host
tensor descriptor as the JIT spells it, ``"tensordesc<bf16[1, 1, 128, 64]>"``}),
``constexprs`` ({arg: value}), and optional ``num_warps``, ``num_stages``, ``archs``, ``divisible``
(i32 arguments that are multiples of 16 at the sizes the spec stands for: the JIT tells the compiler so
at run time, which lets masks and strides keep loads vectorised; :func:`row_divisible` for the row ops).

It must run without TRITON_INTERPRET (the interpreter replaces the kernels by Python
functions); the tests call it in a subprocess for that reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

OP_MODULES = (
    "ard_kernels.ops.block_attention",
    "ard_kernels.ops.modulated_layer_norm",
    "ard_kernels.ops.gated_residual",
    "ard_kernels.ops.gated_residual_modulated_layer_norm",
    "ard_kernels.ops.timestep_embedding",
    "ard_kernels.ops.linear",
)


def jit_function(kernel):
    """Unwrap Autotuner / Heuristics layers down to the JITFunction."""
    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "cache_key"):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"kernel: expected a @triton.jit function, got {type(kernel).__name__}")
        kernel = kernel.fn
    return kernel


def make_signature(kernel, dtype="bf16", overrides=None, floats=()):
    """A compile signature from the kernel's own parameters.

    ``*_ptr`` arguments point to ``dtype`` unless ``overrides`` names another (``{"MEAN_ptr":
    "*fp32"}``); constexpr parameters stay "constexpr"; names in ``floats`` are fp32 scalars;
    every other scalar is an i32 (sizes and strides).
    """
    fn = jit_function(kernel)
    overrides = overrides or {}
    sig = {}
    for param in fn.params:
        name = param.name
        if name in overrides:
            sig[name] = overrides[name]
        elif param.is_constexpr:
            sig[name] = "constexpr"
        elif name.lower().endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def row_divisible(kernel) -> tuple:
    """The i32 arguments of a row kernel (modulated LayerNorm, gated residual) that are multiples of 16 at
    DiT's and text-to-image sizes: N, C and every row and sample stride (C, N·C); block_size (256, 4096)
    too. Counts (blocks, groups, rows per group, the batch) may be anything."""
    names = jit_function(kernel).arg_names
    return tuple(n for n in names
                 if n in ("N", "C", "block_size") or (n.startswith("stride_") and not n.endswith("_c")))


def _ptxas() -> str:
    """ptxas: the CUDA toolkit's on PATH, else the one Triton ships."""
    found = shutil.which("ptxas")
    if found:
        return found
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(bundled):
        return bundled
    raise RuntimeError("ptxas: not on PATH and not shipped with this triton; registers and spills need it")


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the cubin itself does not say); raises if ptxas fails."""
    ptxas = _ptxas()
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -v failed (exit {proc.returncode}): {text[-1000:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": max(spills, default=0)}


def dot_in_flight_at_exp(ttgir: str) -> bool:
    """Whether, in the kernel's first loop, a wgmma product is still running when the first tile-wide
    exponential starts: the last wgmma event before that ``math.exp2`` is an issue, not a wait.

    The attention forward's overlapped loop is written for this (the next tile's scores on the tensor cores
    while this tile's exponentials run); Triton places the waits, so only the compiled IR can tell.
    """
    last = None
    in_loop = False
    for line in ttgir.splitlines():
        if "scf.for" in line:
            in_loop = True
        if not in_loop:
            continue
        if "ttng.warp_group_dot_wait" in line:
            last = "wait"
        elif "ttng.warp_group_dot " in line:
            last = "issue"
        elif "math.exp2" in line and re.search(r"tensor<\d+x\d+x", line):
            return last == "issue"
    return False


def release_before_atomic(ptx: str) -> bool | None:
    """For a kernel with a gpu-scope acq_rel atomic (the serial split-K's arrival counter): whether a CTA
    barrier (``bar.sync``) lies between the last global store before the first such atomic and the atomic,
    so every thread's stores precede the one thread's release. None without such an atomic."""
    lines = ptx.splitlines()
    atom = next((i for i, line in enumerate(lines) if "atom.global" in line and "acq_rel" in line), None)
    if atom is None:
        return None
    last_store = max((i for i, line in enumerate(lines[:atom]) if "st.global" in line), default=-1)
    return any("bar.sync" in line for line in lines[last_store + 1:atom])


def tile_conversions(ttgir: str) -> list:
    """The shapes ("4x1024", ...) of the 2-D tiles a kernel moves between register layouts (``ttg.convert_layout``
    through shared memory): for a row kernel, a tile's round trip that a single layout would avoid."""
    return re.findall(r"ttg\.convert_layout %\S+ : tensor<(\d+x\d+)x", ttgir)


def wait_comes_first(ptx: str) -> bool | None:
    """For a kernel compiled for programmatic dependent launch (:mod:`ard_kernels.ops._pdl`): whether
    ``griddepcontrol.wait`` precedes every global load, store, atomic and asynchronous copy (L2 prefetches may
    come before it) and ``griddepcontrol.launch_dependents`` follows it. None without a ``griddepcontrol.wait``."""
    lines = ptx.splitlines()
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), None)
    if wait is None:
        return None
    memory = ("ld.global", "st.global", "atom.global", "red.global", "cp.async", "cp.reduce.async")
    if any(op in line for line in lines[:wait] for op in memory):
        return False
    release = next((i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line), None)
    return release is not None and release > wait


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; returns a row describing the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(spec["kernel"])
    constexprs = spec.get("constexprs", {})
    # A scalar fixed in constexprs is what the JIT does with an int argument equal to 1 (a unit
    # stride): it compiles it in. Pointers get the 16-byte alignment the JIT infers for torch's
    # allocations, so loads vectorise as they will at run time.
    signature = {k: ("constexpr" if k in constexprs else v) for k, v in spec["signature"].items()}
    divisible = set(spec.get("divisible", ()))
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or (v == "i32" and k in divisible)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {k: spec[k] for k in ("num_warps", "num_stages") if k in spec}
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    ttgir = compiled.asm.get("ttgir", "")
    row = {
        "name": spec["name"],
        "arch": arch,
        "compile_s": round(seconds, 2),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "warp_group_dot" in ttgir,
        "mma": ("warp_group_dot" in ttgir) or ("nvidia_mma" in ttgir) or ("#mma" in ttgir),
        "dot_in_flight_at_exp": dot_in_flight_at_exp(ttgir),
        "barrier_before_release": release_before_atomic(compiled.asm["ptx"]),
        "l2_loads": compiled.asm["ptx"].count("ld.global.cg"),
        "tile_conversions": tile_conversions(ttgir),
        "pdl_wait_first": wait_comes_first(compiled.asm["ptx"]),
    }
    row.update(_ptxas_report(compiled.asm["ptx"], arch))
    return row


def collect_specs(modules=OP_MODULES) -> list:
    specs = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # the op has not been written (yet)
            raise
        if hasattr(module, "aot_specs"):
            specs.extend(module.aot_specs())
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ard_kernels.aot_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels, nothing can be compiled")
    rows, failures = [], []
    for spec in collect_specs():
        if args.filter not in spec["name"]:
            continue
        for arch in args.arch:
            if arch not in spec.get("archs", (arch,)):
                continue
            try:
                rows.append(compile_spec(spec, arch))
            except Exception as exc:  # report every failing kernel, not just the first
                failures.append({"name": spec["name"], "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    if args.json:
        print(json.dumps({"compiled": rows, "failed": failures}, indent=1))
    else:
        cols = ["name", "arch", "compile_s", "shared_bytes", "registers", "spill_bytes", "wgmma", "mma"]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for row in rows:
            print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
        for f in failures:
            print(f"FAILED {f['name']} sm_{f['arch']}: {f['error']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
