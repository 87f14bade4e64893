// Autocast rule of mixed_rank_linear, for every device with an autocast key (CPU, CUDA).
//
// Under torch.autocast the op runs in the autocast dtype (bf16, or fp16 on CUDA) like nn.Linear does: x, U, V, bias
// and the sparse weight are cast (float64 inputs are left alone, as ATen's own lower-precision ops do), the mask is
// not touched. The casts happen above autograd, so the fp32 master weights get fp32 gradients through the cast's
// backward; inside, every product is an ATen GEMM, which accumulates bf16/fp16 inputs in fp32. The weight casts go
// through autocast's cache, so a weight used twice in one autocast region is cast once.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "mixed_rank_linear.h"

namespace lrsparse {
namespace {

template <c10::DeviceType device>
at::Tensor mixed_rank_linear_autocast(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                                      const OptTensor& bias, const OptTensor& sparse_weight,
                                      const OptTensor& sparse_mask, double alpha) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lrsparse::mixed_rank_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, double)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  using at::autocast::cached_cast;
  return op.call(cached_cast(dtype, x, device), cached_cast(dtype, U, device), cached_cast(dtype, V, device),
                 cached_cast(dtype, bias, device), cached_cast(dtype, sparse_weight, device), sparse_mask, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, AutocastCPU, m) {
  m.impl("mixed_rank_linear", &mixed_rank_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lrsparse, AutocastCUDA, m) {
  m.impl("mixed_rank_linear", &mixed_rank_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lrsparse
