// CPU kernel of weighted_lowrank: the fused EM fill step, and the CPU registration of the op.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "weighted_lowrank.h"

namespace lrsparse {
namespace {

// Rows per partial sum are fixed by the shape alone, so the float64 total does not depend on the thread count.
constexpr int64_t kElementsPerBlock = 1 << 15;

template <typename scalar_t>
double fill_rows(scalar_t* filled, const scalar_t* weight, const scalar_t* omega, int64_t row_begin,
                 int64_t row_end, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  double block_error = 0.0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    scalar_t* x = filled + i * n;
    const scalar_t* w = weight + i * n;
    const scalar_t* o = omega + i * n;
    Vec row_error(scalar_t(0));
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec low_rank = Vec::loadu(x + j);
      const Vec residual = Vec::loadu(w + j) - low_rank;
      const Vec weighted_residual = Vec::loadu(o + j) * residual;
      (low_rank + weighted_residual).store(x + j);
      row_error = at::vec::fmadd(weighted_residual, residual, row_error);
    }
    scalar_t tail_error = 0;
    for (; j < n; ++j) {
      const scalar_t residual = w[j] - x[j];
      const scalar_t weighted_residual = o[j] * residual;
      x[j] += weighted_residual;
      tail_error += weighted_residual * residual;
    }
    const scalar_t lanes_error =
        at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, row_error);
    block_error += static_cast<double>(lanes_error) + static_cast<double>(tail_error);
  }
  return block_error;
}

double fill_and_weighted_error_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& weight,
                                   const at::Tensor& omega, at::Tensor& filled) {
  at::mm_out(filled, U, V);
  const int64_t m = filled.size(0), n = filled.size(1);
  const int64_t rows_per_block = std::max<int64_t>(1, kElementsPerBlock / std::max<int64_t>(n, 1));
  const int64_t num_blocks = (m + rows_per_block - 1) / rows_per_block;
  std::vector<double> block_errors(num_blocks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(filled.scalar_type(), "weighted_lowrank_fill_cpu", [&] {
    scalar_t* x = filled.data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* o = omega.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        block_errors[b] = fill_rows(x, w, o, b * rows_per_block, std::min(m, (b + 1) * rows_per_block), n);
      }
    });
  });
  double total = 0.0;
  for (double e : block_errors) total += e;
  return total;
}

std::tuple<at::Tensor, at::Tensor> weighted_lowrank_cpu(const at::Tensor& weight, int64_t rank,
                                                        const std::optional<at::Tensor>& omega, int64_t max_iters,
                                                        double tol, int64_t seed, int64_t oversample) {
  return weighted_lowrank_impl(weight, rank, omega, max_iters, tol, seed, oversample, &fill_and_weighted_error_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CPU, m) { m.impl("weighted_lowrank", &weighted_lowrank_cpu); }

}  // namespace lrsparse
