// Masked sparse-path gradient of mixed_rank_linear: one in-place pass over grad(Ws) with 16-byte accesses.
#include "cuda/mixed_rank_linear_kernels.cuh"

namespace lrsparse {
namespace cuda {
namespace {

// kWidth words of type Word per 16 bytes; the mask is read kWidth bytes at a time.
template <typename Word>
struct ZeroPrunedVector {
  static constexpr int kWidth = 16 / sizeof(Word);
  struct alignas(16) Data {
    Word words[kWidth];
  };
  struct alignas(kWidth) Mask {
    uint8_t keep[kWidth];
  };
};

template <typename Word, bool kVectorized>
__global__ void __launch_bounds__(kThreadsPerBlock)
    zero_pruned_kernel(Word* __restrict__ grad, const uint8_t* __restrict__ mask, int64_t numel) {
  using Vector = ZeroPrunedVector<Word>;
  constexpr int kWidth = Vector::kWidth;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if (kVectorized) {
    const int64_t chunks = numel / kWidth;
    for (int64_t chunk = thread; chunk < chunks; chunk += stride) {
      const typename Vector::Mask keep = reinterpret_cast<const typename Vector::Mask*>(mask)[chunk];
      bool all_kept = true;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) all_kept &= keep.keep[j] != 0;
      if (all_kept) continue;  // nothing to change: skip the read and the write
      typename Vector::Data data = reinterpret_cast<const typename Vector::Data*>(grad)[chunk];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) data.words[j] = keep.keep[j] ? data.words[j] : Word(0);
      reinterpret_cast<typename Vector::Data*>(grad)[chunk] = data;
    }
    scalar_begin = chunks * kWidth;
  }
  for (int64_t i = scalar_begin + thread; i < numel; i += stride) {
    if (mask[i] == 0) grad[i] = Word(0);
  }
}

template <typename Word>
cudaError_t launch_words(void* grad, const uint8_t* mask, int64_t numel, cudaStream_t stream) {
  constexpr int kWidth = ZeroPrunedVector<Word>::kWidth;
  const bool vectorized = is_aligned(grad, 16) && is_aligned(mask, kWidth);
  int blocks = 0;
  LRSPARSE_CUDA_RETURN_IF_ERROR(grid_stride_blocks(vectorized ? numel / kWidth + 1 : numel, kThreadsPerBlock, &blocks));
  Word* words = static_cast<Word*>(grad);
  if (vectorized) {
    zero_pruned_kernel<Word, true><<<blocks, kThreadsPerBlock, 0, stream>>>(words, mask, numel);
  } else {
    zero_pruned_kernel<Word, false><<<blocks, kThreadsPerBlock, 0, stream>>>(words, mask, numel);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_zero_pruned(void* grad, int element_bytes, const uint8_t* mask, int64_t numel,
                               cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (element_bytes) {
    case 2: return launch_words<uint16_t>(grad, mask, numel, stream);
    case 4: return launch_words<uint32_t>(grad, mask, numel, stream);
    case 8: return launch_words<uint64_t>(grad, mask, numel, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lrsparse
