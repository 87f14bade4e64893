"""weighted_lowrank against torch.linalg.svd (optimal truncation), the EM reference and closed-form properties."""
from __future__ import annotations

import pytest
import torch

from lrsparse import ops, reference

torch.set_num_threads(min(torch.get_num_threads(), 2))


def decaying_spectrum_matrix(m: int, n: int, power: float = 0.5, seed: int = 1) -> torch.Tensor:
    """Random singular vectors with sigma_i = i^-power: a slowly decaying, transformer-like spectrum (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g)).Q
    return (u * torch.arange(1, k + 1, dtype=torch.float64) ** -power) @ v.T


def optimal_truncation_error(weight: torch.Tensor, rank: int) -> float:
    return torch.linalg.svdvals(weight.double())[rank:].square().sum().item()


def assert_matches_optimal(
    weight: torch.Tensor, rank: int, U: torch.Tensor, V: torch.Tensor, rel: float, optimal: float | None = None
) -> None:
    m, n = weight.shape
    assert U.shape == (m, rank) and V.shape == (rank, n)
    assert U.dtype == weight.dtype and V.dtype == weight.dtype
    error = reference.weighted_error(weight, U, V).item()
    optimal = optimal_truncation_error(weight, rank) if optimal is None else optimal
    # Absolute floor: a full-rank fit leaves only the rounding of U V in the input dtype.
    floor = 1e3 * torch.finfo(weight.dtype).eps ** 2 * weight.double().square().sum().item()
    assert error <= optimal * (1 + rel) + floor, (error, optimal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (127, 61), (61, 127)])
def test_truncation_matches_svd_on_odd_shapes(shape, dtype):
    weight = torch.randn(*shape, dtype=dtype)
    k = min(shape)
    for rank in sorted({1, max(1, k // 3), max(1, k - 1), k}):
        U, V = ops.weighted_lowrank(weight, rank)
        assert_matches_optimal(weight, rank, U, V, rel=1e-5)


@pytest.mark.parametrize("dtype,ranks", [(torch.float32, (8, 192, 768)), (torch.float64, (192,))])
def test_truncation_matches_svd_on_768x3072_decaying_spectrum(dtype, ranks):
    weight = decaying_spectrum_matrix(768, 3072).to(dtype)
    squared_singular_values = torch.arange(1, 769, dtype=torch.float64) ** -1.0  # sigma_i = i^-0.5 by construction
    for rank in ranks:
        U, V = ops.weighted_lowrank(weight, rank)
        optimal = squared_singular_values[rank:].sum().item()
        assert_matches_optimal(weight, rank, U, V, rel=1e-5, optimal=optimal)


def test_tall_matrix_splits_singular_values_evenly():
    weight = decaying_spectrum_matrix(90, 40, power=1.0).float()
    U, V = ops.weighted_lowrank(weight, 10)
    s = torch.linalg.svdvals(weight.double())[:10]
    # Even split: the column norms of U and row norms of V are both sqrt(sigma_i).
    torch.testing.assert_close(U.double().norm(dim=0), s.sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(V.double().norm(dim=1), s.sqrt(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_returns_input_dtype(dtype):
    weight = decaying_spectrum_matrix(64, 96, power=1.0).to(dtype)
    U, V = ops.weighted_lowrank(weight, 8)
    assert U.dtype == dtype and V.dtype == dtype
    # Computed in float32 from the rounded input: only the final rounding of U and V to `dtype` is lost.
    error = reference.weighted_error(weight, U, V).item()
    optimal = optimal_truncation_error(weight, 8)
    assert error <= optimal * 1.05 + 1e-2 * torch.finfo(dtype).eps * weight.double().square().sum().item()


def test_binary_omega_recovers_exact_low_rank_on_kept_entries():
    g = torch.Generator().manual_seed(3)
    m, n, r = 60, 80, 4
    weight = torch.randn(m, r, dtype=torch.float64, generator=g) @ torch.randn(r, n, dtype=torch.float64, generator=g)
    omega = (torch.rand(m, n, generator=g) < 0.6).double()
    U, V = ops.weighted_lowrank(weight, r, omega, max_iters=500, tol=0.0)
    error = reference.weighted_error(weight, U, V, omega).item()
    assert error / (omega * weight).square().sum().item() < 1e-6


def pruned_problem(m: int, n: int, density: float = 0.25, pruned_weight: float = 0.05):
    weight = decaying_spectrum_matrix(m, n).float()
    kept = weight.abs() >= weight.abs().flatten().kthvalue(int((1 - density) * weight.numel())).values
    return weight, torch.where(kept, 1.0, pruned_weight)


@pytest.mark.parametrize("shape,rank", [((48, 72), 6), ((40, 30), 20)])  # restricted-basis and exact-SVD paths
def test_weighted_error_never_increases_across_em_iterations(shape, rank):
    weight, omega = pruned_problem(*shape)
    errors = []
    for iters in range(1, 13):
        U, V = ops.weighted_lowrank(weight, rank, omega, max_iters=iters, tol=0.0, seed=5)
        errors.append(reference.weighted_error(weight, U, V, omega).item())
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-5), errors
    assert errors[-1] < errors[0]


def test_matches_reference_em_final_error():
    weight, omega = pruned_problem(40, 64)
    U_ref, V_ref = reference.weighted_lowrank(weight, 6, omega, max_iters=200, tol=1e-9)
    U, V = ops.weighted_lowrank(weight, 6, omega, max_iters=200, tol=1e-9)
    expected = reference.weighted_error(weight, U_ref, V_ref, omega).item()
    got = reference.weighted_error(weight, U, V, omega).item()
    assert abs(got - expected) <= 0.01 * expected, (got, expected)


def test_deterministic_for_a_seed():
    weight, omega = pruned_problem(50, 70)
    first = ops.weighted_lowrank(weight, 5, omega, max_iters=20, seed=7)
    second = ops.weighted_lowrank(weight, 5, omega, max_iters=20, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = [ops.weighted_lowrank(weight, 5) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*plain))


def test_outputs_do_not_require_grad():
    weight = torch.randn(20, 30, requires_grad=True)
    omega = torch.rand(20, 30).requires_grad_()
    for U, V in (ops.weighted_lowrank(weight, 3), ops.weighted_lowrank(weight, 3, omega, max_iters=3)):
        assert not U.requires_grad and not V.requires_grad
        assert U.grad_fn is None and V.grad_fn is None


def test_opcheck():
    weight = torch.randn(12, 9)
    omega = torch.rand(12, 9)
    for args in ((weight, 3, None, 5, 1e-6, 0, 2), (weight, 3, omega, 5, 1e-6, 0, 2), (weight, 9, omega, 3, 0.0, 1, 0)):
        torch.library.opcheck(torch.ops.lrsparse.weighted_lowrank.default, args)


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda w, o: (w, 0, None), r"rank must be in \[1, min\(m, n\)\] = \[1, 6\], got 0"),
        (lambda w, o: (w, 7, None), r"rank must be in \[1, min\(m, n\)\] = \[1, 6\], got 7"),
        (lambda w, o: (w.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))), 2, None), "weight must not contain NaN or Inf"),
        (lambda w, o: (w.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), 2, None), "weight must not contain NaN or Inf"),
        (lambda w, o: (w, 2, o.index_put((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan")))), "omega must not contain NaN or Inf"),
        (lambda w, o: (w, 2, o * 1.5), r"omega must have all values in \[0, 1\]"),
        (lambda w, o: (w, 2, -o), r"omega must have all values in \[0, 1\]"),
        (lambda w, o: (w, 2, o[:, :5]), "omega must have the shape of weight"),
        (lambda w, o: (w.reshape(-1), 2, None), "weight must be 2-D"),
        (lambda w, o: (w.long(), 2, None), "weight must be float32, float64, bfloat16 or float16"),
    ],
)
def test_bad_inputs_name_the_argument(make_args, match):
    weight, omega = torch.randn(6, 8), torch.rand(6, 8)
    with pytest.raises(RuntimeError, match=match):
        ops.weighted_lowrank(*make_args(weight, omega))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"max_iters": 0}, "max_iters must be >= 1"), ({"tol": -1.0}, "tol must be >= 0"),
     ({"oversample": -1}, "oversample must be >= 0")],
)
def test_bad_iteration_settings_name_the_argument(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        ops.weighted_lowrank(torch.randn(6, 8), 2, torch.rand(6, 8), **kwargs)
