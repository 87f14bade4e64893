// weighted_lowrank: rank-r fit W ~ U V minimizing sum(omega * (W - U V)^2), plain truncated SVD without omega.
// The algorithm is device-generic (ATen ops only, in weighted_lowrank_common.cpp); each device supplies one fused
// kernel for the EM fill step and registers the op for its dispatch key.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace lrsparse {

// One fused EM step over the m x n matrix, all tensors contiguous and of one floating dtype:
//   L = U @ V written into `filled`, then filled = L + omega * (weight - L) in place,
// returning sum(omega * (weight - L)^2) accumulated in float64 in an order independent of the thread count.
using FillAndWeightedErrorFn = double (*)(const at::Tensor& U, const at::Tensor& V, const at::Tensor& weight,
                                          const at::Tensor& omega, at::Tensor& filled);

std::tuple<at::Tensor, at::Tensor> weighted_lowrank_impl(const at::Tensor& weight, int64_t rank,
                                                         const std::optional<at::Tensor>& omega, int64_t max_iters,
                                                         double tol, int64_t seed, int64_t oversample,
                                                         FillAndWeightedErrorFn fill_and_weighted_error);

}  // namespace lrsparse
