"""Pure-PyTorch reference implementations of the lrsparse operators.

Written for clarity, not speed: the tests compare the compiled kernels against these (usually in float64).
Each function has the same arguments as the operator of the same name in :mod:`lrsparse.ops`.
"""
from __future__ import annotations

import torch
from torch import Tensor

CRITERIA = ("sensitivity", "movement")


def accumulate_importance_(
    ema: Tensor,
    uncertainty: Tensor,
    weight: Tensor,
    grad: Tensor,
    mask: Tensor | None = None,
    fisher: Tensor | None = None,
    beta1: float = 0.85,
    beta2: float = 0.95,
    beta_fisher: float = 0.99,
    criterion: str = "sensitivity",
) -> None:
    """PLATON update of the importance state, in place; entries with mask 0 keep their state."""
    w, g = weight.float(), grad.float()
    if criterion == "sensitivity":
        importance = (w * g).abs()
    elif criterion == "movement":
        importance = -(w * g)
    else:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    new_ema = beta1 * ema + (1 - beta1) * importance
    new_unc = beta2 * uncertainty + (1 - beta2) * (importance - new_ema).abs()
    keep = torch.ones_like(ema, dtype=torch.bool) if mask is None else mask.bool()
    if fisher is not None:
        fisher.copy_(torch.where(keep, beta_fisher * fisher + (1 - beta_fisher) * g * g, fisher))
    ema.copy_(torch.where(keep, new_ema, ema))
    uncertainty.copy_(torch.where(keep, new_unc, uncertainty))


def importance_score(ema: Tensor, uncertainty: Tensor | None) -> Tensor:
    """Selection score: ema * uncertainty (sensitivity) or ema alone (movement), in float32."""
    return ema if uncertainty is None else ema * uncertainty


def global_topk_threshold(
    ema: list[Tensor], uncertainty: list[Tensor], masks: list[Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """Threshold and tie count so that exactly k live entries survive (see ops.global_topk_threshold)."""
    scores, alive = [], []
    for i, e in enumerate(ema):
        scores.append(importance_score(e, uncertainty[i] if uncertainty else None).reshape(-1))
        alive.append(masks[i].reshape(-1).bool() if masks else torch.ones(e.numel(), dtype=torch.bool, device=e.device))
    live = torch.cat(scores)[torch.cat(alive)]
    if k > live.numel():
        raise ValueError(f"k must be at most the number of live entries ({live.numel()}), got {k}")
    if k == 0:
        return torch.tensor(float("inf")), torch.tensor(0)
    threshold = torch.sort(live, descending=True).values[k - 1]
    ties_to_keep = k - int((live > threshold).sum())
    return threshold.float().reshape(()), torch.tensor(ties_to_keep, dtype=torch.int64)


def apply_threshold_mask_(
    masks: list[Tensor],
    weights: list[Tensor],
    ema: list[Tensor],
    uncertainty: list[Tensor],
    threshold: Tensor,
    ties_to_keep: Tensor,
) -> None:
    """mask &= kept; weights of pruned entries set to 0. Ties kept in (tensor index, flat index) order."""
    remaining_ties = int(ties_to_keep)
    thr = threshold.to(torch.float32)
    for i, mask in enumerate(masks):
        score = importance_score(ema[i], uncertainty[i] if uncertainty else None).reshape(-1)
        alive = mask.reshape(-1).bool()
        keep = alive & (score > thr)
        tie_positions = torch.nonzero(alive & (score == thr)).reshape(-1)
        take = tie_positions[:remaining_ties]
        remaining_ties -= take.numel()
        keep[take] = True
        mask.copy_(keep.reshape(mask.shape).to(mask.dtype))
        weights[i].mul_(keep.reshape(weights[i].shape).to(weights[i].dtype))


def weighted_error(weight: Tensor, U: Tensor, V: Tensor, omega: Tensor | None = None) -> Tensor:
    """sum(omega * (W - U V)^2) in float64 (omega None: squared Frobenius error)."""
    residual = weight.double() - U.double() @ V.double()
    return (residual.square() if omega is None else omega.double() * residual.square()).sum()


def _split_singular_values(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def weighted_lowrank(
    weight: Tensor,
    rank: int,
    omega: Tensor | None = None,
    max_iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    oversample: int = 10,
) -> tuple[Tensor, Tensor]:
    """Rank-r fit by EM with a full SVD per iteration (Srebro and Jaakkola 2003); omega None: truncated SVD."""
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}], got {rank}")
    w = weight.double()
    U, V = _split_singular_values(*torch.linalg.svd(w, full_matrices=False), rank)
    if omega is None:
        return U.to(weight.dtype), V.to(weight.dtype)
    om = omega.double()
    previous = weighted_error(w, U, V, om)
    for _ in range(max_iters):
        low_rank = U @ V
        filled = om * w + (1 - om) * low_rank
        U, V = _split_singular_values(*torch.linalg.svd(filled, full_matrices=False), rank)
        current = weighted_error(w, U, V, om)
        if previous - current <= tol * previous:
            break
        previous = current
    return U.to(weight.dtype), V.to(weight.dtype)


def mixed_rank_linear(
    x: Tensor,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    sparse_weight: Tensor | None = None,
    sparse_mask: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """(1 - alpha) * x @ Ws^T + alpha * (x @ V^T) @ U^T + b; the mask only gates the gradient of Ws."""
    y = alpha * ((x @ V.t()) @ U.t())
    if sparse_weight is not None:
        ws = sparse_weight
        if sparse_mask is not None:
            # Forward value unchanged for a weight already zero at pruned entries; masks the gradient of Ws.
            ws = torch.where(sparse_mask.bool(), sparse_weight, sparse_weight.detach())
        y = y + (1 - alpha) * (x @ ws.t())
    if bias is not None:
        y = y + bias
    return y
