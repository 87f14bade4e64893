"""What the pipeline needs to know about a task: its data, tokenization, model head, and how it is scored.

Three kinds share one interface: GLUE sequence classification / regression (:class:`ClassificationTask`), SQuAD
extractive question answering (:class:`QuestionAnsweringTask`) and sentence embeddings
(:class:`lrsparse.embedding.EmbeddingTask`: distillation on unlabelled text, scored on STS-B). The pipeline's stages never look at the kind: they
train on ``model(**batch).loss`` and evaluate through :meth:`metrics` on the model outputs named by
``output_names``. The compressed layers are the same encoder projections for both; task heads are never targets.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from lrsparse.data import GLUE_TASKS, GlueTask, TokenizedDataset, get_task, load_glue
from lrsparse.squad import MIN_SEQ_LEN as _MIN_QUESTION_ANSWERING_SEQ_LEN

__all__ = ["ClassificationTask", "QuestionAnsweringTask", "TASK_NAMES", "resolve_task"]

TASK_NAMES = (*GLUE_TASKS, "squad", "embedding")


class ClassificationTask:
    """A GLUE task: one or two sentences -> class id or score, scored by the GLUE metrics."""

    kind = "classification"
    min_seq_len = 8
    label_names = ("labels",)
    output_names = ("logits",)

    def __init__(self, spec: GlueTask):
        self.spec = spec
        self.name = spec.name
        self.main_metric = spec.main_metric

    def load(self, split: str, data_dir: str | os.PathLike | None, max_samples: int | None, seed: int):
        return load_glue(self.name, split, data_dir, max_samples, seed)

    def tokenize(self, examples, tokenizer, max_seq_len: int, doc_stride: int | None = None) -> TokenizedDataset:
        if doc_stride is not None:
            raise ValueError(f"doc_stride applies to question answering only, not to task {self.name!r}")
        return TokenizedDataset(examples, tokenizer, max_seq_len)

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def head_config(self) -> dict[str, Any]:
        """Config overrides that give a freshly initialized head the task's shape and label names."""
        spec = self.spec
        kwargs: dict[str, Any] = {
            "num_labels": spec.num_labels,
            "problem_type": "regression" if spec.is_regression else "single_label_classification",
        }
        if not spec.is_regression:
            kwargs["id2label"] = dict(enumerate(spec.label_values))
            kwargs["label2id"] = {label: i for i, label in enumerate(spec.label_values)}
        return kwargs

    def has_trained_head(self, model_config) -> bool:
        """Whether the checkpoint already holds a sequence-classification head of the task's size."""
        architectures = getattr(model_config, "architectures", None) or []
        is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
        return is_classifier and int(getattr(model_config, "num_labels", -1)) == self.spec.num_labels

    def check_model(self, model: nn.Module, where: str) -> None:
        if not type(model).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"model in {where} is a {type(model).__name__}, but task {self.name} needs a "
                             "...ForSequenceClassification model")
        num_labels = int(getattr(model.config, "num_labels", -1))
        if num_labels != self.spec.num_labels:
            raise ValueError(f"model in {where} has {num_labels} output label(s) but task {self.name} needs "
                             f"{self.spec.num_labels}")

    def metrics(self, outputs: dict[str, Sequence[torch.Tensor]], dataset: TokenizedDataset) -> dict:
        from lrsparse.metrics import compute_metrics

        labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
        return compute_metrics(self.name, torch.cat(list(outputs["logits"])), labels)


class QuestionAnsweringTask:
    """SQuAD v1.1: a question and a paragraph -> the answer span, scored by exact match and F1 (main)."""

    kind = "question-answering"
    min_seq_len = _MIN_QUESTION_ANSWERING_SEQ_LEN
    name = "squad"
    main_metric = "f1"
    label_names = ("start_positions", "end_positions")
    output_names = ("start_logits", "end_logits")

    def load(self, split: str, data_dir: str | os.PathLike | None, max_samples: int | None, seed: int):
        from lrsparse.squad import load_squad

        return load_squad(split, data_dir, max_samples, seed)

    def tokenize(self, examples, tokenizer, max_seq_len: int, doc_stride: int | None = None):
        from lrsparse.squad import QuestionAnsweringDataset

        return QuestionAnsweringDataset(examples, tokenizer, max_seq_len, doc_stride)

    def auto_model_class(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def head_config(self) -> dict[str, Any]:
        # The span head (qa_outputs) has one output for the start and one for the end logit.
        return {"num_labels": 2}

    def has_trained_head(self, model_config) -> bool:
        architectures = getattr(model_config, "architectures", None) or []
        return (any(name.endswith("ForQuestionAnswering") for name in architectures)
                and int(getattr(model_config, "num_labels", -1)) == 2)

    def check_model(self, model: nn.Module, where: str) -> None:
        if not type(model).__name__.endswith("ForQuestionAnswering") or int(model.config.num_labels) != 2:
            raise ValueError(f"model in {where} is a {type(model).__name__} with {model.config.num_labels} "
                             "output(s), but task squad needs a ...ForQuestionAnswering model with 2 (start, end)")

    def metrics(self, outputs: dict[str, Sequence[torch.Tensor]], dataset) -> dict:
        from lrsparse.metrics import squad_metrics
        from lrsparse.squad import best_spans

        # Batches are padded to different lengths: keep per-window rows (best_spans ignores the padding).
        starts = [row for batch in outputs["start_logits"] for row in batch]
        ends = [row for batch in outputs["end_logits"] for row in batch]
        return squad_metrics(best_spans(dataset, starts, ends), dataset.examples.references())


def resolve_task(task, train_text: str | None = None):
    """The task object for a name (GLUE names as :func:`lrsparse.data.get_task` takes them, "squad" or "embedding"),
    a GlueTask, or a task object (returned as is). ``train_text`` is the embedding task's training text."""
    from lrsparse.embedding import EmbeddingTask

    if isinstance(task, (ClassificationTask, QuestionAnsweringTask, EmbeddingTask)):
        return task
    if isinstance(task, GlueTask):
        return ClassificationTask(task)
    if isinstance(task, str) and task.lower() == "squad":
        return QuestionAnsweringTask()
    if isinstance(task, str) and task.lower() == "embedding":
        return EmbeddingTask(train_text)
    try:
        return ClassificationTask(get_task(task))
    except ValueError:
        raise ValueError(f"task {task!r} is not a GLUE task, squad or embedding; expected one of {sorted(TASK_NAMES)}") from None
