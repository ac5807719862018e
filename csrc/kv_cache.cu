// History-KV-cache kernels: append a step's k, v into preallocated caches at a token offset, and
// split a QKV projection into q and the cache in one pass. See kv_cache.h for the contract.
//
// Both are pure copies, so they move bytes, not elements: every thread moves ILP chunks of
// sizeof(V) bytes (16 when the pointers allow it: 8 bf16/fp16 or 4 fp32 values), all loads issued
// before any store so that ILP 16-byte requests per thread are in flight. A head row (D values) is
// a whole number of chunks because D is a multiple of 8, so a chunk never straddles two heads.
// Indices are 32-bit (the launchers refuse more than 2^31 chunks); cache addresses are 64-bit.

#include <cuda_runtime.h>
#include <stdint.h>

#include "kv_cache.h"

// The one place with launch syntax. tests/csrc/ defines it first to run every grid point of these
// kernels on the host (their threads share nothing, so a serial run is exact) under AddressSanitizer.
#ifndef ARD_LAUNCH_KERNEL
#define ARD_LAUNCH_KERNEL(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int64_t kMaxChunks = (int64_t(1) << 31) - 1 - kThreads * kIlp;

// Where the new tokens go, read on the device; false when they would not fit (nothing may be written).
__device__ __forceinline__ bool write_position(const int64_t* offset, int64_t offset_host, int64_t n,
                                               int64_t capacity, int64_t* pos) {
  *pos = offset_host + (offset != nullptr ? *offset : 0);
  return *pos >= 0 && *pos + n <= capacity;
}

__device__ __forceinline__ void flag_overflow(int32_t* status) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *status = 1;
}

// grid.y = 0 copies k, 1 copies v. Source (rows, n·cd) chunks, destination (rows, capacity·cd).
template <typename V>
__global__ void __launch_bounds__(kThreads) kv_append_kernel(
    V* __restrict__ k_cache, V* __restrict__ v_cache, const V* __restrict__ k, const V* __restrict__ v,
    const int64_t* __restrict__ offset, int64_t offset_host, int32_t* __restrict__ status,
    uint32_t total, uint32_t row_chunks, uint32_t cd, int64_t n, int64_t capacity) {
  const V* __restrict__ src = blockIdx.y == 0 ? k : v;
  V* __restrict__ dst = blockIdx.y == 0 ? k_cache : v_cache;
  const uint32_t base = blockIdx.x * (kThreads * kIlp) + threadIdx.x;

  // The source loads first: they never depend on the offset, so their latency overlaps the offset's
  // (read from device memory by every block before its first store) instead of following it.
  V buf[kIlp];
#pragma unroll
  for (int i = 0; i < kIlp; ++i) {
    const uint32_t idx = base + i * kThreads;
    if (idx < total) buf[i] = __ldg(src + idx);
  }
  int64_t pos;
  if (!write_position(offset, offset_host, n, capacity, &pos)) {
    flag_overflow(status);
    return;
  }
  const int64_t cap_chunks = capacity * cd;
  const int64_t pos_chunks = pos * cd;
#pragma unroll
  for (int i = 0; i < kIlp; ++i) {
    const uint32_t idx = base + i * kThreads;
    if (idx < total) {
      const uint32_t row = idx / row_chunks;
      const uint32_t j = idx - row * row_chunks;
      dst[int64_t(row) * cap_chunks + pos_chunks + j] = buf[i];
    }
  }
}

// Reads follow qkv's memory order (b, t, s, h, c) so they are fully coalesced; each head's row
// of cd chunks lands contiguously in q (b, h, t) or in the cache (b, h, pos + t). Without q (WITH_Q
// false: the caller reads q where it lies, in qkv) only each token row's k and v chunks are visited,
// 2/3 of the bytes.
template <typename V, bool WITH_Q>
__global__ void __launch_bounds__(kThreads) qkv_split_append_kernel(
    const V* __restrict__ qkv, V* __restrict__ q, V* __restrict__ k_cache, V* __restrict__ v_cache,
    const int64_t* __restrict__ offset, int64_t offset_host, int32_t* __restrict__ status,
    uint32_t total, uint32_t cd, uint32_t heads, uint32_t n, int64_t capacity) {
  constexpr uint32_t kParts = WITH_Q ? 3 : 2;  // q, k, v or k, v chunks visited per token row
  const uint32_t hcd = heads * cd;
  const uint32_t row_chunks = kParts * hcd;
  const uint32_t base = blockIdx.x * (kThreads * kIlp) + threadIdx.x;

  // Loads before the offset, as in kv_append_kernel: the two latencies overlap.
  V buf[kIlp];
#pragma unroll
  for (int i = 0; i < kIlp; ++i) {
    const uint32_t idx = base + i * kThreads;
    if (idx >= total) continue;
    if (WITH_Q) {
      buf[i] = __ldg(qkv + idx);
    } else {  // skip each row's q chunks: chunk idx of the (k, v) runs is qkv's row·3·hcd + hcd + j
      const uint32_t row = idx / row_chunks;
      buf[i] = __ldg(qkv + (int64_t(row) * 3 + 1) * hcd + (idx - row * row_chunks));
    }
  }
  int64_t pos;
  const bool fits = write_position(offset, offset_host, n, capacity, &pos);
  if (!fits) flag_overflow(status);
#pragma unroll
  for (int i = 0; i < kIlp; ++i) {
    const uint32_t idx = base + i * kThreads;
    if (idx >= total) continue;
    const uint32_t row = idx / row_chunks;  // token row b·n + t
    const uint32_t j = idx - row * row_chunks + (WITH_Q ? 0 : hcd);  // chunk within qkv's row
    const uint32_t s = j / hcd;  // 0 q, 1 k, 2 v
    const uint32_t r = j - s * hcd;
    const uint32_t h = r / cd;
    const uint32_t c = r - h * cd;
    const uint32_t b = row / n;
    const uint32_t t = row - b * n;
    const int64_t bh = int64_t(b) * heads + h;
    if (WITH_Q && s == 0) {
      q[(bh * n + t) * cd + c] = buf[i];
    } else if (fits) {
      V* __restrict__ dst = s == 1 ? k_cache : v_cache;
      dst[(bh * capacity + pos + t) * cd + c] = buf[i];
    }
  }
}

// Widest chunk (16, 8, 4 or 2 bytes) that divides every address and the head row.
int chunk_bytes(int64_t head_bytes, const void* const* ptrs, int count) {
  int width = 16;
  for (; width > 2; width /= 2) {
    bool ok = head_bytes % width == 0;
    for (int i = 0; i < count && ok; ++i) ok = reinterpret_cast<uintptr_t>(ptrs[i]) % width == 0;
    if (ok) break;
  }
  return width;
}

// Runs fn on `device`, restoring the caller's current device; returns the launch error, if any.
template <typename Fn>
const char* launch_on(int device, Fn fn) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  fn();
  err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename V>
void append_typed(void* k_cache, void* v_cache, const void* k, const void* v, const int64_t* offset,
                  int64_t offset_host, int32_t* status, int64_t rows, int64_t n, int64_t capacity,
                  int64_t head_bytes, cudaStream_t stream) {
  const int64_t cd = head_bytes / int64_t(sizeof(V));
  const int64_t total = rows * n * cd;
  const unsigned blocks = unsigned((total + kThreads * kIlp - 1) / (kThreads * kIlp));
  ARD_LAUNCH_KERNEL(kv_append_kernel<V>, dim3(blocks, 2), kThreads, stream,
      static_cast<V*>(k_cache), static_cast<V*>(v_cache), static_cast<const V*>(k), static_cast<const V*>(v),
      offset, offset_host, status, uint32_t(total), uint32_t(n * cd), uint32_t(cd), n, capacity);
}

template <typename V>
void split_typed(const void* qkv, void* q, void* k_cache, void* v_cache, const int64_t* offset,
                 int64_t offset_host, int32_t* status, int64_t batch, int64_t n, int64_t heads,
                 int64_t capacity, int64_t head_bytes, cudaStream_t stream) {
  const int64_t cd = head_bytes / int64_t(sizeof(V));
  const int64_t total = batch * n * (q != nullptr ? 3 : 2) * heads * cd;
  const unsigned blocks = unsigned((total + kThreads * kIlp - 1) / (kThreads * kIlp));
  // A pointer to the instantiation: its template arguments' comma would split the macro's arguments.
  const auto kernel = q != nullptr ? qkv_split_append_kernel<V, true> : qkv_split_append_kernel<V, false>;
  ARD_LAUNCH_KERNEL(kernel, dim3(blocks), kThreads, stream,
      static_cast<const V*>(qkv), static_cast<V*>(q), static_cast<V*>(k_cache), static_cast<V*>(v_cache),
      offset, offset_host, status, uint32_t(total), uint32_t(cd), uint32_t(heads), uint32_t(n), capacity);
}

const char* kTooLarge = "kv cache kernels index at most 2^31 chunks of 16 bytes per launch; split the batch";

}  // namespace

extern "C" const char* ard_kv_append_launch(void* k_cache, void* v_cache, const void* k, const void* v,
                                            const int64_t* offset, int64_t offset_host, int32_t* status,
                                            int64_t rows, int64_t n, int64_t capacity, int64_t head_bytes,
                                            int device, int64_t stream) {
  if (rows == 0 || n == 0) return nullptr;
  const void* ptrs[4] = {k_cache, v_cache, k, v};
  const int width = chunk_bytes(head_bytes, ptrs, 4);
  if (rows * n * (head_bytes / width) > kMaxChunks) return kTooLarge;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return launch_on(device, [&] {
    switch (width) {
      case 16: append_typed<uint4>(k_cache, v_cache, k, v, offset, offset_host, status, rows, n, capacity, head_bytes, s); break;
      case 8: append_typed<uint2>(k_cache, v_cache, k, v, offset, offset_host, status, rows, n, capacity, head_bytes, s); break;
      case 4: append_typed<unsigned int>(k_cache, v_cache, k, v, offset, offset_host, status, rows, n, capacity, head_bytes, s); break;
      default: append_typed<unsigned short>(k_cache, v_cache, k, v, offset, offset_host, status, rows, n, capacity, head_bytes, s);
    }
  });
}

extern "C" const char* ard_qkv_split_append_launch(const void* qkv, void* q, void* k_cache, void* v_cache,
                                                   const int64_t* offset, int64_t offset_host, int32_t* status,
                                                   int64_t batch, int64_t n, int64_t heads, int64_t capacity,
                                                   int64_t head_bytes, int device, int64_t stream) {
  if (batch == 0 || n == 0 || heads == 0) return nullptr;
  const void* ptrs[4] = {qkv, k_cache, v_cache, q};  // q last: it may be absent
  const int width = chunk_bytes(head_bytes, ptrs, q != nullptr ? 4 : 3);
  if (batch * n * 3 * heads * (head_bytes / width) > kMaxChunks) return kTooLarge;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return launch_on(device, [&] {
    switch (width) {
      case 16: split_typed<uint4>(qkv, q, k_cache, v_cache, offset, offset_host, status, batch, n, heads, capacity, head_bytes, s); break;
      case 8: split_typed<uint2>(qkv, q, k_cache, v_cache, offset, offset_host, status, batch, n, heads, capacity, head_bytes, s); break;
      case 4: split_typed<unsigned int>(qkv, q, k_cache, v_cache, offset, offset_host, status, batch, n, heads, capacity, head_bytes, s); break;
      default: split_typed<unsigned short>(qkv, q, k_cache, v_cache, offset, offset_host, status, batch, n, heads, capacity, head_bytes, s);
    }
  });
}
