// Helpers for the torch-facing CUDA glue (csrc/cuda/*_cuda.cpp): device guard, current stream and dtype tags for
// the raw launchers, which take raw pointers and a cudaStream_t only. The glue is plain C++, built by the host
// compiler like the CPU kernels: nvcc compiles the kernels alone and never sees a torch header.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernel_utils.cuh"

namespace lrsparse {
namespace cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline FloatKind float_kind(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat: return FloatKind::kFloat32;
    case at::kBFloat16: return FloatKind::kBFloat16;
    case at::kHalf: return FloatKind::kFloat16;
    case at::kDouble: return FloatKind::kFloat64;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16, float16 or float64, got ", type);
  }
}

// bool and uint8 masks are both one byte per entry, read as nonzero = keep.
inline const uint8_t* mask_bytes(const at::Tensor& mask) { return static_cast<const uint8_t*>(mask.const_data_ptr()); }

}  // namespace cuda
}  // namespace lrsparse
