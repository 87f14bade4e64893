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
from lrsparse.owndata import TEXT_TASK, DataSpec, LabelSpace, read_examples, subset
from lrsparse.squad import MIN_SEQ_LEN as _MIN_QUESTION_ANSWERING_SEQ_LEN

__all__ = ["ClassificationTask", "TextFilesTask", "QuestionAnsweringTask", "TASK_NAMES", "resolve_task"]

TASK_NAMES = (*GLUE_TASKS, "squad", "embedding", TEXT_TASK)


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
            names = getattr(spec, "label_names", None) or spec.label_values
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {label: i for i, label in enumerate(names)}
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
        return compute_metrics(self.spec, torch.cat(list(outputs["logits"])), labels)


class TextFilesTask(ClassificationTask):
    """The user's own labelled text (:mod:`lrsparse.owndata`): classes scored by accuracy, macro-F1 (and the positive
    class's F1 when binary), or a regression scored by Pearson and Spearman. The label space is known once the
    training data is read (:meth:`load`), or given for a trained model (its ``id2label``)."""

    name = TEXT_TASK

    def __init__(self, data: DataSpec, labels: LabelSpace | None = None):
        self.data = data
        self._labels = labels
        self._splits: dict | None = None

    @property
    def spec(self) -> LabelSpace:
        if self._labels is None:
            raise RuntimeError("the labels of your own data are known once its training split is read (load)")
        return self._labels

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    def load(self, split: str, data_dir, max_samples: int | None, seed: int):
        if self._splits is None:
            train, dev, labels = read_examples(self.data)
            if self._labels is not None and labels.label_values != self._labels.label_values:
                raise ValueError(f"the training labels {list(labels.label_values)} differ from the model's "
                                 f"{list(self._labels.label_values)}")
            self._labels = labels
            self._splits = {"train": train, "dev": dev}
        if split not in self._splits:
            raise ValueError(f"split {split!r} is not available; expected one of {sorted(self._splits)}")
        return subset(self._splits[split], max_samples, seed)

    def has_trained_head(self, model_config) -> bool:
        """A classifier head is kept only when it predicts the same labels in the same order (names compared without
        case), a regression head when the model is a one-output regressor."""
        if not super().has_trained_head(model_config):
            return False
        if self.spec.is_regression:
            return getattr(model_config, "problem_type", None) in (None, "regression")
        names = [str(model_config.id2label[i]).lower() for i in range(int(model_config.num_labels))]
        return names == [name.lower() for name in self.spec.label_values]


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


def resolve_task(task, train_text: str | None = None, data: DataSpec | None = None,
                 text_columns: tuple[str, ...] | None = None):
    """The task object for a name (GLUE names as :func:`lrsparse.data.get_task` takes them, "squad", "embedding" or
    "text-classification"), a GlueTask, or a task object (returned as is). ``train_text`` is the embedding task's
    training text (``text_columns``: its columns when it is a table), ``data`` where text-classification's examples
    come from."""
    from lrsparse.embedding import EmbeddingTask

    if isinstance(task, (ClassificationTask, QuestionAnsweringTask, EmbeddingTask)):
        return task
    if task == TEXT_TASK:
        if data is None:
            raise ValueError(f"task {TEXT_TASK} needs your data: --train-file FILE or --dataset NAME")
        return TextFilesTask(data)
    if isinstance(task, GlueTask):
        return ClassificationTask(task)
    if isinstance(task, str) and task.lower() == "squad":
        return QuestionAnsweringTask()
    if isinstance(task, str) and task.lower() == "embedding":
        return EmbeddingTask(train_text, text_columns)
    try:
        return ClassificationTask(get_task(task))
    except ValueError:
        raise ValueError(f"task {task!r} is not a GLUE task, squad or embedding; expected one of {sorted(TASK_NAMES)}") from None
