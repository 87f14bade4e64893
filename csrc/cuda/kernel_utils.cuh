// Helpers shared by the raw lrsparse kernels (csrc/cuda/*_kernels.cu). Plain CUDA only, no torch headers, so the
// kernels compile with a bare nvcc (`make cuda-check`). The launchers' headers (*_kernels.cuh) include this file and
// are also read by the torch-facing glue (*_cuda.cpp), which the host C++ compiler builds: the device-only parts are
// visible to nvcc alone (__CUDACC__).
#pragma once
#include <cuda_runtime.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cstdint>

namespace lrsparse {
namespace cuda {

// Returns from the enclosing host function on the first CUDA error (launch-configuration errors included).
#define LRSPARSE_CUDA_RETURN_IF_ERROR(expr)   \
  do {                                        \
    const cudaError_t lrsparse_err_ = (expr); \
    if (lrsparse_err_ != cudaSuccess) {       \
      return lrsparse_err_;                   \
    }                                         \
  } while (0)

constexpr int kThreadsPerBlock = 256;

// Element type tag for the 16-bit / 32-bit floating inputs, so that host launchers take no template argument.
enum class FloatKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

#ifdef __CUDACC__
template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<double>(double value) { return static_cast<float>(value); }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }
#endif  // __CUDACC__

// Grid for a grid-stride loop over `work_items`: enough blocks to fill the device, never more than the work needs.
inline cudaError_t grid_stride_blocks(int64_t work_items, int threads_per_block, int* blocks) {
  int device = 0, sm_count = 0;
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (work_items + threads_per_block - 1) / threads_per_block;
  const int64_t resident = static_cast<int64_t>(sm_count) * (2048 / threads_per_block);
  *blocks = static_cast<int>(std::max<int64_t>(1, std::min(needed, resident)));
  return cudaSuccess;
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

#ifdef __CUDACC__
// Inclusive prefix sum over a warp (lane order), with every lane active.
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T value) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += other;
  }
  return value;
}

// Exclusive prefix sum over the block in thread order; `block_total` gets the sum. Every thread of a block of
// kThreadsPerBlock threads must call it; `warp_sums` is shared scratch of kThreadsPerBlock / 32 entries.
template <typename T>
__device__ __forceinline__ T block_exclusive_sum(T value, T* warp_sums, T* block_total) {
  constexpr int kWarps = kThreadsPerBlock / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T inclusive = warp_inclusive_sum(value);
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const T warp_total = lane < kWarps ? warp_sums[lane] : T(0);
    const T warp_prefix = warp_inclusive_sum(warp_total);
    if (lane < kWarps) warp_sums[lane] = warp_prefix - warp_total;
    if (lane == kWarps - 1) *block_total = warp_prefix;
  }
  __syncthreads();
  const T result = warp_sums[warp] + inclusive - value;
  __syncthreads();  // warp_sums may be reused right after
  return result;
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace lrsparse
