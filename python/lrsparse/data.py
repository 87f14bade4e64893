"""GLUE task specifications, loaders for the original GLUE TSV files (or the hub), and tokenization.

Local layout: ``<data_dir>/<TASK dir>/{train,dev}.tsv`` exactly as ``download_glue_data.py`` writes it. The files
are read with ``delimiter='\\t'`` and ``quoting=csv.QUOTE_NONE`` like the GLUE processors (MRPC and STS-B contain
bare ``"`` characters that a quoting reader would swallow), as UTF-8 with a leading byte-order mark dropped so that
MRPC's does not end up in its first column name. Every problem with a file (missing file, bytes that are not UTF-8,
missing or repeated column, row with more or fewer columns than the header, over-long field, label outside the task's
label set or range, empty split) raises a ValueError (FileNotFoundError for a missing file) before any model work
starts, naming the file and line.
"""
from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "GlueTask",
    "GLUE_TASKS",
    "GlueSplit",
    "get_task",
    "task_file",
    "load_glue",
    "validate_glue_files",
    "TokenizedDataset",
    "PaddingCollator",
]


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored locally and on the hub, and how it is scored.

    ``text_columns`` / ``label_column`` are header names of the local TSV, or integer column indices when the file
    has no header (CoLA). ``label_values`` lists the label strings of a classification task in class-id order
    (``label_names`` their names, as the hub's "glue" dataset gives them, where the files hold 0 / 1);
    regression tasks (``num_labels == 1``) instead accept plain decimal numbers in ``label_range``. Every row of a
    file with a header has as many columns as the header; ``num_columns`` is that count for a file without one.
    """

    name: str
    dir_name: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    has_header: bool = True
    num_columns: int | None = None
    label_values: tuple[str, ...] = ("0", "1")
    label_names: tuple[str, ...] | None = None  # the classes' names (the model's id2label) where the files use ids
    label_range: tuple[float, float] | None = None
    split_files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    hub_text_fields: tuple[str, ...] = ("sentence1", "sentence2")
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation"})

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


_NLI_LABELS = ("entailment", "not_entailment")

# Label order follows the hub's "glue" dataset so that a model fine-tuned on either source predicts the same ids.
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("sst2", "SST-2", ("sentence",), "label", 2, ("accuracy",), "accuracy", hub_text_fields=("sentence",),
                 label_names=("negative", "positive")),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", 2, ("accuracy", "f1"), "f1",
                 label_names=("not_equivalent", "equivalent")),
        GlueTask("cola", "CoLA", (3,), 1, 2, ("matthews_corr",), "matthews_corr", has_header=False, num_columns=4,
                 hub_text_fields=("sentence",), label_names=("unacceptable", "acceptable")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", 1, ("pearson", "spearman"), "pearson",
                 label_values=(), label_range=(0.0, 5.0)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", 2, ("accuracy",), "accuracy",
                 label_values=_NLI_LABELS),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", 2, ("accuracy",), "accuracy",
                 label_values=_NLI_LABELS, hub_text_fields=("question", "sentence")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", 3, ("accuracy",), "accuracy",
                 label_values=("entailment", "neutral", "contradiction"),
                 split_files={"train": "train.tsv", "dev": "dev_matched.tsv"},
                 hub_text_fields=("premise", "hypothesis"),
                 hub_splits={"train": "train", "dev": "validation_matched"}),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", 2, ("accuracy", "f1"), "f1",
                 hub_text_fields=("question1", "question2"), label_names=("not_duplicate", "duplicate")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", 2, ("accuracy",), "accuracy",
                 label_names=("not_entailment", "entailment")),
    )
}


def get_task(task: str) -> GlueTask:
    """The spec of ``task`` (case-insensitive; "sst-2" and "SST-2" work too)."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}")
    key = task.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"task {task!r} is not a GLUE task; expected one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _check_split(spec: GlueTask, split: str) -> None:
    if split not in spec.split_files:
        raise ValueError(f"split {split!r} is not available for {spec.name}; expected one of {sorted(spec.split_files)}")


def task_file(task: str | GlueTask, split: str, data_dir: str | os.PathLike) -> Path:
    """Path of the local TSV of ``split`` of ``task`` under ``data_dir``."""
    spec = task if isinstance(task, GlueTask) else get_task(task)
    _check_split(spec, split)
    return Path(data_dir) / spec.dir_name / spec.split_files[split]


@dataclass
class GlueSplit:
    """Examples of one split: one or two texts per example and a class id (int) or score (float) label."""

    task: GlueTask
    split: str
    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[Any]
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]) -> "GlueSplit":
        return GlueSplit(
            self.task,
            self.split,
            [self.texts_a[i] for i in indices],
            None if self.texts_b is None else [self.texts_b[i] for i in indices],
            [self.labels[i] for i in indices],
            self.source,
        )


# A plain decimal number: float() alone would also take "1_0" (10.0), " 3 " and non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _parse_label(spec: GlueTask, raw: str, where: str) -> int | float:
    if spec.is_regression:
        if not _DECIMAL.fullmatch(raw):
            raise ValueError(f"{where}: label {raw!r} of {spec.name} is not a number")
        value = float(raw)
        low, high = spec.label_range
        if not (low <= value <= high):  # also rejects nan
            raise ValueError(f"{where}: label {value} of {spec.name} is outside [{low}, {high}]")
        return value
    try:
        return spec.label_values.index(raw)
    except ValueError:
        raise ValueError(
            f"{where}: label {raw!r} of {spec.name} is not one of {list(spec.label_values)}"
        ) from None


def _undecodable(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits in ``path``: "line N: byte 0x.. at offset M (reason)"."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")  # a leading BOM is valid UTF-8, so offsets count from the start of the file
    except UnicodeDecodeError as exc:
        head = raw[: exc.start]
        line = head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1  # as csv's line_num counts
        return f"line {line}: byte {raw[exc.start]:#04x} at offset {exc.start} is not UTF-8 ({exc.reason})"
    return "is not UTF-8"  # only if the file changed since it was read


def _without_bom(lines):
    """The lines with a byte-order mark at the very start dropped: what the utf-8-sig codec does, except that
    utf-8-sig silently swallows a file of just b"\\xef" or b"\\xef\\xbb" instead of failing on the truncated BOM."""
    for number, line in enumerate(lines):
        yield line[1:] if number == 0 and line.startswith("\ufeff") else line


def _read_tsv(spec: GlueTask, split: str, path: Path) -> GlueSplit:
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.name} {split} file not found: {path} (expected the GLUE layout "
            f"<data_dir>/{spec.dir_name}/{spec.split_files[split]})"
        )
    texts: list[list[str]] = [[] for _ in spec.text_columns]
    labels: list[Any] = []
    reader = None
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(_without_bom(handle), delimiter="\t", quoting=csv.QUOTE_NONE)
            if spec.has_header:
                header = next(reader, None)
                # A file of nothing but a BOM reads as one empty row: it is empty too.
                if header is None or (not header and path.read_bytes() == "\ufeff".encode("utf-8")):
                    raise ValueError(f"{path} is empty: the {split} split of {spec.name} has no header and no rows")
                wanted = (*spec.text_columns, spec.label_column)
                missing = [name for name in wanted if name not in header]
                if missing:
                    hint = " (is the file tab-separated?)" if len(header) == 1 else ""
                    raise ValueError(f"{path} line 1: column(s) {missing} missing from the header {header}{hint}")
                repeated = [name for name in wanted if header.count(name) > 1]
                if repeated:
                    raise ValueError(f"{path} line 1: column(s) {repeated} appear more than once in the header "
                                     f"{header}")
                text_idx = [header.index(name) for name in spec.text_columns]
                label_idx = header.index(spec.label_column)
                columns, columns_of = len(header), f"the header on line 1 has {len(header)}"
            else:
                text_idx = list(spec.text_columns)
                label_idx = spec.label_column
                columns, columns_of = spec.num_columns, f"{spec.name} files have {spec.num_columns}"
            needed = max(*text_idx, label_idx) + 1
            for row in reader:
                line = reader.line_num
                if not row or row == [""]:
                    continue  # a trailing blank line is not an example
                where = f"{path} line {line}"
                if len(row) < needed:
                    raise ValueError(
                        f"{where} has {len(row)} tab-separated column(s), expected at least {needed} "
                        "(is the file tab-separated?)"
                    )
                if columns is not None and len(row) != columns:
                    # Without quoting, a tab inside a field (or a missing field) shifts every later column.
                    raise ValueError(f"{where} has {len(row)} tab-separated columns but {columns_of} (a tab inside a "
                                     "field, or a missing field?)")
                labels.append(_parse_label(spec, row[label_idx], where))
                for column, idx in zip(texts, text_idx):
                    column.append(row[idx])
    except UnicodeDecodeError:
        raise ValueError(f"{path} {_undecodable(path)}: GLUE TSVs are UTF-8 text") from None
    except csv.Error as exc:  # with QUOTE_NONE: a field longer than csv.field_size_limit()
        line = reader.line_num if reader is not None else 0
        raise ValueError(f"{path} line {line}: {exc}, see csv.field_size_limit() (is this a GLUE TSV?)") from None
    if not labels:
        raise ValueError(f"{path}: the {split} split of {spec.name} has no rows")
    return GlueSplit(spec, split, texts[0], texts[1] if spec.is_pair else None, labels, str(path))


def _read_hub(spec: GlueTask, split: str) -> GlueSplit:
    try:
        import datasets
    except ImportError as exc:  # the hub path is optional; local TSVs need nothing extra
        raise ImportError("loading GLUE from the hub needs `pip install datasets` (or pass data_dir)") from exc
    try:
        rows = datasets.load_dataset("glue", spec.name, split=spec.hub_splits[split])
    except Exception as exc:  # offline, unknown config, hub errors: all mean "no data", say how to fix it
        raise ValueError(
            f"could not load glue/{spec.name} from the hub ({type(exc).__name__}: {exc}); pass data_dir "
            "(--data-dir) with local GLUE TSVs instead"
        ) from exc
    columns = [list(rows[name]) for name in spec.hub_text_fields]
    labels = list(rows["label"])
    where = f"hub glue/{spec.name} {spec.hub_splits[split]}"
    if not labels:
        raise ValueError(f"{where} has no rows")
    if spec.is_regression:
        labels = [_parse_label(spec, str(value), where) for value in labels]
    else:
        bad = [value for value in labels if not 0 <= int(value) < spec.num_labels]
        if bad:
            raise ValueError(f"{where}: labels {sorted(set(bad))[:5]} outside [0, {spec.num_labels - 1}]")
        labels = [int(value) for value in labels]
    return GlueSplit(spec, split, columns[0], columns[1] if spec.is_pair else None, labels, where)


def subsample_indices(total: int, max_samples: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``range(total)`` kept in file order (all of it when max_samples is None)."""
    if max_samples is None or max_samples >= total:
        return list(range(total))
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    return sorted(random.Random(seed).sample(range(total), max_samples))


def load_glue(
    task: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> GlueSplit:
    """Loads ``split`` ("train" or "dev") of a GLUE task from ``data_dir`` or, when it is None, from the hub.

    ``max_samples`` keeps a seeded random subset (same ``seed`` → same rows), in file order.
    """
    spec = get_task(task)
    _check_split(spec, split)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if data_dir is None:
        examples = _read_hub(spec, split)
    else:
        path = task_file(spec, split, data_dir)
        if not path.is_file() and task_file(spec, split, Path(data_dir) / "glue").is_file():
            raise FileNotFoundError(f"{path} not found, but {Path(data_dir) / 'glue'} has {spec.dir_name}: "
                                    "data_dir must be the folder that holds the task folders")
        examples = _read_tsv(spec, split, path)
    if max_samples is not None and max_samples < len(examples):
        examples = examples.select(subsample_indices(len(examples), max_samples, seed))
    return examples


def validate_glue_files(task: str, data_dir: str | os.PathLike, splits: Sequence[str] = ("train", "dev")) -> None:
    """Raises the loader's error for the first missing or malformed split, without tokenizing anything."""
    for split in splits:
        load_glue(task, split, data_dir)


class TokenizedDataset(torch.utils.data.Dataset):
    """A GLUE split tokenized once up front (truncated to ``max_seq_len``, unpadded)."""

    def __init__(self, examples: GlueSplit, tokenizer, max_seq_len: int = 128):
        if max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8 tokens, got {max_seq_len}")
        encoded = tokenizer(
            examples.texts_a,
            examples.texts_b,
            truncation=True,
            max_length=max_seq_len,
            padding=False,
        )
        label_dtype = torch.float32 if examples.task.is_regression else torch.long
        self.features = []
        for i, label in enumerate(examples.labels):
            item = {key: torch.tensor(values[i], dtype=torch.long) for key, values in encoded.items()}
            item["labels"] = torch.tensor(label, dtype=label_dtype)
            self.features.append(item)
        self.task = examples.task

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.features[index]


class PaddingCollator:
    """Pads each batch only to its own longest sequence (dynamic padding); per-example scalars (labels, answer
    start/end positions) are stacked."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features must hold at least one example")
        length = max(int(item["input_ids"].numel()) for item in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if features[0][key].dim() == 0 or key == "labels":
                batch[key] = torch.stack([item[key] for item in features])
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            out = torch.full((len(features), length), fill, dtype=torch.long)
            for row, item in enumerate(features):
                out[row, : item[key].numel()] = item[key]
            batch[key] = out
        return batch
