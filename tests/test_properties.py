"""Property-based tests (hypothesis) of every lrsparse op against lrsparse.reference or a closed form.

Hypothesis draws shapes (1 and odd sizes included), masks (all-0, all-1, random densities; bool and uint8), dtypes
and alphas; tensor values come from torch.manual_seed(seed) with a drawn seed. derandomize=True makes every run
draw the same examples, so a failure reproduces.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrsparse import ops, reference
from test_accumulate_importance import assert_state_matches, make_mask, run_steps
from test_mixed_rank_linear import check_against_reference, make_inputs


def property_settings(max_examples: int):
    # The conftest's autouse seeding fixture runs once per test, not per example: each example seeds from `seed`.
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("single_thread")


seeds = st.integers(0, 2**31 - 1)
sizes = st.one_of(st.sampled_from([1, 2, 3, 7, 13]), st.integers(1, 40))
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
mask_dtypes = st.sampled_from([torch.bool, torch.uint8])
unit_floats = st.floats(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- accumulate_importance_
@property_settings(max_examples=150)
@given(seed=seeds, rows=sizes, cols=sizes,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       density=st.one_of(st.none(), densities), mask_dtype=mask_dtypes,
       criterion=st.sampled_from(reference.CRITERIA), with_fisher=st.booleans(),
       betas=st.tuples(unit_floats, unit_floats, unit_floats))
def test_accumulate_importance_matches_reference(seed, rows, cols, dtype, density, mask_dtype, criterion, with_fisher,
                                                 betas):
    torch.manual_seed(seed)
    state, expected, initial, mask = run_steps((rows, cols), dtype, density, criterion, with_fisher,
                                               mask_dtype=mask_dtype, betas=betas)
    # With beta = 1 (or all-zero importance) an entry can legitimately keep its state: check values, not movement.
    assert_state_matches(state, expected, initial, mask, expect_update=False)


# ------------------------------------------------------------------------- global_topk_threshold/apply_threshold_mask_
@st.composite
def score_lists(draw):
    """1-3 tensors of float32 state with masks; 'ties' makes scores small integers (many exact ties)."""
    seed = draw(seeds)
    count = draw(st.integers(1, 3))
    shapes = [(draw(sizes), draw(sizes)) for _ in range(count)]
    tie_heavy = draw(st.booleans())
    with_uncertainty = draw(st.booleans())
    with_masks = draw(st.booleans())
    mask_densities = [draw(densities) for _ in range(count)]
    mask_dtype = draw(mask_dtypes)
    weight_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    torch.manual_seed(seed)

    def values(shape):
        return torch.randint(0, 4, shape).float() if tie_heavy else torch.rand(shape)

    ema = [values(s) for s in shapes]
    unc = [values(s) for s in shapes] if with_uncertainty else None
    masks = [make_mask(s, d, mask_dtype) for s, d in zip(shapes, mask_densities)] if with_masks else None
    weights = [torch.randn(s).to(weight_dtype) for s in shapes]
    live = sum(int(m.bool().sum()) for m in masks) if masks else sum(e.numel() for e in ema)
    k = draw(st.one_of(st.sampled_from([0, live]), st.integers(0, live)))
    return ema, unc, masks, weights, k


@property_settings(max_examples=200)
@given(case=score_lists())
def test_global_topk_keeps_exactly_k_as_the_reference(case):
    ema, unc, masks, weights, k = case
    threshold, ties = ops.global_topk_threshold(ema, unc, masks, k)
    expected_threshold, expected_ties = reference.global_topk_threshold(ema, unc or [], masks or [], k)
    if k > 0:  # with k = 0 any threshold above every score is right
        assert threshold.item() == expected_threshold.item()
        assert ties.item() == expected_ties.item()

    # apply_threshold_mask_ needs masks: all-ones where the threshold call had none.
    full_masks = masks or [torch.ones(e.shape, dtype=torch.bool) for e in ema]
    got_masks, got_weights = [m.clone() for m in full_masks], [w.clone() for w in weights]
    want_masks, want_weights = [m.clone() for m in full_masks], [w.clone() for w in weights]
    ops.apply_threshold_mask_(got_masks, got_weights, ema, unc, threshold, ties)
    reference.apply_threshold_mask_(want_masks, want_weights, ema, unc or [], expected_threshold, expected_ties)
    assert sum(int(m.bool().sum()) for m in got_masks) == k
    for got_m, want_m, got_w, want_w, before in zip(got_masks, want_masks, got_weights, want_weights, full_masks):
        assert got_m.dtype == before.dtype
        assert torch.equal(got_m.bool(), want_m.bool())
        assert not (got_m.bool() & ~before.bool()).any(), "a dead entry was revived"
        assert torch.equal(got_w, want_w)


# ------------------------------------------------------------------------------------------------------ weighted_lowrank
# Allowed excess of the fit's error over the optimum, relative to the (weighted) energy of W, per factor dtype: the
# factors are rounded to the dtype, which perturbs U V to first order.
EXCESS_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@property_settings(max_examples=150)
@given(seed=seeds, rows=sizes, cols=sizes, rank_fraction=unit_floats,
       dtype=st.sampled_from(list(EXCESS_TOL)), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_weighted_lowrank_without_omega_reaches_the_svd_optimum(seed, rows, cols, rank_fraction, dtype, scale):
    torch.manual_seed(seed)
    rank = 1 + int(rank_fraction * (min(rows, cols) - 1))
    weight = (torch.randn(rows, cols, dtype=torch.float64) * scale).to(dtype)
    U, V = ops.weighted_lowrank(weight, rank)
    assert U.shape == (rows, rank) and V.shape == (rank, cols) and U.dtype == V.dtype == dtype
    singular_values = torch.linalg.svdvals(weight.double())
    optimum = float(singular_values[rank:].square().sum())
    error = float(reference.weighted_error(weight, U, V))
    energy = float(singular_values.square().sum())
    assert abs(error - optimum) <= EXCESS_TOL[dtype] * energy + 1e-300, (error, optimum, energy)


@st.composite
def omegas(draw, shape, dtype):
    kind = draw(st.sampled_from(["bool", "binary", "continuous", "sparse-aware"]))
    density = draw(densities)
    keep = torch.rand(shape) < density
    if kind == "bool":
        return keep
    if kind == "binary":
        return keep.to(dtype)
    if kind == "continuous":
        return torch.rand(shape, dtype=torch.float64).to(dtype)
    return torch.where(keep, 0.5 + 0.5 * torch.rand(shape), torch.full(shape, 0.05)).to(dtype)


@property_settings(max_examples=150)
@given(data=st.data(), seed=seeds, rows=st.integers(1, 48), cols=st.integers(1, 48), rank_fraction=unit_floats,
       dtype=st.sampled_from([torch.float32, torch.float64]), oversample=st.integers(0, 10))
def test_weighted_lowrank_with_omega_is_no_worse_than_plain_svd(data, seed, rows, cols, rank_fraction, dtype,
                                                                oversample):
    torch.manual_seed(seed)
    rank = 1 + int(rank_fraction * (min(rows, cols) - 1))
    weight = torch.randn(rows, cols, dtype=torch.float64).to(dtype)
    omega = data.draw(omegas((rows, cols), dtype))
    U, V = ops.weighted_lowrank(weight, rank, omega, oversample=oversample, seed=seed)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    plain_U, plain_V = reference.weighted_lowrank(weight, rank)
    error = float(reference.weighted_error(weight, U, V, omega))
    plain_error = float(reference.weighted_error(weight, plain_U, plain_V, omega))
    weighted_energy = float((omega.double() * weight.double().square()).sum())
    # EM starts from the plain truncated SVD and never increases the weighted error: only rounding may exceed it.
    assert error <= plain_error + EXCESS_TOL[dtype] * weighted_energy + 1e-300, (error, plain_error, weighted_energy)


# ----------------------------------------------------------------------------------------------------- mixed_rank_linear
@property_settings(max_examples=200)
@given(seed=seeds, lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), in_f=sizes, out_f=sizes,
       rank_fraction=unit_floats, alpha=unit_floats,
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       bias=st.booleans(), sparse=st.booleans(), density=st.one_of(st.none(), densities), mask_dtype=mask_dtypes)
def test_mixed_rank_linear_forward_and_gradients_match_float64_reference(seed, lead, in_f, out_f, rank_fraction,
                                                                          alpha, dtype, bias, sparse, density,
                                                                          mask_dtype):
    torch.manual_seed(seed)
    rank = 1 + int(rank_fraction * (min(in_f, out_f) - 1))
    inputs = make_inputs(tuple(lead), in_f, out_f, rank, dtype=dtype, bias=bias, sparse=sparse, density=density,
                         mask_dtype=mask_dtype)
    check_against_reference(inputs, alpha, dtype)
