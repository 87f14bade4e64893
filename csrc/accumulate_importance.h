// accumulate_importance_: argument validation shared by the CPU and CUDA kernels, so both reject the same inputs
// with the same messages.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

#include "checks.h"

namespace lrsparse {

enum class Criterion { kSensitivity, kMovement };

inline Criterion parse_criterion(std::string_view criterion) {
  if (criterion == "sensitivity") return Criterion::kSensitivity;
  if (criterion == "movement") return Criterion::kMovement;
  TORCH_CHECK(false, "criterion must be one of \"sensitivity\", \"movement\", got \"", std::string(criterion), "\"");
}

// Checks every argument (dtypes, shapes, devices, contiguity, betas) and returns the parsed criterion.
inline Criterion check_accumulate_importance_args(const at::Tensor& ema, const at::Tensor& uncertainty,
                                                  const at::Tensor& weight, const at::Tensor& grad,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& fisher, double beta1,
                                                  double beta2, double beta_fisher, std::string_view criterion) {
  const Criterion parsed = parse_criterion(criterion);
  check_unit_interval(beta1, "beta1");
  check_unit_interval(beta2, "beta2");
  check_unit_interval(beta_fisher, "beta_fisher");

  check_floating(weight, "weight");
  const auto input_type = weight.scalar_type();
  TORCH_CHECK(input_type == at::kFloat || input_type == at::kBFloat16 || input_type == at::kHalf ||
                  input_type == at::kDouble,
              "weight must be float32, bfloat16, float16 or float64, got ", input_type);
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(grad.scalar_type() == input_type, "grad must have the dtype of weight (", input_type, "), got ",
              grad.scalar_type());
  check_same_shape(grad, weight, "grad", "weight");
  check_same_device(grad, weight, "grad", "weight");
  TORCH_CHECK(grad.is_contiguous(), "grad must be contiguous");

  check_float_state(ema, "ema");
  check_same_shape(ema, weight, "ema", "weight");
  check_same_device(ema, weight, "ema", "weight");
  check_float_state(uncertainty, "uncertainty");
  check_same_shape(uncertainty, weight, "uncertainty", "weight");
  check_same_device(uncertainty, weight, "uncertainty", "weight");

  if (mask.has_value() && mask->defined()) check_mask(*mask, weight, "mask", "weight");
  if (fisher.has_value() && fisher->defined()) {
    check_float_state(*fisher, "fisher");
    check_same_shape(*fisher, weight, "fisher", "weight");
    check_same_device(*fisher, weight, "fisher", "weight");
  }
  return parsed;
}

}  // namespace lrsparse
