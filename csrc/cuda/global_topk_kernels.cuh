// Raw CUDA kernels of global_topk_threshold / apply_threshold_mask_ (no torch headers).
//
// The state tensors are never concatenated: a device array of ScoreSlice descriptors (pointers + numel) is walked
// in tiles of kTileElements, each tile inside one tensor and tiles numbered in (tensor index, flat index) order.
// Selection is an exact 4-pass radix select (8 bits per pass) over order-preserving uint32 keys of the float32
// scores, with the chosen bucket and the remaining rank kept on the device between passes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_utils.cuh"

namespace lrsparse {
namespace cuda {

constexpr int kTopkItemsPerThread = 16;
constexpr int64_t kTileElements = static_cast<int64_t>(kThreadsPerBlock) * kTopkItemsPerThread;

struct ScoreSlice {
  const float* ema;          // float32 scores (or the first factor of them)
  const float* uncertainty;  // score = ema * uncertainty; nullptr: score = ema
  const uint8_t* mask;       // live entries (nonzero); nullptr: all live
  int64_t numel;
  int64_t first_tile;        // set by assign_tiles
  // apply_threshold_mask_ only: the mask to overwrite with the kept flags (0/1) and the weight whose pruned
  // entries become +0.0 (any IEEE type of weight_bytes = 2, 4 or 8 bytes).
  uint8_t* mask_out;
  void* weight;
  int32_t weight_bytes;
};

// Device-side state of the radix select; zeroed by launch_select_threshold.
struct SelectState {
  unsigned long long histogram[256];
  unsigned long long live_count;  // live entries with a non-NaN score
  unsigned long long nan_count;   // live entries whose score is NaN (an error)
  unsigned long long rank;        // rank (1 = largest) of the wanted entry among those matching `prefix`
  uint32_t prefix;                // key bits chosen so far
  int32_t k_out_of_range;         // k > live_count
  uint32_t first_nan_slice;       // lowest slice index with a NaN score (UINT32_MAX: none)
};

struct SelectStatus {
  unsigned long long live_count;
  unsigned long long nan_count;
  uint32_t first_nan_slice;
  int32_t k_out_of_range;
};

// Fills slices[i].first_tile and returns the total number of tiles.
int64_t assign_tiles(ScoreSlice* slices, int num_slices);

// Copies the host descriptors to device memory (`device_slices`, num_slices entries) on `stream`.
cudaError_t upload_slices(const ScoreSlice* host_slices, int num_slices, ScoreSlice* device_slices,
                          cudaStream_t stream);

// Score of the k-th largest live entry (k >= 1) and how many entries equal to it to keep, written to the device
// scalars `threshold` and `ties_to_keep`. NaN scores and k > live entries are reported through `state`
// (read_select_status), the results are then meaningless.
cudaError_t launch_select_threshold(const ScoreSlice* device_slices, int num_slices, int64_t num_tiles, int64_t k,
                                    SelectState* state, float* threshold, int64_t* ties_to_keep,
                                    cudaStream_t stream);

// Copies the error counters to the host and waits for `stream` (the single synchronization of the selection).
cudaError_t read_select_status(const SelectState* state, SelectStatus* status, cudaStream_t stream);

// mask_out = live && (score > threshold || it is one of the first ties_to_keep entries equal to threshold in
// (tensor, flat index) order); weight = 0 wherever the result is 0. `tile_ties` is scratch of num_tiles int64.
cudaError_t launch_apply_threshold(const ScoreSlice* device_slices, int num_slices, int64_t num_tiles,
                                   const float* threshold, const int64_t* ties_to_keep, int64_t* tile_ties,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace lrsparse
