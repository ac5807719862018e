"""pytest-benchmark suite: ``pytest --benchmark-only`` (skipped without that flag; ``make test`` runs tests/ only).

4-step sampling of the published formulation against ard_kernels (eager; CUDA graphs on a GPU),
ARD N>0 against N=0, and the FLOP model itself. DiT-XL/2 bf16 at B 8 on CUDA, DiT-tiny/2 fp32 at
B 2 on the CPU (a smoke-sized run: CPU timings say little about the GPU).
"""

import pytest
import torch

from benchmarks.bench_e2e import _build

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CONFIG, BATCH, DTYPE, HISTORY = ("DiT-XL/2", 8, torch.bfloat16, 6) if CUDA else ("DiT-tiny/2", 2, torch.float32, 2)

_models = {}


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """Small ops on a shared CPU: OpenMP workers spinning cost more than they give (restored after)."""
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _get(n):
    if n not in _models:
        _models.clear()  # one pair of DiT-XL/2 models in memory at a time
        _models[n] = _build(CONFIG, n, 4, DEVICE, DTYPE, ("published",))
    return _models[n]


def _inputs():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(BATCH, 4, 32, 32, generator=g).to(DEVICE, DTYPE)
    y = torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)
    return noise, y


def _timed(benchmark, fn):
    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    call()  # warm-up outside the timing (autotuning, graph capture, lazy init)
    benchmark.pedantic(call, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", [0, HISTORY], ids=["N0", f"N{HISTORY}"])
@pytest.mark.parametrize("stack", ["published", "eager", "graphs"])
@torch.no_grad()
def test_sample_4_steps(benchmark, stack, n):
    if stack == "graphs" and not CUDA:
        pytest.skip("CUDA graphs need a GPU")
    models = _get(n)
    noise, y = _inputs()
    benchmark.group = f"sample {CONFIG} B{BATCH}"
    benchmark.extra_info.update(config=CONFIG, batch=BATCH, stack=stack, history_layers=n)
    if stack == "published":
        fn = lambda: models["published"].sample(noise, y)
    else:
        fn = lambda: models["ard"].sample(noise, y, use_cuda_graphs=stack == "graphs")
    _timed(benchmark, fn)


def test_flop_model_analytic(benchmark):
    from ard_kernels import flops

    benchmark.group = "flops"
    r = benchmark(lambda: flops.report("DiT-XL/2", 6, 4, measure=False))
    assert 1.1 <= r["overhead_percent_analytic"] <= 1.2
