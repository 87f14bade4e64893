"""Your own labelled text: a file (CSV, TSV, JSON / JSON lines, Parquet, or a folder written by ``datasets``'
``save_to_disk``) or a ``datasets.load_dataset`` name, read into the examples the pipeline trains on, for single-label
classification or regression, in the conventions of transformers' text-classification examples.

Files are parsed by ``datasets`` into its memory-mapped Arrow cache. CSV and TSV cells are read as text (no "NA"
becomes a missing value) and the labels are typed here: integers or strings are classes, decimals a regression
(``problem_type="auto"``). Class names are sorted (numerically when all are integers) and become the model's
``id2label``, so every export and ``lrsparse predict`` speak the user's labels. Without a validation file a seeded
hold-out of the training file is the dev set, the same rows for every ``--seed`` so that seeds and methods are
scored on one dev set.

Every problem with the data raises a ValueError (FileNotFoundError for a missing file) naming the file, the column
and the row (1 = the first example) before any model work starts.
"""
from __future__ import annotations

import codecs
import csv
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lrsparse.data import GlueSplit, subsample_indices

__all__ = ["TEXT_TASK", "PROBLEM_TYPES", "DataSpec", "LabelSpace", "read_examples", "read_table", "label_space"]

TEXT_TASK = "text-classification"  # the task name of a run on the user's own labelled text
PROBLEM_TYPES = ("auto", "single_label", "regression")
CLASS_METRICS = ("accuracy", "macro_f1", "f1")  # f1: of the second class in sorted order, binary only
REGRESSION_METRICS = ("pearson", "spearman")
HOLDOUT_SEED = 0  # the hold-out is the same for every --seed: seeds and methods are scored on one dev set
DATA_FORMAT = 1
# Column names taken when text_columns is not given, in this order (transformers' examples do the same).
DEFAULT_TEXT_COLUMNS = (("sentence1", "sentence2"), ("sentence",), ("text",))

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


@dataclass(frozen=True)
class DataSpec:
    """Where the user's examples come from and how they are read (saved with the run and the model)."""

    train_file: str | None = None
    validation_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str = "label"
    problem_type: str = "auto"
    metric: str | None = None
    validation_split: float = 0.1

    def __post_init__(self) -> None:
        if (self.train_file is None) == (self.dataset is None):
            raise ValueError("own data needs exactly one of train_file (--train-file) and dataset (--dataset), got "
                             f"train_file={self.train_file!r}, dataset={self.dataset!r}")
        if self.dataset_config is not None and self.dataset is None:
            raise ValueError("dataset_config (--dataset-config) goes with dataset (--dataset)")
        if self.text_columns is not None:
            columns = tuple(self.text_columns)
            if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
                raise ValueError(f"text_columns (--text-columns) takes one or two column names (a text or a pair), "
                                 f"got {list(columns)}")
            object.__setattr__(self, "text_columns", columns)
        if not isinstance(self.label_column, str) or not self.label_column:
            raise ValueError(f"label_column (--label-column) must be a column name, got {self.label_column!r}")
        if self.text_columns is not None and self.label_column in self.text_columns:
            raise ValueError(f"label_column {self.label_column!r} is also one of text_columns {list(self.text_columns)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type (--problem-type) must be one of {list(PROBLEM_TYPES)}, got "
                             f"{self.problem_type!r}")
        metrics = {"auto": CLASS_METRICS + REGRESSION_METRICS, "single_label": CLASS_METRICS,
                   "regression": REGRESSION_METRICS}[self.problem_type]
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(f"metric (--metric) must be one of {list(metrics)} for problem_type "
                             f"{self.problem_type!r}, got {self.metric!r}")
        split = self.validation_split
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 < split < 1.0:
            raise ValueError(f"validation_split (--validation-split) must be a fraction in (0, 1), got {split!r}")

    def to_dict(self) -> dict:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["text_columns"] = None if self.text_columns is None else list(self.text_columns)
        return {"format": DATA_FORMAT, **values}

    @classmethod
    def from_dict(cls, values: dict) -> "DataSpec":
        values = dict(values)
        if values.pop("format", None) != DATA_FORMAT:
            raise ValueError(f"data spec format must be {DATA_FORMAT}: saved by another lrsparse version")
        return cls(**values)

    def describe_holdout(self) -> str | None:
        """The log and report line for a dev set held out of the training data (None with a validation file)."""
        if self.validation_file is not None:
            return None
        return (f"no validation file: {self.validation_split:.0%} of the training data (seeded, the same rows for "
                "every seed) is held out as the dev set")


@dataclass(frozen=True)
class LabelSpace:
    """What the labels are: class names in id order, or a regression (no names)."""

    problem_type: str  # "single_label" or "regression"
    label_values: tuple[str, ...] = ()
    metric: str | None = None  # the main metric chosen by the user (None: accuracy, or pearson for a regression)
    name: str = TEXT_TASK

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_values)

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.is_regression:
            return REGRESSION_METRICS
        return CLASS_METRICS if len(self.label_values) == 2 else CLASS_METRICS[:2]

    @property
    def main_metric(self) -> str:
        return self.metric or ("pearson" if self.is_regression else "accuracy")

    @classmethod
    def from_model_config(cls, model_config, metric: str | None = None) -> "LabelSpace":
        """The label space a model was trained for, from its config (``id2label`` / ``problem_type``)."""
        if getattr(model_config, "problem_type", None) == "regression" or int(model_config.num_labels) == 1:
            return cls("regression", (), metric)
        names = tuple(str(model_config.id2label[i]) for i in range(int(model_config.num_labels)))
        return cls("single_label", names, metric)


# --------------------------------------------------------------------------------------------------------- reading
def _quiet_datasets():
    try:
        import datasets
    except ImportError as exc:  # a dependency of lrsparse; only a broken install lacks it
        raise ImportError("reading your own data needs `pip install datasets`") from exc
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _check_utf8(path: Path) -> None:
    """Streams ``path`` through a UTF-8 decoder; the first byte that is not UTF-8 is an error naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                where = line + chunk[: exc.start].count(b"\n")
                raise ValueError(f"{path} line {where}: byte {chunk[exc.start]:#04x} at offset "
                                 f"{offset + exc.start} is not UTF-8 ({exc.reason}); save the file as UTF-8") from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} line {line}: the file ends inside a UTF-8 character ({exc.reason})") from None


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The header row of a CSV / TSV file that has at least one example row after it."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        first = next((row for row in reader if row and row != [""]), None)
    if not header or header == [""]:
        raise ValueError(f"{path} is empty: expected a header row naming the columns, then one example per row")
    if first is None:
        raise ValueError(f"{path} has no rows after its header {header}")
    return header


def read_table(path: str | os.PathLike, role: str = "data"):
    """The rows of one file or ``save_to_disk`` folder as a ``datasets.Dataset`` (a DatasetDict folder gives its
    ``train`` split for ``role`` "train", else its ``validation`` split)."""
    datasets = _quiet_datasets()
    path = Path(path)
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk (no "
                             "dataset_info.json or dataset_dict.json)")
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            table = _split_of(table, role, str(path))
        return table
    if not path.is_file():
        raise FileNotFoundError(f"{role} file not found: {path}")
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(TABLE_SUFFIXES)} or a "
                         "folder written by datasets' save_to_disk")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    options: dict[str, Any] = {}
    if kind == "csv":
        _check_utf8(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        header = _csv_header(path, delimiter)
        # Every cell as text: typing the labels is done here, the same way for every format.
        options = {"delimiter": delimiter, "keep_default_na": False, "na_filter": False,
                   "features": datasets.Features({name: datasets.Value("string") for name in header})}
        if delimiter == "\t":
            options["quoting"] = csv.QUOTE_NONE  # as the GLUE TSVs are written: a bare " is a character
    elif kind == "json":
        _check_utf8(path)
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets wraps parser errors in its own types; the cause says what was wrong
        cause = exc.__cause__ or exc
        raise ValueError(f"{path} could not be read as {kind.upper()}: {type(cause).__name__}: {cause}") from None
    if len(table) == 0:
        raise ValueError(f"{path} has no rows")
    return table


def _split_of(tables, role: str, where: str):
    wanted = ("train",) if role == "train" else ("validation", "dev")
    for name in wanted:
        if name in tables:
            return tables[name]
    raise ValueError(f"{where} has the splits {sorted(tables)}; expected {' or '.join(wanted)}")


def _load_named(spec: DataSpec) -> tuple[Any, Any]:
    """(train, validation or None) of a ``datasets.load_dataset`` name, or a local save_to_disk folder."""
    datasets = _quiet_datasets()
    if Path(spec.dataset).is_dir() and (Path(spec.dataset) / "dataset_dict.json").is_file():
        tables = datasets.load_from_disk(spec.dataset)
    else:
        try:
            tables = datasets.load_dataset(spec.dataset, spec.dataset_config)
        except Exception as exc:
            raise ValueError(f"could not load dataset {spec.dataset!r}"
                             + (f" ({spec.dataset_config!r})" if spec.dataset_config else "")
                             + f": {type(exc).__name__}: {exc}") from None
    if not isinstance(tables, datasets.DatasetDict):
        return tables, None
    train = _split_of(tables, "train", f"dataset {spec.dataset!r}")
    validation = next((tables[name] for name in ("validation", "dev") if name in tables), None)
    return train, validation


# --------------------------------------------------------------------------------------------------------- columns
def text_columns_of(columns: Sequence[str], spec: DataSpec, where: str) -> tuple[str, ...]:
    """The text column(s) to read: ``spec.text_columns``, else sentence1 + sentence2, sentence or text."""
    if spec.text_columns is not None:
        missing = [name for name in spec.text_columns if name not in columns]
        if missing:
            raise ValueError(f"{where}: text column(s) {missing} not found; the columns are {list(columns)}")
        return spec.text_columns
    for names in DEFAULT_TEXT_COLUMNS:
        if all(name in columns for name in names):
            return names
    raise ValueError(f"{where}: no column named sentence1/sentence2, sentence or text; pass --text-columns with one "
                     f"or two of the columns {list(columns)}")


def _column(table, name: str, where: str) -> list:
    if name not in table.column_names:
        raise ValueError(f"{where}: column {name!r} not found; the columns are {table.column_names}")
    return list(table[name])  # datasets returns a lazy column; the tokenizer takes lists


def _texts(table, name: str, where: str) -> list[str]:
    values = _column(table, name, where)
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            kind = "missing" if value is None else f"a {type(value).__name__}"
            raise ValueError(f"{where}: column {name!r} row {row}: the text is {kind}, expected a string")
        if not value.strip():
            raise ValueError(f"{where}: column {name!r} row {row}: the text is empty")
    return values


def _classify(values: list, problem_type: str, where: str, column: str) -> str:
    """"single_label" or "regression" for raw label ``values`` (checking that they are of one kind)."""
    numbers, strings = None, None
    kinds = set()
    for row, value in enumerate(values, start=1):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{where}: column {column!r} row {row}: the label is missing")
        if isinstance(value, bool):
            kind = "class"
        elif isinstance(value, int):
            kind = "integer"
        elif isinstance(value, float):
            kind = "decimal"
        elif isinstance(value, str):
            text = value.strip()
            kind = ("integer" if _INTEGER.fullmatch(text) else
                    "decimal" if _DECIMAL.fullmatch(text) or _NONFINITE.fullmatch(text) else "string")
        else:
            raise ValueError(f"{where}: column {column!r} row {row}: label {value!r} is a {type(value).__name__}; "
                             "expected a class name, an integer or a number")
        kinds.add(kind)
        if kind in ("integer", "decimal") and numbers is None:
            numbers = (row, value)
        if kind == "string" and strings is None:
            strings = (row, value)
    if numbers is not None and strings is not None:
        raise ValueError(f"{where}: column {column!r} mixes numbers (row {numbers[0]}: {numbers[1]!r}) and strings "
                         f"(row {strings[0]}: {strings[1]!r}); labels are all class names or all numbers")
    if problem_type != "auto":
        return problem_type
    return "regression" if "decimal" in kinds else "single_label"


def _regression_targets(values: list, where: str, column: str) -> list[float]:
    targets = []
    for row, value in enumerate(values, start=1):
        if isinstance(value, str):
            text = value.strip()
            if not (_DECIMAL.fullmatch(text) or _NONFINITE.fullmatch(text)):
                raise ValueError(f"{where}: column {column!r} row {row}: label {value!r} is not a number "
                                 "(problem_type regression)")
            value = float(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: column {column!r} row {row}: label {value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{where}: column {column!r} row {row}: regression target {value} is not finite")
        targets.append(float(value))
    return targets


def _class_name(value) -> str:
    return str(value).strip() if isinstance(value, str) else str(value)


def _sorted_names(names: set[str]) -> tuple[str, ...]:
    if all(_INTEGER.fullmatch(name) for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def label_space(values: list, spec: DataSpec, where: str) -> LabelSpace:
    """The label space of the training labels ``values``."""
    problem_type = _classify(values, spec.problem_type, where, spec.label_column)
    if problem_type == "regression":
        if spec.metric is not None and spec.metric not in REGRESSION_METRICS:
            raise ValueError(f"metric {spec.metric!r} is for classes, but the labels of {where} are numbers (a "
                             f"regression); use one of {list(REGRESSION_METRICS)} or --problem-type single_label")
        _regression_targets(values, where, spec.label_column)
        return LabelSpace("regression", (), spec.metric)
    names = _sorted_names({_class_name(value) for value in values})
    if len(names) < 2:
        raise ValueError(f"{where}: column {spec.label_column!r} has a single class {names[0]!r}: a classifier needs "
                         "at least two")
    if spec.metric is not None and spec.metric not in CLASS_METRICS:
        raise ValueError(f"metric {spec.metric!r} is for a regression, but the labels of {where} are classes; use one "
                         f"of {list(CLASS_METRICS)} or --problem-type regression")
    if spec.metric == "f1" and len(names) != 2:
        raise ValueError(f"metric 'f1' is the positive class's F1 of a binary task; {where} has {len(names)} "
                         "classes: use macro_f1")
    return LabelSpace("single_label", names, spec.metric)


def _label_ids(values: list, labels: LabelSpace, where: str, column: str) -> list:
    if labels.is_regression:
        return _regression_targets(values, where, column)
    index = {name: i for i, name in enumerate(labels.label_values)}
    ids = []
    for row, value in enumerate(values, start=1):
        name = _class_name(value)
        if value is None or name not in index:
            raise ValueError(f"{where}: column {column!r} row {row}: label {value!r} is not one of the training "
                             f"labels {list(labels.label_values)}")
        ids.append(index[name])
    return ids


def _examples(table, spec: DataSpec, labels: LabelSpace, split: str, where: str) -> GlueSplit:
    columns = text_columns_of(table.column_names, spec, where)
    texts = [_texts(table, name, where) for name in columns]
    ids = _label_ids(_column(table, spec.label_column, where), labels, where, spec.label_column)
    return GlueSplit(labels, split, texts[0], texts[1] if len(texts) == 2 else None, ids, where)


def read_examples(spec: DataSpec) -> tuple[GlueSplit, GlueSplit, LabelSpace]:
    """(train, dev, label space) of the user's data; the dev split is held out of train without a validation set."""
    if spec.dataset is not None:
        train_table, validation_table = _load_named(spec)
        train_where = f"dataset {spec.dataset!r} train"
    else:
        train_table, validation_table = read_table(spec.train_file, "train"), None
        train_where = str(spec.train_file)
    if spec.validation_file is not None:
        validation_table = read_table(spec.validation_file, "validation")
    if len(train_table) == 0:
        raise ValueError(f"{train_where} has no rows")
    text_columns_of(train_table.column_names, spec, train_where)  # a missing column before the labels are typed
    labels = label_space(_column(train_table, spec.label_column, train_where), spec, train_where)
    train = _examples(train_table, spec, labels, "train", train_where)
    if validation_table is None:
        if len(train) < 2:
            raise ValueError(f"{train_where} has {len(train)} example(s): too few to hold out a dev set")
        order = list(range(len(train)))
        random.Random(HOLDOUT_SEED).shuffle(order)
        held = min(len(train) - 1, max(1, round(len(train) * spec.validation_split)))
        dev = train.select(sorted(order[:held]))
        dev.split, dev.source = "dev", f"{train_where} (held out: {held} of {len(train)} rows)"
        train = train.select(sorted(order[held:]))
        return train, dev, labels
    where = str(spec.validation_file) if spec.validation_file is not None else f"dataset {spec.dataset!r} validation"
    if len(validation_table) == 0:
        raise ValueError(f"{where} has no rows")
    return train, _examples(validation_table, spec, labels, "dev", where), labels


def read_labelled_file(path: str | os.PathLike, spec: DataSpec, labels: LabelSpace) -> GlueSplit:
    """A labelled file scored against a model trained for ``labels`` (``lrsparse evaluate --validation-file``)."""
    return _examples(read_table(path, "validation"), spec, labels, "dev", str(path))


def subset(examples: GlueSplit, max_samples: int | None, seed: int) -> GlueSplit:
    if max_samples is None or max_samples >= len(examples):
        return examples
    return examples.select(subsample_indices(len(examples), max_samples, seed))
