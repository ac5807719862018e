"""The GPU machines' software stack, checked without a GPU: torch 2.11.0+cu130 and triton 3.6.0.

This venv (tests and package here) runs a newer CPU torch and Triton; what breaks only under the GPU
machines' versions would otherwise show first there. `make test` builds `.venv-gpu-stack` with that
stack and only packages the GPU machines' image also has (no diffusers), and points
ARD_KERNELS_GPU_STACK_PYTHON at it. Its python, in subprocesses: builds the CUDA extension against
the CUDA torch and loads it; collects the `-m cuda` tests, what the GPU machines run. Every kernel
compiled by triton 3.6 for sm_90: tests/test_aot_compile.py, with :func:`gpu_stack_python`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _gpu_stack import ROOT, cuda_home, gpu_stack_env, gpu_stack_python, skip_or_fail
from _gpu_stack import TORCH as TORCH_PREFIX


@pytest.mark.slow
def test_extension_builds_against_cuda_torch_and_loads(cuda_torch_tree):
    """ard_kernels._C builds against the CUDA torch 2.11 and loads in it; built in a copy of the sources
    (the ``cuda_torch_tree`` fixture), so the in-place ard_kernels/_C*.so of this venv's torch stays."""
    python, src = gpu_stack_python(), cuda_torch_tree
    code = (
        "import json, torch\n"
        "import ard_kernels, ard_kernels._C\n"
        "from ard_kernels import _ext\n"
        "out = {'files': [ard_kernels.__file__, ard_kernels._C.__file__], 'available': _ext.extension_available(),\n"
        "       'ops': [hasattr(torch.ops.ard_kernels, op)\n"
        "               for op in ('kv_append', 'qkv_split_append', 'qkv_append')]}\n"
        "kc, status = torch.zeros(1, 2, 8, 8), torch.zeros(1, dtype=torch.int32)\n"
        "try:\n"
        "    torch.ops.ard_kernels.kv_append(kc, kc.clone(), kc[:, :, :2].clone(), kc[:, :, :2].clone(), None, 0,\n"
        "                                    status, 0)\n"
        "    out['cpu'] = 'accepted'\n"
        "except RuntimeError as e:\n"
        "    out['cpu'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([python, "-c", code], cwd=src, env=gpu_stack_env(PYTHONPATH=str(src)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(Path(f).resolve().is_relative_to(src.resolve()) for f in out["files"]), out["files"]
    assert out["available"], proc.stderr[-4000:]
    assert out["ops"] == [True, True, True], out
    assert "expected CUDA tensors" in out["cpu"], out["cpu"]
    # The in-place build records the torch it binds; this venv's (CPU) torch then names the mismatch.
    assert json.loads((src / "ard_kernels" / "_C.build.json").read_text())["torch"].startswith(TORCH_PREFIX)
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from ard_kernels import _ext\n"
            "    print(_ext.extension_available(), [str(w.message) for w in caught])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, env=gpu_stack_env(PYTHONPATH=str(src)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("False"), proc.stdout + proc.stderr[-2000:]
    assert f"built against torch {TORCH_PREFIX}" in proc.stdout and "this is torch" in proc.stdout, proc.stdout


def test_cuda_tests_collect_under_the_gpu_stack():
    """`pytest -m cuda tests`, what the GPU machines run, collects there: no test module imports something
    torch 2.11 / triton 3.6 lack, or a package their image does not have. TRITON_INTERPRET=0 defines the
    kernels for compiling, as on a GPU (without a GPU here conftest.py would turn the interpreter on)."""
    python = gpu_stack_python()
    proc = subprocess.run(
        [python, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, env=gpu_stack_env(PYTHONPATH=str(ROOT), TRITON_INTERPRET="0"), capture_output=True, text=True,
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    collected = [line for line in lines if line.startswith("tests/") and "::" in line]
    report = "\n".join(line for line in lines if line not in collected)  # the errors, not the test ids
    assert proc.returncode == 0, f"`pytest -m cuda` fails to collect there:\n{report[-8000:]}\n{proc.stderr[-2000:]}"
    assert len(collected) > 100, f"only {len(collected)} cuda tests collected:\n{report[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["this venv (CPU torch)", "GPU stack (CUDA torch 2.11)"])
def test_cmake_builds_the_extension(stack, tmp_path):
    """CMakeLists.txt builds ard_kernels._C against a CPU torch and against a CUDA torch, and the module loads."""
    import sys

    python = sys.executable if stack.startswith("this") else gpu_stack_python()
    cmake, ninja = shutil.which("cmake"), os.path.join(os.path.dirname(python), "ninja")
    if cmake is None or cuda_home() is None:
        skip_or_fail("cmake and nvcc are needed to build the extension with CMake")
    if not os.path.exists(ninja):
        ninja = shutil.which("ninja") or ninja
    build = tmp_path / "build"
    env = gpu_stack_env()
    configure = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                                f"-DPython_EXECUTABLE={python}", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                                "-DCMAKE_CUDA_ARCHITECTURES=90"], capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    # find_package(Torch) where it configures: always for a CPU torch; for a CUDA torch only with the CUDA
    # libraries it was built with in the toolkit, else (a minimal toolkit) torch's paths, saying why.
    found = "ard_kernels: torch from find_package(Torch)" in configure.stdout
    if stack.startswith("this"):
        assert found, configure.stdout[-3000:]
    else:
        assert found or ("find_package(Torch) fails here (CMake Error" in configure.stdout
                         and "torch from its reported paths" in configure.stdout), configure.stdout[-3000:]
    compiled = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True, env=env, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    (module,) = build.glob("_C*.so")
    pkg = tmp_path / "src" / "ard_kernels"
    shutil.copytree(ROOT / "ard_kernels", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy2(module, pkg / module.name)
    code = ("import torch, ard_kernels._C as m; from ard_kernels import _ext\n"
            "assert _ext.extension_available(), _ext.extension_error()\n"
            "print(m.__file__, torch.ops.ard_kernels.qkv_split_append, torch.ops.ard_kernels.kv_append)\n")
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, env=gpu_stack_env(PYTHONPATH=str(tmp_path / "src")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and str(pkg) in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_a_wheel_for_the_gpu_machines_torch(cuda_torch_tree, tmp_path):
    """A wheel built with the GPU stack's python is versioned ``+pt211cu130``, requires torch 2.11, and once
    installed (nothing else on the path) its extension loads in that torch and says what it was built with."""
    python = gpu_stack_python()
    path = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
    env = gpu_stack_env(ARD_KERNELS_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2", PATH=path)
    build = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path / "dist"), str(cuda_torch_tree)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "+pt211cu130-" in wheel.name, wheel.name
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                              str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import json, torch, importlib.metadata as md\n"
            "from ard_kernels import _ext\n"
            "print(json.dumps({'file': _ext.__file__, 'available': _ext.extension_available(),\n"
            "                  'info': _ext.build_info(), 'requires': md.requires('ard_kernels')}))\n")
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, env=gpu_stack_env(PYTHONPATH=str(tmp_path / "site")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to((tmp_path / "site").resolve()), out["file"]
    assert out["available"] and out["info"]["torch"].startswith("2.11.") and out["info"]["torch_cuda"].startswith("13.")
    assert any(r.startswith("torch==2.11.*") for r in out["requires"]), out["requires"]
