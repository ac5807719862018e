"""The CUDA kernels of csrc/kv_cache.cu, run on the host: index math, bounds, alignment, geometry.

On a machine without a GPU the kernels can only be compiled, never run. But they are pure copies
whose threads share nothing, so a host compiler can run them exactly: tests/csrc/cuda_host/ stands
in for the CUDA runtime and runs every (block, thread) of each launch in turn, and
tests/csrc/kv_cache_host_test.cpp checks every byte of every output against a loop written from the
contract in kv_cache.h. It is built with AddressSanitizer and UBSan over exact-size allocations, so
a byte read or written past any tensor, or a misaligned 16-byte access, fails the run.

The mutation tests below break the kernels in the ways a real bug would and require the harness to
notice, so that a harness which checks nothing cannot pass.
"""

import pathlib
import shutil
import subprocess

import pytest
from _gpu_stack import skip_or_fail

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "kv_cache.cu"
HARNESS = ROOT / "tests" / "csrc" / "kv_cache_host_test.cpp"
SHIM = ROOT / "tests" / "csrc" / "cuda_host"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _compiler():
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        skip_or_fail("no C++ compiler (g++, c++ or clang++) to run the KV-cache kernels on the host")
    return cxx


def _build_and_run(tree, tmp_path, warnings_are_errors=True):
    """Compile the harness against the kernels under `tree` (a copy of csrc/ and tests/csrc/), run it."""
    exe = tmp_path / "kv_cache_host_test"
    warnings = ["-Wall", "-Wextra", "-Wno-unknown-pragmas"] + (["-Werror"] if warnings_are_errors else [])
    csrc_tests = tree / "tests" / "csrc"
    cmd = [_compiler(), "-std=c++17", "-O1", "-g", *SANITIZE, *warnings,
           "-I", str(csrc_tests / "cuda_host"), str(csrc_tests / "kv_cache_host_test.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "asan" in build.stderr.lower():
        skip_or_fail(f"the C++ compiler has no AddressSanitizer runtime: {build.stderr[-500:]}")
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stderr[-4000:]}"
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)


def _tree(tmp_path, kernels_source):
    tree = tmp_path / "tree"
    (tree / "csrc").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "kv_cache.h", tree / "csrc")
    (tree / "csrc" / "kv_cache.cu").write_text(kernels_source)
    shutil.copytree(SHIM, tree / "tests" / "csrc" / "cuda_host")
    shutil.copy(HARNESS, tree / "tests" / "csrc")
    return tree


def test_kernels_match_the_contract_under_sanitizers(tmp_path):
    run = _build_and_run(_tree(tmp_path, KERNELS.read_text()), tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "kv_cache host emulation:" in out and "cases passed" in out, out[-2000:]
    cases = int(out.split("kv_cache host emulation:")[1].split("cases")[0])
    assert cases >= 300, out  # both ops, 2 element sizes × 7 head dims × offsets, alignments, overflows


# (name, text in kv_cache.cu, its broken replacement, what must catch it)
MUTANTS = [
    ("append writes one token late", "pos_chunks + j] = buf[i]", "pos_chunks + j + cd] = buf[i]", "AddressSanitizer"),
    ("bounds let one token past the capacity", "*pos + n <= capacity;", "*pos + n <= capacity + 1;",
     "AddressSanitizer"),
    ("16-byte chunks on misaligned pointers", "ok = reinterpret_cast<uintptr_t>(ptrs[i]) % width == 0;", "ok = true;",
     "misaligned"),
    ("the tail reads one chunk past qkv", "buf[i] = __ldg(qkv + idx);", "buf[i] = __ldg(qkv + idx + 1);",
     "AddressSanitizer"),
    ("without q, the k and v runs read from q's chunks", "(int64_t(row) * 3 + 1) * hcd", "(int64_t(row) * 3) * hcd",
     "without q"),
    ("without q, the q chunks visited too", "constexpr uint32_t kParts = WITH_Q ? 3 : 2;",
     "constexpr uint32_t kParts = 3;", "without q"),
    ("a stray write in front of a misaligned cache (8-byte path)",
     "      dst[int64_t(row) * cap_chunks + pos_chunks + j] = buf[i];\n",
     "      dst[int64_t(row) * cap_chunks + pos_chunks + j] = buf[i];\n"
     "      if (sizeof(V) == 8 && idx == 0) dst[-1] = buf[i];\n", "wrote in front of a cache"),
    ("k and v swapped", "V* __restrict__ dst = s == 1 ? k_cache : v_cache;",
     "V* __restrict__ dst = s == 1 ? v_cache : k_cache;", "FAILED at case"),
    ("q in token-major order", "q[(bh * n + t) * cd + c]", "q[((int64_t(b) * n + t) * heads + h) * cd + c]",
     "FAILED at case"),
    ("one block too few", "(total + kThreads * kIlp - 1) / (kThreads * kIlp));\n  ARD_LAUNCH_KERNEL(kv_append",
     "total / (kThreads * kIlp));\n  ARD_LAUNCH_KERNEL(kv_append", "FAILED at case"),
]


@pytest.mark.parametrize("name,text,broken,caught_by", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_harness_catches_a_broken_kernel(tmp_path, name, text, broken, caught_by):
    source = KERNELS.read_text()
    assert source.count(text) == 1, f"mutant {name!r}: its text is no longer in kv_cache.cu, update MUTANTS"
    # a mutant may leave a parameter unused: its warnings are not the point
    run = _build_and_run(_tree(tmp_path, source.replace(text, broken)), tmp_path, warnings_are_errors=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0, f"mutant {name!r} passed the harness:\n{out[-2000:]}"
    assert caught_by in out, f"mutant {name!r} failed, but not through {caught_by!r}:\n{out[-2000:]}"
