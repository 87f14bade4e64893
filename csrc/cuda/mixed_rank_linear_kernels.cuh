// Raw CUDA epilogue of mixed_rank_linear_backward (no torch headers): masking of the sparse-path gradient.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_utils.cuh"

namespace lrsparse {
namespace cuda {

// grad[i] = mask[i] ? grad[i] : +0.0 in place, for any IEEE element of element_bytes = 2, 4 or 8 (the zero is the
// all-zero bit pattern, so the dtype itself is not needed; (1 - alpha) is already folded into the GEMM that
// produced grad). 16-byte vector steps when grad and mask are aligned for them, scalar otherwise and for the tail.
cudaError_t launch_zero_pruned(void* grad, int element_bytes, const uint8_t* mask, int64_t numel,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace lrsparse
