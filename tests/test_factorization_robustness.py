"""The factorization path never fails on the matrices pruning produces.

A captured input that made ``weighted_lowrank`` raise on two threads (LAPACK's eigensolver refusing the cluster of
zero Gram eigenvalues that empty rows create), a stress grid of pruned-like matrices (densities 0.5 to 0.005,
all-zero rows and columns, exactly repeated singular values, exact low rank, a 1e30 dynamic range; ranks 1 to full;
with and without omega; 1 and 2 threads), the energy-allocation spectra and the Fisher-weighted SVD on the same
matrices, and the pipeline's handling of one layer that fails anyway. References: scipy's float64 SVD.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from lrsparse import ops
from lrsparse.factorization import fisher_row_scale, factorize_matrix, singular_values

REGRESSION_FILE = "regressions/weighted_lowrank_eigh_fail_384x384_r14.safetensors"


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def reference_svd(weight: torch.Tensor):
    u, s, vh = scipy.linalg.svd(weight.double().numpy(), full_matrices=False, lapack_driver="gesvd")
    return u, s, vh


def weighted_error(weight, U, V, omega=None) -> float:
    """sum(omega * (W - U V)^2) in float64 (numpy)."""
    w = weight.double().numpy()
    residual = w - np.asarray(U, dtype=np.float64) @ np.asarray(V, dtype=np.float64)
    om = np.ones_like(w) if omega is None else omega.double().numpy()
    return float((om * residual**2).sum())


def truncated_svd_factors(weight, rank: int):
    u, s, vh = reference_svd(weight)
    return u[:, :rank] * s[:rank], vh[:rank]


def check_factors(weight, rank, U, V, omega=None, optimal_rtol=1e-5):
    """Finite factors of the requested shape; without omega the optimal truncation error (to optimal_rtol relative,
    plus float32 rounding of ||W||^2 for a float32 fit); with omega never above the plain truncated SVD's."""
    m, n = weight.shape
    assert U.shape == (m, rank) and V.shape == (rank, n)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    error = weighted_error(weight, U.numpy(), V.numpy(), omega)
    norm2 = float(weight.double().square().sum())
    rounding = (1e-6 if weight.dtype == torch.float32 else 1e-12) * norm2
    svd_error = weighted_error(weight, *truncated_svd_factors(weight, rank), omega)
    if omega is None:
        assert error <= svd_error * (1 + optimal_rtol) + rounding, (error, svd_error)
    else:
        assert error <= svd_error * (1 + 1e-6) + rounding, (error, svd_error)
    return error


# ------------------------------------------------------------------------------------------------ captured input
@pytest.fixture(scope="module")
def captured(data_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(data_dir) / REGRESSION_FILE
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("with_omega", [False, True])
def test_captured_pruned_attention_matrix(captured, threads, with_omega):
    tensors, metadata = captured
    weight, omega = tensors["weight"], tensors["omega"] if with_omega else None
    rank = int(metadata["rank"])
    assert (weight.shape, rank, int((weight.abs().sum(1) == 0).sum())) == ((384, 384), 14, 157)
    U, V = ops.weighted_lowrank(weight, rank, omega, max_iters=int(metadata["max_iters"]), tol=float(metadata["tol"]),
                                seed=int(metadata["seed"]), oversample=8)
    check_factors(weight, rank, U, V, omega)


# ------------------------------------------------------------------------------------------------ stress grid
def pruned_like(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """Matrices shaped like pruned transformer weights (float32)."""
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("density"):
        density = float(kind.split("-")[1])
        dense = torch.randn(m, n, generator=gen, dtype=torch.float64)
        weight = dense * (torch.rand(m, n, generator=gen) < density)
        weight[torch.rand(m, generator=gen) < 0.4] = 0  # whole heads / neurons pruned: empty rows ...
        weight[:, torch.rand(n, generator=gen) < 0.2] = 0  # ... and columns
    elif kind == "repeated":
        # Exactly repeated singular values (blocks of equal ones) inside zero rows and columns.
        rows, cols = torch.randperm(m, generator=gen)[: m // 2], torch.randperm(n, generator=gen)[: n // 3]
        k = min(len(rows), len(cols))
        q1 = torch.linalg.qr(torch.randn(len(rows), k, generator=gen, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(len(cols), k, generator=gen, dtype=torch.float64))[0]
        s = torch.tensor([4.0] * (k // 3) + [1.0] * (k // 3) + [0.0] * (k - 2 * (k // 3)), dtype=torch.float64)
        weight = torch.zeros(m, n, dtype=torch.float64)
        weight[rows[:, None], cols[None, :]] = (q1 * s) @ q2.T
    elif kind == "low-rank":
        weight = torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen,
                                                                                     dtype=torch.float64)
        weight[torch.rand(m, generator=gen) < 0.5] = 0
    elif kind == "dynamic-range":
        weight = torch.randn(m, n, generator=gen, dtype=torch.float64) * (torch.rand(m, n, generator=gen) < 0.05)
        weight = weight * torch.logspace(-15, 15, m, dtype=torch.float64)[torch.randperm(m, generator=gen), None]
    else:
        raise ValueError(kind)
    return weight.float()


KINDS = ["density-0.5", "density-0.05", "density-0.005", "repeated", "low-rank", "dynamic-range"]
SHAPES = [(96, 160), (160, 96)]


def stress_omega(weight: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    kept = 0.5 + 0.5 * torch.rand(weight.shape, generator=gen)
    return torch.where(weight != 0, kept, torch.full_like(kept, 0.5))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("with_omega", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_stress_pruned_like_matrices(kind, shape, with_omega, threads):
    weight = pruned_like(kind, *shape, seed=KINDS.index(kind))
    omega = stress_omega(weight, seed=1) if with_omega else None
    full = min(shape)
    for rank in (1, 7, full // 2, full - 1, full):
        U, V = ops.weighted_lowrank(weight, rank, omega, max_iters=20 if with_omega else 1)
        check_factors(weight, rank, U, V, omega)


def test_all_zero_rows_and_columns_get_zero_factors():
    # Deflation is exact: the factors are zero on empty rows (U) and columns (V), with or without omega.
    weight = pruned_like("density-0.05", 96, 160, seed=4)
    empty_rows, empty_cols = weight.abs().sum(1) == 0, weight.abs().sum(0) == 0
    assert empty_rows.any() and empty_cols.any()
    for omega in (None, stress_omega(weight, seed=2)):
        U, V = ops.weighted_lowrank(weight, 10, omega)
        assert torch.equal(U[empty_rows], torch.zeros_like(U[empty_rows]))
        assert torch.equal(V[:, empty_cols], torch.zeros_like(V[:, empty_cols]))


@pytest.mark.parametrize("kind", KINDS)
def test_spectrum_for_energy_allocation_matches_scipy(kind):
    weight = pruned_like(kind, 96, 160, seed=KINDS.index(kind) + 10)
    values = singular_values(weight)
    _, expected, _ = reference_svd(weight)
    assert values.dtype == torch.float64 and values.shape == (96,)
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-9 * max(expected[0], 1e-300))


def test_spectrum_of_an_all_zero_matrix():
    assert torch.equal(singular_values(torch.zeros(5, 7)), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_weighted_svd_is_the_scaled_optimum(kind):
    # FWSVD minimizes sum_ij s_i^2 (W - U V)_ij^2: the closed form is diag(1/s) trunc_r(diag(s) W).
    weight = pruned_like(kind, 96, 160, seed=KINDS.index(kind) + 20)
    gen = torch.Generator().manual_seed(5)
    fisher = torch.rand(96, 160, generator=gen) * (torch.rand(96, 1, generator=gen) < 0.7)  # rows without Fisher mass
    rank = 12
    U, V = factorize_matrix(weight, rank, "fwsvd", fisher_rows=fisher)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    scale = fisher_row_scale(fisher, 96).double()
    row_weight = (scale**2)[:, None].expand(96, 160)
    error = weighted_error(weight, U.numpy(), V.numpy(), row_weight)
    Us, Vs = truncated_svd_factors(scale[:, None] * weight.double(), rank)
    optimal = weighted_error(weight, Us / scale.numpy()[:, None], Vs, row_weight)
    assert error <= optimal * (1 + 1e-5) + 1e-6 * float((row_weight * weight.double() ** 2).sum())


# ------------------------------------------------------------------------------------------------ the pipeline
def test_a_failing_layer_is_reported_saved_and_resumable(tmp_path, data_dir, minilm_path, monkeypatch):
    """A layer whose factorization raises: the error names the layer and the call's arguments, its inputs are
    written beside the checkpoint, and --resume continues from the prune checkpoint once the cause is gone."""
    from safetensors import safe_open

    from lrsparse import factorization
    from lrsparse.cli import main
    from pipeline_helpers import save_tiny_bert_checkpoint

    model_dir = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path)
    output = tmp_path / "run"
    argv = ["compress", "--model", str(model_dir), "--task", "sst2", "--keep", "0.3", "--output", str(output),
            "--data-dir", str(Path(data_dir) / "glue"), "--max-train-samples", "32", "--max-eval-samples", "16",
            "--max-seq-len", "16", "--batch-size", "8", "--epochs", "1", "--factorization-iters", "2",
            "--delta-t", "1", "--threads", "1", "--checkpoint-every", "0", "--no-inspect"]
    failing = "bert.encoder.layer.0.attention.self.value"
    real = factorization.factorize_matrix
    calls = []

    def factorize_or_fail(weight, rank, method, *args, **kwargs):
        calls.append(rank)
        if len(calls) == 3:  # the third target layer (query, key, value, ...) fails
            raise torch.linalg.LinAlgError("injected by the test")
        return real(weight, rank, method, *args, **kwargs)

    monkeypatch.setattr(factorization, "factorize_matrix", factorize_or_fail)
    assert main(argv) == 2
    manifest = json.loads((output / "checkpoint" / "manifest.json").read_text())
    assert [stage["name"] for stage in manifest["stages"]] == ["dense", "prune"]
    saved = output / "checkpoint" / f"factorization_failure_{failing}.safetensors"
    with safe_open(str(saved), "pt") as handle:
        # The default factorizer's inputs: the pruned weight, its mask and the calibration input covariance.
        assert set(handle.keys()) >= {"weight", "mask", "input_covariance"}
        assert handle.get_tensor("weight").shape == handle.get_tensor("input_covariance").shape == (32, 32)
        assert handle.metadata()["layer"] == failing and handle.metadata()["rank"] == str(calls[2])
        assert "injected by the test" in handle.metadata()["error"]

    monkeypatch.setattr(factorization, "factorize_matrix", real)
    assert main(argv + ["--resume"]) == 0
    report = json.loads((output / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["dense", "prune", "factorize", "mixed_rank"]
    assert math.isfinite(report["final_metrics"]["main"])


def test_failure_message_names_layer_arguments_and_resume(tmp_path, capsys, data_dir, minilm_path, monkeypatch):
    from lrsparse.factorization import FactorizationError

    error = FactorizationError("encoder.layer.3.output.dense", {"rank": 14, "method": "sparsity-aware",
                                                                 "max_iters": 100},
                               {"weight": torch.ones(2, 3), "mask": None}, torch.linalg.LinAlgError("eigh failed"))
    error.save(tmp_path / "failure.safetensors")
    text = str(error)
    for expected in ("'encoder.layer.3.output.dense'", "rank=14", "method='sparsity-aware'", "max_iters=100",
                     "weight (2, 3)", "LinAlgError: eigh failed", str(tmp_path / "failure.safetensors")):
        assert expected in text
