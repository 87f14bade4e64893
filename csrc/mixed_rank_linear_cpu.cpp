// CPU kernels of mixed_rank_linear and its backward: the device-generic GEMM sequence (mixed_rank_linear_common.cpp)
// with the CPU masking of grad(Ws).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mixed_rank_linear.h"

namespace lrsparse {
namespace {

// grad(Ws) = 0 wherever mask == 0, in place, in one pass. A select (not a multiply) keeps NaN/inf out of pruned
// entries.
void zero_pruned_cpu(at::Tensor& grad, const at::Tensor& mask) {
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && mask.is_contiguous() && grad.numel() == mask.numel());
  const uint8_t* keep = static_cast<const uint8_t*>(mask.data_ptr());  // bool is stored as one byte
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "zero_pruned_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) g[i] = keep[i] ? g[i] : scalar_t(0);
    });
  });
}

at::Tensor mixed_rank_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const OptTensor& bias,
                                 const OptTensor& sparse_weight, const OptTensor& sparse_mask, double alpha) {
  return mixed_rank_linear_impl(x, U, V, bias, sparse_weight, sparse_mask, alpha);
}

MixedRankGrads mixed_rank_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& U,
                                              const at::Tensor& V, const OptTensor& sparse_weight,
                                              const OptTensor& sparse_mask, double alpha,
                                              std::array<bool, 5> output_mask) {
  return mixed_rank_linear_backward_impl(grad_out, x, U, V, sparse_weight, sparse_mask, alpha, output_mask,
                                         &zero_pruned_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CPU, m) {
  m.impl("mixed_rank_linear", &mixed_rank_linear_cpu);
  m.impl("mixed_rank_linear_backward", &mixed_rank_linear_backward_cpu);
}

}  // namespace lrsparse
