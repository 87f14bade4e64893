// Raw CUDA kernel of the weighted_lowrank EM fill step (no torch headers).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_utils.cuh"

namespace lrsparse {
namespace cuda {

// Blocks of the fill kernel, a function of numel only, so the float64 sum is reduced in the same order on every
// device and run (the caller allocates num_blocks + 1 doubles of partials).
int weighted_fill_blocks(int64_t numel);

// filled holds L = U V on entry; afterwards filled = L + omega * (weight - L) (in place), and
// partials[num_blocks] = sum(omega * (weight - L)^2), summed in float64: per-thread, then a fixed-order tree per
// block into partials[0..num_blocks), then one block in a fixed order. kind: kFloat32 or kFloat64.
cudaError_t launch_fill_and_weighted_error(FloatKind kind, void* filled, const void* weight, const void* omega,
                                           int64_t numel, double* partials, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrsparse
