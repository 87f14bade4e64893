// Input validation shared by the kernels: every failure names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace lrsparse {

inline void check_float_state(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 (importance state is kept in float32), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_mask(const at::Tensor& mask, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, name,
              " must be bool or uint8, got ", mask.scalar_type());
  check_same_shape(mask, ref, name, ref_name);
  check_same_device(mask, ref, name, ref_name);
  TORCH_CHECK(mask.is_contiguous(), name, " must be contiguous");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_unit_interval(double value, const char* name) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, name, " must be in [0, 1], got ", value);
}

// Per-list-element argument name, e.g. "ema[3]".
inline std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

}  // namespace lrsparse
