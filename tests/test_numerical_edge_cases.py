"""Numerical edge cases of the factorization path and determinism of pruning + factorization.

weighted_lowrank on all-zero, rank-deficient, huge-norm and denormal matrices and on an omega that is zero almost
everywhere; pruning that leaves all-zero rows and columns through factorize_matrix and MixedRankLinear; the same seed
giving bitwise-identical masks and factors twice in one process.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsparse import ops, reference
from lrsparse.factorization import factorize_matrix, factorize_model
from lrsparse.layers import MixedRankLinear
from lrsparse.pruning import FirstOrderPruner
from pipeline_helpers import random_batches, tiny_bert, train
from test_mixed_rank_linear import check_against_reference

DTYPES = [torch.float32, torch.float64]
# Relative reconstruction error allowed for an exactly representable (rank <= r) matrix, per dtype.
EXACT_FIT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
HUGE_SCALE = {torch.float32: 1e30, torch.float64: 1e300}
# Denormal scale and the relative precision left to entries of that size (denormals carry fewer mantissa bits).
DENORMAL_SCALE = {torch.float32: (1e-40, 1e-3), torch.float64: (1e-310, 1e-9)}


def low_rank_matrix(m: int, n: int, rank: int, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(m, rank, dtype=torch.float64) @ torch.randn(rank, n, dtype=torch.float64)).to(dtype)


def binary_omega(shape, density: float = 0.6) -> torch.Tensor:
    return (torch.rand(shape) < density).double()


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), "non-finite factor"


def relative_fit_error(weight, U, V, omega=None, scale: float = 1.0) -> float:
    """sqrt(sum(omega * (W - U V)^2)) / sqrt(sum(omega * W^2)), everything divided by `scale` first (in float64) so
    1e300-scale matrices do not overflow the measurement itself."""
    w = weight.double() / scale
    root = scale**-0.5
    residual = w - (U.double() * root) @ (V.double() * root)
    om = torch.ones_like(w) if omega is None else omega.double()
    return float((om * residual.square()).sum().sqrt() / (om * w.square()).sum().sqrt())


def optimal_relative_error(weight, rank: int, scale: float = 1.0) -> float:
    s = torch.linalg.svdvals(weight.double() / scale)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


# -------------------------------------------------------------------------------------------------- weighted_lowrank
@pytest.mark.parametrize("with_omega", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_matrix_gives_zero_finite_factors(dtype, with_omega):
    weight = torch.zeros(20, 13, dtype=dtype)
    U, V = ops.weighted_lowrank(weight, 4, binary_omega(weight.shape).to(dtype) if with_omega else None)
    assert_finite(U, V)
    assert torch.equal(U @ V, weight)


@pytest.mark.parametrize("with_omega", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_deficient_matrix_is_reconstructed(dtype, with_omega):
    weight = low_rank_matrix(30, 21, 3, dtype)
    omega = binary_omega(weight.shape).to(dtype) if with_omega else None
    U, V = ops.weighted_lowrank(weight, 8, omega)  # requested rank 8 > true rank 3
    assert_finite(U, V)
    assert relative_fit_error(weight, U, V) <= EXACT_FIT_TOL[dtype]


@pytest.mark.parametrize("with_omega", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_norm_matrix(dtype, with_omega):
    scale = HUGE_SCALE[dtype]
    omega = binary_omega((30, 21)).to(dtype) if with_omega else None
    exact = (low_rank_matrix(30, 21, 3) * scale).to(dtype)
    U, V = ops.weighted_lowrank(exact, 3, omega)
    assert_finite(U, V)
    assert relative_fit_error(exact, U, V, scale=scale) <= EXACT_FIT_TOL[dtype]
    # A full-rank one: the truncated SVD must reach the Eckart-Young optimum (weighted: be at least as good).
    full = (torch.randn(30, 21, dtype=torch.float64) * scale).to(dtype)
    U, V = ops.weighted_lowrank(full, 5, omega)
    assert_finite(U, V)
    if omega is None:
        assert relative_fit_error(full, U, V, scale=scale) == pytest.approx(optimal_relative_error(full, 5, scale),
                                                                            rel=1e-5)
    else:
        plain_U, plain_V = reference.weighted_lowrank(full.double() / scale, 5)
        plain = relative_fit_error(full.double() / scale, plain_U, plain_V, omega)
        assert relative_fit_error(full, U, V, omega, scale=scale) <= plain * (1 + 1e-5)


@pytest.mark.parametrize("with_omega", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_denormal_matrix(dtype, with_omega):
    scale, precision = DENORMAL_SCALE[dtype]
    exact = low_rank_matrix(30, 21, 3)
    weight = (exact / exact.abs().max() * scale).to(dtype)
    assert weight[weight != 0].abs().max() < torch.finfo(dtype).tiny, "test matrix must be denormal"
    omega = binary_omega(weight.shape).to(dtype) if with_omega else None
    U, V = ops.weighted_lowrank(weight, 3, omega)
    assert_finite(U, V)
    assert (U @ V).abs().max() > 0, "the fit of a nonzero denormal matrix was flushed to zero"
    assert relative_fit_error(weight, U, V, scale=scale) <= precision


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_omega_zero_except_a_few_entries(dtype):
    weight = torch.randn(20, 15, dtype=torch.float64).to(dtype)
    # Four observed entries in distinct rows and columns: a rank-1 matrix fits them exactly.
    rows, cols = torch.randperm(20)[:4], torch.randperm(15)[:4]
    omega = torch.zeros(20, 15, dtype=dtype)
    omega[rows, cols] = 1
    U, V = ops.weighted_lowrank(weight, 1, omega, max_iters=2000, tol=0.0)
    assert_finite(U, V)
    observed = weight[rows, cols].double()
    fitted = (U.double() @ V.double())[rows, cols]
    assert float((fitted - observed).norm() / observed.norm()) <= 1e-3
    # An omega of all zeros: every fit is optimal, the factors must still be finite.
    assert_finite(*ops.weighted_lowrank(weight, 2, torch.zeros_like(omega)))


# ----------------------------------------------------------------------------- pruning with all-zero rows and columns
def pruned_with_empty_rows_and_columns(m=24, n=16, rank=2):
    """A rank-`rank` weight pruned to ~50% with rows 0-3 and columns 0-2 entirely pruned."""
    mask = torch.rand(m, n) < 0.5
    mask[:4] = False
    mask[:, :3] = False
    dense = low_rank_matrix(m, n, rank, torch.float32)
    return dense * mask, mask


def test_factorize_pruned_matrix_with_empty_rows_and_columns_fits_the_kept_entries():
    weight, mask = pruned_with_empty_rows_and_columns()
    # pruned_weight 0: the kept entries of a rank-2 matrix can be fitted exactly by rank 2.
    U, V = factorize_matrix(weight, 2, "sparsity-aware", mask=mask, pruned_weight=0.0, max_iters=3000, tol=0.0)
    assert_finite(U, V)
    assert relative_fit_error(weight, U, V, mask) <= 1e-3
    # Default omega (pruned entries weighted 0.05) and the other methods stay finite as well.
    for method in ("svd", "sparsity-aware"):
        assert_finite(*factorize_matrix(weight, 2, method, mask=mask if method != "svd" else None))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mixed_rank_linear_with_empty_rows_and_columns_matches_reference(alpha):
    weight, mask = pruned_with_empty_rows_and_columns()
    U, V = factorize_matrix(weight, 2, "sparsity-aware", mask=mask)
    inputs = {"x": torch.randn(5, 16, dtype=torch.float64), "U": U.double(), "V": V.double(),
              "bias": torch.randn(24, dtype=torch.float64), "sparse_weight": weight.double(), "sparse_mask": mask}
    check_against_reference(inputs, alpha, torch.float64)  # also: zero gradient of the pruned entries

    layer = MixedRankLinear(U, V, None, weight.clone(), mask)
    layer.alpha = alpha
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert_finite(y, x.grad, layer.U.grad, layer.V.grad, layer.sparse_weight.grad)
    assert (layer.sparse_weight.grad[:4] == 0).all() and (layer.sparse_weight.grad[:, :3] == 0).all()


# ------------------------------------------------------------------------------------------------------- determinism
def prune_and_factorize(seed: int):
    """A few real optimizer + FirstOrderPruner steps on a tiny BERT, then factorize_model: masks and factors."""
    model = tiny_bert(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = FirstOrderPruner(model, final_density=0.4, total_steps=6, initial_warmup_fraction=1,
                              final_warmup_fraction=1, delta_t=1)
    torch.manual_seed(seed)
    train(model, optimizer, random_batches(6, seed=seed + 1), after_step=pruner.step)
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    factorize_model(model, 0.4, pruner=pruner)
    factors = {name: (module.U.detach().clone(), module.V.detach().clone())
               for name, module in model.named_modules() if isinstance(module, MixedRankLinear)}
    return pruner.density(), masks, factors


def test_same_seed_gives_bitwise_identical_masks_and_factors():
    density, masks, factors = prune_and_factorize(seed=3)
    assert density == pytest.approx(0.4, abs=1e-3)  # the schedule really pruned
    assert set(factors) == set(masks) and len(masks) > 0
    density_again, masks_again, factors_again = prune_and_factorize(seed=3)
    assert density_again == density
    for name in masks:
        assert torch.equal(masks[name], masks_again[name]), name
        assert torch.equal(factors[name][0], factors_again[name][0]), name
        assert torch.equal(factors[name][1], factors_again[name][1]), name
    # A different seed gives different masks: the comparison above can fail.
    _, other_masks, _ = prune_and_factorize(seed=4)
    assert any(not torch.equal(masks[name], other_masks[name]) for name in masks)
