"""Every Triton kernel compiles for the H100 (sm_90) and the A100 (sm_80) without a GPU.

The interpreter that runs the kernels in the other CPU tests accepts programs the GPU compiler
rejects; this runs Triton's whole pipeline down to a cubin for each configuration the op modules
list, in a subprocess because TRITON_INTERPRET must be off for it.
"""

import json
import os
import subprocess
import sys

import pytest
from _gpu_stack import gpu_stack_env, gpu_stack_python

from ard_kernels import aot_check


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ard_kernels.aot_check", "--arch", "90", "80", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_sm90_and_sm80(report):
    assert not report["failed"], json.dumps(report["failed"], indent=1)[:6000]
    # Every op module exists (collect_specs would pass over a missing one) and has kernels compiled for both
    # archs: a module whose aot_specs() lost its specs would otherwise go unnoticed behind the others' count.
    for module in aot_check.OP_MODULES:
        assert __import__("importlib").util.find_spec(module), f"{module} is missing"
        op = module.rsplit(".", 1)[1]
        for arch in (90, 80):
            assert any(r["name"].startswith(f"{op}_") and r["arch"] == arch for r in report["compiled"]), \
                f"no {op} kernel compiled for sm_{arch}"


def test_every_kernel_has_a_register_count(report):
    """ptxas ran on every compiled kernel: the spill checks below read its report, and a kernel without one
    would pass them for want of data."""
    missing = [(r["name"], r["arch"]) for r in report["compiled"] if not r.get("registers")]
    assert not missing, f"no ptxas register count for {missing[:10]}"
    assert all("spill_bytes" in r for r in report["compiled"])


def test_elementwise_kernels_do_not_spill_at_target_sizes(report):
    # The widest rows (C = 8192, one row of five live fp32 tiles per program in the LayerNorm
    # backward) spill a little: correct, and outside the sizes the performance targets are set for.
    spilled = [r for r in report["compiled"]
               if r.get("spill_bytes") and not r["name"].startswith("block_attention") and "C8192" not in r["name"]]
    assert not spilled, f"kernels spill registers: {spilled}"


def test_padded_remainder_keeps_the_row_tiles_in_one_layout(report):
    """DiT-XL/2's rows (C = 1152 = 1024 + 128, sm_90): with the exact 128-wide remainder the compiled row kernels
    move their (BLOCK_M, 1024) tiles between register layouts through shared memory (what the padded variant is
    offered against); with the remainder as wide as the main segment no 2-D tile changes layout."""
    rows = {r["name"]: r for r in report["compiled"] if r["arch"] == 90 and "layer_norm" in r["name"]}
    padded = [name for name in rows if name.endswith("_padded")]
    assert len(padded) >= 12, sorted(rows)
    for name in padded:
        assert rows[name]["tile_conversions"] == [], (name, rows[name]["tile_conversions"])
    exact = [rows[name[: -len("_padded")]] for name in padded]
    converted = [r["name"] for r in exact if any(shape.endswith("x1024") for shape in r["tile_conversions"])]
    assert len(converted) >= len(exact) // 2, [(r["name"], r["tile_conversions"]) for r in exact]


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_hopper_dit_attention_has_a_clean_wgmma_config(report, kind):
    """DiT-XL/2's case (bf16, head dim 72 = 64 + 16, sm_90): the autotuner has at least one config
    per kernel that runs its products on wgmma without spilling registers."""
    rows = [r for r in report["compiled"]
            if r["arch"] == 90 and r["name"].startswith(f"block_attention_{kind}_bf16_D72_")]
    assert rows, f"no block_attention_{kind} bf16 D72 spec was compiled for sm_90"
    assert any(r["wgmma"] and not r.get("spill_bytes") for r in rows), rows


def test_attention_fits_the_shared_memory_of_its_targets(report):
    # Per-block opt-in limits: A100 163 KiB, H100 227 KiB; the autotuner would prune a config
    # that does not fit, but every listed config should be launchable.
    limit = {80: 166912, 90: 232448}
    too_big = [r for r in report["compiled"] if r["shared_bytes"] > limit[r["arch"]]]
    assert not too_big, too_big


def test_every_kernel_compiles_with_triton_36_for_sm90():
    """The GPU machines run torch 2.11 and triton 3.6: compile every kernel with them too, in the GPU-stack
    venv (`make test` builds it; tests/test_gpu_stack.py checks its versions)."""
    python = gpu_stack_python()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = gpu_stack_env(PYTHONPATH=root)
    proc = subprocess.run([python, "-m", "ard_kernels.aot_check", "--arch", "90", "--json"], capture_output=True,
                          text=True, env=env, cwd=root, timeout=900)
    assert proc.stdout, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert not result["failed"], json.dumps(result["failed"], indent=1)[:6000]
    assert any(r["wgmma"] for r in result["compiled"] if r["name"].startswith("block_attention_fwd_bf16_D72"))


def test_hopper_dit_forward_has_clean_tma_configs(report):
    """The TMA (copy-engine) forward configs for DiT's head dim use wgmma and do not spill."""
    rows = [r for r in report["compiled"] if r["arch"] == 90
            and r["name"].startswith("block_attention_fwd_bf16_D72_") and r["name"].endswith("_tma")]
    assert rows and all(r["wgmma"] and not r.get("spill_bytes") for r in rows), rows


def test_dit_forward_without_its_masked_loop_is_lighter(report):
    """ARD's 256-token blocks launch the forward with its masked loop compiled out (``..._fullonly``): on sm_90
    each such config holds no more registers or shared memory than with it, so at least as many programs share
    an SM (block_schedule.has_masked_tiles)."""
    rows = {r["name"]: r for r in report["compiled"]
            if r["arch"] == 90 and r["name"].startswith("block_attention_fwd_bf16_D72_")
            and not r["name"].endswith("_pdl")}
    pairs = [(rows[n[:-len("_fullonly")]], r) for n, r in rows.items() if n.endswith("_fullonly")]
    assert pairs and len(pairs) * 2 == len(rows), sorted(rows)
    for masked, full in pairs:
        assert full["registers"] <= masked["registers"] and full["shared_bytes"] <= masked["shared_bytes"], \
            (masked, full)
    assert any(full["registers"] < masked["registers"] for masked, full in pairs)


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_overlapped_loops_keep_a_product_running_through_the_exponentials(report, kind):
    """The ``_overlap`` configs (forward, dQ, dK/dV) issue the next tile's products before this tile's exponentials;
    in the compiled IR a wgmma is still in flight at the first tile-wide exponential of the loop
    (aot_check.dot_in_flight_at_exp), which is not so in the plain loops (Triton waits for a product used in
    the same iteration right after issuing it)."""
    prefix = f"block_attention_{kind}_bf16_D72_"
    rows = [r for r in report["compiled"] if r["arch"] == 90 and r["name"].startswith(prefix)]
    overlapped = [r for r in rows if "_overlap" in r["name"]]
    assert overlapped and all(r["dot_in_flight_at_exp"] for r in overlapped), overlapped
    assert not any(r["dot_in_flight_at_exp"] for r in rows if "_overlap" not in r["name"])


def test_serial_split_k_releases_its_partials_after_a_barrier(report):
    """The serial linear plans: in the compiled code every thread's partial sums are stored, then a CTA barrier,
    then one thread's gpu-scope acq_rel atomic on the tile's counter, and the reducing program reads the
    partials through L2 (ld.global.cg: L1 is not coherent across SMs). The other plans have no atomic."""
    rows = [r for r in report["compiled"] if r["name"].startswith("linear_")]
    serial = [r for r in rows if "_serial" in r["name"]]
    assert serial and {r["arch"] for r in serial} == {90, 80}
    assert all(r["barrier_before_release"] is True and r["l2_loads"] > 0 for r in serial), serial
    assert all(r["barrier_before_release"] is None and r["l2_loads"] == 0 for r in rows if r not in serial)


def test_pdl_kernels_wait_before_touching_memory(report):
    """Programmatic dependent launch (ard_kernels.ops._pdl): every ``_pdl`` kernel (the inference forwards and the
    split-K linear, as the sampler launches them) executes ``griddepcontrol.wait`` before any global load, store,
    atomic or asynchronous copy, and lets the next kernel launch after it; the kernels compiled without PDL have
    no wait at all. Only sm_90 compiles them (the instructions are Hopper's)."""
    rows = [r for r in report["compiled"] if r["name"].endswith("_pdl")]
    ops = {name for name in ("modulated_layer_norm_fwd", "gated_residual_fwd",
                             "gated_residual_modulated_layer_norm_fwd", "block_attention_fwd", "linear_bf16",
                             "linear_reduce")
           if any(r["name"].startswith(name) for r in rows)}
    assert len(ops) == 6, ops
    assert {r["arch"] for r in rows} == {90}
    assert all(r["pdl_wait_first"] is True for r in rows), [(r["name"], r["pdl_wait_first"]) for r in rows]
    assert all(r["pdl_wait_first"] is None for r in report["compiled"] if not r["name"].endswith("_pdl"))
    # The wait and the weight prefetch cost no registers to speak of (the same programs per SM).
    plain = {r["name"]: r for r in report["compiled"] if r["arch"] == 90}
    twins = [(plain[r["name"][:-len("_pdl")]], r) for r in rows if r["name"][:-len("_pdl")] in plain]
    assert len(twins) >= 10
    assert all(r["registers"] <= p["registers"] + 8 and not r["spill_bytes"] for p, r in twins), twins


def test_wait_comes_first_reads_the_ptx_order():
    """The check itself: a load before the wait, or no release after it, fails; an L2 prefetch before it is fine."""
    wait, release = "griddepcontrol.wait;", "griddepcontrol.launch_dependents;"
    prefetch, load = "@p prefetch.global.L2 [%rd1];", "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2];"
    assert aot_check.wait_comes_first("\n".join([prefetch, wait, release, load])) is True
    assert aot_check.wait_comes_first("\n".join([load, wait, release])) is False
    copy = "cp.async.cg.shared.global [%r1], [%rd1], 16;"
    assert aot_check.wait_comes_first("\n".join([copy, wait, release])) is False
    assert aot_check.wait_comes_first("\n".join([wait, load])) is False
    assert aot_check.wait_comes_first("\n".join([release, wait, load])) is False
    assert aot_check.wait_comes_first(load) is None


def test_split_kv_forward_merges_after_a_barrier_without_spilling(report):
    """The split-KV forward configs (``_split<n>``): each program's partial stored, a CTA barrier, then one thread's
    gpu-scope acq_rel atomic on the query tile's counter, and the merging program reading the partials through L2
    (ld.global.cg); on sm_90 no spill at the widths they are offered for (the 64-row one only up to width 96; on
    sm_80 some spill a few bytes, 8 to 32 under triton 3.6 and 3.7)."""
    rows = [r for r in report["compiled"] if r["name"].startswith("block_attention_fwd_") and "_split" in r["name"]]
    assert {r["name"].split("_D")[1].split("_")[0] for r in rows} >= {"72", "128"}
    assert {r["arch"] for r in rows} == {90, 80}
    assert all(r["barrier_before_release"] is True and r["l2_loads"] > 0 for r in rows), rows
    assert not any(r["spill_bytes"] for r in rows if r["arch"] == 90), rows
    assert all(r["spill_bytes"] <= 64 for r in rows), rows
    assert not any("_D128_64x64" in r["name"] for r in rows)
