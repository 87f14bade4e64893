// CUDA registration of weighted_lowrank: the device-generic algorithm (weighted_lowrank_common.cpp, ATen with
// cuBLAS/cuSOLVER underneath) with the fused CUDA fill step.
#include <torch/library.h>

#include "cuda/torch_glue.h"
#include "cuda/weighted_lowrank_kernels.cuh"
#include "weighted_lowrank.h"

namespace lrsparse {
namespace {

double fill_and_weighted_error_cuda(const at::Tensor& U, const at::Tensor& V, const at::Tensor& weight,
                                    const at::Tensor& omega, at::Tensor& filled) {
  TORCH_INTERNAL_ASSERT(filled.is_contiguous() && weight.is_contiguous() && omega.is_contiguous());
  TORCH_INTERNAL_ASSERT(weight.scalar_type() == filled.scalar_type() && omega.scalar_type() == filled.scalar_type());
  const c10::cuda::CUDAGuard device_guard(filled.device());
  at::mm_out(filled, U, V);
  const int64_t numel = filled.numel();
  const int blocks = cuda::weighted_fill_blocks(numel);
  at::Tensor partials = at::empty({blocks + 1}, filled.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::launch_fill_and_weighted_error(cuda::float_kind(filled.scalar_type(), "filled"),
                                                      filled.data_ptr(), weight.const_data_ptr(),
                                                      omega.const_data_ptr(), numel, partials.data_ptr<double>(),
                                                      cuda::current_stream()));
  // The EM loop tests convergence on the host: one scalar copy per iteration.
  return partials[blocks].item<double>();
}

std::tuple<at::Tensor, at::Tensor> weighted_lowrank_cuda(const at::Tensor& weight, int64_t rank,
                                                         const std::optional<at::Tensor>& omega, int64_t max_iters,
                                                         double tol, int64_t seed, int64_t oversample) {
  const c10::cuda::CUDAGuard device_guard(weight.device());
  return weighted_lowrank_impl(weight, rank, omega, max_iters, tol, seed, oversample, &fill_and_weighted_error_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CUDA, m) { m.impl("weighted_lowrank", &weighted_lowrank_cuda); }

}  // namespace lrsparse
