// global_topk_threshold / apply_threshold_mask_: argument validation written to be shared by the CPU and CUDA
// kernels (same rules, same messages as csrc/global_topk_threshold_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "checks.h"

namespace lrsparse {

struct ScoreListLayout {
  bool has_uncertainty;
  bool has_mask;
};

// ema[i] float32 contiguous on one device; uncertainty empty or one per ema of its shape; masks likewise (or
// required). `op` prefixes every message.
inline ScoreListLayout check_score_lists(const char* op, at::TensorList ema, at::TensorList uncertainty,
                                         at::TensorList masks, bool masks_required) {
  const size_t n = ema.size();
  TORCH_CHECK(uncertainty.empty() || uncertainty.size() == n, op,
              ": uncertainty must be empty or hold one tensor per ema tensor (", n, "), got ", uncertainty.size());
  if (masks_required) {
    TORCH_CHECK(masks.size() == n, op, ": masks must hold one tensor per ema tensor (", n, "), got ", masks.size());
  } else {
    TORCH_CHECK(masks.empty() || masks.size() == n, op, ": masks must be empty or hold one tensor per ema tensor (",
                n, "), got ", masks.size());
  }
  const ScoreListLayout layout{!uncertainty.empty(), !masks.empty()};
  for (size_t i = 0; i < n; ++i) {
    const std::string ema_name = indexed("ema", i);
    check_float_state(ema[i], ema_name.c_str());
    check_same_device(ema[i], ema[0], ema_name.c_str(), "ema[0]");
    if (layout.has_uncertainty) {
      const std::string name = indexed("uncertainty", i);
      check_float_state(uncertainty[i], name.c_str());
      check_same_shape(uncertainty[i], ema[i], name.c_str(), ema_name.c_str());
      check_same_device(uncertainty[i], ema[i], name.c_str(), ema_name.c_str());
    }
    if (layout.has_mask) check_mask(masks[i], ema[i], indexed("masks", i).c_str(), ema_name.c_str());
  }
  return layout;
}

// The weights of apply_threshold_mask_ and the form (not the value) of threshold and ties_to_keep.
inline void check_apply_targets(const char* op, at::TensorList weights, at::TensorList ema,
                                const at::Tensor& threshold, const at::Tensor& ties_to_keep) {
  TORCH_CHECK(weights.size() == ema.size(), op, ": weights must hold one tensor per ema tensor (", ema.size(),
              "), got ", weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string name = indexed("weights", i);
    const std::string ema_name = indexed("ema", i);
    check_floating(weights[i], name.c_str());
    check_same_shape(weights[i], ema[i], name.c_str(), ema_name.c_str());
    check_same_device(weights[i], ema[i], name.c_str(), ema_name.c_str());
    TORCH_CHECK(weights[i].is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK(threshold.dim() == 0 && at::isFloatingType(threshold.scalar_type()), op,
              ": threshold must be a 0-d floating-point tensor, got ", threshold.dim(), "-d ",
              threshold.scalar_type());
  TORCH_CHECK(ties_to_keep.dim() == 0 && at::isIntegralType(ties_to_keep.scalar_type(), /*includeBool=*/false), op,
              ": ties_to_keep must be a 0-d integer tensor, got ", ties_to_keep.dim(), "-d ",
              ties_to_keep.scalar_type());
}

}  // namespace lrsparse
