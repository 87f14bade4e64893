// EM fill step of weighted_lowrank: X = L + omega * (W - L) and the weighted error, one memory-bound pass.
#include "cuda/weighted_lowrank_kernels.cuh"

namespace lrsparse {
namespace cuda {
namespace {

constexpr int kMaxFillBlocks = 1024;
constexpr int kFillItemsPerThread = 8;

// Fixed-order tree sum over the block (blockDim.x == kThreadsPerBlock); the result is in sums[0].
__device__ __forceinline__ void block_tree_sum(double value, double* sums) {
  sums[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreadsPerBlock / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    fill_kernel(T* __restrict__ filled, const T* __restrict__ weight, const T* __restrict__ omega, int64_t numel,
                double* __restrict__ partials) {
  __shared__ double sums[kThreadsPerBlock];
  double error = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreadsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x; i < numel; i += stride) {
    const T low_rank = filled[i];
    const T residual = weight[i] - low_rank;
    const T weighted_residual = omega[i] * residual;
    filled[i] = low_rank + weighted_residual;
    error += static_cast<double>(weighted_residual) * static_cast<double>(residual);
  }
  block_tree_sum(error, sums);
  if (threadIdx.x == 0) partials[blockIdx.x] = sums[0];
}

__global__ void __launch_bounds__(kThreadsPerBlock) sum_partials_kernel(double* partials, int num_blocks) {
  __shared__ double sums[kThreadsPerBlock];
  double value = 0.0;
  for (int b = threadIdx.x; b < num_blocks; b += kThreadsPerBlock) value += partials[b];
  block_tree_sum(value, sums);
  if (threadIdx.x == 0) partials[num_blocks] = sums[0];
}

template <typename T>
cudaError_t launch_typed(void* filled, const void* weight, const void* omega, int64_t numel, double* partials,
                         cudaStream_t stream) {
  const int blocks = weighted_fill_blocks(numel);
  fill_kernel<T><<<blocks, kThreadsPerBlock, 0, stream>>>(static_cast<T*>(filled), static_cast<const T*>(weight),
                                                           static_cast<const T*>(omega), numel, partials);
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  sum_partials_kernel<<<1, kThreadsPerBlock, 0, stream>>>(partials, blocks);
  return cudaGetLastError();
}

}  // namespace

int weighted_fill_blocks(int64_t numel) {
  const int64_t per_block = static_cast<int64_t>(kThreadsPerBlock) * kFillItemsPerThread;
  const int64_t blocks = (numel + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxFillBlocks ? kMaxFillBlocks : blocks));
}

cudaError_t launch_fill_and_weighted_error(FloatKind kind, void* filled, const void* weight, const void* omega,
                                           int64_t numel, double* partials, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat32: return launch_typed<float>(filled, weight, omega, numel, partials, stream);
    case FloatKind::kFloat64: return launch_typed<double>(filled, weight, omega, numel, partials, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lrsparse
