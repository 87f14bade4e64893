"""Factorization methods against float64 references, rank allocation against budgets and a brute-force optimum,
and factorize_model on a pruned model."""
from __future__ import annotations

import itertools

import pytest
import torch

from lrsparse import reference
from lrsparse.factorization import (
    allocate_ranks,
    balance_factors,
    factorize_matrix,
    factorize_model,
    fisher_row_scale,
    sparsity_aware_omega,
)
from lrsparse.layers import MixedRankLinear
from lrsparse.pruning import FirstOrderPruner, magnitude_prune
from pipeline_helpers import random_batches, tiny_bert, train


def truncated_svd64(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def pruned_matrix(m=24, n=16, density=0.35, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, n, generator=gen) < density
    # Low-rank structure plus noise, like a fine-tuned matrix, then pruned.
    low_rank = torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
    weight = low_rank + 0.3 * torch.randn(m, n, generator=gen)
    importance = torch.rand(m, n, generator=gen) ** 3 * 1e-4
    return weight * mask, mask, importance


def test_svd_method_is_the_truncated_svd():
    weight = torch.randn(20, 12)
    U, V = factorize_matrix(weight, 4, "svd")
    assert U.shape == (20, 4) and V.shape == (4, 12) and U.dtype == weight.dtype
    torch.testing.assert_close((U.double() @ V.double()), truncated_svd64(weight, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fisher_kind", ["matrix", "row_sums"])
def test_fwsvd_is_the_row_weighted_closed_form(fisher_kind):
    weight = torch.randn(18, 10)
    fisher = torch.rand(18, 10) ** 2
    rows = fisher.double().sum(dim=1).sqrt()
    expected = truncated_svd64(rows[:, None] * weight.double(), 3) / rows[:, None]
    given = fisher if fisher_kind == "matrix" else fisher.sum(dim=1)
    U, V = factorize_matrix(weight, 3, "fwsvd", fisher_rows=given)
    torch.testing.assert_close(U.double() @ V.double(), expected, rtol=1e-4, atol=1e-4)
    # It is the optimum of the row-weighted error, so it beats plain truncation on that error.
    row_omega = (rows**2)[:, None].expand(18, 10)
    U_svd, V_svd = factorize_matrix(weight, 3, "svd")
    fw_error = reference.weighted_error(weight, U, V, row_omega)
    assert fw_error <= reference.weighted_error(weight, U_svd, V_svd, row_omega)


@pytest.mark.parametrize("method", ["svd", "fwsvd", "sparsity-aware", "activation", "activation-importance"])
def test_every_factorizer_returns_balanced_factors(method):
    # Each rank-1 component's norm is split evenly: |U[:, k]| = |V[k, :]| (Adam then moves both factors alike).
    weight, mask, importance = pruned_matrix()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen) * torch.linspace(0.05, 3.0, 16)  # unevenly scaled inputs
    stats = {"mask": mask, "importance": importance, "fisher_rows": torch.rand(24, generator=gen) ** 4,
             "input_covariance": x.T @ x / 64}
    U, V = factorize_matrix(weight, 4, method, **stats)
    torch.testing.assert_close(U.double().norm(dim=0), V.double().norm(dim=1), rtol=1e-4, atol=1e-6)


def test_balance_factors_keeps_the_product_and_leaves_balanced_factors_alone():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(12, 3, generator=gen), torch.randn(3, 7, generator=gen)
    U[:, 0] *= 30.0  # one component 30x unbalanced, one factor of another component zero
    V[2] = 0.0
    U_b, V_b = balance_factors(U, V)
    torch.testing.assert_close(U_b.double() @ V_b.double(), U.double() @ V.double(), rtol=1e-6, atol=1e-6)
    norms_u, norms_v = U_b.double().norm(dim=0), V_b.double().norm(dim=1)
    torch.testing.assert_close(norms_u[:2], norms_v[:2], rtol=1e-6, atol=0)
    assert torch.equal(U_b[:, 2], U[:, 2]) and torch.equal(V_b[2], V[2])  # a zero component is left as it was
    again = balance_factors(U_b, V_b)
    assert again[0] is U_b and again[1] is V_b  # balanced within BALANCE_TOLERANCE: bit-identical


def test_fwsvd_needs_valid_fisher():
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError, match="fisher_rows is required"):
        factorize_matrix(weight, 2, "fwsvd")
    with pytest.raises(ValueError, match="fisher_rows"):
        factorize_matrix(weight, 2, "fwsvd", fisher_rows=torch.ones(5))
    with pytest.raises(ValueError, match="fisher_rows"):
        fisher_row_scale(torch.zeros(6), 6)


def test_omega_closed_form():
    weight = torch.tensor([[1.0, 0.0, 2.0, 3.0, 4.0]])
    mask = weight != 0
    importance = torch.tensor([[0.0, 9.0, 1.0, 2.0, 4.0]])
    # quantile 0.5 over the 4 kept scores [0, 1, 2, 4]: the 2nd smallest = 1.
    omega = sparsity_aware_omega(weight, mask, importance, pruned_weight=0.1, kept_floor=0.2, quantile=0.5)
    expected = torch.tensor([[0.2, 0.1, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(omega, expected)
    omega = sparsity_aware_omega(weight, mask, importance, pruned_weight=0.1, kept_floor=0.2, quantile=1.0)
    torch.testing.assert_close(omega, torch.tensor([[0.2, 0.1, 0.2 + 0.8 * 0.25, 0.2 + 0.8 * 0.5, 1.0]]))
    torch.testing.assert_close(sparsity_aware_omega(weight, pruned_weight=0.3), torch.tensor([[1.0, 0.3, 1, 1, 1]]))
    with pytest.raises(ValueError, match="kept_floor"):
        sparsity_aware_omega(weight, kept_floor=2.0)


def test_sparsity_aware_beats_plain_svd_on_its_weighted_error():
    weight, mask, importance = pruned_matrix()
    omega = sparsity_aware_omega(weight, mask, importance)
    U, V = factorize_matrix(weight, 3, "sparsity-aware", mask=mask, importance=importance)
    U_svd, V_svd = factorize_matrix(weight, 3, "svd")
    err = reference.weighted_error(weight, U, V, omega)
    err_svd = reference.weighted_error(weight, U_svd, V_svd, omega)
    assert err <= err_svd
    # ... and reaches (within 1%) the float64 reference EM's fit from the same start.
    U_ref, V_ref = reference.weighted_lowrank(weight.double(), 3, omega.double())
    assert err <= 1.01 * reference.weighted_error(weight, U_ref, V_ref, omega)


def test_factorize_matrix_rejects_bad_arguments():
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rank"):
        factorize_matrix(weight, 5, "svd")
    with pytest.raises(ValueError, match="method"):
        factorize_matrix(weight, 2, "qr")
    with pytest.raises(TypeError, match=r"options \[.kept_floor.\] do not apply to method .svd."):
        factorize_matrix(weight, 2, "svd", kept_floor=0.5)


SHAPES = {"a": (24, 16, 150), "b": (16, 40, 300), "c": (30, 30, 12), "d": (8, 64, 200)}


@pytest.mark.parametrize("scheme", ["budget", "uniform", "energy"])
@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_allocate_ranks_never_exceeds_budget(scheme, multiple):
    keep = 0.3
    spectra = {name: torch.rand(min(m, n)).sort(descending=True).values for name, (m, n, _) in SHAPES.items()}
    ranks = allocate_ranks(SHAPES, keep, scheme, multiple, spectra)
    assert set(ranks) == set(SHAPES)
    for name, (m, n, nnz) in SHAPES.items():
        r = ranks[name]
        assert 1 <= r <= min(m, n)
        limit = {"budget": nnz, "uniform": keep * m * n}.get(scheme)
        if limit is not None:
            # floor of the per-layer limit, rounded down to the multiple when one fits (ranks are >= 1 anyway).
            raw = int(limit // (m + n))
            assert r == max(1, (raw // multiple) * multiple if raw >= multiple else raw)
            assert r * (m + n) <= max(limit, m + n)
        elif multiple > 1:
            assert r % multiple == 0 or r in (1, min(m, n))
    if scheme == "energy":
        assert sum(r * (m + n) for r, (m, n, _) in zip(ranks.values(), SHAPES.values())) <= keep * sum(
            m * n for m, n, _ in SHAPES.values())


def brute_force_energy(shapes, spectra, budget):
    names = list(shapes)
    best = None
    for combo in itertools.product(*[range(1, min(shapes[n][:2]) + 1) for n in names]):
        cost = sum(r * (shapes[n][0] + shapes[n][1]) for r, n in zip(combo, names))
        if cost <= budget:
            energy = sum(float((spectra[n][:r] ** 2).sum()) for r, n in zip(combo, names))
            best = energy if best is None else max(best, energy)
    return best


def retained_energy(ranks, spectra):
    return sum(float((spectra[n][: ranks[n]] ** 2).sum()) for n in ranks)


def test_energy_allocation_is_optimal_for_equal_costs():
    gen = torch.Generator().manual_seed(3)
    shapes = {"x": (6, 4, 0), "y": (5, 5, 0), "z": (4, 6, 0)}  # every rank costs m + n = 10
    spectra = {n: (torch.rand(4, generator=gen) * 3).sort(descending=True).values for n in shapes}
    keep = 0.5  # budget 0.5 * (24 + 25 + 24) = 36.5 parameters: 3 ranks in all
    ranks = allocate_ranks(shapes, keep, "energy", spectra=spectra)
    assert retained_energy(ranks, spectra) == pytest.approx(brute_force_energy(shapes, spectra, 36.5))


def test_energy_allocation_is_near_optimal_for_unequal_costs():
    gen = torch.Generator().manual_seed(4)
    shapes = {"x": (8, 3, 0), "y": (4, 4, 0), "z": (3, 12, 0)}
    spectra = {n: (torch.rand(min(shapes[n][:2]), generator=gen) * 2).sort(descending=True).values for n in shapes}
    keep = 0.45
    budget = keep * sum(m * n for m, n, _ in shapes.values())
    ranks = allocate_ranks(shapes, keep, "energy", spectra=spectra)
    optimum = brute_force_energy(shapes, spectra, budget)
    # Greedy by energy per parameter loses at most one chunk (a single singular value here) to the optimum.
    largest_step = max(float(s.max() ** 2) for s in spectra.values())
    assert optimum - largest_step <= retained_energy(ranks, spectra) <= optimum + 1e-9


def test_allocate_ranks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scheme"):
        allocate_ranks(SHAPES, 0.3, "greedy")
    with pytest.raises(ValueError, match="keep"):
        allocate_ranks(SHAPES, 0.0)
    with pytest.raises(ValueError, match="multiple"):
        allocate_ranks(SHAPES, 0.3, multiple=0)
    with pytest.raises(ValueError, match="spectra"):
        allocate_ranks(SHAPES, 0.3, "energy")


def pruned_tiny_bert(density=0.4, steps=12):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    pruner = FirstOrderPruner(model, density, steps, initial_warmup_fraction=2, final_warmup_fraction=2, delta_t=2)
    train(model, optimizer, random_batches(steps), after_step=pruner.step)
    return model, pruner


def test_factorize_model_with_pruner_builds_mixed_layers_from_the_pruned_weights():
    model, pruner = pruned_tiny_bert()
    model.eval()
    batch = random_batches(1, seed=7)[0]
    pruned_logits = model(input_ids=batch["input_ids"]).logits
    weights = {name: module.weight for name, module in pruner.targets.items()}
    masks = pruner.masks
    reports = factorize_model(model, 0.4, method="sparsity-aware", pruner=pruner)

    expected_ranks = allocate_ranks(
        {n: (*w.shape, int(masks[n].sum())) for n, w in weights.items()}, 0.4, "budget")
    assert [r.name for r in reports] == list(weights)
    for report in reports:
        layer = model.get_submodule(report.name)
        assert isinstance(layer, MixedRankLinear)
        assert layer.sparse_weight is weights[report.name] and torch.equal(layer.sparse_mask, masks[report.name])
        assert report.rank == layer.rank == expected_ranks[report.name]
        assert report.density == pytest.approx(float(masks[report.name].float().mean()))
        w = weights[report.name].detach().double()
        residual = torch.linalg.matrix_norm(w - layer.U.detach().double() @ layer.V.detach().double())
        norm = torch.linalg.matrix_norm(w)
        assert report.relative_error == pytest.approx(float(residual / norm) if norm > 0 else float(residual), rel=1e-4)
    # alpha = 0: the mixed model is exactly the pruned model.
    torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, pruned_logits, rtol=1e-4, atol=1e-5)


def test_factorize_model_baselines():
    model = tiny_bert()
    masks = magnitude_prune(model, 0.3)
    reports = factorize_model(model, 0.3, method="svd", masks=masks, allocation="uniform", rank_multiple=2)
    for report in reports:
        m, n = report.out_features, report.in_features
        assert report.rank == max(1, int(0.3 * m * n // (m + n)) // 2 * 2)
    dense = tiny_bert()
    reports = factorize_model(dense, 0.5, method="svd")
    assert all(r.density == 1.0 and dense.get_submodule(r.name).sparse_mask is None for r in reports)
    with pytest.raises(ValueError, match="track_fisher"):
        factorize_model(tiny_bert(), 0.5, method="fwsvd")
    with pytest.raises(ValueError, match="allocation"):
        factorize_model(tiny_bert(), 0.5, allocation="random")


def test_factorize_model_fwsvd_and_energy_use_pruner_statistics():
    model, pruner = pruned_tiny_bert(density=1.0)  # density 1: Fisher collection without pruning
    fisher = {n: pruner.fisher(n) for n in pruner.targets}
    weights = {n: m.weight.detach().clone() for n, m in pruner.targets.items()}
    reports = factorize_model(model, 0.5, method="fwsvd", allocation="energy", pruner=pruner)
    budget = 0.5 * sum(w.numel() for w in weights.values())
    assert sum(r.rank * (r.in_features + r.out_features) for r in reports) <= budget
    for report in reports[:3]:
        layer = model.get_submodule(report.name)
        U, V = factorize_matrix(weights[report.name], report.rank, "fwsvd", fisher_rows=fisher[report.name])
        torch.testing.assert_close(layer.U @ layer.V, U @ V)


def test_fisher_only_pruner_gets_the_keep_budget_not_full_rank():
    # Regression: a density-1 pruner (Fisher collection for fwsvd) has all-ones masks; its ranks must come from
    # keep, i.e. floor(keep * m * n / (m + n)), not from nnz = m * n.
    model, pruner = pruned_tiny_bert(density=1.0)
    reports = factorize_model(model, 0.25, method="fwsvd", pruner=pruner)
    for r in reports:
        m, n = r.out_features, r.in_features
        assert r.rank == max(1, (m * n // 4) // (m + n))
    assert sum(r.rank * (r.in_features + r.out_features) for r in reports) <= 0.25 * sum(
        r.in_features * r.out_features for r in reports
    )
