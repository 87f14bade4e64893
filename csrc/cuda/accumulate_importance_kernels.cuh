// Raw CUDA kernel of accumulate_importance_ (no torch headers): one fused, vectorized pass over a weight matrix.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_utils.cuh"

namespace lrsparse {
namespace cuda {

enum class ImportanceCriterion : int { kSensitivity = 0, kMovement = 1 };

struct ImportanceArgs {
  float* ema;                // float32 state, numel entries
  float* uncertainty;        // float32 state
  float* fisher;             // float32 state, or nullptr (not tracked)
  const void* weight;        // weight_kind elements
  const void* grad;          // weight_kind elements
  const uint8_t* mask;       // bool/uint8 keep-mask, or nullptr (every entry live)
  int64_t numel;
  FloatKind weight_kind;     // dtype of weight and grad (they share one)
  ImportanceCriterion criterion;
  // The reference multiplies float32 tensors by Python floats: each factor is rounded to float32 once, and
  // 1 - beta is formed in double before that rounding.
  double beta1, beta2, beta_fisher;
};

// Uses 16-byte loads when every pointer allows it (float4 state, 4 fp32 or 8 half/bf16 weight/grad), scalar
// loads otherwise and for the tail (float64 inputs: two 16-byte loads per 4 entries). Returns the launch error, if any.
cudaError_t launch_accumulate_importance(const ImportanceArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrsparse
