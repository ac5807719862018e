"""The FLOP model (analytic against FlopCounterMode, the paper's 1.1% and 32%) and the benchmark plumbing.

Also here, because they are what the benchmarks stand on: the published-formulation baseline
computes the same samples as ARDiT on the same weights, and ``run_all`` runs a tiny suite on the CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ard_kernels import flops

REPO = Path(__file__).resolve().parent.parent
XL = flops.shape_from_config("DiT-XL/2")


# ------------------------------------------------------------------------------------- analytic
def test_xl_forward_matches_the_paper():
    # ARD.md: one DiT-XL/2 forward on 256 tokens ≈ 118.4 GMACs (DiT paper: 118.6 "Gflops").
    gmacs = sum(flops.teacher_macs(XL, 1).values()) / 1e9
    assert XL.tokens == 256
    assert 118.3 <= gmacs <= 118.7


def test_history_attention_is_the_only_extra_work_with_the_cache():
    sd, ard = flops.ard_macs(XL, 0, 4), flops.ard_macs(XL, 6, 4)
    extra = {k: ard[k] - sd[k] for k in sd}
    # Σ_{k<4} 2·256·(256·k)·1152 MACs per history layer × 6 layers (ARD.md: ≈ 5.44 GMACs)
    expected = sum(2 * 256 * 256 * k * 1152 for k in range(4)) * 6
    assert extra["attention"] == expected
    assert all(v == 0 for k, v in extra.items() if k != "attention")


def test_xl_overheads_match_the_paper():
    r = flops.report("DiT-XL/2", 6, 4, measure=False)
    assert 1.1 <= r["overhead_percent_analytic"] <= 1.2
    assert abs(r["overhead_percent_analytic"] - 1.15) < 0.01
    assert 31.0 <= r["overhead_percent_no_cache"] <= 33.0  # ARD.md: "≈ +32%"
    assert r["gflops_ard_no_cache"] > r["gflops_ard"] > r["gflops_step_distillation"]
    # per-token adaLN (published formulation) costs far more in absolute terms
    assert r["gflops_ard_published_formulation"] > 1.4 * r["gflops_ard"]
    assert r["gflops_teacher"] == pytest.approx(25 * r["gflops_forward"])


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_variants_are_consistent(n, k):
    s = flops.shape_from_config("DiT-S/2")
    cached, nocache = flops.ard_macs(s, n, k), flops.ard_macs(s, n, k, cache=False)
    assert sum(nocache.values()) >= sum(cached.values())
    if n == 0 or k == 1:  # nothing to recompute
        assert nocache == cached
    # the training forward over K blocks does exactly the work of the K cached steps
    assert sum(flops.ard_train_macs(s, n, k).values()) == sum(cached.values())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="history_layers"):
        flops.ard_macs(XL, 29, 4)
    with pytest.raises(ValueError, match="steps"):
        flops.ard_macs(XL, 6, 0)
    with pytest.raises(ValueError, match="conditioning"):
        flops.ard_macs(XL, 6, 4, conditioning="sample")


# ------------------------------------------------------------------------------------- measured
@pytest.mark.parametrize("n,k", [(0, 4), (2, 4), (4, 4), (1, 2)])
def test_measured_sampling_equals_analytic_on_cpu(n, k):
    s = flops.shape_from_config("DiT-tiny/2")
    macs = flops.ard_macs(s, n, k)
    assert flops.measured_sampling_flops("DiT-tiny/2", n, k, batch=1, device="cpu") == 2 * sum(macs.values())
    if n == 2:
        # ARDiT embeds the K block times once per batch, not per sample: at B = 2 that row work is shared.
        total = flops.measured_sampling_flops("DiT-tiny/2", n, k, batch=2, device="cpu") * 2
        assert total == 2 * (2 * sum(macs.values())) - 2 * macs["t_embed"]


@pytest.mark.parametrize("n,k", [(0, 4), (2, 4), (4, 4), (1, 2)])
def test_measured_no_cache_sampling_equals_analytic_on_cpu(n, k):
    """The history recomputed at every step (sampling.sample_recomputing_history): counted = analytic."""
    s = flops.shape_from_config("DiT-tiny/2")
    macs = flops.ard_macs(s, n, k, cache=False)
    got = flops.measured_sampling_flops("DiT-tiny/2", n, k, batch=1, device="cpu", cache=False)
    assert got == 2 * sum(macs.values())
    if n:
        assert got > flops.measured_sampling_flops("DiT-tiny/2", n, k, batch=1, device="cpu")


def test_measured_teacher_forward_equals_analytic():
    s = flops.shape_from_config("DiT-tiny/2")
    assert flops.measured_forward_flops("DiT-tiny/2", device="cpu") == 2 * sum(flops.teacher_macs(s, 1).values())
    assert flops.measured_forward_flops("DiT-XL/2", device="meta") == 2 * sum(flops.teacher_macs(XL, 1).values())


def test_cli_json_and_table(capsys):
    assert flops.main(["--model", "DiT-XL/2", "--history-layers", "6", "--steps", "4", "--json", "--no-measure"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("overhead_percent_analytic", "overhead_percent_measured", "overhead_percent_no_cache",
                "gflops_teacher", "gflops_step_distillation", "gflops_ard", "gflops_ard_no_cache"):
        assert key in out
    assert flops.main(["--model", "DiT-XL/2", "--table", "--json", "--no-measure"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["N"] for r in rows] == list(flops.TABLE_HISTORY_LAYERS)
    assert rows[0]["overhead_%"] == 0 and rows[-1]["overhead_%"] > rows[3]["overhead_%"]


def test_cli_module_prints_one_json_object():
    cmd = [sys.executable, "-m", "ard_kernels.flops", "--model", "DiT-XL/2", "--history-layers", "6",
           "--steps", "4", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # DiT-XL/2 counted on the meta device: analytic and measured agree within 0.1 pp
    assert out["measured_error"] is None
    assert abs(out["overhead_percent_measured"] - out["overhead_percent_analytic"]) < 0.1
    assert 1.1 <= out["overhead_percent_measured"] <= 1.2
    assert 31.0 <= out["overhead_percent_no_cache"] <= 33.0
    assert abs(out["overhead_percent_no_cache_measured"] - out["overhead_percent_no_cache"]) < 0.1


# ---------------------------------------------------------------------------- benchmark plumbing
@torch.no_grad()
@pytest.mark.parametrize("n,cfg_scale", [(0, 1.0), (2, 1.0), (4, 1.0), (2, 1.5)])
def test_published_formulation_samples_like_ardit(n, cfg_scale):
    from ard_kernels.models import ARDiT
    from benchmarks.published_ard import PublishedARD

    ard = ARDiT("DiT-tiny/2", history_layers=n, steps=4).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in ard.named_parameters():
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pub = PublishedARD("DiT-tiny/2", history_layers=n, steps=4).eval()
    pub.load_state_dict(ard.state_dict(), strict=True)
    x, y = torch.randn(2, 4, 32, 32), torch.tensor([3, 5])
    a_out, a_states = ard.sample(x, y, cfg_scale=cfg_scale, return_states=True)
    p_out, p_states = pub.sample(x, y, cfg_scale=cfg_scale, return_states=True)
    torch.testing.assert_close(p_states, a_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p_out, a_out, rtol=1e-4, atol=1e-4)
    if cfg_scale != 1.0:
        return
    # and its cached path equals its own training forward on those states (unguided)
    inputs = torch.cat([x[:, None], p_states[:, :-1]], dim=1)
    torch.testing.assert_close(pub.forward_train(inputs, y)[:, :, :4], p_states, rtol=1e-4, atol=1e-4)


def test_markdown_table_tolerates_ragged_rows():
    from benchmarks.common import markdown_table

    table = markdown_table([{"a": 1, "b": 2.5}, {"a": 2, "c": "x|y"}, {"b": None}])
    lines = table.strip().splitlines()
    assert lines[0] == "| a | b | c |" and len(lines) == 5
    assert "x\\|y" in lines[3] and "–" in lines[4]


def test_run_all_quick_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--cpu", "--only", "e2e",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("SUMMARY.md", "e2e.json", "flops.json", "e2e_latency.png"):
        assert (tmp_path / name).is_file(), name
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert {r["stack"] for r in rows} >= {"published", "eager"}
    assert all("error" not in r for r in rows), rows
    assert "## e2e" in (tmp_path / "SUMMARY.md").read_text()


@pytest.mark.parametrize("name", ["attention", "host", "modulation", "linear", "kv_cache", "e2e", "train"])
def test_gpu_argv_parses(name):
    """A typo in a module's GPU_ARGV would only show on a GPU machine: parse it (and the budget flag) here."""
    import importlib

    module = importlib.import_module(f"benchmarks.bench_{name}")
    args = module._parse(list(module.GPU_ARGV) + [module.BUDGET_ARG, "60"])
    assert args.time_budget_s == 60


def test_run_all_isolated_with_deadline(tmp_path):
    """The GPU check's mode: child processes, a deadline; a benchmark that cannot get its minimum is skipped."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--cpu", "--isolate", "--no-flops",
           "--only", "kv_cache,train", "--deadline-s", "60", "--extra", "kv_cache=--ops append", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    status = {n: b["status"] for n, b in json.loads((tmp_path / "results.json").read_text())["benchmarks"].items()}
    assert status["kv_cache"] == "ok", status
    assert status["train"] == "ok" or status["train"].startswith("skipped"), status
    rows = json.loads((tmp_path / "kv_cache.json").read_text())["rows"]
    assert rows and {r["op"] for r in rows} == {"append"}
    assert "## Targets" in (tmp_path / "SUMMARY.md").read_text() and (tmp_path / "TARGETS.md").is_file()


def test_summary_lists_the_run_time_choices():
    """SUMMARY.md's "Run-time choices": what each benchmark's kernel_choices recorded, one line per choice."""
    from benchmarks.run_all import render_summary

    choices = {"e2e": {"attention": {"fwd_kernel Lq256 Lk1024 occ0 D72 bfloat16": "64x64 w4s3 tma overlap"},
                       "linear": {"M256 N1152 K1152 bfloat16": "serial2"},
                       "rows": {"_gated_residual_modulated_layer_norm_fwd_kernel": {"256, 1152": "BLOCK_M=1 w4"}}}}
    text = render_summary({"e2e": [{"ms": 1.0}]}, {}, {}, {}, choices=choices)
    assert "## Run-time choices" in text and "### e2e" in text
    assert "- attention `fwd_kernel Lq256 Lk1024 occ0 D72 bfloat16`: 64x64 w4s3 tma overlap" in text
    assert "- linear `M256 N1152 K1152 bfloat16`: serial2" in text
    assert "- rows `_gated_residual_modulated_layer_norm_fwd_kernel` `256, 1152`: BLOCK_M=1 w4" in text
    assert "Run-time choices" not in render_summary({"e2e": [{"ms": 1.0}]}, {}, {}, {})


def test_counter_sees_the_fused_gelu_gemm_as_its_addmm():
    """CUDA inference runs fc1 + GELU as ``_addmm_activation``, for which FlopCounterMode has no formula."""
    from ard_kernels.flops import _count

    x, w, b = torch.randn(6, 8), torch.randn(16, 8), torch.randn(16)
    fused = _count(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    assert fused == _count(lambda: torch.addmm(b, x, w.t())) == 2 * 6 * 8 * 16


def test_kernel_profile_ranks_the_work_and_reports_busy_time():
    """The GPU check's diagnostic, on the CPU's operators: the dominant op first, an "(all)" row with counts."""
    from benchmarks.common import kernel_profile

    a, small = torch.randn(1024, 1024), torch.randn(8)  # a matmul no scheduler hiccup of the tiny ops outlasts
    rows = kernel_profile(lambda: (a @ a, small + 1, small * 2), "cpu", top=2, stack="x")
    assert [r["kernel"] for r in rows[:1]] == ["aten::matmul"] and len(rows) == 3
    total = rows[-1]
    assert total["kernel"] == "(all)" and total["calls"] == 3 and total["stack"] == "x"
    assert 0 < total["ms"] <= total["wall_ms"] and 0 < total["busy_%"] <= 100
    failed = kernel_profile(lambda: 1 / 0, "cpu")
    assert failed[0]["kernel"] == "(profile failed)" and "ZeroDivisionError" in failed[0]["error"]


def test_render_targets_reads_issue_7_from_the_training_rows():
    from benchmarks.run_all import render_targets

    rows = [{"provider": "ardit-auto", "mode": "fwd_bwd", "images_per_s": 170.0, "shape": "s"},
            {"provider": "published", "mode": "fwd_bwd", "images_per_s": 80.6},
            {"provider": "ardit-auto", "mode": "step", "images_per_s": 120.0, "speedup_vs_published": 0.9},
            {"provider": "ardit-auto-graphs", "mode": "fwd_bwd", "images_per_s": 150.0, "shape": "s"},
            {"provider": "ardit-auto-graphs", "mode": "step", "images_per_s": 140.0, "speedup_vs_published": 1.2}]
    table = render_targets({"train": rows})
    assert "| 7 | training fwd_bwd images/s, s | ≥ 160 img/s | 170 | published 80.6 img/s | PASS |" in table
    graphs = "| 7 | training fwd_bwd images/s, CUDA graphs, s | ≥ 160 img/s | 150 | published 80.6 img/s | miss |"
    assert graphs in table
    assert "| 7 | training step images/s" in table and "| 120 |  | miss |" in table
    assert table.rstrip().endswith("| 140 |  | PASS |")


def test_render_targets_names_the_device_and_cautions_off_an_h100():
    from benchmarks.run_all import render_targets

    rows = [{"provider": "ardit-auto", "mode": "fwd_bwd", "images_per_s": 170.0, "shape": "s"}]
    assert "Measured on" not in render_targets({"train": rows})
    h100 = render_targets({"train": rows}, "NVIDIA H100 80GB HBM3")
    assert "Measured on: NVIDIA H100 80GB HBM3. The targets were set for one H100 (bf16)." in h100
    assert "indicative only" not in h100
    h200 = render_targets({"train": rows}, "NVIDIA H200")
    assert "Measured on: NVIDIA H200." in h200 and "indicative only" in h200 and "| 170 |" in h200


def test_render_targets_gives_each_graph_stack_its_issue_8_line():
    """Issue 8's latency lines: one per graph stack (plain launches, and PDL where it ran), the best of ours over
    every stack of ours, and the N=6 over N=0 line of each stack."""
    from benchmarks.run_all import render_targets

    rows = [{"stack": s, "variant": v, "batch": 1, "ms": ms, "vs_N0_%": pct}
            for s, v, ms, pct in (("graphs", "ARD N=6", 6.8, 2.7), ("graphs-pdl", "ARD N=6", 3.9, 2.0),
                                  ("eager", "ARD N=6", 110.0, 1.0), ("published", "ARD N=6", 54.0, None))]
    table = render_targets({"e2e": rows})
    assert "| 8 | ARD N=6, 4 steps, B1, CUDA graphs (best of ours: 3.9 ms) | ≤ 4 ms | 6.8 ms |" in table
    assert "| 8 | ARD N=6, 4 steps, B1, CUDA graphs + PDL (best of ours: 3.9 ms) | ≤ 4 ms | 3.9 ms |" in table
    assert "| 8 | ARD N=6 over N=0, graphs-pdl, B1 | ≤ 3% | 2% |" in table
    no_pdl = render_targets({"e2e": [r for r in rows if r["stack"] != "graphs-pdl"]})
    assert "PDL" not in no_pdl and "graphs-pdl" not in no_pdl
    assert "| 8 | ARD N=6, 4 steps, B1, CUDA graphs (best of ours: 6.8 ms) | ≤ 4 ms | 6.8 ms |" in no_pdl


def test_e2e_recompute_stack_runs_beside_the_cached_one(tmp_path):
    """bench_e2e's opt-in "recompute" stack: the sampler without the KV cache, timed beside the cached one."""
    from benchmarks import bench_e2e

    rows = bench_e2e.main(["--config", "DiT-tiny/2", "--batches", "1", "--teacher-steps", "0", "--history-layers", "2",
                           "--stacks", "eager,recompute", "--out", str(tmp_path), "--no-profile"])
    ms = {(r["stack"], r["variant"]): r["ms"] for r in rows if r.get("ms")}
    assert set(ms) == {(s, v) for s in ("eager", "recompute") for v in ("N=0 (step distillation)", "ARD N=2")}


def test_e2e_graphs_pdl_stack_samples_with_programmatic_launch_on(monkeypatch):
    """bench_e2e's "graphs-pdl" stack: the graphed sampler called with PDL switched on (and off again after), its
    own captured graph beside the "graphs" stack's; the same samples where PDL cannot apply (here: the CPU)."""
    from _graph_helpers import install_eager_replay

    from ard_kernels.ops import programmatic_launch_enabled
    from benchmarks import bench_e2e

    runner = install_eager_replay(monkeypatch)
    models = bench_e2e._build("DiT-tiny/2", 2, 4, torch.device("cpu"), torch.float32, ("eager",))
    ard = models["ard"]
    ard.set_backends(attn="sdpa")  # capture-safe on the CPU (the reference backend builds masks on the host)
    seen = []
    real_sample = type(ard).sample
    monkeypatch.setattr(type(ard), "sample", lambda self, *a, **k: (seen.append(programmatic_launch_enabled()),
                                                                      real_sample(self, *a, **k))[1])
    noise, y = torch.randn(1, 4, ard.input_size, ard.input_size), torch.tensor([3])
    pdl = bench_e2e._runner("graphs-pdl", models, noise, y)()
    plain = bench_e2e._runner("graphs", models, noise, y)()
    assert seen == [True, False] and not programmatic_launch_enabled()
    assert runner.captures == 2 and len(ard._graph_samplers) == 2
    torch.testing.assert_close(pdl, plain, rtol=0, atol=0)
