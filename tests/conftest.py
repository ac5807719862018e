"""Shared test set-up: the Triton interpreter on CPU-only machines, the ``cuda`` marker, seeds.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is decided here, at
the top of the first module pytest imports, before the tests import ard_kernels.ops.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not a parameter id that happens to read "cuda"
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def triton_device():
    """The device the Triton kernels run on here: CUDA, or the CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA and not INTERPRETED else "cpu")


@pytest.fixture(params=["fused", "split"])
def row_bwd_plan(request, monkeypatch):
    """Each plan of the row ops' backwards in turn (``ARD_KERNELS_ROW_BWD``): one kernel that also sums the
    per-block columns, or dx alone then the column-parallel sums (:func:`ard_kernels.ops._rows.row_backward_plan`)."""
    monkeypatch.setenv("ARD_KERNELS_ROW_BWD", request.param)
    return request.param


@pytest.fixture(params=["exact", "padded"])
def row_remainder(request, monkeypatch):
    """Each remainder width of the whole-row kernels in turn (:func:`ard_kernels.ops._rows.remainder_configs`): the
    row's rest as its own narrow tile, or padded to the main tile's width (its layout). The interpreter runs
    ``configs[0]``, so the padded kernels run here only when forced."""
    from ard_kernels.ops import _rows

    monkeypatch.setattr(_rows, "_ROW_REMAINDER", request.param)
    return request.param


@pytest.fixture(scope="session")
def cuda_torch_tree(tmp_path_factory):
    """A copy of the package whose CUDA extension is built against the GPU machines' CUDA torch 2.11
    (``.venv-gpu-stack``; built once per session, ~20 s): run it with that venv's python."""
    from _gpu_stack import build_extension_tree

    return build_extension_tree(tmp_path_factory.mktemp("cuda-torch-tree"))


@pytest.fixture
def cuda_extension():
    """The compiled KV-cache extension, for tests that exercise it on a GPU.

    On a GPU machine a missing or unloadable extension fails these tests, naming why (a skip would let
    `pytest -m cuda` pass with the kernels never run); ARD_KERNELS_BUILD_CUDA=0 says it was left out on
    purpose, and skips them.
    """
    from ard_kernels import _ext

    if _ext.extension_available():
        return _ext
    reason = f"CUDA extension ard_kernels._C not loaded: {_ext.extension_error()}"
    if HAS_CUDA and os.environ.get("ARD_KERNELS_BUILD_CUDA") != "0":
        pytest.fail(f"{reason} (build it: pip install -e . or python setup.py build_ext --inplace; "
                    f"ARD_KERNELS_BUILD_CUDA=0 skips these tests)")
    pytest.skip(reason)
