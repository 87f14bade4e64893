"""Python entry points of the lrsparse operators, with their fake (meta) kernels and autograd.

The schemas live in csrc/registration.cpp and the kernels in csrc/ (CPU) and csrc/cuda/ (CUDA); this module adds
what torch.compile and autograd need. Each function documents its contract; :mod:`lrsparse.reference` holds the
pure-PyTorch equivalent of each.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lrsparse._extension import load_extension

_C, BUILD_INFO = load_extension()
_ops = torch.ops.lrsparse

__all__ = [
    "accumulate_importance_",
    "global_topk_threshold",
    "apply_threshold_mask_",
    "weighted_lowrank",
    "mixed_rank_linear",
    "BUILD_INFO",
]


def _check_same_device(reference_name: str, reference: Tensor, **tensors: Tensor | None) -> None:
    """check_same_device of csrc/checks.h for the fake kernels: a call mixing a ``meta`` tensor with real ones is
    dispatched to them (Meta outranks CPU/CUDA), so the C++ checks never see it."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise RuntimeError(f"{name} must be on the device of {reference_name} ({reference.device}), got "
                               f"{tensor.device}")


def _indexed(name: str, tensors) -> dict[str, Tensor]:
    return {f"{name}[{i}]": t for i, t in enumerate(tensors)}


# ----------------------------------------------------------------------------------------------------------------
# accumulate_importance_
# ----------------------------------------------------------------------------------------------------------------
def accumulate_importance_(
    ema: Tensor,
    uncertainty: Tensor,
    weight: Tensor,
    grad: Tensor,
    mask: Tensor | None = None,
    fisher: Tensor | None = None,
    *,
    beta1: float = 0.85,
    beta2: float = 0.95,
    beta_fisher: float = 0.99,
    criterion: str = "sensitivity",
) -> None:
    """One fused PLATON step on one weight matrix, in place.

    ``I = |w*g|`` ("sensitivity") or ``-w*g`` ("movement"); ``ema = b1*ema + (1-b1)*I``;
    ``uncertainty = b2*uncertainty + (1-b2)*|I - ema|``; ``fisher = bf*fisher + (1-bf)*g^2`` when given.
    Entries whose ``mask`` is 0 keep their state. State tensors are float32; weight/grad float32, bf16 or fp16.
    """
    _ops.accumulate_importance_(
        ema, uncertainty, weight, grad, mask, fisher, float(beta1), float(beta2), float(beta_fisher), criterion
    )


@torch.library.register_fake("lrsparse::accumulate_importance_")
def _accumulate_importance_fake(
    ema, uncertainty, weight, grad, mask=None, fisher=None, beta1=0.85, beta2=0.95, beta_fisher=0.99,
    criterion="sensitivity",
):
    # Defaults as in the schema: the dispatcher drops trailing arguments equal to their defaults.
    _check_same_device("weight", weight, grad=grad, ema=ema, uncertainty=uncertainty, mask=mask, fisher=fisher)
    return None


# ----------------------------------------------------------------------------------------------------------------
# global_topk_threshold / apply_threshold_mask_
# ----------------------------------------------------------------------------------------------------------------
def global_topk_threshold(
    ema: Sequence[Tensor],
    uncertainty: Sequence[Tensor] | None,
    masks: Sequence[Tensor] | None,
    k: int,
) -> tuple[Tensor, Tensor]:
    """Exact k-th largest score over many tensors without concatenating them.

    The score of an entry is ``ema * uncertainty`` (or ``ema`` alone when ``uncertainty`` is None); entries whose
    mask is 0 are excluded. Returns ``(threshold, ties_to_keep)``: keeping every live entry with score > threshold
    plus the first ``ties_to_keep`` entries equal to it, in (tensor index, flat index) order, keeps exactly k.
    """
    return _ops.global_topk_threshold(list(ema), list(uncertainty or []), list(masks or []), int(k))


@torch.library.register_fake("lrsparse::global_topk_threshold")
def _global_topk_threshold_fake(ema, uncertainty, masks, k):
    if len(ema):
        _check_same_device("ema[0]", ema[0], **_indexed("ema", ema), **_indexed("uncertainty", uncertainty),
                           **_indexed("masks", masks))
    device = ema[0].device if len(ema) else torch.device("cpu")
    return (torch.empty((), dtype=torch.float32, device=device), torch.empty((), dtype=torch.int64, device=device))


def apply_threshold_mask_(
    masks: Sequence[Tensor],
    weights: Sequence[Tensor],
    ema: Sequence[Tensor],
    uncertainty: Sequence[Tensor] | None,
    threshold: Tensor,
    ties_to_keep: Tensor,
) -> None:
    """``mask &= score is kept`` for every tensor, and pruned weights become exactly 0 (fused, in place)."""
    _ops.apply_threshold_mask_(list(masks), list(weights), list(ema), list(uncertainty or []), threshold, ties_to_keep)


@torch.library.register_fake("lrsparse::apply_threshold_mask_")
def _apply_threshold_mask_fake(masks, weights, ema, uncertainty, threshold, ties_to_keep):
    # threshold and ties_to_keep are read as values: any device will do.
    if len(ema):
        _check_same_device("ema[0]", ema[0], **_indexed("ema", ema), **_indexed("uncertainty", uncertainty),
                           **_indexed("masks", masks), **_indexed("weights", weights))
    return None


# ----------------------------------------------------------------------------------------------------------------
# weighted_lowrank
# ----------------------------------------------------------------------------------------------------------------
def weighted_lowrank(
    weight: Tensor,
    rank: int,
    omega: Tensor | None = None,
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    oversample: int = 10,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``U (m x r)``, ``V (r x n)`` minimizing ``sum(omega * (W - U V)^2)``.

    ``omega`` None gives the truncated SVD; otherwise EM (fill ``omega*W + (1-omega)*UV``, refit rank r) with a
    warm-started randomized subspace iteration, stopped after ``max_iters`` or when the relative decrease of the
    weighted error drops below ``tol``. Deterministic for a given ``seed``; singular values are split evenly
    between U and V. Not differentiable.
    """
    return _ops.weighted_lowrank(weight, int(rank), omega, int(max_iters), float(tol), int(seed), int(oversample))


@torch.library.register_fake("lrsparse::weighted_lowrank")
def _weighted_lowrank_fake(weight, rank, omega=None, max_iters=100, tol=1e-6, seed=0, oversample=10):
    # Defaults as in the schema: the dispatcher drops trailing arguments equal to their defaults.
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    _check_same_device("weight", weight, omega=omega)
    m, n = weight.shape
    return weight.new_empty((m, rank)), weight.new_empty((rank, n))


# ----------------------------------------------------------------------------------------------------------------
# mixed_rank_linear
# ----------------------------------------------------------------------------------------------------------------
def mixed_rank_linear(
    x: Tensor,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    sparse_weight: Tensor | None = None,
    sparse_mask: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``(1 - alpha) * x @ Ws^T + alpha * (x @ V^T) @ U^T + bias`` for ``x`` of shape ``(..., in)``.

    ``U`` is ``(out, r)``, ``V`` is ``(r, in)``; ``sparse_weight`` (``Ws``, dense storage, zero where pruned) is
    ``(out, in)`` and ``sparse_mask`` its keep-mask: the gradient of ``Ws`` is exactly zero where the mask is 0.
    Without ``sparse_weight`` (or with alpha = 1) this is the plain low-rank linear used at inference.
    """
    return _ops.mixed_rank_linear(x, U, V, bias, sparse_weight, sparse_mask, float(alpha))


@torch.library.register_fake("lrsparse::mixed_rank_linear")
def _mixed_rank_linear_fake(x, U, V, bias=None, sparse_weight=None, sparse_mask=None, alpha=1.0):
    # Defaults as in the schema: the dispatcher drops trailing arguments equal to their defaults.
    _check_same_device("x", x, U=U, V=V, bias=bias, sparse_weight=sparse_weight, sparse_mask=sparse_mask)
    return x.new_empty((*x.shape[:-1], U.shape[0]))


@torch.library.register_fake("lrsparse::mixed_rank_linear_backward")
def _mixed_rank_linear_backward_fake(grad_out, x, U, V, sparse_weight, sparse_mask, alpha, output_mask):
    _check_same_device("x", x, grad_out=grad_out, U=U, V=V, sparse_weight=sparse_weight, sparse_mask=sparse_mask)
    # The CPU/CUDA kernels return contiguous gradients whatever the layout of the inputs.
    grads = (
        x.new_empty(x.shape),
        U.new_empty(U.shape),
        V.new_empty(V.shape),
        grad_out.new_empty((U.shape[0],)),
        sparse_weight.new_empty(sparse_weight.shape) if sparse_weight is not None else None,
    )
    return tuple(g if needed else None for g, needed in zip(grads, output_mask))


def _mixed_rank_linear_setup_context(ctx, inputs, output):
    x, U, V, bias, sparse_weight, sparse_mask, alpha = inputs
    ctx.save_for_backward(x, U, V, sparse_weight, sparse_mask)
    ctx.alpha = alpha
    ctx.has_bias = bias is not None


def _mixed_rank_linear_backward(ctx, grad_out):
    x, U, V, sparse_weight, sparse_mask = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults (e.g. bias=None, ..., alpha=1.0) before
    # autograd sees them, so needs_input_grad can be shorter than the schema: absent means not needed.
    needs = (*ctx.needs_input_grad, *[False] * 5)[:5]
    output_mask = [needs[0], needs[1], needs[2], needs[3] and ctx.has_bias, needs[4] and sparse_weight is not None]
    grad_x, grad_U, grad_V, grad_bias, grad_sparse = _ops.mixed_rank_linear_backward(
        grad_out, x, U, V, sparse_weight, sparse_mask, ctx.alpha, output_mask
    )
    return grad_x, grad_U, grad_V, grad_bias, grad_sparse, None, None


torch.library.register_autograd(
    "lrsparse::mixed_rank_linear", _mixed_rank_linear_backward, setup_context=_mixed_rank_linear_setup_context
)
