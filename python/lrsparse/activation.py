"""Activation-aware factorization: fit each layer's outputs on calibration inputs, not its weights.

The calibration statistic is the covariance of each target layer's inputs (:func:`input_covariances`); the
registered factorizers "activation" and "activation-importance" fit ``U V`` to it in closed form.

A layer's output error on its inputs ``X`` (one row per token) is ``||X (W - U V)^T||_F^2 = tr((W - U V) C (W - U V)^T)
* n`` with ``C = X^T X / n``: the input covariance is all an output-error fit needs, and it is small (in x in).
Padding tokens are left out: the model masks them, so their outputs are never used.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from lrsparse import ops
from lrsparse.distributed import is_distributed, sum_across_ranks
from lrsparse.factorization import fisher_row_scale
from lrsparse.registry import LayerStatistics, register_factorizer
from lrsparse.targets import linear_shape


class CovarianceSums:
    """Running ``sum x x^T`` (float64) and token counts of the inputs of target layers, over the real tokens."""

    def __init__(self, targets: Mapping[str, nn.Module]):
        self.targets = targets
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in targets}

    def add(self, name: str, x: Tensor, mask: Tensor | None) -> None:
        """Adds the rows of ``x`` (``... x in``) whose ``mask`` entry (the attention mask, shaped like ``x`` without
        its last dimension) is set: padding tokens are left out, the model masks their outputs."""
        rows = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            rows = rows[mask.reshape(-1).bool()]
        rows = rows.double()
        self.sums[name] = rows.t() @ rows + self.sums[name] if name in self.sums else rows.t() @ rows
        self.counts[name] += rows.shape[0]

    def covariances(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """``E[x x^T]`` of every target; under a process group pooled over the ranks (every rank ends with the same
        covariances, in one collective per target, in the same order everywhere). The running sums stay this rank's,
        so a second call pools the same way."""
        sums, counts = dict(self.sums), dict(self.counts)
        if is_distributed():
            for name, module in self.targets.items():
                features = linear_shape(module)[0]
                local = sums.get(name)
                if local is None:
                    local = torch.zeros(features, features, dtype=torch.float64, device=device)
                total = sum_across_ranks(torch.cat([local.reshape(-1), local.new_tensor([counts[name]])]))
                counts[name] = int(total[-1].item())
                sums[name] = total[:-1].reshape(features, features)
        missing = [name for name, count in counts.items() if count == 0]
        if missing:
            raise ValueError(f"calibration saw no input of target(s) {missing[:4]}: pass batches of model inputs "
                             "that run through these layers")
        return {name: sums[name] / counts[name] for name in self.targets}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["counts"]) != set(self.targets):
            raise ValueError("calibration state was gathered for other target layers")
        self.sums, self.counts = dict(state["sums"]), {k: int(v) for k, v in state["counts"].items()}


@torch.no_grad()
def input_covariances(model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable[Mapping[str, Tensor]],
                      device: torch.device | None = None, max_examples: int | None = None) -> dict[str, Tensor]:
    """``E[x x^T]`` (float64, in x in) of the inputs of each module in ``targets`` over the real tokens of
    ``batches`` (model input dicts; labels are ignored), the model in eval mode (no dropout). With ``max_examples``
    only the first that many examples (rows of the batches) are used, so a whole training DataLoader can be passed:
    iteration stops there. Under a process group every rank calibrates on its own batches (``max_examples`` is per
    rank) and the sums are pooled over the ranks, so all of them end with the same covariances: a sharded loader
    contributes each rank's examples, a replicated one the same examples on every rank (its covariance unchanged)."""
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    if device is None:
        device = next(model.parameters()).device
    sums = CovarianceSums(targets)
    state = {"mask": None}

    def hook(name: str):
        def accumulate(module, args):
            sums.add(name, args[0], state["mask"])
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in targets.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()
                      if k not in ("labels", "start_positions", "end_positions")}
            size = batch_size_of(inputs)
            if max_examples is not None and seen + size > max_examples:  # the last batch contributes only its head
                inputs = {k: v[:max_examples - seen] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size
                          else v for k, v in inputs.items()}
            seen += size
            state["mask"] = inputs.get("attention_mask")
            model(**inputs)
            if max_examples is not None and seen >= max_examples:
                break  # stop iterating (a prefetching loader may have read one batch ahead)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums.covariances(device)


def batch_size_of(inputs: Mapping[str, Tensor]) -> int:
    # The examples are the rows of the token inputs; other tensors (e.g. a (1, L) position_ids) need not be batch-first.
    for key in ("input_ids", "attention_mask", "inputs_embeds"):
        if torch.is_tensor(inputs.get(key)) and inputs[key].dim() > 0:
            return int(inputs[key].shape[0])
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"a calibration batch must hold tensors of model inputs, got keys {sorted(inputs)}")


def input_whitening(covariance: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor ``L`` of ``C + damping * mean(diag C) * I`` (float64): ``||(W - UV) L||_F`` is the
    layer's output error on inputs of covariance ``C``. The ridge keeps input directions the calibration rarely saw
    fitted (and ``L`` invertible)."""
    if covariance is None:
        raise ValueError("input_covariance is required by activation-aware factorization (calibrate the model first)")
    c = covariance.detach().double()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"input_covariance must be square (in x in), got shape {tuple(c.shape)}")
    scale = float(c.diagonal().mean())
    ridge = damping * scale if scale > 0 else 1.0
    identity = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c + ridge * identity)
    if int(info) != 0:  # a covariance that is not positive semi-definite (not from real inputs) or a zero ridge
        raise ValueError(f"input_covariance plus ridge {ridge:.3g} is not positive definite: increase "
                         "activation_damping (in a new run: it is part of the method)")
    return factor


def _row_scale(weight: Tensor, stats: LayerStatistics) -> Tensor | None:
    """Per-output-row weights sqrt(sum_j importance_ij) of "activation-importance", as FWSVD weighs rows by Fisher."""
    if stats.importance is None:
        raise ValueError("importance is required by method 'activation-importance'")
    if not bool((stats.importance > 0).any()):
        raise ValueError("importance has no positive entry: 'activation-importance' weighs rows by it (train the "
                         "pruning stage first, or use 'activation')")
    return fisher_row_scale(stats.importance.clamp_min(0), weight.shape[0]).to(weight.device).double()


def _two_sided(weight: Tensor, stats: LayerStatistics, damping: float, rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    whitening = input_whitening(stats.input_covariance, damping).to(weight.device)
    scale = _row_scale(weight, stats) if rows else torch.ones(weight.shape[0], dtype=torch.float64,
                                                              device=weight.device)
    return scale[:, None] * (weight.double() @ whitening), scale, whitening


def _activation_fit(weight: Tensor, rank: int, stats: LayerStatistics, damping: float, rows: bool,
                    solver: Mapping) -> tuple[Tensor, Tensor]:
    # min ||D (W - U V) L||_F: the truncated SVD of D W L, mapped back (Eckart-Young in the weighted coordinates).
    target, scale, whitening = _two_sided(weight, stats, damping, rows)
    U, V = ops.weighted_lowrank(target.float().contiguous(), rank, None, **solver)
    V = torch.linalg.solve_triangular(whitening, V.double(), upper=False, left=False)  # V L^-1
    return (U.double() / scale[:, None]).float(), V.float()


_ACTIVATION_OPTIONS = {"damping": "activation_damping"}


@register_factorizer("activation", needs=("input_covariance",), options=_ACTIVATION_OPTIONS,
                     spectrum_matrix=lambda weight, stats, damping: _two_sided(weight, stats, damping, False)[0])
def activation_aware_svd(weight: Tensor, rank: int, stats: LayerStatistics, *, max_iters: int, tol: float, seed: int,
                         damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """The rank-r fit of least output error on the calibration inputs: ``min ||(W - U V) L||_F`` with ``L L^T`` the
    (ridged) input covariance, in closed form ``trunc_r(W L) L^-1``."""
    return _activation_fit(weight, rank, stats, damping, False, {"max_iters": max_iters, "tol": tol, "seed": seed})


@register_factorizer("activation-importance", needs=("importance", "input_covariance"), options=_ACTIVATION_OPTIONS,
                     spectrum_matrix=lambda weight, stats, damping: _two_sided(weight, stats, damping, True)[0])
def activation_importance_svd(weight: Tensor, rank: int, stats: LayerStatistics, *, max_iters: int, tol: float,
                              seed: int, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """Output error weighted per output row by the pruning stage's importance: ``min ||D (W - U V) L||_F`` with
    ``D = diag(sqrt(sum_j importance_ij))``, closed form ``D^-1 trunc_r(D W L) L^-1``."""
    return _activation_fit(weight, rank, stats, damping, True, {"max_iters": max_iters, "tol": tol, "seed": seed})
