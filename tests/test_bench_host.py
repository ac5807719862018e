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
