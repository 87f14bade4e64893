// Device-generic part of mixed_rank_linear (see mixed_rank_linear.h): validation and the GEMM sequence of the
// forward and the backward. Everything is an ATen GEMM with the blend factor and the bias folded into its
// alpha/beta, so no pass over an (N x out) or (out x in) tensor is spent on scaling or adding; the only extra
// pass is the device's masking of grad(Ws).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <vector>

#include "checks.h"
#include "mixed_rank_linear.h"

namespace lrsparse {
namespace {


bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_matching_float(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
              t.scalar_type());
  check_same_device(t, x, name, "x");
}

// Validation shared by the forward and the backward. Returns in_features; out_features is U.size(0).
void check_mixed_rank_inputs(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const OptTensor& bias,
                             const OptTensor& sparse_weight, const OptTensor& sparse_mask, double alpha) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension (..., in_features), got a 0-d tensor");
  TORCH_CHECK(U.dim() == 2, "U must be 2-D (out_features, rank), got ", U.dim(), "-D");
  TORCH_CHECK(V.dim() == 2, "V must be 2-D (rank, in_features), got ", V.dim(), "-D");
  check_matching_float(U, x, "U");
  check_matching_float(V, x, "V");
  TORCH_CHECK(x.size(-1) == V.size(1), "x must have last dimension in_features = V.size(1) = ", V.size(1), ", got ",
              x.size(-1));
  TORCH_CHECK(U.size(1) == V.size(0), "U must have U.size(1) == rank = V.size(0) = ", V.size(0), ", got ",
              U.size(1));
  const int64_t out_features = U.size(0);
  if (present(bias)) {
    check_matching_float(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features,
                "bias must have shape (out_features,) = (", out_features, ",), got ", bias->sizes());
  }
  if (present(sparse_weight)) {
    check_matching_float(*sparse_weight, x, "sparse_weight");
    TORCH_CHECK(sparse_weight->dim() == 2 && sparse_weight->size(0) == out_features &&
                    sparse_weight->size(1) == V.size(1),
                "sparse_weight must have shape (out_features, in_features) = (", out_features, ", ", V.size(1),
                "), got ", sparse_weight->sizes());
  }
  if (present(sparse_mask)) {
    TORCH_CHECK(present(sparse_weight), "sparse_mask was given without sparse_weight");
    check_mask(*sparse_mask, *sparse_weight, "sparse_mask", "sparse_weight");
  }
  check_unit_interval(alpha, "alpha");
}

// out = scale * a @ b, written by one GEMM (beta = 0 never reads the uninitialized output).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scale) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/scale);
  return out;
}

// bias + scale * a @ b (bias broadcast over rows), or scale * a @ b without bias.
at::Tensor biased_scaled_mm(const OptTensor& bias, const at::Tensor& a, const at::Tensor& b, double scale) {
  if (present(bias)) return at::addmm(*bias, a, b, /*beta=*/1, /*alpha=*/scale);
  return scaled_mm(a, b, scale);
}

}  // namespace

at::Tensor mixed_rank_linear_impl(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const OptTensor& bias,
                                  const OptTensor& sparse_weight, const OptTensor& sparse_mask, double alpha) {
  // Autograd is handled around the op (python/lrsparse/ops.py); the ATen calls inside must not record a graph
  // (out= GEMMs refuse inputs that require grad).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_mixed_rank_inputs(x, U, V, bias, sparse_weight, sparse_mask, alpha);
  const int64_t in_features = V.size(1);
  const int64_t out_features = U.size(0);
  const at::Tensor x2 = x.reshape({-1, in_features});
  const bool use_low_rank = alpha != 0.0;
  const bool use_sparse = alpha != 1.0 && present(sparse_weight);

  at::Tensor y;
  if (use_low_rank) {
    y = biased_scaled_mm(bias, at::mm(x2, V.t()), U.t(), alpha);
    if (use_sparse) y.addmm_(x2, sparse_weight->t(), /*beta=*/1, /*alpha=*/1.0 - alpha);
  } else if (use_sparse) {
    y = biased_scaled_mm(bias, x2, sparse_weight->t(), 1.0 - alpha);
  } else if (present(bias)) {
    y = bias->expand({x2.size(0), out_features}).contiguous();
  } else {
    y = at::zeros({x2.size(0), out_features}, x.options());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  return y.view(out_shape);
}

MixedRankGrads mixed_rank_linear_backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& U,
                                              const at::Tensor& V, const OptTensor& sparse_weight,
                                              const OptTensor& sparse_mask, double alpha,
                                              std::array<bool, 5> output_mask, ZeroPrunedFn zero_pruned) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see mixed_rank_linear_impl
  check_mixed_rank_inputs(x, U, V, std::nullopt, sparse_weight, sparse_mask, alpha);
  const int64_t in_features = V.size(1);
  const int64_t out_features = U.size(0);
  check_matching_float(grad_out, x, "grad_out");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape ", at::IntArrayRef(out_shape),
              " (x's leading dims, out_features), got ", grad_out.sizes());
  const auto [need_x, need_U, need_V, need_bias, need_sparse] = output_mask;
  TORCH_CHECK(!need_sparse || present(sparse_weight),
              "output_mask[4] (grad of sparse_weight) requested but sparse_weight is None");

  const at::Tensor g = grad_out.reshape({-1, out_features});
  const at::Tensor x2 = x.reshape({-1, in_features});
  const bool use_low_rank = alpha != 0.0;
  const bool use_sparse = alpha != 1.0 && present(sparse_weight);
  // g U feeds both grad_x and grad_V.
  const at::Tensor gU = use_low_rank && (need_x || need_V) ? at::mm(g, U) : at::Tensor();

  OptTensor grad_x, grad_U, grad_V, grad_bias, grad_sparse;
  if (need_x) {
    at::Tensor gx;
    if (use_low_rank) {
      gx = scaled_mm(gU, V, alpha);
      if (use_sparse) gx.addmm_(g, *sparse_weight, /*beta=*/1, /*alpha=*/1.0 - alpha);
    } else if (use_sparse) {
      gx = scaled_mm(g, *sparse_weight, 1.0 - alpha);
    } else {
      gx = at::zeros({x2.size(0), in_features}, x.options());
    }
    grad_x = gx.view(x.sizes());
  }
  if (need_U) grad_U = use_low_rank ? scaled_mm(g.t(), at::mm(x2, V.t()), alpha) : at::zeros(U.sizes(), U.options());
  if (need_V) grad_V = use_low_rank ? scaled_mm(gU.t(), x2, alpha) : at::zeros(V.sizes(), V.options());
  if (need_bias) grad_bias = g.sum(0);
  if (need_sparse) {
    if (use_sparse) {
      at::Tensor gs = scaled_mm(g.t(), x2, 1.0 - alpha);
      if (present(sparse_mask)) zero_pruned(gs, *sparse_mask);
      grad_sparse = gs;
    } else {
      grad_sparse = at::zeros({out_features, in_features}, x.options());
    }
  }
  return {grad_x, grad_U, grad_V, grad_bias, grad_sparse};
}

}  // namespace lrsparse
