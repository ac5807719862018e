"""The GPU machines' software stack on this machine: its python, environment, and a source tree whose
CUDA extension is built against its CUDA torch (tests/test_gpu_stack.py says why; used there, by
tests/test_aot_compile.py and tests/test_op_census.py).
"""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_VENV_PYTHON = ROOT / ".venv-gpu-stack" / "bin" / "python"
TORCH, CUDA, TRITON = "2.11.", "13.", "3.6."


def skip_or_fail(reason):
    """Skip, except under `make test` (ARD_KERNELS_REQUIRE_TEST_DEPS=1), which provides what is missing."""
    if os.environ.get("ARD_KERNELS_REQUIRE_TEST_DEPS") == "1":
        pytest.fail(f"{reason} (ARD_KERNELS_REQUIRE_TEST_DEPS=1: required under make test)")
    pytest.skip(reason)


@functools.cache
def _versions(python):
    code = "import json, torch, triton; print(json.dumps([torch.__version__, torch.version.cuda, triton.__version__]))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=gpu_stack_env(), timeout=300)
    assert proc.returncode == 0, f"{python} cannot import torch and triton: {proc.stderr[-3000:]}"
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def gpu_stack_python():
    """The GPU-stack venv's python (ARD_KERNELS_GPU_STACK_PYTHON, else .venv-gpu-stack), versions checked."""
    python = os.environ.get("ARD_KERNELS_GPU_STACK_PYTHON")
    if not python and LOCAL_VENV_PYTHON.exists():
        python = str(LOCAL_VENV_PYTHON)  # `make test` built it here
    if not python:
        skip_or_fail("no GPU-stack venv: `make test` builds .venv-gpu-stack (or set ARD_KERNELS_GPU_STACK_PYTHON)")
    assert os.path.exists(python), f"ARD_KERNELS_GPU_STACK_PYTHON={python} does not exist"
    torch_version, cuda, triton_version = _versions(python)
    assert torch_version.startswith(TORCH) and (cuda or "").startswith(CUDA) and triton_version.startswith(TRITON), (
        f"{python} has torch {torch_version} (CUDA {cuda}) and triton {triton_version}; the GPU machines run "
        f"torch {TORCH}x+cu130 and triton {TRITON}x"
    )
    return python


def gpu_stack_env(**extra):
    """This process's environment less what only this venv's tests set (the Triton interpreter, the
    test-dependency requirement, its PYTHONPATH), plus ``extra``."""
    drop = ("TRITON_INTERPRET", "ARD_KERNELS_REQUIRE_TEST_DEPS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def cuda_home():
    spec = importlib.util.spec_from_file_location("ard_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by `if __name__ == "__main__"`: defines only
    return module.find_cuda_home()


def build_extension_tree(dest: Path) -> Path:
    """A copy of the package and csrc/ under ``dest`` with ard_kernels._C built against the GPU-stack torch
    (out of tree: this venv's in-place _C*.so, built against its CPU torch, stays). Returns ``dest``."""
    python = gpu_stack_python()
    if cuda_home() is None:
        skip_or_fail("no nvcc (CUDA toolkit) to build the extension with")
    shutil.copytree(ROOT / "ard_kernels", dest / "ard_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", dest / "csrc")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    # ninja from the venv, where the machine has none on PATH (torch's build looks it up there).
    path = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
    env = gpu_stack_env(ARD_KERNELS_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2", PATH=path)
    build = subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (build.stdout[-2000:], build.stderr[-4000:])
    return dest
