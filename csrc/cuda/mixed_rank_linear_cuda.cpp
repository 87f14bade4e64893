// CUDA registration of mixed_rank_linear and its backward: the device-generic GEMM sequence (cuBLAS through
// ATen, fp32 accumulation for bf16/fp16) with the CUDA masking of grad(Ws). The bias gradient stays at::sum over
// rows, already a single fp32-accumulating column reduction.
#include <torch/library.h>

#include "cuda/mixed_rank_linear_kernels.cuh"
#include "cuda/torch_glue.h"
#include "mixed_rank_linear.h"

namespace lrsparse {
namespace {

void zero_pruned_cuda(at::Tensor& grad, const at::Tensor& mask) {
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && mask.is_contiguous() && grad.numel() == mask.numel());
  TORCH_INTERNAL_ASSERT(grad.device() == mask.device());
  const c10::cuda::CUDAGuard device_guard(grad.device());
  C10_CUDA_CHECK(cuda::launch_zero_pruned(grad.data_ptr(), static_cast<int>(grad.element_size()),
                                          cuda::mask_bytes(mask), grad.numel(), cuda::current_stream()));
}

at::Tensor mixed_rank_linear_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const OptTensor& bias,
                                  const OptTensor& sparse_weight, const OptTensor& sparse_mask, double alpha) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return mixed_rank_linear_impl(x, U, V, bias, sparse_weight, sparse_mask, alpha);
}

MixedRankGrads mixed_rank_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& U,
                                               const at::Tensor& V, const OptTensor& sparse_weight,
                                               const OptTensor& sparse_mask, double alpha,
                                               std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return mixed_rank_linear_backward_impl(grad_out, x, U, V, sparse_weight, sparse_mask, alpha, output_mask,
                                         &zero_pruned_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CUDA, m) {
  m.impl("mixed_rank_linear", &mixed_rank_linear_cuda);
  m.impl("mixed_rank_linear_backward", &mixed_rank_linear_backward_cuda);
}

}  // namespace lrsparse
