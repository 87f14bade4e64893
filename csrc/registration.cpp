// Operator schemas of the lrsparse library and the pybind11 module that carries build information.
// This file is always compiled: the kernels for each dispatch key register themselves in
// <op>_cpu.cpp and cuda/<op>_cuda.cpp, and the fake (meta) kernels and autograd live in python/lrsparse/ops.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#ifndef LRSPARSE_WITH_CUDA
#define LRSPARSE_WITH_CUDA 0
#define LRSPARSE_CUDA_VERSION ""
#endif

TORCH_LIBRARY(lrsparse, m) {
  // PLATON-style importance state update for one weight matrix, in place, skipping masked-out entries.
  // criterion: "sensitivity" (I = |w*g|) or "movement" (I = -w*g).
  m.def(
      "accumulate_importance_(Tensor(a!) ema, Tensor(b!) uncertainty, Tensor weight, Tensor grad, "
      "Tensor? mask=None, Tensor(c!)? fisher=None, float beta1=0.85, float beta2=0.95, "
      "float beta_fisher=0.99, str criterion=\"sensitivity\") -> ()");
  // Exact score of the k-th largest live entry over many state tensors (score = ema * uncertainty, or ema
  // alone when `uncertainty` is empty); entries whose mask is 0 are excluded (`masks` empty: none are).
  // Returns (threshold: 0-d float32, ties_to_keep: 0-d int64): keep every live entry with score > threshold
  // and the first `ties_to_keep` entries with score == threshold in (tensor index, flat index) order.
  m.def("global_topk_threshold(Tensor[] ema, Tensor[] uncertainty, Tensor[] masks, int k) -> (Tensor, Tensor)");
  // Applies such a threshold: each mask becomes mask AND kept, and pruned weights are set to exactly 0.
  m.def(
      "apply_threshold_mask_(Tensor(a!)[] masks, Tensor(b!)[] weights, Tensor[] ema, Tensor[] uncertainty, "
      "Tensor threshold, Tensor ties_to_keep) -> ()");
  // Rank-r fit W ~ U @ V minimizing sum(omega * (W - U V)^2) (plain truncated SVD when omega is None).
  m.def(
      "weighted_lowrank(Tensor weight, int rank, Tensor? omega=None, int max_iters=100, float tol=1e-6, "
      "int seed=0, int oversample=10) -> (Tensor, Tensor)");
  // y = (1 - alpha) * x @ sparse_weight^T + alpha * (x @ V^T) @ U^T + bias.
  m.def(
      "mixed_rank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias=None, Tensor? sparse_weight=None, "
      "Tensor? sparse_mask=None, float alpha=1.0) -> Tensor");
  // Gradients (x, U, V, bias, sparse_weight); output_mask says which are needed, the others come back undefined.
  m.def(
      "mixed_rank_linear_backward(Tensor grad_out, Tensor x, Tensor U, Tensor V, Tensor? sparse_weight, "
      "Tensor? sparse_mask, float alpha, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "lrsparse compiled extension: operators are in torch.ops.lrsparse";
  module.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = LRSPARSE_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(LRSPARSE_WITH_CUDA);
    info["cuda_version"] = LRSPARSE_CUDA_VERSION;
    info["compiler"] = LRSPARSE_CXX_COMPILER;
    return info;
  });
}
