"""GLUE metrics against hand-computed answers, closed forms and scipy."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lrsparse.data import GLUE_TASKS
from lrsparse.metrics import (
    accuracy,
    compute_metrics,
    f1_score,
    matthews_corr,
    pearson,
    predictions_from_logits,
    spearman,
)


def test_accuracy_and_f1_hand_computed():
    predictions = [1, 0, 1, 1, 0, 1]
    labels = [1, 1, 1, 0, 0, 0]
    # TP=2 (idx 0,2), FP=2 (idx 3,5), FN=1 (idx 1), TN=1 (idx 4)
    assert accuracy(predictions, labels) == pytest.approx(3 / 6)
    assert f1_score(predictions, labels) == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # F1 of the other class: TP=1, FP=1, FN=2
    assert f1_score(predictions, labels, positive=0) == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))


def test_f1_without_any_positive_is_zero():
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0


def _binary_mcc_closed_form(predictions, labels) -> float:
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(predictions, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def test_matthews_binary_known_answers():
    # scikit-learn's documented example: [+1,+1,+1,-1] vs predictions [+1,-1,+1,+1] -> -1/3
    assert matthews_corr([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3)
    assert matthews_corr([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corr([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corr([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0  # constant predictor: undefined -> 0


def test_matthews_binary_matches_closed_form_on_random_data():
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        labels = torch.randint(0, 2, (200,), generator=generator).tolist()
        predictions = torch.randint(0, 2, (200,), generator=generator).tolist()
        assert matthews_corr(predictions, labels) == pytest.approx(_binary_mcc_closed_form(predictions, labels))


def test_matthews_multiclass_matches_one_hot_covariance_form():
    # Gorodkin's R_K = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) with X, Y the one-hot matrices.
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (300,), generator=generator)
    predictions = torch.where(torch.rand(300, generator=generator) < 0.6, labels, torch.randint(0, 3, (300,)))
    x = torch.nn.functional.one_hot(predictions, 3).double()
    y = torch.nn.functional.one_hot(labels, 3).double()
    x, y = x - x.mean(0), y - y.mean(0)
    expected = (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())
    assert matthews_corr(predictions, labels) == pytest.approx(float(expected))


def test_pearson_and_spearman_match_scipy_with_ties():
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(0, 6, (500,), generator=generator).double() / 2  # many ties, like STS-B scores
    y = x + torch.randn(500, generator=generator, dtype=torch.float64)
    assert pearson(y, x) == pytest.approx(stats.pearsonr(y.numpy(), x.numpy())[0], abs=1e-12)
    assert spearman(y, x) == pytest.approx(stats.spearmanr(y.numpy(), x.numpy())[0], abs=1e-12)


def test_pearson_spearman_closed_forms():
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # Monotone but non-linear: Spearman 1, Pearson below 1.
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 8.0, 27.0, 64.0]
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.99
    # No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of y are [2, 1, 4, 3] -> sum d^2 = 4
    assert spearman([1.0, 2.0, 3.0, 4.0], [0.5, 0.1, 0.9, 0.7]) == pytest.approx(1 - 6 * 4 / (4 * 15))
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_compute_metrics_per_task_has_main():
    labels = [0, 1, 1, 0, 1]
    predictions = [0, 1, 0, 0, 1]
    for name, spec in GLUE_TASKS.items():
        if spec.is_regression:
            result = compute_metrics(name, [0.1, 2.0, 2.5, 4.0, 5.0], [0.0, 2.2, 2.0, 4.5, 4.9])
        else:
            result = compute_metrics(name, predictions, labels)
        assert set(result) == set(spec.metrics) | {"main"}
        assert result["main"] == result[spec.main_metric]
    assert compute_metrics("mrpc", predictions, labels) == {
        "accuracy": pytest.approx(0.8),
        "f1": pytest.approx(2 * 2 / (2 * 2 + 0 + 1)),
        "main": pytest.approx(0.8),
    }


def test_compute_metrics_accepts_logits():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.5]])
    assert predictions_from_logits("sst2", logits).tolist() == [0, 1, 0]
    assert compute_metrics("sst2", logits, [0, 1, 1])["accuracy"] == pytest.approx(2 / 3)
    scores = torch.tensor([[1.0], [2.0], [3.0]])
    assert compute_metrics("stsb", scores, [1.0, 2.0, 3.0])["pearson"] == pytest.approx(1.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="predictions must not be empty"):
        pearson([], [])
    with pytest.raises(ValueError, match="task 'squad'"):
        compute_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="logits for mnli"):
        predictions_from_logits("mnli", torch.zeros(4, 2))
    with pytest.raises(ValueError, match="class ids"):
        compute_metrics("sst2", [0.3, 0.7], [0, 1])
