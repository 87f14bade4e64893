// mixed_rank_linear: y = (1 - alpha) x Ws^T + alpha (x V^T) U^T + bias, and its backward.
// The algorithm is device-generic (ATen GEMMs with the blend factor and the bias folded into alpha/beta, in
// mixed_rank_linear_common.cpp); each device supplies the in-place masking of grad(Ws) and registers the ops.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lrsparse {

using OptTensor = std::optional<at::Tensor>;
using MixedRankGrads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;

// grad = 0 wherever mask == 0, in place (grad and mask contiguous, same numel, mask bool/uint8). A select, not a
// multiply, so NaN/inf never survive in pruned entries.
using ZeroPrunedFn = void (*)(at::Tensor& grad, const at::Tensor& mask);

at::Tensor mixed_rank_linear_impl(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const OptTensor& bias,
                                  const OptTensor& sparse_weight, const OptTensor& sparse_mask, double alpha);

MixedRankGrads mixed_rank_linear_backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& U,
                                              const at::Tensor& V, const OptTensor& sparse_weight,
                                              const OptTensor& sparse_mask, double alpha,
                                              std::array<bool, 5> output_mask, ZeroPrunedFn zero_pruned);

}  // namespace lrsparse
