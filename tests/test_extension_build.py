"""The optional CUDA extension ard_kernels._C: built wherever nvcc exists, importable, and its ops
refuse CPU tensors clearly. Runs on CPU-only machines (CI compiles it against the CPU torch).
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ard_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("ard_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by `if __name__ == "__main__"`: defines only
    return module


SETUP = _setup_module()
BUILD_EXPECTED = SETUP.want_cuda()
needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason="ard_kernels._C not built")


def _python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not BUILD_EXPECTED, reason="no nvcc here, or ARD_KERNELS_BUILD_CUDA=0")
def test_extension_is_built_where_nvcc_exists():
    assert _ext.extension_available(), (
        f"nvcc is installed but ard_kernels._C does not import ({_ext.extension_error()}); "
        "build it with `pip install --no-build-isolation -e .` (make install)"
    )
    assert (_ext.build_info() or {}).get("torch") == torch.__version__, _ext.build_info()


def test_a_torch_mismatch_is_explained():
    """An extension built against another torch fails to import with an undefined symbol: the warning
    says which torch it was built against, from the build record beside it."""
    said = _ext.torch_mismatch({"torch": "2.13.0+cpu"}, "2.11.0+cu130")
    assert "built against torch 2.13.0+cpu" in said and "this is torch 2.11.0+cu130" in said
    assert _ext.torch_mismatch({"torch": "2.11.0+cu130"}, "2.11.0+cu130") == ""
    assert _ext.torch_mismatch(None) == "" and _ext.torch_mismatch({}) == ""


def test_build_tag_names_the_torch_the_extension_binds():
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    assert SETUP.torch_build_tag() == (f"pt{major}{minor}{device}", f"torch=={major}.{minor}.*")


@pytest.mark.slow
@pytest.mark.skipif(not BUILD_EXPECTED, reason="no nvcc here, or ARD_KERNELS_BUILD_CUDA=0")
def test_wheel_carries_the_extension_and_the_torch_it_binds(tmp_path):
    """`make wheel`'s command: a wheel with the compiled module and its build record, versioned
    ``<version>+pt<torch minor><cuda|cpu>`` and requiring that torch minor."""
    env = dict(os.environ, MAX_JOBS="2", TORCH_CUDA_ARCH_LIST="9.0")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=900, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    tag, requirement = SETUP.torch_build_tag()
    assert wheel.name.startswith(f"ard_kernels-{SETUP.read_version()}+{tag}-"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert any(n.startswith("ard_kernels/_C") and n.endswith(".so") for n in names), names
        info = json.loads(zf.read("ard_kernels/_C.build.json"))
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in zf.read(metadata).decode().splitlines() if line.startswith("Requires-Dist: torch")]
    assert info["torch"] == torch.__version__
    assert requires == [f"Requires-Dist: {requirement}"], requires


@needs_ext
@pytest.mark.parametrize("op", ["kv_append", "qkv_split_append", "qkv_append"])
def test_ops_refuse_cpu_tensors(op):
    kc = torch.zeros(1, 2, 8, 8)
    status = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=f"ard_kernels.{op}: expected CUDA tensors; use the PyTorch path"):
        if op == "kv_append":
            torch.ops.ard_kernels.kv_append(kc, kc.clone(), kc[:, :, :2].clone(), kc[:, :, :2].clone(), None, 0,
                                            status, 0)
        else:
            getattr(torch.ops.ard_kernels, op)(torch.zeros(1, 2, 48), kc, kc.clone(), None, 0, status, 2, 0)


# The bindings check shapes and dtypes before devices, so CPU tensors reach the messages that carry
# numbers (built without iostreams: see csrc/kv_cache_ops.cpp); the cuda twin runs them on the GPU.
@needs_ext
@pytest.mark.parametrize("case", ["num_heads", "qkv shape", "k shape", "head dim", "layout", "status", "dtype"])
def test_binding_messages_carry_the_numbers(case):
    kc = torch.zeros(1, 2, 16, 72)
    k = torch.zeros(1, 2, 2, 72)
    st = torch.zeros(1, dtype=torch.int32)
    ops = torch.ops.ard_kernels
    calls = {
        "num_heads": (lambda: ops.qkv_split_append(torch.zeros(1, 4, 432), kc, kc.clone(), None, 0, st, 3, 0),
                      "qkv_split_append: num_heads is 3, expected the cache's H = 2"),
        "qkv shape": (lambda: ops.qkv_append(torch.zeros(1, 4, 431), kc, kc.clone(), None, 0, st, 2, 0),
                      r"qkv_append: qkv must be \(B, n, 3·H·D\) = \(1, n, 432\), got \[1, 4, 431\]"),
        "k shape": (lambda: ops.kv_append(kc, kc.clone(), k[:, :1].contiguous(), k, None, 0, st, 0),
                    r"kv_append: k must be \(B, H, n, D\) = \(1, 2, n, 72\), got \[1, 1, 2, 72\]"),
        "head dim": (lambda: ops.kv_append(kc[..., :70].contiguous(), kc[..., :70].contiguous(),
                                           k[..., :70].contiguous(), k[..., :70].contiguous(), None, 0, st, 0),
                     "kv_append: head dim D must be a multiple of 8, got 70"),
        "layout": (lambda: ops.kv_append(kc.transpose(2, 3), kc.transpose(2, 3), k, k, None, 0, st, 0),
                   r"kv_append: k_cache must be contiguous \(shape \[1, 2, 72, 16\], strides \[2304, 1152, 1, 72\]\)"),
        "status": (lambda: ops.kv_append(kc, kc.clone(), k, k, None, 0, st.long(), 0),
                   r"kv_append: status must be a contiguous int32 tensor with at least 1 element, got Long of "
                   r"shape \[1\]"),
        "dtype": (lambda: ops.kv_append(kc, kc.clone(), k, k.double(), None, 0, st, 0),
                  "kv_append: v must be bfloat16, float16 or float32, got Double"),
    }
    call, match = calls[case]
    with pytest.raises(RuntimeError, match=match):
        call()


@needs_ext
def test_fake_implementations_give_shapes():
    kc = torch.empty(2, 4, 32, 72, device="meta", dtype=torch.bfloat16)
    qkv = torch.empty(2, 5, 3 * 4 * 72, device="meta", dtype=torch.bfloat16)
    status = torch.empty(1, dtype=torch.int32, device="meta")
    q = torch.ops.ard_kernels.qkv_split_append(qkv, kc, kc, None, 0, status, 4, 0)
    assert q.shape == (2, 4, 5, 72) and q.dtype == torch.bfloat16 and q.device.type == "meta"
    torch.ops.ard_kernels.kv_append(kc, kc, kc[:, :, :3], kc[:, :, :3], None, 0, status, 0)
    assert torch.ops.ard_kernels.qkv_append(qkv, kc, kc, None, 0, status, 4, 0) is None


@needs_ext
@pytest.mark.parametrize("python_first", [True, False])
def test_namespace_shared_with_python_custom_ops(python_first):
    """The C++ fragment and torch.library.custom_op ops live side by side in ``ard_kernels``."""
    define = (
        "@torch.library.custom_op('ard_kernels::_probe_py', mutates_args=())\n"
        "def probe(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
    )
    load = "import ard_kernels._C\n"
    code = "import torch\n" + (define + load if python_first else load + define) + (
        "assert torch.ops.ard_kernels._probe_py(torch.zeros(1)).item() == 1\n"
        "assert torch.ops.ard_kernels.qkv_split_append is not None\n"
        "import ard_kernels.ops\n"
        "print('ok')\n"
    )
    result = _python(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_import_never_fails_without_the_extension():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ard_kernels._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ard_kernels\n"
        "import warnings\n"
        "from ard_kernels import _ext\n"
        "from ard_kernels.kv_cache import HistoryKVCache\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not _ext.extension_available() and not _ext.extension_available()\n"
        "assert len(w) == 1, [str(x.message) for x in w]\n"
        "print(HistoryKVCache(1, 1, 1, 8, 2, 2).backend)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARD_KERNELS_BUILD_CUDA"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == "torch", result.stderr


@pytest.mark.parametrize(
    "arch_list,expected",
    [
        ("8.0;9.0+PTX", ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                         "arch=compute_90,code=compute_90"]),
        ("9.0a", ["arch=compute_90a,code=sm_90a"]),
        ("7.5 8.6", ["arch=compute_75,code=sm_75", "arch=compute_86,code=sm_86"]),
    ],
)
def test_arch_list_parsing(arch_list, expected):
    assert SETUP.gencode_flags(arch_list) == [f"-gencode={e}" for e in expected]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        SETUP.gencode_flags("sm_90")


@pytest.mark.slow
@pytest.mark.skipif(not BUILD_EXPECTED, reason="no nvcc here, or ARD_KERNELS_BUILD_CUDA=0")
def test_fresh_build_imports(tmp_path):
    """setup.py builds the extension from scratch (nvcc objects + C++ bindings) into a clean directory."""
    env = dict(os.environ, MAX_JOBS="2", TORCH_CUDA_ARCH_LIST="9.0")
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (so,) = (tmp_path / "lib" / "ard_kernels").glob("_C*.so")
    info = json.loads((so.parent / "_C.build.json").read_text())  # what the module is bound to, beside it
    assert info["torch"] == torch.__version__ and info["archs"] == "9.0" and info["torch_cuda"] == torch.version.cuda
    code = (
        "import torch\n"
        f"torch.ops.load_library({str(so)!r})\n"
        "kc = torch.zeros(1, 1, 4, 8)\n"
        "try:\n"
        "    torch.ops.ard_kernels.kv_append(kc, kc, kc, kc, None, 0, torch.zeros(1, dtype=torch.int32), 0)\n"
        "except RuntimeError as e:\n"
        "    print('refused' if 'expected CUDA tensors' in str(e) else e)\n"
    )
    result = _python(code)
    assert result.stdout.strip() == "refused", result.stderr
    # the same build directory, other archs: the nvcc object is rebuilt, not reused (a wheel for
    # 8.0;9.0+PTX must not carry a 9.0-only object from an earlier build)
    (obj,) = (tmp_path / "tmp").rglob("kv_cache.cu.o")
    stamp = obj.with_suffix(".o.cmd")
    assert "arch=compute_90" in stamp.read_text()
    env["TORCH_CUDA_ARCH_LIST"] = "8.0"
    again = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "arch=compute_80" in stamp.read_text() and "compute_90" not in stamp.read_text()
    assert json.loads((so.parent / "_C.build.json").read_text())["archs"] == "8.0"
