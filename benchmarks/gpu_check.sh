#!/usr/bin/env bash
# GPU check for a CUDA machine without network: build, GPU tests, memcheck of the KV cache, benchmarks.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Uses the system python3 (torch with CUDA, triton, pytest, ninja, pybind11 preinstalled; no venv,
# no downloads). Each step runs under `timeout` with its log in OUTDIR/<step>.log; a failed step is
# recorded and the next one still runs; the script exits non-zero at the end if any step failed.
# The whole run is kept under GPU_CHECK_BUDGET_S seconds (default 470, i.e. < 8 minutes): each step
# gets min(its own limit, the time left). Results of the benchmarks land in OUTDIR/results.
set -uo pipefail

OUT="${1:?usage: gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
SUMMARY="$OUT/gpu_check_summary.txt"
: > "$SUMMARY"
FAILED=()

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# run_step NAME LIMIT_S CMD... : run CMD with a timeout of min(LIMIT_S, time left), log to OUT/NAME.log
run_step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 10 )); then
        log "SKIP $name (time budget of ${BUDGET}s spent)"; FAILED+=("$name(skipped)"); return 1
    fi
    (( limit > left )) && limit=$left
    log "START $name (limit ${limit}s): $*"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        log "OK    $name (${dt}s)"
    else
        (( rc == 124 || rc == 137 )) && log "TIMEOUT $name after ${dt}s" || log "FAIL  $name rc=$rc (${dt}s)"
        tail -n 30 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
        FAILED+=("$name")
    fi
    return $rc
}

{
    echo "date: $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$SUMMARY"

# 1. Build the CUDA extension in place (H100 only: sm_90 keeps the nvcc time down).
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-8}"
run_step build 150 env ARD_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
"$PY" -c "from ard_kernels import _ext; print('extension available:', _ext.extension_available(), _ext.extension_error())" \
    >> "$OUT/build.log" 2>&1 || true

# 2. The GPU tests (the cuda marker), then the KV-cache tests under compute-sanitizer memcheck.
run_step pytest_cuda 120 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"

SANITIZER="$(command -v compute-sanitizer || true)"
for cand in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    [[ -z "$SANITIZER" && -n "$cand" && -x "$cand/bin/compute-sanitizer" ]] && SANITIZER="$cand/bin/compute-sanitizer"
done
if [[ -n "$SANITIZER" ]]; then
    # PyTorch's caching allocator hides out-of-bounds accesses inside its pools; disable it here.
    run_step memcheck_kv_cache 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 --print-limit 20 "$PY" -m pytest tests/test_kv_cache.py -m cuda -q -p no:cacheprovider
    if [[ -f "$OUT/memcheck_kv_cache.log" ]] && ! grep -q "ERROR SUMMARY: 0 errors" "$OUT/memcheck_kv_cache.log"; then
        log "FAIL  memcheck_kv_cache: no 'ERROR SUMMARY: 0 errors' in the log"
        [[ " ${FAILED[*]} " == *" memcheck_kv_cache "* ]] || FAILED+=("memcheck_kv_cache")
    fi
else
    log "FAIL  memcheck_kv_cache: compute-sanitizer not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH)"
    FAILED+=("memcheck_kv_cache(no sanitizer)")
fi

# 3. The FLOP check (meta device, seconds).
run_step flops 60 "$PY" -m ard_kernels.flops --model DiT-XL/2 --history-layers 6 --steps 4 --json

# 4. Every benchmark at GPU sizes (run_all isolates failures and exits 1 if any failed).
run_step benchmarks 330 "$PY" benchmarks/run_all.py --gpu --out "$OUT/results"
[[ -f "$OUT/results/SUMMARY.md" ]] && cp "$OUT/results/SUMMARY.md" "$OUT/SUMMARY.md"

TOTAL=$(( $(date +%s) - START ))
if (( ${#FAILED[@]} )); then
    log "DONE in ${TOTAL}s: FAILED ${FAILED[*]}"
    exit 1
fi
log "DONE in ${TOTAL}s: all steps passed"
