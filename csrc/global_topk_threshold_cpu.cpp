// CPU kernels of lrsparse::global_topk_threshold and lrsparse::apply_threshold_mask_.
//
// global_topk_threshold finds the exact k-th largest live score over a list of tensors without concatenating
// them: a radix select over the float32 scores mapped to order-preserving uint32 keys, two passes of 16-bit
// digit histograms (high digit, then the low digit among the entries whose high digit was selected). Scores are
// recomputed on the fly (ema * uncertainty, one float32 multiply like the reference), so each pass reads the
// state once and writes nothing. The work is cut into fixed chunks of one tensor each, grouped into contiguous
// runs with one histogram per run; histograms are integer counts, so their merge is exact and deterministic.
//
// apply_threshold_mask_ keeps every live entry above the threshold and the first `ties_to_keep` live entries
// equal to it in (tensor index, flat index) order. It first keeps every tie while counting the ties of each
// chunk; a prefix sum over the chunk counts then says which chunks hold ties beyond the budget, and only those
// are visited again to drop their surplus ties. With distinct scores there is one tie and a single pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "global_topk_checks.h"

namespace lrsparse {
namespace {

constexpr int64_t kChunkEntries = int64_t{1} << 16;  // unit of work and of tie counting
constexpr int64_t kBlockEntries = 1024;              // keys are staged in blocks this long (on the stack)
constexpr uint32_t kDigitBins = 1u << 16;
constexpr uint32_t kSkipBin = kDigitBins;  // extra histogram slot that absorbs entries not being counted
constexpr int64_t kHistogramSlots = kDigitBins + 1;

// The state of one tensor of the list; uncertainty and mask are nullptr when absent.
struct ScoreSource {
  const float* ema;
  const float* uncertainty;
  const uint8_t* mask;  // bool storage is read as bytes 0/1
  int64_t numel;
};

struct Chunk {
  int64_t source;
  int64_t begin;
  int64_t end;
};

// Maps a float32 score to a uint32 whose unsigned order is the numeric order of the scores. Adding +0 turns -0
// into +0 so that the two zeros, which compare equal as floats, get the same key.
inline uint32_t order_key(float score) {
  const float canonical = score + 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &canonical, sizeof(bits));
  // Negative: flip every bit (larger magnitude -> smaller key); non-negative: flip the sign bit only.
  const uint32_t flip = (0u - (bits >> 31)) | 0x80000000u;
  return bits ^ flip;
}

inline float key_to_score(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  float score;
  std::memcpy(&score, &bits, sizeof(score));
  return score;
}

template <bool kHasUncertainty>
inline float score_at(const float* __restrict__ ema, const float* __restrict__ uncertainty, int64_t i) {
  if constexpr (kHasUncertainty) {
    return ema[i] * uncertainty[i];
  } else {
    return ema[i];
  }
}

// ------------------------------------------------------------------------------------------------------------
// Validation shared by both operators
// ------------------------------------------------------------------------------------------------------------
struct ScoreInputs {
  std::vector<ScoreSource> sources;
  bool has_uncertainty;
  bool has_mask;
};

// Validation is shared with the CUDA kernels (global_topk_checks.h); this only gathers the pointers.
ScoreInputs check_score_inputs(const char* op, const at::TensorList ema, const at::TensorList uncertainty,
                               const at::TensorList masks, bool masks_required) {
  const ScoreListLayout layout = check_score_lists(op, ema, uncertainty, masks, masks_required);
  ScoreInputs inputs{{}, layout.has_uncertainty, layout.has_mask};
  inputs.sources.reserve(ema.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    ScoreSource source{ema[i].const_data_ptr<float>(), nullptr, nullptr, ema[i].numel()};
    if (inputs.has_uncertainty) source.uncertainty = uncertainty[i].const_data_ptr<float>();
    if (inputs.has_mask) source.mask = static_cast<const uint8_t*>(masks[i].const_data_ptr());
    inputs.sources.push_back(source);
  }
  return inputs;
}

std::vector<Chunk> make_chunks(const std::vector<ScoreSource>& sources) {
  std::vector<Chunk> chunks;
  for (size_t s = 0; s < sources.size(); ++s) {
    for (int64_t begin = 0; begin < sources[s].numel; begin += kChunkEntries) {
      chunks.push_back({static_cast<int64_t>(s), begin, std::min(begin + kChunkEntries, sources[s].numel)});
    }
  }
  return chunks;
}

// ------------------------------------------------------------------------------------------------------------
// global_topk_threshold
// ------------------------------------------------------------------------------------------------------------

// `counted ? digit : kSkipBin` (counted is 0 or 1) as bit operations: GCC keeps a conditional on a loaded byte as
// a branch, which stops the digit loop from vectorizing.
inline uint32_t digit_or_skip(uint32_t counted, uint32_t digit) {
  const uint32_t all_ones_if_counted = 0u - counted;
  return (digit & all_ones_if_counted) | (kSkipBin & ~all_ones_if_counted);
}

// Adds the digit of every entry of `chunk` to `histogram`; `digit_of(key, live)` returns kSkipBin for entries
// not counted. Returns whether a live entry has a NaN score.
template <bool kHasUncertainty, bool kHasMask, typename DigitOf>
bool histogram_chunk(const ScoreSource& source, const Chunk& chunk, const DigitOf& digit_of,
                     uint32_t* __restrict__ histogram) {
  const float* __restrict__ ema = source.ema;
  const float* __restrict__ uncertainty = source.uncertainty;
  const uint8_t* __restrict__ mask = source.mask;
  uint32_t digits[kBlockEntries];
  uint32_t nan_seen = 0;
  for (int64_t block = chunk.begin; block < chunk.end; block += kBlockEntries) {
    const int64_t count = std::min(kBlockEntries, chunk.end - block);
    // Branch-free, vectorizable: score, key and digit of each entry.
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = block + j;
      const float score = score_at<kHasUncertainty>(ema, uncertainty, i);
      const uint32_t live = kHasMask ? static_cast<uint32_t>(mask[i] != 0) : 1u;
      nan_seen |= static_cast<uint32_t>(score != score) & live;
      digits[j] = digit_of(order_key(score), live);
    }
    for (int64_t j = 0; j < count; ++j) ++histogram[digits[j]];
  }
  return nan_seen != 0;
}

// One counting pass over all chunks. Returns the merged histogram (kDigitBins counts, skipped entries dropped)
// and sets nan_in_source[s] for each tensor with a live NaN score.
template <bool kHasUncertainty, bool kHasMask, typename DigitOf>
std::vector<int64_t> histogram_pass(const std::vector<ScoreSource>& sources, const std::vector<Chunk>& chunks,
                                    const DigitOf& digit_of, std::vector<uint8_t>& nan_in_source) {
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // One histogram per contiguous run of chunks; enough runs that a run's uint32 counts cannot overflow.
  constexpr int64_t kMaxChunksPerRun = (int64_t{1} << 31) / kChunkEntries;
  const int64_t num_runs = std::min<int64_t>(
      num_chunks, std::max<int64_t>(at::get_num_threads(), (num_chunks + kMaxChunksPerRun - 1) / kMaxChunksPerRun));
  std::vector<int64_t> merged(kDigitBins, 0);
  if (num_runs == 0) return merged;
  std::vector<uint32_t> run_histograms(static_cast<size_t>(num_runs) * kHistogramSlots, 0);
  std::vector<uint8_t> nan_in_chunk(num_chunks, 0);
  at::parallel_for(0, num_runs, 1, [&](int64_t run_begin, int64_t run_end) {
    for (int64_t run = run_begin; run < run_end; ++run) {
      uint32_t* histogram = run_histograms.data() + run * kHistogramSlots;
      for (int64_t c = run * num_chunks / num_runs; c < (run + 1) * num_chunks / num_runs; ++c) {
        const Chunk& chunk = chunks[c];
        nan_in_chunk[c] =
            histogram_chunk<kHasUncertainty, kHasMask>(sources[chunk.source], chunk, digit_of, histogram);
      }
    }
  });
  for (int64_t run = 0; run < num_runs; ++run) {
    const uint32_t* histogram = run_histograms.data() + run * kHistogramSlots;
    for (uint32_t bin = 0; bin < kDigitBins; ++bin) merged[bin] += histogram[bin];
  }
  for (int64_t c = 0; c < num_chunks; ++c) nan_in_source[chunks[c].source] |= nan_in_chunk[c];
  return merged;
}

struct DigitChoice {
  uint32_t digit;
  int64_t count_above;  // entries counted in higher bins
};

// The bin holding the k-th largest counted entry (1 <= k <= total count), scanning from the largest digit.
DigitChoice choose_digit(const std::vector<int64_t>& histogram, int64_t k) {
  int64_t above = 0;
  for (int64_t bin = kDigitBins - 1; bin >= 0; --bin) {
    if (above + histogram[bin] >= k) return {static_cast<uint32_t>(bin), above};
    above += histogram[bin];
  }
  TORCH_INTERNAL_ASSERT(false, "global_topk_threshold: k exceeds the histogram total");
}

void check_no_nan(const std::vector<uint8_t>& nan_in_source, bool has_uncertainty) {
  for (size_t s = 0; s < nan_in_source.size(); ++s) {
    if (!nan_in_source[s]) continue;
    if (has_uncertainty) {
      TORCH_CHECK(false, "global_topk_threshold: the score ", indexed("ema", s), " * ", indexed("uncertainty", s),
                  " is NaN at a live entry; ema and uncertainty must be free of NaN (and of inf * 0)");
    }
    TORCH_CHECK(false, "global_topk_threshold: ", indexed("ema", s), " is NaN at a live entry; ema must be free of NaN");
  }
}

template <bool kHasUncertainty, bool kHasMask>
std::tuple<at::Tensor, at::Tensor> select_threshold(const std::vector<ScoreSource>& sources, int64_t k) {
  const std::vector<Chunk> chunks = make_chunks(sources);
  std::vector<uint8_t> nan_in_source(sources.size(), 0);
  const auto high_digit = [](uint32_t key, uint32_t live) { return digit_or_skip(live, key >> 16); };
  const std::vector<int64_t> high_histogram =
      histogram_pass<kHasUncertainty, kHasMask>(sources, chunks, high_digit, nan_in_source);
  check_no_nan(nan_in_source, kHasUncertainty);
  int64_t live_count = 0;
  for (int64_t count : high_histogram) live_count += count;
  TORCH_CHECK(k >= 0 && k <= live_count, "global_topk_threshold: k must be in [0, ", live_count,
              "] (the number of live entries), got ", k);
  auto threshold_tensor = [](float threshold, int64_t ties) {
    return std::make_tuple(at::scalar_tensor(threshold, at::kFloat), at::scalar_tensor(ties, at::kLong));
  };
  if (k == 0) return threshold_tensor(std::numeric_limits<float>::infinity(), 0);

  const DigitChoice high = choose_digit(high_histogram, k);
  const uint32_t selected_high = high.digit;
  const auto low_digit = [selected_high](uint32_t key, uint32_t live) {
    // `&` rather than `&&`: no short circuit, so the digit loop stays branch-free and vectorizes.
    const uint32_t counted = live & static_cast<uint32_t>((key >> 16) == selected_high);
    return digit_or_skip(counted, key & 0xFFFFu);
  };
  const std::vector<int64_t> low_histogram =
      histogram_pass<kHasUncertainty, kHasMask>(sources, chunks, low_digit, nan_in_source);
  const int64_t k_in_bin = k - high.count_above;
  const DigitChoice low = choose_digit(low_histogram, k_in_bin);
  const uint32_t key = (selected_high << 16) | low.digit;
  return threshold_tensor(key_to_score(key), k_in_bin - low.count_above);
}

std::tuple<at::Tensor, at::Tensor> global_topk_threshold_cpu(at::TensorList ema, at::TensorList uncertainty,
                                                             at::TensorList masks, int64_t k) {
  const ScoreInputs inputs = check_score_inputs("global_topk_threshold", ema, uncertainty, masks, false);
  TORCH_CHECK(k >= 0, "global_topk_threshold: k must be non-negative, got ", k);
  if (inputs.has_uncertainty) {
    return inputs.has_mask ? select_threshold<true, true>(inputs.sources, k)
                           : select_threshold<true, false>(inputs.sources, k);
  }
  return inputs.has_mask ? select_threshold<false, true>(inputs.sources, k)
                         : select_threshold<false, false>(inputs.sources, k);
}

// ------------------------------------------------------------------------------------------------------------
// apply_threshold_mask_
// ------------------------------------------------------------------------------------------------------------

// The weights are only ever kept or zeroed, so they are handled as raw bits of their width (+0 is all zeros in
// every floating format): one instantiation per width instead of one per dtype.
struct MaskTarget {
  uint8_t* mask;
  void* weight;
};

// Keeps live entries with score >= threshold (so every tie), zeroes the weights of the others and returns the
// number of live ties in the chunk.
template <bool kHasUncertainty, typename weight_bits_t>
int64_t keep_at_or_above(const ScoreSource& source, const MaskTarget& target, const Chunk& chunk, float threshold) {
  const float* __restrict__ ema = source.ema;
  const float* __restrict__ uncertainty = source.uncertainty;
  uint8_t* __restrict__ mask = target.mask;
  weight_bits_t* __restrict__ weight = static_cast<weight_bits_t*>(target.weight);
  // Loop bounds in locals: the byte stores to `mask` could otherwise alias `chunk` and defeat vectorization.
  const int64_t begin = chunk.begin, end = chunk.end;
  int64_t ties = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float score = score_at<kHasUncertainty>(ema, uncertainty, i);
    const bool live = mask[i] != 0;
    const bool keep = live & (score >= threshold);
    ties += live & (score == threshold);
    mask[i] = static_cast<uint8_t>(keep);
    weight[i] = keep ? weight[i] : weight_bits_t{0};
  }
  return ties;
}

// Second visit of a chunk holding more ties than it may keep: the kept ties (mask 1, score == threshold) beyond
// the first `ties_allowed` are pruned.
template <bool kHasUncertainty, typename weight_bits_t>
void drop_surplus_ties(const ScoreSource& source, const MaskTarget& target, const Chunk& chunk, float threshold,
                       int64_t ties_allowed) {
  uint8_t* mask = target.mask;
  weight_bits_t* weight = static_cast<weight_bits_t*>(target.weight);
  int64_t ties_seen = 0;
  for (int64_t i = chunk.begin; i < chunk.end; ++i) {
    if (mask[i] == 0 || score_at<kHasUncertainty>(source.ema, source.uncertainty, i) != threshold) continue;
    if (ties_seen++ >= ties_allowed) {
      mask[i] = 0;
      weight[i] = weight_bits_t{0};
    }
  }
}

template <bool kHasUncertainty, typename weight_bits_t>
void apply_to_chunk(const ScoreSource& source, const MaskTarget& target, const Chunk& chunk, float threshold,
                    int64_t* ties, int64_t ties_allowed, bool first_visit) {
  if (first_visit) {
    *ties = keep_at_or_above<kHasUncertainty, weight_bits_t>(source, target, chunk, threshold);
  } else {
    drop_surplus_ties<kHasUncertainty, weight_bits_t>(source, target, chunk, threshold, ties_allowed);
  }
}

using ChunkVisit = void (*)(const ScoreSource&, const MaskTarget&, const Chunk&, float, int64_t*, int64_t, bool);

template <bool kHasUncertainty>
ChunkVisit chunk_visit_for_width(size_t weight_bytes) {
  switch (weight_bytes) {
    case 2: return &apply_to_chunk<kHasUncertainty, uint16_t>;
    case 4: return &apply_to_chunk<kHasUncertainty, uint32_t>;
    case 8: return &apply_to_chunk<kHasUncertainty, uint64_t>;
    default: TORCH_CHECK(false, "apply_threshold_mask_: unsupported weight element size ", weight_bytes);
  }
}

void apply_threshold_mask_cpu(at::TensorList masks, at::TensorList weights, at::TensorList ema,
                              at::TensorList uncertainty, const at::Tensor& threshold,
                              const at::Tensor& ties_to_keep) {
  const char* op = "apply_threshold_mask_";
  const ScoreInputs inputs = check_score_inputs(op, ema, uncertainty, masks, true);
  check_apply_targets(op, weights, ema, threshold, ties_to_keep);
  std::vector<MaskTarget> targets;
  std::vector<ChunkVisit> visits;
  for (size_t i = 0; i < weights.size(); ++i) {
    targets.push_back({static_cast<uint8_t*>(masks[i].mutable_data_ptr()), weights[i].mutable_data_ptr()});
    visits.push_back(inputs.has_uncertainty ? chunk_visit_for_width<true>(weights[i].element_size())
                                            : chunk_visit_for_width<false>(weights[i].element_size()));
  }
  // Compared in float32 like the reference, which rounds the threshold to float32.
  const float threshold_value = static_cast<float>(threshold.item<double>());
  const int64_t ties_budget = ties_to_keep.item<int64_t>();
  TORCH_CHECK(threshold_value == threshold_value, op, ": threshold must not be NaN");
  TORCH_CHECK(ties_budget >= 0, op, ": ties_to_keep must be non-negative, got ", ties_budget);

  const std::vector<Chunk> chunks = make_chunks(inputs.sources);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> ties(num_chunks, 0);
  auto visit = [&](int64_t c, int64_t ties_allowed, bool first_visit) {
    const Chunk& chunk = chunks[c];
    visits[chunk.source](inputs.sources[chunk.source], targets[chunk.source], chunk, threshold_value, &ties[c],
                         ties_allowed, first_visit);
  };
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) visit(c, 0, true);
  });
  // Ties are granted in chunk order, i.e. (tensor index, flat index) order.
  std::vector<int64_t> over_budget;
  std::vector<int64_t> ties_allowed(num_chunks, 0);
  int64_t granted = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    ties_allowed[c] = std::min(ties[c], ties_budget - granted);
    granted += ties_allowed[c];
    if (ties_allowed[c] < ties[c]) over_budget.push_back(c);
  }
  at::parallel_for(0, static_cast<int64_t>(over_budget.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) visit(over_budget[j], ties_allowed[over_budget[j]], false);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrsparse, CPU, m) {
  m.impl("global_topk_threshold", &global_topk_threshold_cpu);
  m.impl("apply_threshold_mask_", &apply_threshold_mask_cpu);
}

}  // namespace lrsparse
