"""The benchmark suite runs only when asked: ``pytest --benchmark-only`` (or ``pytest benchmarks --benchmark-only``).

``testpaths`` names benchmarks/ so that the bare command finds this suite; without the flag a plain
``pytest`` would time DiT-XL/2 on a GPU machine, so its benchmarks are skipped then.
"""

import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run with pytest --benchmark-only")
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents and "benchmark" in item.fixturenames:
            item.add_marker(skip)
