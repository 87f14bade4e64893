// Device-generic algorithm of weighted_lowrank (ATen ops only) and its autograd registration.
//
//  * omega absent: truncated SVD from the Gram matrix of the shorter side (see truncated_svd).
//  * omega present: EM (Srebro & Jaakkola 2003) in a right basis Qr (n x c, orthonormal columns): Z = X Qr is
//    small (m x c), and its thin SVD Z = Uz s Vz^T gives the best rank-r fit of X whose row space lies in
//    span(Qr): Uz_r s_r (Vz_r^T Qr^T). The fill X = L + omega (W - L) majorizes the weighted error at L, so any
//    rank-r L' with ||X - L'|| <= ||X - L|| lowers it; keeping span(V) inside the next basis makes the restricted
//    fit at least that good (error non-increasing), and the power directions X^T Uz refine the basis. When the
//    basis would approach min(m, n) the small SVD saves nothing, and an exact thin SVD of X is used instead.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "weighted_lowrank.h"

namespace lrsparse {
namespace {

// Exact SVD once the basis holds this fraction of min(m, n): the small-matrix SVD and QR then cost as much as it.
constexpr double kExactSvdBasisFraction = 0.5;

struct LowRankFactors {
  at::Tensor U, V;
};

// Splits the singular values evenly: U = Uz_r sqrt(s_r), V = sqrt(s_r) Vh_r.
LowRankFactors split_singular_values(const at::Tensor& u, const at::Tensor& s, const at::Tensor& vh, int64_t rank) {
  const at::Tensor root = s.narrow(0, 0, rank).sqrt();
  return {u.narrow(1, 0, rank) * root, root.unsqueeze(1) * vh.narrow(0, 0, rank)};
}

at::Tensor orthonormal_columns(const at::Tensor& a) { return std::get<0>(at::linalg_qr(a, "reduced")); }

// Gaussian test matrix drawn on the CPU from a generator seeded with `seed`: identical on every device.
at::Tensor seeded_gaussian(int64_t rows, int64_t cols, int64_t seed, const at::TensorOptions& options) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  return at::randn({rows, cols}, generator, at::TensorOptions().dtype(at::kFloat)).to(options);
}

// A float32 Gram eigendecomposition is trusted when the energy it leaves out is at least this multiple of its
// rounding scale k * eps * lambda_max (see top_gram_eigenvectors).
constexpr double kFloat32GramMargin = 1e3;

// eigh sorts ascending: the top `rank` directions are the last columns, largest first after the flip.
at::Tensor top_columns(const at::Tensor& eigenvectors, int64_t rank) {
  return eigenvectors.narrow(1, eigenvectors.size(1) - rank, rank).flip({1});
}

// Eigenvectors of a symmetric positive semi-definite float64 matrix, ascending eigenvalues, never failing on finite
// input. LAPACK's divide-and-conquer eigensolver can refuse matrices with large clusters of repeated eigenvalues
// (pruned weights give them: exact low rank leaves hundreds of zero eigenvalues), and whether it does depends on
// the thread count. Each fallback is exact in exact arithmetic and only changes the rounding pattern:
//   1. eigh of the matrix;
//   2. an SVD of the matrix itself (a PSD matrix's SVD is its eigendecomposition; another LAPACK driver, gesdd);
//   3. eigh of Q^T G Q for a seeded random orthogonal Q, rotated back (same spectrum, different rounding).
at::Tensor psd_eigenvectors(const at::Tensor& gram) {
  try {
    return std::get<1>(at::linalg_eigh(gram));
  } catch (const c10::LinAlgError&) {
  }
  try {
    // U of the SVD is sorted by descending singular values = eigenvalues of a PSD matrix: flip to ascending.
    return std::get<0>(at::linalg_svd(gram, /*full_matrices=*/false)).flip({1});
  } catch (const c10::LinAlgError&) {
  }
  const at::Tensor rotation = orthonormal_columns(seeded_gaussian(gram.size(0), gram.size(0), 0, gram.options()));
  const at::Tensor rotated = at::mm(at::mm(rotation.t(), gram), rotation);
  // Symmetrize: the rounding of the two products can leave it asymmetric by ~eps, which eigh ignores anyway.
  return at::mm(rotation, std::get<1>(at::linalg_eigh((rotated + rotated.t()) * 0.5)));
}

// Top `rank` eigenvectors of the Gram matrix short_side short_side^T (k x k), largest first, in short_side's dtype.
// float32 first: its Gram product and eigh are about twice as fast as float64's and dominate the op. Rounding
// perturbs the Gram matrix by about k * eps * lambda_max, which moves the captured energy by at most that much
// (second order in the rotation of the subspace), so the float32 directions are kept when the energy left out, the
// optimal error itself, is at least kFloat32GramMargin times larger: then the fit is optimal to ~1e-3 relative in
// the worst case (measured: ~1e-10 on transformer-like spectra). Steep spectra or ranks near full leave a tail the
// float32 Gram matrix cannot resolve, and are recomputed in float64 (a full rank leaves no tail to resolve), as is
// a float32 matrix the float32 eigensolver refuses (see psd_eigenvectors).
at::Tensor top_gram_eigenvectors(const at::Tensor& short_side, int64_t rank) {
  const int64_t k = short_side.size(0);
  if (short_side.scalar_type() == at::kFloat) {
    try {
      auto [values, vectors] = at::linalg_eigh(at::mm(short_side, short_side.t()));
      if (rank == k) return vectors.flip({1});
      const double rounding_scale_per_lambda_max = static_cast<double>(k) * std::numeric_limits<float>::epsilon();
      const at::Tensor left_out = values.narrow(0, 0, k - rank).sum();
      const at::Tensor rounding_scale = values[k - 1] * rounding_scale_per_lambda_max;
      if ((left_out >= rounding_scale * kFloat32GramMargin).item<bool>()) return top_columns(vectors, rank);
    } catch (const c10::LinAlgError&) {
    }
  }
  const at::Tensor exact = short_side.to(at::kDouble);
  return top_columns(psd_eigenvectors(at::mm(exact, exact.t())), rank).to(short_side.scalar_type());
}

// Thin SVD (u, s, vh), s descending, that never fails on finite input: gesdd can refuse clustered spectra too.
// Falls back to float64, then to the Gram eigendecomposition of the shorter side (psd_eigenvectors), which gives
// the exact singular triplets of the nonzero singular values; a zero singular value gets a zero long-side vector.
std::tuple<at::Tensor, at::Tensor, at::Tensor> thin_svd(const at::Tensor& x) {
  try {
    return at::linalg_svd(x, /*full_matrices=*/false);
  } catch (const c10::LinAlgError&) {
  }
  const auto dtype = x.scalar_type();
  const at::Tensor exact = x.to(at::kDouble);
  try {
    auto [u, s, vh] = at::linalg_svd(exact, /*full_matrices=*/false);
    return {u.to(dtype), s.to(dtype), vh.to(dtype)};
  } catch (const c10::LinAlgError&) {
  }
  const bool wide = x.size(0) <= x.size(1);
  const at::Tensor short_side = wide ? exact : exact.t();
  const at::Tensor vectors = psd_eigenvectors(at::mm(short_side, short_side.t())).flip({1});  // descending
  const at::Tensor projected = at::mm(vectors.t(), short_side);
  const at::Tensor s = at::linalg_vector_norm(projected, 2, {1});
  const at::Tensor long_side = projected / at::where(s > 0, s, at::ones_like(s)).unsqueeze(1);
  if (wide) return {vectors.to(dtype), s.to(dtype), long_side.to(dtype)};
  return {long_side.t().to(dtype), s.to(dtype), vectors.t().to(dtype)};
}

struct RestrictedFit {
  at::Tensor Uz, s, Vh;  // Vh = Vz^T Qr^T (c x n): right singular vectors of the fit in the original coordinates
};

RestrictedFit fit_in_right_basis(const at::Tensor& x, const at::Tensor& right_basis) {
  auto [uz, s, vzh] = thin_svd(at::mm(x, right_basis));
  return {uz, s, at::mm(vzh, right_basis.t())};
}

// Truncated SVD from the eigendecomposition of the Gram matrix of the shorter side: exact (no iteration) and
// several times faster than a thin SVD; the captured energy is second-order insensitive to mixing of nearly equal
// singular directions.
LowRankFactors truncated_svd(const at::Tensor& x, int64_t rank) {
  const bool wide = x.size(0) <= x.size(1);
  const at::Tensor top = top_gram_eigenvectors(wide ? x : x.t(), rank);  // k x rank
  const at::Tensor projected = at::mm(top.t(), wide ? x : x.t());  // r x long, rows scaled by the singular values
  const at::Tensor root = at::linalg_vector_norm(projected, 2, {1}).sqrt();
  // A zero singular value leaves a zero row in the long factor rather than 0 / 0.
  const at::Tensor long_factor = projected / at::where(root > 0, root, at::ones_like(root)).unsqueeze(1);
  const at::Tensor short_factor = top * root;
  if (wide) return {short_factor, long_factor};
  return {long_factor.t(), short_factor.t()};
}

// Right basis for the first iteration: the exact top-`rank` right singular directions of x, so the first EM iterate
// is the plain truncated SVD and the weighted error only goes down from there (a randomized start alone can leave
// EM, under slow progress such as a small uniform omega, stopped above the truncated SVD's error), completed by one
// power step on a seeded random start.
at::Tensor initial_right_basis(const at::Tensor& x, int64_t rank, int64_t columns, int64_t seed) {
  const at::Tensor top = truncated_svd(x, rank).V.t();  // n x rank, spans the top right singular directions
  if (columns == rank) return orthonormal_columns(top);
  const at::Tensor left =
      orthonormal_columns(at::mm(x, seeded_gaussian(x.size(1), columns - rank, seed, x.options())));
  return orthonormal_columns(at::cat({top, at::mm(x.t(), left)}, 1));
}

LowRankFactors weighted_em(const at::Tensor& w, const at::Tensor& omega, int64_t rank, int64_t power_columns,
                           int64_t max_iters, double tol, int64_t seed, FillAndWeightedErrorFn fill_and_error) {
  const int64_t k = std::min(w.size(0), w.size(1));
  const int64_t basis_columns = std::min(rank + power_columns, k);
  const bool exact = basis_columns >= kExactSvdBasisFraction * k;
  at::Tensor filled = w.clone();
  at::Tensor right_basis;
  if (!exact) right_basis = initial_right_basis(filled, rank, basis_columns, seed);
  LowRankFactors factors;
  double previous_error = 0.0;
  for (int64_t iter = 0; iter < max_iters; ++iter) {
    at::Tensor uz;
    if (exact) {
      auto [u, s, vh] = thin_svd(filled);
      factors = split_singular_values(u, s, vh, rank);
    } else {
      RestrictedFit fit = fit_in_right_basis(filled, right_basis);
      factors = split_singular_values(fit.Uz, fit.s, fit.Vh, rank);
      uz = fit.Uz.narrow(1, 0, std::min(power_columns, fit.Uz.size(1)));
    }
    const double error = fill_and_error(factors.U, factors.V, w, omega, filled);
    if (iter > 0 && previous_error - error <= tol * previous_error) break;
    previous_error = error;
    if (!exact && iter + 1 < max_iters) {
      right_basis = orthonormal_columns(at::cat({factors.V.t(), at::mm(filled.t(), uz)}, 1));
    }
  }
  return factors;
}

void check_all_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " must not contain NaN or Inf");
}

at::ScalarType compute_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Even power-of-two exponent e with max|w| * 2^-e in [0.25, 1) (0 for an all-zero w). Solving for w * 2^-e keeps
// every intermediate in range: the Gram matrix and row norms of a 1e30-scale float32 (or 1e300-scale float64)
// matrix overflow, and denormal entries lose all precision or flush to zero in the SVD. Powers of two scale
// exactly, and an even e splits back evenly between U and V.
int64_t normalizing_exponent(const at::Tensor& w) {
  const double max_abs = w.abs().max().item<double>();
  if (max_abs == 0.0) return 0;
  int exponent = 0;
  std::frexp(max_abs, &exponent);  // max_abs = f * 2^exponent, f in [0.5, 1)
  return exponent % 2 == 0 ? exponent : exponent + 1;
}

// w * 2^exponent in `dtype`, computed in float64 and in two half steps: 2^exponent itself can lie beyond the range
// of float32, and for a denormal float64 matrix (exponent ~ 1030) beyond that of float64.
at::Tensor scaled_by_power_of_two(const at::Tensor& w, int64_t exponent, at::ScalarType dtype) {
  if (exponent == 0) return w.to(dtype).contiguous();
  const int half = static_cast<int>(exponent / 2);
  const int rest = static_cast<int>(exponent - half);
  return (w.to(at::kDouble) * std::ldexp(1.0, half) * std::ldexp(1.0, rest)).to(dtype).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weighted_lowrank_impl(const at::Tensor& weight, int64_t rank,
                                                         const std::optional<at::Tensor>& omega, int64_t max_iters,
                                                         double tol, int64_t seed, int64_t oversample,
                                                         FillAndWeightedErrorFn fill_and_weighted_error) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.dim(), "-D");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "weight must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t m = weight.size(0), n = weight.size(1), k = std::min(m, n);
  TORCH_CHECK(rank >= 1 && rank <= k, "rank must be in [1, min(m, n)] = [1, ", k, "], got ", rank);
  TORCH_CHECK(max_iters >= 1, "max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK(tol >= 0.0, "tol must be >= 0, got ", tol);
  TORCH_CHECK(oversample >= 0, "oversample must be >= 0, got ", oversample);
  check_all_finite(weight, "weight");
  const int64_t exponent = normalizing_exponent(weight);
  const at::Tensor w = scaled_by_power_of_two(weight, -exponent, compute_dtype(dtype));
  std::optional<at::Tensor> omega_c;
  if (omega.has_value()) {
    const at::Tensor& om = *omega;
    check_same_shape(om, weight, "omega", "weight");
    check_same_device(om, weight, "omega", "weight");
    TORCH_CHECK(at::isFloatingType(om.scalar_type()) || om.scalar_type() == at::kBool,
                "omega must be a floating-point or bool tensor, got ", om.scalar_type());
    omega_c = om.to(w.scalar_type()).contiguous();
    check_all_finite(*omega_c, "omega");
    TORCH_CHECK(((*omega_c >= 0) & (*omega_c <= 1)).all().item<bool>(), "omega must have all values in [0, 1]");
  }
  auto solve = [&](const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& om) -> LowRankFactors {
    if (!om.has_value()) return truncated_svd(x, r);
    const int64_t basis_columns = std::min(r + oversample, std::min(x.size(0), x.size(1)));
    return weighted_em(x, *om, r, basis_columns, max_iters, tol, seed, fill_and_weighted_error);
  };

  // Deflation of all-zero rows and columns (pruning leaves many): whatever omega is there, the optimal factors are
  // zero on them (a zero row i of W costs sum_j omega_ij (U_i V_j)^2, minimized by U_i = 0 without touching any
  // other entry; likewise for columns and V), so the fit of the live submatrix embedded in zeros is exact. It is
  // also faster, and it removes the cluster of zero Gram eigenvalues the empty rows create, on which LAPACK's
  // eigensolver can fail. A live submatrix of rank below `rank` leaves the extra factor columns zero.
  const at::Tensor nonzero = w != 0;
  const at::Tensor live_rows = nonzero.any(1).nonzero().squeeze(1);
  const at::Tensor live_cols = nonzero.any(0).nonzero().squeeze(1);
  const int64_t m_live = live_rows.size(0), n_live = live_cols.size(0);
  LowRankFactors factors;
  if (m_live == m && n_live == n) {
    factors = solve(w, rank, omega_c);
  } else {
    factors = {at::zeros({m, rank}, w.options()), at::zeros({rank, n}, w.options())};
    const int64_t rank_live = std::min(rank, std::min(m_live, n_live));
    if (rank_live > 0) {
      auto live = [&](const at::Tensor& t) { return t.index_select(0, live_rows).index_select(1, live_cols); };
      std::optional<at::Tensor> omega_live;
      if (omega_c.has_value()) omega_live = live(*omega_c).contiguous();
      const LowRankFactors sub = solve(live(w).contiguous(), rank_live, omega_live);
      factors.U.narrow(1, 0, rank_live).index_copy_(0, live_rows, sub.U);
      factors.V.narrow(0, 0, rank_live).index_copy_(1, live_cols, sub.V);
    }
  }
  return {scaled_by_power_of_two(factors.U, exponent / 2, dtype),
          scaled_by_power_of_two(factors.V, exponent / 2, dtype)};
}

namespace {

// The op is not differentiable: run it below autograd so its outputs never carry a grad_fn.
std::tuple<at::Tensor, at::Tensor> weighted_lowrank_no_grad(const at::Tensor& weight, int64_t rank,
                                                            const std::optional<at::Tensor>& omega,
                                                            int64_t max_iters, double tol, int64_t seed,
                                                            int64_t oversample) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrsparse::weighted_lowrank", "")
                       .typed<decltype(weighted_lowrank_no_grad)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(weight, rank, omega, max_iters, tol, seed, oversample);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, Autograd, m) { m.impl("weighted_lowrank", &weighted_lowrank_no_grad); }

}  // namespace lrsparse
