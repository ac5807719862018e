// A host stand-in for <cuda_runtime.h>, just wide enough for csrc/kv_cache.cu: with it, g++ compiles
// the kernels as plain functions and ARD_LAUNCH_KERNEL calls one for every (block, thread) of the
// grid, serially. That is exact for kernels whose threads neither share memory nor synchronise,
// which is what the KV-cache copies are; a kernel that starts to need either must not be run here.
//
// Each launch is recorded (grid, threads), so the driver can check the launch geometry too.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// The vector types' sizes and alignments are what the kernels' 16/8-byte chunks rely on.
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
static_assert(sizeof(uint4) == 16 && sizeof(uint2) == 8, "chunk types must match CUDA's");

typedef struct CUstream_st* cudaStream_t;
typedef enum { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 } cudaError_t;

inline uint3 blockIdx, threadIdx;
inline dim3 gridDim, blockDim;

struct EmulatedLaunch { dim3 grid; unsigned threads; };
inline std::vector<EmulatedLaunch> emulated_launches;
inline cudaError_t emulated_error = cudaSuccess;

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { cudaError_t e = emulated_error; emulated_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid configuration argument"; }

// CUDA's limits on a launch: a bad grid fails the launch (reported by cudaGetLastError), as on a GPU.
#define ARD_LAUNCH_KERNEL(kernel, grid, threads, stream, ...)                                         \
  do {                                                                                              \
    const dim3 launch_grid_ = (grid);                                                               \
    const unsigned launch_threads_ = (threads);                                                     \
    (void)(stream);                                                                                 \
    emulated_launches.push_back({launch_grid_, launch_threads_});                                   \
    if (launch_grid_.x == 0 || launch_grid_.x > 2147483647u || launch_grid_.y == 0 ||               \
        launch_grid_.y > 65535u || launch_grid_.z == 0 || launch_grid_.z > 65535u ||                \
        launch_threads_ == 0 || launch_threads_ > 1024u) {                                          \
      emulated_error = cudaErrorInvalidConfiguration;                                               \
      break;                                                                                        \
    }                                                                                               \
    gridDim = launch_grid_;                                                                         \
    blockDim = dim3(launch_threads_);                                                               \
    for (unsigned bz_ = 0; bz_ < launch_grid_.z; ++bz_)                                             \
      for (unsigned by_ = 0; by_ < launch_grid_.y; ++by_)                                           \
        for (unsigned bx_ = 0; bx_ < launch_grid_.x; ++bx_)                                         \
          for (unsigned tx_ = 0; tx_ < launch_threads_; ++tx_) {                                    \
            blockIdx = uint3{bx_, by_, bz_};                                                        \
            threadIdx = uint3{tx_, 0, 0};                                                           \
            kernel(__VA_ARGS__);                                                                    \
          }                                                                                         \
  } while (0)
