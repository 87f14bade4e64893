// PLATON importance update: I = |w*g| or -w*g; ema = b1*ema + (1-b1)*I; unc = b2*unc + (1-b2)*|I - ema_new|;
// fisher = bf*fisher + (1-bf)*g*g; entries with mask 0 keep their state. Memory-bound: one read of every input,
// one write of every state tensor, 16-byte transactions where aligned.
#include "cuda/accumulate_importance_kernels.cuh"

namespace lrsparse {
namespace cuda {
namespace {

struct Coefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, beta_fisher, one_minus_beta_fisher;
};

// Explicit _rn intrinsics: nvcc would otherwise contract a*b + c*d into an FMA and round differently from the
// float32 reference (two products, one sum, each rounded).
template <ImportanceCriterion kCriterion, bool kHasFisher>
__device__ __forceinline__ void update_entry(float& ema, float& uncertainty, float& fisher, float w, float g,
                                             const Coefficients& c) {
  const float product = __fmul_rn(w, g);
  const float importance = kCriterion == ImportanceCriterion::kSensitivity ? fabsf(product) : -product;
  const float new_ema = __fadd_rn(__fmul_rn(c.beta1, ema), __fmul_rn(c.one_minus_beta1, importance));
  const float deviation = fabsf(__fsub_rn(importance, new_ema));
  uncertainty = __fadd_rn(__fmul_rn(c.beta2, uncertainty), __fmul_rn(c.one_minus_beta2, deviation));
  ema = new_ema;
  if (kHasFisher) fisher = __fadd_rn(__fmul_rn(c.beta_fisher, fisher), __fmul_rn(__fmul_rn(c.one_minus_beta_fisher, g), g));
}

template <typename T, ImportanceCriterion kCriterion, bool kHasMask, bool kHasFisher>
__device__ __forceinline__ void update_scalar(const ImportanceArgs& a, const Coefficients& c, int64_t i) {
  if (kHasMask && a.mask[i] == 0) return;
  float ema = a.ema[i], unc = a.uncertainty[i], fisher = kHasFisher ? a.fisher[i] : 0.f;
  update_entry<kCriterion, kHasFisher>(ema, unc, fisher, to_float(static_cast<const T*>(a.weight)[i]),
                                       to_float(static_cast<const T*>(a.grad)[i]), c);
  a.ema[i] = ema;
  a.uncertainty[i] = unc;
  if (kHasFisher) a.fisher[i] = fisher;
}

// Entries per vector step: 16 bytes of T (4 float32, 8 half/bf16) and at least one float4 of state (4 float64).
template <typename T>
struct VectorWidth {
  static constexpr int value = 16 / sizeof(T) > 4 ? 16 / sizeof(T) : 4;
  static constexpr int input_loads = value * sizeof(T) / 16;  // uint4 loads of weight (and of grad)
};

template <int kWidth>
struct alignas(kWidth) MaskVector {
  uint8_t keep[kWidth];
};

template <typename T, ImportanceCriterion kCriterion, bool kHasMask, bool kHasFisher, bool kVectorized>
__global__ void __launch_bounds__(kThreadsPerBlock)
    accumulate_importance_kernel(ImportanceArgs a, Coefficients c) {
  constexpr int kWidth = VectorWidth<T>::value;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_begin = 0;
  if (kVectorized) {
    const int64_t chunks = a.numel / kWidth;
    for (int64_t chunk = thread; chunk < chunks; chunk += stride) {
      const int64_t base = chunk * kWidth;
      MaskVector<kWidth> keep;
      if (kHasMask) {
        keep = *reinterpret_cast<const MaskVector<kWidth>*>(a.mask + base);
        bool any = false;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) any |= keep.keep[j] != 0;
        if (!any) continue;  // a pruned block of entries: nothing to read or write
      }
      // Register arrays reinterpreted as float4/uint4 need the vector alignment.
      alignas(16) float ema[kWidth], unc[kWidth], fisher[kWidth];
      alignas(16) T w[kWidth], g[kWidth];
#pragma unroll
      for (int j = 0; j < kWidth; j += 4) {
        *reinterpret_cast<float4*>(ema + j) = *reinterpret_cast<const float4*>(a.ema + base + j);
        *reinterpret_cast<float4*>(unc + j) = *reinterpret_cast<const float4*>(a.uncertainty + base + j);
        if (kHasFisher) *reinterpret_cast<float4*>(fisher + j) = *reinterpret_cast<const float4*>(a.fisher + base + j);
      }
#pragma unroll
      for (int j = 0; j < VectorWidth<T>::input_loads; ++j) {
        reinterpret_cast<uint4*>(w)[j] = reinterpret_cast<const uint4*>(static_cast<const T*>(a.weight) + base)[j];
        reinterpret_cast<uint4*>(g)[j] = reinterpret_cast<const uint4*>(static_cast<const T*>(a.grad) + base)[j];
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        float new_ema = ema[j], new_unc = unc[j], new_fisher = kHasFisher ? fisher[j] : 0.f;
        update_entry<kCriterion, kHasFisher>(new_ema, new_unc, new_fisher, to_float(w[j]), to_float(g[j]), c);
        const bool live = !kHasMask || keep.keep[j] != 0;
        ema[j] = live ? new_ema : ema[j];
        unc[j] = live ? new_unc : unc[j];
        if (kHasFisher) fisher[j] = live ? new_fisher : fisher[j];
      }
#pragma unroll
      for (int j = 0; j < kWidth; j += 4) {
        *reinterpret_cast<float4*>(a.ema + base + j) = *reinterpret_cast<const float4*>(ema + j);
        *reinterpret_cast<float4*>(a.uncertainty + base + j) = *reinterpret_cast<const float4*>(unc + j);
        if (kHasFisher) *reinterpret_cast<float4*>(a.fisher + base + j) = *reinterpret_cast<const float4*>(fisher + j);
      }
    }
    scalar_begin = chunks * kWidth;
  }
  for (int64_t i = scalar_begin + thread; i < a.numel; i += stride) {
    update_scalar<T, kCriterion, kHasMask, kHasFisher>(a, c, i);
  }
}

template <typename T, ImportanceCriterion kCriterion, bool kHasMask, bool kHasFisher>
cudaError_t launch_typed(const ImportanceArgs& a, const Coefficients& c, cudaStream_t stream) {
  constexpr int kWidth = VectorWidth<T>::value;
  // float4 state loads need 16-byte alignment; the mask is read kWidth bytes at a time.
  const bool vectorized = is_aligned(a.ema, 16) && is_aligned(a.uncertainty, 16) && is_aligned(a.fisher, 16) &&
                          is_aligned(a.weight, 16) && is_aligned(a.grad, 16) && is_aligned(a.mask, kWidth);
  int blocks = 0;
  LRSPARSE_CUDA_RETURN_IF_ERROR(grid_stride_blocks(vectorized ? a.numel / kWidth + 1 : a.numel, kThreadsPerBlock, &blocks));
  if (vectorized) {
    accumulate_importance_kernel<T, kCriterion, kHasMask, kHasFisher, true><<<blocks, kThreadsPerBlock, 0, stream>>>(a, c);
  } else {
    accumulate_importance_kernel<T, kCriterion, kHasMask, kHasFisher, false><<<blocks, kThreadsPerBlock, 0, stream>>>(a, c);
  }
  return cudaGetLastError();
}

// Turns the runtime flags into template arguments, one level at a time.
template <typename T, ImportanceCriterion kCriterion, bool kHasMask>
cudaError_t dispatch_fisher(const ImportanceArgs& a, const Coefficients& c, cudaStream_t stream) {
  return a.fisher != nullptr ? launch_typed<T, kCriterion, kHasMask, true>(a, c, stream)
                             : launch_typed<T, kCriterion, kHasMask, false>(a, c, stream);
}

template <typename T, ImportanceCriterion kCriterion>
cudaError_t dispatch_mask(const ImportanceArgs& a, const Coefficients& c, cudaStream_t stream) {
  return a.mask != nullptr ? dispatch_fisher<T, kCriterion, true>(a, c, stream)
                           : dispatch_fisher<T, kCriterion, false>(a, c, stream);
}

template <typename T>
cudaError_t dispatch_criterion(const ImportanceArgs& a, const Coefficients& c, cudaStream_t stream) {
  switch (a.criterion) {
    case ImportanceCriterion::kSensitivity:
      return dispatch_mask<T, ImportanceCriterion::kSensitivity>(a, c, stream);
    case ImportanceCriterion::kMovement:
      return dispatch_mask<T, ImportanceCriterion::kMovement>(a, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_accumulate_importance(const ImportanceArgs& args, cudaStream_t stream) {
  if (args.numel == 0) return cudaSuccess;
  const Coefficients c{static_cast<float>(args.beta1),       static_cast<float>(1.0 - args.beta1),
                       static_cast<float>(args.beta2),       static_cast<float>(1.0 - args.beta2),
                       static_cast<float>(args.beta_fisher), static_cast<float>(1.0 - args.beta_fisher)};
  switch (args.weight_kind) {
    case FloatKind::kFloat32:
      return dispatch_criterion<float>(args, c, stream);
    case FloatKind::kBFloat16:
      return dispatch_criterion<__nv_bfloat16>(args, c, stream);
    case FloatKind::kFloat16:
      return dispatch_criterion<__half>(args, c, stream);
    case FloatKind::kFloat64:
      return dispatch_criterion<double>(args, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrsparse
