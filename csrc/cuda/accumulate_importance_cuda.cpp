// CUDA registration of accumulate_importance_: validation shared with the CPU kernel, then one raw launch.
#include <torch/library.h>

#include "accumulate_importance.h"
#include "cuda/accumulate_importance_kernels.cuh"
#include "cuda/torch_glue.h"

namespace lrsparse {
namespace {

void accumulate_importance_cuda(at::Tensor& ema, at::Tensor& uncertainty, const at::Tensor& weight,
                                const at::Tensor& grad, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& fisher, double beta1, double beta2,
                                double beta_fisher, std::string_view criterion) {
  const Criterion parsed = check_accumulate_importance_args(ema, uncertainty, weight, grad, mask, fisher, beta1,
                                                            beta2, beta_fisher, criterion);
  cuda::check_cuda_tensor(weight, "weight");
  const bool has_mask = mask.has_value() && mask->defined();
  const bool has_fisher = fisher.has_value() && fisher->defined();
  const c10::cuda::CUDAGuard device_guard(weight.device());
  cuda::ImportanceArgs args{};
  args.ema = ema.data_ptr<float>();
  args.uncertainty = uncertainty.data_ptr<float>();
  args.fisher = has_fisher ? fisher->data_ptr<float>() : nullptr;
  args.weight = weight.const_data_ptr();
  args.grad = grad.const_data_ptr();
  args.mask = has_mask ? cuda::mask_bytes(*mask) : nullptr;
  args.numel = weight.numel();
  args.weight_kind = cuda::float_kind(weight.scalar_type(), "weight");
  args.criterion = parsed == Criterion::kSensitivity ? cuda::ImportanceCriterion::kSensitivity
                                                     : cuda::ImportanceCriterion::kMovement;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.beta_fisher = beta_fisher;
  C10_CUDA_CHECK(cuda::launch_accumulate_importance(args, cuda::current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CUDA, m) { m.impl("accumulate_importance_", &accumulate_importance_cuda); }

}  // namespace lrsparse
