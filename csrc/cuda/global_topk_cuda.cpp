// CUDA registration of global_topk_threshold / apply_threshold_mask_. Descriptors of all the tensors go to the
// device in one copy; the threshold and the tie count stay on the device between the two ops.
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/global_topk_kernels.cuh"
#include "cuda/torch_glue.h"
#include "global_topk_checks.h"

namespace lrsparse {
namespace {

std::vector<cuda::ScoreSlice> score_slices(at::TensorList ema, at::TensorList uncertainty, at::TensorList masks,
                                           const ScoreListLayout& layout) {
  std::vector<cuda::ScoreSlice> slices(ema.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    cuda::ScoreSlice& s = slices[i];
    s.ema = ema[i].const_data_ptr<float>();
    s.uncertainty = layout.has_uncertainty ? uncertainty[i].const_data_ptr<float>() : nullptr;
    s.mask = layout.has_mask ? cuda::mask_bytes(masks[i]) : nullptr;
    s.numel = ema[i].numel();
  }
  return slices;
}

// Device copy of the descriptors; the returned byte tensor owns the memory (stream-ordered caching allocator).
at::Tensor upload(std::vector<cuda::ScoreSlice>& slices, const at::Device& device, int64_t* num_tiles) {
  *num_tiles = cuda::assign_tiles(slices.data(), static_cast<int>(slices.size()));
  at::Tensor storage = at::empty({static_cast<int64_t>(slices.size() * sizeof(cuda::ScoreSlice))},
                                 at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cuda::upload_slices(slices.data(), static_cast<int>(slices.size()),
                                     static_cast<cuda::ScoreSlice*>(storage.data_ptr()), cuda::current_stream()));
  return storage;
}

std::tuple<at::Tensor, at::Tensor> global_topk_threshold_cuda(at::TensorList ema, at::TensorList uncertainty,
                                                              at::TensorList masks, int64_t k) {
  const ScoreListLayout layout = check_score_lists("global_topk_threshold", ema, uncertainty, masks, false);
  TORCH_CHECK(k >= 0, "global_topk_threshold: k must be non-negative, got ", k);
  TORCH_CHECK(!ema.empty(), "global_topk_threshold: ema must hold at least one tensor");
  TORCH_CHECK(ema.size() <= static_cast<size_t>(std::numeric_limits<int>::max()),
              "global_topk_threshold: too many tensors in ema (", ema.size(), ")");
  cuda::check_cuda_tensor(ema[0], "ema[0]");
  const c10::cuda::CUDAGuard device_guard(ema[0].device());
  const auto options = at::TensorOptions().device(ema[0].device());

  std::vector<cuda::ScoreSlice> slices = score_slices(ema, uncertainty, masks, layout);
  int64_t num_tiles = 0;
  const at::Tensor device_slices = upload(slices, ema[0].device(), &num_tiles);
  at::Tensor state = at::empty({static_cast<int64_t>(sizeof(cuda::SelectState))}, options.dtype(at::kByte));
  at::Tensor threshold = at::empty({}, options.dtype(at::kFloat));
  at::Tensor ties_to_keep = at::empty({}, options.dtype(at::kLong));
  const cudaStream_t stream = cuda::current_stream();
  auto* select_state = static_cast<cuda::SelectState*>(state.data_ptr());
  C10_CUDA_CHECK(cuda::launch_select_threshold(static_cast<const cuda::ScoreSlice*>(device_slices.const_data_ptr()),
                                               static_cast<int>(slices.size()), num_tiles, k, select_state,
                                               threshold.data_ptr<float>(), ties_to_keep.data_ptr<int64_t>(), stream));

  // The one synchronization: the error checks need the device counters.
  cuda::SelectStatus status{};
  C10_CUDA_CHECK(cuda::read_select_status(select_state, &status, stream));
  if (status.nan_count > 0) {
    const size_t s = status.first_nan_slice;
    if (layout.has_uncertainty) {
      TORCH_CHECK(false, "global_topk_threshold: the score ", indexed("ema", s), " * ", indexed("uncertainty", s),
                  " is NaN at a live entry; ema and uncertainty must be free of NaN (and of inf * 0)");
    }
    TORCH_CHECK(false, "global_topk_threshold: ", indexed("ema", s), " is NaN at a live entry; ema must be free of NaN");
  }
  TORCH_CHECK(!status.k_out_of_range && static_cast<unsigned long long>(k) <= status.live_count,
              "global_topk_threshold: k must be in [0, ", status.live_count, "] (the number of live entries), got ", k);
  if (k == 0) {  // nothing is kept: every score is below +inf and no tie is kept
    threshold.fill_(std::numeric_limits<float>::infinity());
    ties_to_keep.zero_();
  }
  return {threshold, ties_to_keep};
}

// The value checks of the CPU kernel (csrc/global_topk_threshold_cpu.cpp), same messages. threshold_f32 and ties_i64
// are on one device; both flags come back in one copy, the op's one synchronization (it runs once per pruning step,
// right after global_topk_threshold, which synchronizes too). A NaN threshold would compare false everywhere and
// prune every entry; a negative budget would be read as "no ties" on the device.
void check_threshold_values(const char* op, const at::Tensor& threshold_f32, const at::Tensor& ties_i64) {
  const at::Tensor flags = at::stack({threshold_f32.isnan(), ties_i64.lt(0)}).to(at::kCPU);
  const bool* bad = flags.const_data_ptr<bool>();
  TORCH_CHECK(!bad[0], op, ": threshold must not be NaN");
  TORCH_CHECK(!bad[1], op, ": ties_to_keep must be non-negative, got ", ties_i64.item<int64_t>());
}

// threshold and ties_to_keep are used on the device; a CPU scalar is accepted and copied over.
void apply_threshold_mask_cuda(at::TensorList masks, at::TensorList weights, at::TensorList ema,
                               at::TensorList uncertainty, const at::Tensor& threshold,
                               const at::Tensor& ties_to_keep) {
  const char* op = "apply_threshold_mask_";
  const ScoreListLayout layout = check_score_lists(op, ema, uncertainty, masks, true);
  check_apply_targets(op, weights, ema, threshold, ties_to_keep);
  if (ema.empty()) {  // nothing to apply, but the values are refused as on the CPU
    check_threshold_values(op, threshold.to(at::kCPU, at::kFloat), ties_to_keep.to(at::kCPU, at::kLong));
    return;
  }
  TORCH_CHECK(ema.size() <= static_cast<size_t>(std::numeric_limits<int>::max()), op, ": too many tensors in ema (",
              ema.size(), ")");
  cuda::check_cuda_tensor(ema[0], "ema[0]");
  const at::Device device = ema[0].device();
  TORCH_CHECK(threshold.is_cpu() || threshold.device() == device, op, ": threshold must be on ", device,
              " or the CPU, got ", threshold.device());
  TORCH_CHECK(ties_to_keep.is_cpu() || ties_to_keep.device() == device, op, ": ties_to_keep must be on ", device,
              " or the CPU, got ", ties_to_keep.device());
  const c10::cuda::CUDAGuard device_guard(device);
  // Compared in float32 like the reference.
  const at::Tensor threshold_f32 = threshold.to(device, at::kFloat);
  const at::Tensor ties_i64 = ties_to_keep.to(device, at::kLong);
  check_threshold_values(op, threshold_f32, ties_i64);

  std::vector<cuda::ScoreSlice> slices = score_slices(ema, uncertainty, masks, layout);
  for (size_t i = 0; i < slices.size(); ++i) {
    slices[i].mask_out = static_cast<uint8_t*>(masks[i].mutable_data_ptr());
    slices[i].weight = weights[i].mutable_data_ptr();
    slices[i].weight_bytes = static_cast<int32_t>(weights[i].element_size());
    TORCH_CHECK(slices[i].weight_bytes == 2 || slices[i].weight_bytes == 4 || slices[i].weight_bytes == 8, op,
                ": unsupported weight element size ", slices[i].weight_bytes);
  }
  int64_t num_tiles = 0;
  const at::Tensor device_slices = upload(slices, device, &num_tiles);
  at::Tensor tile_ties = at::empty({num_tiles}, at::TensorOptions().dtype(at::kLong).device(device));
  C10_CUDA_CHECK(cuda::launch_apply_threshold(static_cast<const cuda::ScoreSlice*>(device_slices.const_data_ptr()),
                                              static_cast<int>(slices.size()), num_tiles,
                                              threshold_f32.const_data_ptr<float>(),
                                              ties_i64.const_data_ptr<int64_t>(), tile_ties.data_ptr<int64_t>(),
                                              cuda::current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CUDA, m) {
  m.impl("global_topk_threshold", &global_topk_threshold_cuda);
  m.impl("apply_threshold_mask_", &apply_threshold_mask_cuda);
}

}  // namespace lrsparse
