"""benchmarks/bench_host.py runs every layer of its launch-path breakdown (here under the interpreter:
the code path, not the timings, which only the GPU run means)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_host  # noqa: E402


def test_every_layer_runs(triton_device):
    rows = bench_host.main(["--device", str(triton_device), "--calls", "1", "--reps", "1", "--no-json"])
    assert rows and not [r for r in rows if "error" in r or "skipped" in r], rows
    assert all(r["us"] > 0 for r in rows)
    layers = {(r["op"], r["layer"]) for r in rows}
    for layer in ("api", "op", "launcher", "plan", "api fwd+bwd", "floor: SDPA, no mask"):
        assert ("block_attention", layer) in layers
    assert ("block_attention", "custom op fwd+bwd") in layers
    for layer in ("modulated_layer_norm op", "fused residual+LN op, in place", "fused residual+LN launcher, in place",
                  "modulated_layer_norm api fwd+bwd", "modulated_layer_norm custom op fwd+bwd",
                  "fused residual+LN custom op fwd+bwd", "floor: F.layer_norm fwd+bwd"):
        assert ("modulation", layer) in layers


def test_stubbed_kernels_time_the_host_path_alone(triton_device):
    """--stub-kernels (CPU, interpreter): the rows time the launch path with the kernels' runs as no-ops, and the
    interpreter's kernels run again afterwards."""
    import pytest
    import torch

    import ard_kernels as ak

    if triton_device.type == "cuda":
        with pytest.raises(SystemExit, match="stub-kernels"):
            bench_host.main(["--device", "cuda", "--stub-kernels", "--no-json"])
        return
    rows = bench_host.main(["--device", "cpu", "--calls", "2", "--reps", "1", "--no-json", "--stub-kernels"])
    interleaved = bench_host.main(["--device", "cpu", "--calls", "2", "--reps", "2", "--no-json", "--stub-kernels",
                                   "--interleave", "--stat", "min"])
    assert [(r["op"], r["layer"]) for r in interleaved] == [(r["op"], r["layer"]) for r in rows]
    assert all(r["us"] > 0 and "error" not in r for r in interleaved), interleaved
    assert rows and all(r.get("kernels") == "stubbed" and r["us"] > 0 for r in rows if "skipped" not in r), rows
    layers = {(r["op"], r["layer"]) for r in rows}
    assert {("block_attention", "api, packed qkv"), ("modulation", "gated_residual api")} <= layers
    x, y, gate = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 1, 8)
    torch.testing.assert_close(ak.gated_residual(x, y, gate, 4, backend="triton"), x + gate * y)  # kernels back
