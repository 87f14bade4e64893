"""GLUE and SQuAD metrics, implemented directly (float64) so the package needs neither scikit-learn nor scipy.

Degenerate inputs follow scikit-learn's conventions where a metric is undefined: F1 and Matthews correlation are 0
when their denominator is 0, and Pearson/Spearman are 0 for a constant input (a constant predictor carries no
information, and 0 keeps report.json valid JSON where NaN would not be).

SQuAD exact match and F1 follow the official v1.1 evaluation script, reported as fractions in [0, 1] like every
other metric here (the official script prints percentages: multiply by 100).
"""
from __future__ import annotations

from typing import Sequence

import collections
import re
import string

import torch

from lrsparse.data import get_task

__all__ = ["accuracy", "f1_score", "macro_f1", "matthews_corr", "pearson", "spearman", "compute_metrics", "predictions_from_logits",
           "normalize_answer", "squad_exact_match", "squad_f1", "squad_metrics"]


def _as_vector(values, name: str, dtype=torch.float64) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().to("cpu")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    return tensor.to(dtype)


def _pair(predictions, labels, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _as_vector(predictions, "predictions", dtype)
    gold = _as_vector(labels, "labels", dtype)
    if pred.numel() != gold.numel():
        raise ValueError(f"predictions and labels must have the same length, got {pred.numel()} and {gold.numel()}")
    return pred, gold


def accuracy(predictions, labels) -> float:
    pred, gold = _pair(predictions, labels, torch.long)
    return float((pred == gold).double().mean())


def f1_score(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2 TP / (2 TP + FP + FN)."""
    pred, gold = _pair(predictions, labels, torch.long)
    tp = int(((pred == positive) & (gold == positive)).sum())
    fp = int(((pred == positive) & (gold != positive)).sum())
    fn = int(((pred != positive) & (gold == positive)).sum())
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def macro_f1(predictions, labels) -> float:
    """Unweighted mean over the classes present in ``labels`` or ``predictions`` of each class's one-vs-rest F1
    (scikit-learn's ``f1_score(average="macro")``)."""
    pred, gold = _pair(predictions, labels, torch.long)
    classes = torch.unique(torch.cat([pred, gold])).tolist()
    return sum(f1_score(pred, gold, positive=c) for c in classes) / len(classes)


def matthews_corr(predictions, labels) -> float:
    """Matthews correlation (multiclass R_K of Gorodkin 2004, equal to the phi coefficient for two classes)."""
    pred, gold = _pair(predictions, labels, torch.long)
    if int(torch.minimum(pred.min(), gold.min())) < 0:
        raise ValueError("predictions and labels must be non-negative class ids")
    num_classes = int(torch.maximum(pred.max(), gold.max())) + 1
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    confusion.index_put_((gold, pred), torch.ones_like(gold, dtype=torch.float64), accumulate=True)
    n = confusion.sum()
    correct = confusion.trace()
    true_per_class = confusion.sum(dim=1)
    pred_per_class = confusion.sum(dim=0)
    covariance = correct * n - (pred_per_class * true_per_class).sum()
    denominator = torch.sqrt((n * n - (pred_per_class**2).sum()) * (n * n - (true_per_class**2).sum()))
    return 0.0 if float(denominator) == 0.0 else float(covariance / denominator)


def pearson(predictions, labels) -> float:
    x, y = _pair(predictions, labels)
    x = x - x.mean()
    y = y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if float(denominator) == 0.0 else float((x * y).sum() / denominator)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given the mean of the ranks they span (as Spearman's rho needs)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    n = values.numel()
    # Each run of equal values [start, end) gets rank (start + end + 1) / 2 in 1-based terms.
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    run_rank = (starts + ends + 1).double() / 2.0
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = run_rank[run_id]
    return ranks


def spearman(predictions, labels) -> float:
    x, y = _pair(predictions, labels)
    return pearson(_average_ranks(x), _average_ranks(y))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_score,
    "macro_f1": macro_f1,
    "matthews_corr": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}


def _spec(task):
    """A GLUE task's spec by name, or a spec object itself (lrsparse.owndata.LabelSpace for the user's labels)."""
    return get_task(task) if isinstance(task, str) else task


def predictions_from_logits(task, logits: torch.Tensor) -> torch.Tensor:
    """Class ids (argmax) for classification tasks, the single output for regression tasks."""
    spec = _spec(task)
    logits = torch.as_tensor(logits)
    if spec.is_regression:
        if logits.dim() > 2 or (logits.dim() == 2 and logits.shape[1] != 1):
            raise ValueError(f"logits for regression task {spec.name} must have shape (N,) or (N, 1), got {tuple(logits.shape)}")
        return logits.reshape(-1).double()
    if logits.dim() != 2 or logits.shape[1] != spec.num_labels:
        raise ValueError(f"logits for {spec.name} must have shape (N, {spec.num_labels}), got {tuple(logits.shape)}")
    return logits.argmax(dim=1)


def compute_metrics(task, predictions: Sequence | torch.Tensor, labels: Sequence | torch.Tensor) -> dict:
    """The official metrics of ``task`` plus ``"main"`` (the task's headline metric), all as floats in [-1, 1].

    ``predictions`` are class ids (or a 2-D logits array, which is argmaxed) for classification and scores for
    regression. ``task`` is a GLUE task name or a spec (:class:`lrsparse.owndata.LabelSpace`).
    """
    spec = _spec(task)
    predictions = torch.as_tensor(predictions)
    if predictions.dim() == 2:
        predictions = predictions_from_logits(task, predictions)
    if not spec.is_regression and predictions.is_floating_point():
        raise ValueError(f"predictions for classification task {spec.name} must be class ids, got floating values")
    results = {name: _METRICS[name](predictions, labels) for name in spec.metrics}
    results["main"] = results[spec.main_metric]
    return results


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v1.1 (the official evaluate-v1.1.py, same normalization and aggregation)
# ---------------------------------------------------------------------------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, ground_truth: str) -> float:
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    common = collections.Counter(predicted) & collections.Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _ground_truth_list(ground_truths) -> list[str]:
    if isinstance(ground_truths, str):
        raise TypeError("ground_truths must be a sequence of answer strings, not a single string")
    ground_truths = list(ground_truths)
    if not ground_truths:
        raise ValueError("ground_truths must hold at least one answer")
    return ground_truths


def squad_exact_match(prediction: str, ground_truths) -> float:
    """1.0 when the normalized prediction equals any normalized ground truth, else 0.0."""
    return max(float(normalize_answer(prediction) == normalize_answer(gold))
               for gold in _ground_truth_list(ground_truths))


def squad_f1(prediction: str, ground_truths) -> float:
    """The best bag-of-tokens F1 of the normalized prediction against any ground truth."""
    return max(_token_f1(prediction, gold) for gold in _ground_truth_list(ground_truths))


def squad_metrics(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict:
    """Mean exact match and F1 over the questions of ``references`` (id -> ground-truth answers), plus ``"main"``
    (F1). Every referenced question needs a prediction (id -> answer text)."""
    if not references:
        raise ValueError("references must hold at least one question")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"predictions are missing {len(missing)} of {len(references)} question ids, e.g. "
                         f"{missing[:3]}")
    exact = sum(squad_exact_match(predictions[qid], golds) for qid, golds in references.items())
    f1 = sum(squad_f1(predictions[qid], golds) for qid, golds in references.items())
    results = {"exact_match": exact / len(references), "f1": f1 / len(references)}
    results["main"] = results["f1"]
    return results
