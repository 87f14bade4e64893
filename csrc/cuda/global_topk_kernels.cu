// Exact global top-k over many float32 state tensors: radix select for the threshold, then a tie-ordered apply.
#include "cuda/global_topk_kernels.cuh"

#include <cmath>

namespace lrsparse {
namespace cuda {
namespace {

constexpr int kRadixBits = 8;
constexpr int kBuckets = 1 << kRadixBits;
constexpr int kNoBucket = -1;
static_assert(kBuckets == kThreadsPerBlock, "the bucket scan gives one bucket to each thread");

// Same float32 product as the CPU kernel and the reference (ema * uncertainty, one rounding).
__device__ __forceinline__ float score_at(const ScoreSlice& s, int64_t i) {
  return s.uncertainty != nullptr ? __fmul_rn(s.ema[i], s.uncertainty[i]) : s.ema[i];
}

__device__ __forceinline__ bool live_at(const ScoreSlice& s, int64_t i) {
  return s.mask == nullptr || s.mask[i] != 0;
}

// Order-preserving map float -> uint32 (a > b  <=>  key(a) > key(b)); -0.0 is folded onto +0.0 first so that
// equal scores have equal keys.
__device__ __forceinline__ uint32_t score_key(float score) {
  const uint32_t bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_score(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The slice that holds tile blockIdx.x (binary search over first_tile), shared by the whole block.
__device__ __forceinline__ int locate_tile(const ScoreSlice* slices, int num_slices, ScoreSlice* slice,
                                           int64_t* begin, int64_t* end) {
  __shared__ int found;
  if (threadIdx.x == 0) {
    int lo = 0, hi = num_slices - 1;
    while (lo < hi) {  // last slice with first_tile <= tile (zero-tile slices share a first_tile with the next)
      const int mid = (lo + hi + 1) / 2;
      if (slices[mid].first_tile <= static_cast<int64_t>(blockIdx.x)) lo = mid; else hi = mid - 1;
    }
    found = lo;
  }
  __syncthreads();
  *slice = slices[found];
  *begin = (static_cast<int64_t>(blockIdx.x) - slice->first_tile) * kTileElements;
  *end = *begin + kTileElements < slice->numel ? *begin + kTileElements : slice->numel;
  return found;
}

// One radix pass: histogram of digit (key >> shift) & 0xff over the live keys whose higher digits equal the
// prefix chosen so far. Per-block shared histogram (warp-aggregated atomics: many keys share a digit), then one
// global atomic per non-empty bucket. The first pass also counts live entries and NaN scores.
__global__ void __launch_bounds__(kThreadsPerBlock)
    radix_histogram_kernel(const ScoreSlice* slices, int num_slices, SelectState* state, int shift,
                           bool count_live) {
  __shared__ unsigned int histogram[kBuckets];
  __shared__ unsigned int block_live, block_nan;
  histogram[threadIdx.x] = 0;
  if (threadIdx.x == 0) block_live = block_nan = 0;
  ScoreSlice slice;
  int64_t begin, end;
  const int slice_index = locate_tile(slices, num_slices, &slice, &begin, &end);  // synchronizes the zeroing above
  const uint32_t prefix = state->prefix;
  const uint32_t higher_digits = shift + kRadixBits >= 32 ? 0u : (~0u << (shift + kRadixBits));
  unsigned int live = 0, nan = 0;
  // Uniform trip count across the block so every lane takes part in the warp match below.
  for (int64_t base = begin; base < end; base += kThreadsPerBlock) {
    const int64_t i = base + threadIdx.x;
    int bucket = kNoBucket;
    if (i < end && live_at(slice, i)) {
      const float score = score_at(slice, i);
      if (isnan(score)) {
        ++nan;
      } else {
        ++live;
        const uint32_t key = score_key(score);
        if ((key & higher_digits) == prefix) bucket = static_cast<int>((key >> shift) & (kBuckets - 1));
      }
    }
    const unsigned int same = __match_any_sync(0xffffffffu, bucket);
    if (bucket != kNoBucket && (threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&histogram[bucket], __popc(same));
  }
  if (count_live) {
    if (live) atomicAdd(&block_live, live);
    if (nan) atomicAdd(&block_nan, nan);
  }
  __syncthreads();
  if (histogram[threadIdx.x]) atomicAdd(&state->histogram[threadIdx.x], histogram[threadIdx.x]);
  if (count_live && threadIdx.x == 0) {
    if (block_live) atomicAdd(&state->live_count, block_live);
    if (block_nan) {
      atomicAdd(&state->nan_count, block_nan);
      atomicMin(&state->first_nan_slice, static_cast<uint32_t>(slice_index));
    }
  }
}

// Picks the bucket that holds the entry of rank state->rank (counting from the largest key), narrows the prefix
// and the rank to it, and clears the histogram for the next pass. One block; thread t owns bucket 255 - t so the
// exclusive scan counts the entries in larger buckets.
__global__ void __launch_bounds__(kThreadsPerBlock)
    radix_select_bucket_kernel(SelectState* state, int shift, int64_t k, bool first_pass) {
  __shared__ unsigned long long warp_sums[kThreadsPerBlock / 32];
  __shared__ unsigned long long total;
  const int bucket = kBuckets - 1 - threadIdx.x;
  const unsigned long long count = state->histogram[bucket];
  const unsigned long long rank = first_pass ? static_cast<unsigned long long>(k) : state->rank;
  const unsigned long long above = block_exclusive_sum(count, warp_sums, &total);  // synchronizes the reads
  state->histogram[bucket] = 0;
  if (above < rank && rank <= above + count) {
    state->prefix |= static_cast<uint32_t>(bucket) << shift;
    state->rank = rank - above;
  }
  // Only the first pass sees every live entry; later passes then never match (rank stays 0).
  if (threadIdx.x == 0 && first_pass && total < rank) state->k_out_of_range = 1;
}

__global__ void radix_finalize_kernel(const SelectState* state, float* threshold, int64_t* ties_to_keep) {
  *threshold = key_score(state->prefix);
  *ties_to_keep = static_cast<int64_t>(state->rank);
}

// Live entries equal to the threshold, per tile (the tie ranks of a tile start at the sum over earlier tiles).
__global__ void __launch_bounds__(kThreadsPerBlock)
    count_ties_kernel(const ScoreSlice* slices, int num_slices, const float* threshold, int64_t* tile_ties) {
  __shared__ unsigned int block_ties;
  if (threadIdx.x == 0) block_ties = 0;
  ScoreSlice slice;
  int64_t begin, end;
  locate_tile(slices, num_slices, &slice, &begin, &end);
  const float thr = *threshold;
  unsigned int ties = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreadsPerBlock) {
    ties += live_at(slice, i) && score_at(slice, i) == thr;
  }
  if (ties) atomicAdd(&block_ties, ties);
  __syncthreads();
  if (threadIdx.x == 0) tile_ties[blockIdx.x] = block_ties;
}

// In-place exclusive scan of the per-tile tie counts: one block walks the tiles in chunks of the block size.
__global__ void __launch_bounds__(kThreadsPerBlock) exclusive_scan_tiles_kernel(int64_t* tile_ties, int64_t num_tiles) {
  __shared__ long long warp_sums[kThreadsPerBlock / 32];
  __shared__ long long chunk_total;
  long long carry = 0;
  for (int64_t base = 0; base < num_tiles; base += kThreadsPerBlock) {
    const int64_t i = base + threadIdx.x;
    const long long value = i < num_tiles ? tile_ties[i] : 0;
    const long long prefix = block_exclusive_sum(value, warp_sums, &chunk_total);
    if (i < num_tiles) tile_ties[i] = carry + prefix;
    carry += chunk_total;
  }
}

// Writes the kept flags and zeroes pruned weights. Elements are visited in rounds of one block width in flat
// order, so a block-wide scan of the tie flags of a round gives each tie its rank in (tensor, flat index) order.
__global__ void __launch_bounds__(kThreadsPerBlock)
    apply_threshold_kernel(const ScoreSlice* slices, int num_slices, const float* threshold,
                           const int64_t* ties_to_keep, const int64_t* tile_tie_offsets) {
  __shared__ int warp_sums[kThreadsPerBlock / 32];
  __shared__ int round_ties;
  ScoreSlice slice;
  int64_t begin, end;
  locate_tile(slices, num_slices, &slice, &begin, &end);
  const float thr = *threshold;
  const int64_t ties_budget = *ties_to_keep;
  int64_t ties_before = tile_tie_offsets[blockIdx.x];
  for (int64_t base = begin; base < end; base += kThreadsPerBlock) {
    const int64_t i = base + threadIdx.x;
    bool keep = false, tie = false;
    if (i < end && live_at(slice, i)) {
      const float score = score_at(slice, i);
      keep = score > thr;
      tie = score == thr;
    }
    // Ties are rare: most rounds skip the scan.
    if (__syncthreads_count(tie) > 0) {
      const int rank_in_round = block_exclusive_sum(static_cast<int>(tie), warp_sums, &round_ties);
      keep = keep || (tie && ties_before + rank_in_round < ties_budget);
      ties_before += round_ties;
    }
    if (i < end) {
      slice.mask_out[i] = keep ? 1 : 0;
      if (!keep) {
        switch (slice.weight_bytes) {
          case 2: static_cast<uint16_t*>(slice.weight)[i] = 0; break;
          case 4: static_cast<uint32_t*>(slice.weight)[i] = 0; break;
          case 8: static_cast<uint64_t*>(slice.weight)[i] = 0; break;
        }
      }
    }
  }
}

}  // namespace

int64_t assign_tiles(ScoreSlice* slices, int num_slices) {
  int64_t tiles = 0;
  for (int i = 0; i < num_slices; ++i) {
    slices[i].first_tile = tiles;
    tiles += (slices[i].numel + kTileElements - 1) / kTileElements;
  }
  return tiles;
}

cudaError_t upload_slices(const ScoreSlice* host_slices, int num_slices, ScoreSlice* device_slices,
                          cudaStream_t stream) {
  // From pageable memory: returns once the source is staged, so the host array may be freed right after.
  return cudaMemcpyAsync(device_slices, host_slices, sizeof(ScoreSlice) * num_slices, cudaMemcpyHostToDevice,
                         stream);
}

cudaError_t launch_select_threshold(const ScoreSlice* device_slices, int num_slices, int64_t num_tiles, int64_t k,
                                    SelectState* state, float* threshold, int64_t* ties_to_keep,
                                    cudaStream_t stream) {
  if (num_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(state, 0, sizeof(SelectState), stream));
  LRSPARSE_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(&state->first_nan_slice, 0xff, sizeof(state->first_nan_slice), stream));
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    const bool first_pass = shift == 32 - kRadixBits;
    if (num_tiles > 0) {
      radix_histogram_kernel<<<static_cast<unsigned int>(num_tiles), kThreadsPerBlock, 0, stream>>>(
          device_slices, num_slices, state, shift, first_pass);
      LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    radix_select_bucket_kernel<<<1, kThreadsPerBlock, 0, stream>>>(state, shift, k, first_pass);
    LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  radix_finalize_kernel<<<1, 1, 0, stream>>>(state, threshold, ties_to_keep);
  return cudaGetLastError();
}

cudaError_t read_select_status(const SelectState* state, SelectStatus* status, cudaStream_t stream) {
  SelectState copy;
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&copy, state, sizeof(SelectState), cudaMemcpyDeviceToHost, stream));
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  *status = SelectStatus{copy.live_count, copy.nan_count, copy.first_nan_slice, copy.k_out_of_range};
  return cudaSuccess;
}

cudaError_t launch_apply_threshold(const ScoreSlice* device_slices, int num_slices, int64_t num_tiles,
                                   const float* threshold, const int64_t* ties_to_keep, int64_t* tile_ties,
                                   cudaStream_t stream) {
  if (num_tiles == 0) return cudaSuccess;
  if (num_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const auto grid = static_cast<unsigned int>(num_tiles);
  count_ties_kernel<<<grid, kThreadsPerBlock, 0, stream>>>(device_slices, num_slices, threshold, tile_ties);
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  exclusive_scan_tiles_kernel<<<1, kThreadsPerBlock, 0, stream>>>(tile_ties, num_tiles);
  LRSPARSE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  apply_threshold_kernel<<<grid, kThreadsPerBlock, 0, stream>>>(device_slices, num_slices, threshold, ties_to_keep,
                                                                 tile_ties);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lrsparse
