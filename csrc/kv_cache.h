// Launchers of the history-KV-cache kernels (kv_cache.cu), shared with the op bindings.
//
// This header includes neither torch nor CUDA: the bindings (kv_cache_ops.cpp) are compiled by
// the host compiler against whatever torch is installed, CPU-only builds included, and the
// kernels by nvcc without torch. Everything crosses the boundary as raw pointers and sizes.
//
// The kernels copy raw bytes: a token row of one head is `head_bytes` = D · element size bytes,
// so one kernel serves bf16, fp16 and fp32. Write position pos = offset_host + (offset ? *offset
// : 0), read on the device so that one captured CUDA graph serves every step. When pos < 0 or
// pos + n > capacity the caches are left untouched and status[0] is set to 1 (never cleared here).
//
// Each launcher returns nullptr on success, else a static message (a CUDA error string or a
// size-limit explanation).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// k_cache, v_cache: (rows, capacity, head_bytes) with rows = B·H; k, v: (rows, n, head_bytes).
const char* ard_kv_append_launch(void* k_cache, void* v_cache, const void* k, const void* v,
                                 const int64_t* offset, int64_t offset_host, int32_t* status,
                                 int64_t rows, int64_t n, int64_t capacity, int64_t head_bytes,
                                 int device, int64_t stream);

// qkv: (batch, n, 3, heads, head_bytes); q: (batch, heads, n, head_bytes) or nullptr (only k and v are
// appended: 2/3 of the bytes, for callers that read q in place in qkv);
// k_cache, v_cache: (batch, heads, capacity, head_bytes). q is written even on overflow.
const char* ard_qkv_split_append_launch(const void* qkv, void* q, void* k_cache, void* v_cache,
                                        const int64_t* offset, int64_t offset_host, int32_t* status,
                                        int64_t batch, int64_t n, int64_t heads, int64_t capacity,
                                        int64_t head_bytes, int device, int64_t stream);

#ifdef __cplusplus
}
#endif
