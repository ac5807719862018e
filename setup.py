"""Build of ard_kernels: the Python package, plus the optional CUDA extension ``ard_kernels._C``.

The extension (csrc/) is built when nvcc is found; ARD_KERNELS_BUILD_CUDA=1 forces it (a failure
is then an error), =0 skips it. One build path serves a CPU-only torch (CI: compiled and imported,
its ops refuse CPU tensors) and a CUDA torch alike, because torch's CUDAExtension needs a CUDA torch:

1. nvcc compiles the kernels (csrc/*.cu, no torch headers) to position-independent objects, with
   one -gencode per entry of TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX") and MAX_JOBS threads;
2. a CppExtension compiles the op bindings (csrc/*.cpp: torch/library.h, no CUDA headers) with
   ninja and links them with those objects and the static CUDA runtime.

Development install: ``pip install --no-build-isolation -e .`` (the .so lands in ard_kernels/);
wheel: ``pip wheel --no-build-isolation --no-deps -w dist .``.

A compiled extension is bound to the torch it was built against (its C++ ABI changes between
minor versions), so a build with it carries that torch in its version's local tag (``0.1.0+pt211cu130``:
torch 2.11, CUDA 13.0; ``+pt213cpu`` for a CPU torch), requires that torch minor, and writes
``ard_kernels/_C.build.json`` beside the module (torch, CUDA, archs), from which
:mod:`ard_kernels._ext` explains a mismatch instead of an opaque undefined symbol.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def read_version():
    """``__version__`` read textually from ard_kernels/__init__.py (importing it would need torch)."""
    init = ROOT / "ard_kernels" / "__init__.py"
    text = init.read_text() if init.exists() else ""
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    return match.group(1) if match else "0.1.0"


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, else the real location of ``nvcc`` on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return default if (default / "bin" / "nvcc").exists() else None
    nvcc_path = Path(nvcc).resolve()
    home = nvcc_path.parent.parent
    if (home / "include" / "cuda_runtime.h").exists():
        return home
    # A wrapper script on PATH (e.g. /usr/local/bin/nvcc): fall back to the conventional root.
    for candidate in (Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)):
        if (candidate / "bin" / "nvcc").exists():
            return candidate
    return None


def torch_build_tag():
    """``("pt211cu130", "torch==2.11.*")``: the local version tag and requirement of a build against this torch."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = torch.version.cuda
    return f"pt{major}{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu"), f"torch=={major}.{minor}.*"


def build_info(archs: str) -> dict:
    """What the extension is bound to, written beside it as ``_C.build.json``."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "archs": archs,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "python": ".".join(map(str, sys.version_info[:2]))}


def gencode_flags(arch_list):
    """``"8.0;9.0+PTX"`` -> -gencode flags: machine code for each arch, PTX for those marked +PTX."""
    flags = []
    for entry in re.split(r"[;\s,]+", arch_list.strip()):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        num = entry.removesuffix("+PTX")
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", num)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {entry!r} (expected e.g. '8.0', '9.0a', '9.0+PTX')")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def want_cuda():
    """True/False from ARD_KERNELS_BUILD_CUDA, else whether a CUDA toolkit is found."""
    flag = os.environ.get("ARD_KERNELS_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return find_cuda_home() is not None


def cuda_extensions():
    """The ``ard_kernels._C`` extension and the build command class, or ([], {}) when skipped."""
    if not want_cuda():
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("ARD_KERNELS_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # Under pip's build isolation torch is absent: build the pure-Python package unless forced.
        if os.environ.get("ARD_KERNELS_BUILD_CUDA", "").strip() == "1":
            raise
        print("ard_kernels: torch is not importable here (use pip --no-build-isolation); skipping the CUDA "
              "extension", file=sys.stderr)
        return [], {}

    lib_dir = next((cuda_home / d for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                    if (cuda_home / d / "libcudart_static.a").exists()), cuda_home / "lib64")

    class BuildWithNvcc(BuildExtension):
        """Compiles each extension's ``cuda_sources`` with nvcc first, then links them in."""

        def build_extensions(self):
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + [
                    self._nvcc(Path(src)) for src in getattr(ext, "cuda_sources", [])
                ]
            super().build_extensions()
            for ext in self.extensions:  # beside the built module (a wheel packs it)
                self._write_build_info(Path(self.get_ext_fullpath(ext.name)).with_name("_C.build.json"))

        def run(self):
            super().run()
            # In-place and editable builds: setuptools builds in build/ and copies only the modules into the
            # source tree, so the record goes there too (else a stale one would describe a new module).
            if self.inplace or getattr(self, "editable_mode", False):
                for ext in self.extensions:
                    self._write_build_info(ROOT.joinpath(*ext.name.split(".")[:-1], "_C.build.json"))

        @staticmethod
        def _write_build_info(path):
            info = build_info(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
            path.write_text(json.dumps(info, indent=1) + "\n")

        def _nvcc(self, src):
            obj = Path(self.build_temp).resolve() / "cuda" / (src.stem + ".cu.o")
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
            jobs = os.environ.get("MAX_JOBS", "1")
            flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode_flags(archs)]
            nvcc = str(cuda_home / "bin" / "nvcc")
            # The object is reused only if it was compiled from these sources by this nvcc with these
            # flags: a build for other archs (TORCH_CUDA_ARCH_LIST) must not slip into a wheel for all.
            stamp = obj.with_suffix(".o.cmd")
            recipe = " ".join([nvcc, *flags])
            deps = [src, *CSRC.glob("*.h")]
            if (obj.exists() and stamp.exists() and stamp.read_text() == recipe
                    and all(obj.stat().st_mtime >= d.stat().st_mtime for d in deps)):
                return str(obj)
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *flags, "--threads", jobs]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd, cwd=ROOT)
            stamp.write_text(recipe)
            return str(obj)

    ext = CppExtension(
        name="ard_kernels._C",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))],
        include_dirs=[str(CSRC)],
        library_dirs=[str(lib_dir)],
        # The static runtime makes the module self-contained: it imports without any CUDA library
        # installed (CI) and loads only the driver, lazily, at its first launch.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3"],
    )
    ext.cuda_sources = sorted(CSRC.glob("*.cu"))
    return [ext], {"build_ext": BuildWithNvcc.with_options(use_ninja=True)}


def main():
    ext_modules, cmdclass = ([], {}) if sys.platform in ("darwin", "win32") else cuda_extensions()
    version, torch_requirement = read_version(), "torch>=2.11"
    if ext_modules:  # bound to this torch: say which in the version, require it
        tag, torch_requirement = torch_build_tag()
        version = f"{version}+{tag}"
    setup(
        name="ard_kernels",
        version=version,
        description="Triton/CUDA kernels and a thin PyTorch model for AutoRegressive Distillation of DiTs",
        packages=find_packages(include=["ard_kernels*"]),
        python_requires=">=3.10",
        install_requires=[torch_requirement, "triton>=3.6; sys_platform == 'linux'", "numpy"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
