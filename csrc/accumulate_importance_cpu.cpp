// CPU kernel of lrsparse::accumulate_importance_: one fused, in-place PLATON step over one weight matrix.
//
// The arithmetic reproduces python/lrsparse/reference.py operation by operation in float32 (the betas and
// 1 - beta are rounded to float exactly as PyTorch rounds a Python scalar for a float32 tensor), so the kernel
// agrees with the reference bitwise on any machine that does not fuse multiply-adds (the build does not enable
// FMA). Every branch that depends on the arguments is a template parameter, so the inner loop is straight-line
// code that the compiler vectorizes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "accumulate_importance.h"

namespace lrsparse {
namespace {

// Scalar factors rounded to float32 the way `beta * float32_tensor` and `(1 - beta) * float32_tensor` round
// the Python double in the reference: 1 - beta is formed in double first.
struct Decay {
  float keep;  // beta
  float mix;   // 1 - beta
  explicit Decay(double beta) : keep(static_cast<float>(beta)), mix(static_cast<float>(1.0 - beta)) {}
};

struct StatePointers {
  float* ema;
  float* uncertainty;
  float* fisher;  // nullptr when there is no Fisher state
  const uint8_t* mask;  // nullptr when every entry is live; bool storage is read as bytes 0/1
};

// `live ? updated : old` as bit operations: GCC keeps a conditional on a loaded mask byte as a branch, which
// would stop the loop from vectorizing. Also keeps `old` bit for bit where the entry is masked out.
inline float select_live(uint32_t live, float updated, float old) {
  uint32_t updated_bits, old_bits;
  std::memcpy(&updated_bits, &updated, sizeof(float));
  std::memcpy(&old_bits, &old, sizeof(float));
  const uint32_t all_ones_if_live = 0u - live;
  const uint32_t bits = (updated_bits & all_ones_if_live) | (old_bits & ~all_ones_if_live);
  float result;
  std::memcpy(&result, &bits, sizeof(float));
  return result;
}

template <Criterion kCriterion, bool kHasMask, bool kHasFisher, typename input_t>
void accumulate_range(const StatePointers& state, const input_t* __restrict__ weight,
                      const input_t* __restrict__ grad, Decay d1, Decay d2, Decay df, int64_t begin,
                      int64_t end) {
  float* __restrict__ ema = state.ema;
  float* __restrict__ uncertainty = state.uncertainty;
  float* __restrict__ fisher = state.fisher;
  const uint8_t* __restrict__ mask = state.mask;
  for (int64_t i = begin; i < end; ++i) {
    const float w = static_cast<float>(weight[i]);
    const float g = static_cast<float>(grad[i]);
    const float product = w * g;
    const float importance = kCriterion == Criterion::kSensitivity ? std::fabs(product) : -product;
    const float old_ema = ema[i];
    const float old_uncertainty = uncertainty[i];
    // Separate products and sums (never fused) to round like the reference's tensor ops.
    const float ema_decayed = d1.keep * old_ema;
    const float ema_new_part = d1.mix * importance;
    const float new_ema = ema_decayed + ema_new_part;
    const float uncertainty_decayed = d2.keep * old_uncertainty;
    const float uncertainty_new_part = d2.mix * std::fabs(importance - new_ema);
    const float new_uncertainty = uncertainty_decayed + uncertainty_new_part;
    const uint32_t live = kHasMask ? static_cast<uint32_t>(mask[i] != 0) : 1u;
    ema[i] = select_live(live, new_ema, old_ema);
    uncertainty[i] = select_live(live, new_uncertainty, old_uncertainty);
    if constexpr (kHasFisher) {
      const float old_fisher = fisher[i];
      const float fisher_decayed = df.keep * old_fisher;
      const float fisher_new_part = (df.mix * g) * g;  // `(1 - bf) * g * g` associates left in the reference
      const float new_fisher = fisher_decayed + fisher_new_part;
      fisher[i] = select_live(live, new_fisher, old_fisher);
    }
  }
}

template <typename input_t>
void accumulate_dispatch(Criterion criterion, const StatePointers& state, const input_t* weight,
                         const input_t* grad, Decay d1, Decay d2, Decay df, int64_t begin, int64_t end) {
  // Expands the run-time flags into one of the eight straight-line instantiations.
  auto with_criterion = [&](auto criterion_tag) {
    constexpr Criterion kCriterion = decltype(criterion_tag)::value;
    const bool has_mask = state.mask != nullptr;
    const bool has_fisher = state.fisher != nullptr;
    if (has_mask && has_fisher) {
      accumulate_range<kCriterion, true, true>(state, weight, grad, d1, d2, df, begin, end);
    } else if (has_mask) {
      accumulate_range<kCriterion, true, false>(state, weight, grad, d1, d2, df, begin, end);
    } else if (has_fisher) {
      accumulate_range<kCriterion, false, true>(state, weight, grad, d1, d2, df, begin, end);
    } else {
      accumulate_range<kCriterion, false, false>(state, weight, grad, d1, d2, df, begin, end);
    }
  };
  if (criterion == Criterion::kSensitivity) {
    with_criterion(std::integral_constant<Criterion, Criterion::kSensitivity>{});
  } else {
    with_criterion(std::integral_constant<Criterion, Criterion::kMovement>{});
  }
}

void accumulate_importance_cpu(at::Tensor& ema, at::Tensor& uncertainty, const at::Tensor& weight,
                               const at::Tensor& grad, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& fisher, double beta1, double beta2,
                               double beta_fisher, std::string_view criterion_name) {
  const Criterion criterion = check_accumulate_importance_args(ema, uncertainty, weight, grad, mask, fisher, beta1,
                                                               beta2, beta_fisher, criterion_name);
  const auto input_type = weight.scalar_type();
  const bool has_mask = mask.has_value() && mask->defined();
  const bool has_fisher = fisher.has_value() && fisher->defined();

  const int64_t numel = weight.numel();
  if (numel == 0) return;
  const StatePointers state{ema.data_ptr<float>(), uncertainty.data_ptr<float>(),
                            has_fisher ? fisher->data_ptr<float>() : nullptr,
                            has_mask ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr};
  const Decay d1(beta1), d2(beta2), df(beta_fisher);
  // About 25 bytes of traffic per entry: ranges of 32K entries amortize the task start-up.
  constexpr int64_t kGrain = 32768;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input_type, "accumulate_importance_", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      accumulate_dispatch<scalar_t>(criterion, state, w, g, d1, d2, df, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CPU, m) { m.impl("accumulate_importance_", &accumulate_importance_cpu); }

}  // namespace lrsparse
