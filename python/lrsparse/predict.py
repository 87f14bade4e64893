"""``lrsparse predict``: a trained classifier or regressor applied to new text, from a file (or standard input) to a
file (or standard output).

The model is a run folder, its ``model/`` folder (``save_compressed``), a ``lrsparse export --format pytorch``
folder or any transformers sequence-classification folder. Inputs are CSV, TSV, JSON lines or Parquet (the text
columns those of the run unless ``text_columns`` names others); standard input is JSON lines when its first character
is ``{``, else CSV. Each output row is the input row followed by the prediction: ``prediction`` (the label's name, from
the model's ``id2label``) with ``probability`` and every class's probability, or the regression value.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from lrsparse.data import PaddingCollator
from lrsparse.modeling import autocast, check_precision, quiet_transformers, resolve_device
from lrsparse.owndata import DEFAULT_TEXT_COLUMNS, DataSpec, read_table

__all__ = ["load_classifier", "predict_rows", "predict_file"]

OUTPUT_FIELDS = ("prediction", "probability", "probabilities")


def run_model_dir(path: str | os.PathLike) -> Path:
    """A run folder's ``model/`` folder, or ``path`` itself."""
    path = Path(path)
    if (path / "report.json").is_file() and (path / "model").is_dir():
        return path / "model"
    return path


def load_classifier(path: str | os.PathLike) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, what the run saved with it: task, data spec, max_seq_len) of a
    sequence-classification model folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrsparse.embedding import transformer_folder
    from lrsparse.export import CONFIG_LAYERS_KEY
    from lrsparse.io import LAYERS_FILE, load_compressed, saved_extra

    model_dir = run_model_dir(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} not found")
    quiet_transformers()
    if (model_dir / LAYERS_FILE).is_file():
        model, saved = load_compressed(model_dir), saved_extra(model_dir)
    else:
        folder = transformer_folder(model_dir)
        config_file = Path(folder) / "config.json"
        exported = config_file.is_file() and CONFIG_LAYERS_KEY in json.loads(config_file.read_text(encoding="utf-8"))
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                                   trust_remote_code=exported)
        saved = {}
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"{model_dir} holds a {type(model).__name__}; predict applies sequence-classification "
                         "models (a run of a GLUE task or of your own labelled data)")
    tokenizer = AutoTokenizer.from_pretrained(transformer_folder(model_dir))
    return model.eval(), tokenizer, saved


def _read_input(source: str, role: str = "input"):
    """The rows of ``source`` (a file, or "-" for standard input) as a datasets.Dataset."""
    if source != "-":
        return read_table(source, role)
    text = sys.stdin.read()
    if not text.strip():
        raise ValueError("standard input is empty: expected CSV with a header row, or JSON lines")
    suffix = ".jsonl" if text.lstrip().startswith("{") else ".csv"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"stdin{suffix}"
        path.write_text(text, encoding="utf-8")
        return read_table(path, role).flatten_indices()  # the cache outlives the temporary file


def _text_columns(columns: Sequence[str], text_columns: Sequence[str] | None, saved: dict, where: str):
    if text_columns:
        wanted = tuple(text_columns)
    elif saved.get("data", {}).get("text_columns"):
        wanted = tuple(saved["data"]["text_columns"])
    else:
        wanted = next((names for names in DEFAULT_TEXT_COLUMNS if all(n in columns for n in names)), None)
        if wanted is None:
            raise ValueError(f"{where}: no column named sentence1/sentence2, sentence or text; pass --text-columns "
                             f"with one or two of the columns {list(columns)}")
    DataSpec(train_file="-", text_columns=wanted)  # one or two names
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise ValueError(f"{where}: text column(s) {missing} not found; the columns are {list(columns)} (pass "
                         "--text-columns)")
    clash = [name for name in OUTPUT_FIELDS if name in columns]
    if clash:
        raise ValueError(f"{where}: column(s) {clash} would be overwritten by the prediction; rename them")
    return wanted


@torch.no_grad()
def predict_rows(model: nn.Module, tokenizer, texts_a: list[str], texts_b: list[str] | None, batch_size: int = 64,
                 max_seq_len: int = 128, device: str = "auto", precision: str = "fp32",
                 progress: bool = True) -> Iterator[dict]:
    """One dict per text (or pair): the prediction, from logits computed in batches (padded per batch)."""
    from tqdm.auto import tqdm

    target = resolve_device(device)
    check_precision(precision, target)
    model = model.to(target)
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    config = model.config
    regression = getattr(config, "problem_type", None) == "regression" or int(config.num_labels) == 1
    names = None if regression else [str(config.id2label[i]) for i in range(int(config.num_labels))]
    starts = range(0, len(texts_a), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress, file=sys.stderr):
        stop = start + batch_size
        encoded = tokenizer(texts_a[start:stop], None if texts_b is None else texts_b[start:stop], truncation=True,
                            max_length=max_seq_len, padding=False)
        features = [{key: torch.tensor(values[i]) for key, values in encoded.items()}
                    for i in range(len(encoded["input_ids"]))]
        batch = {key: value.to(target) for key, value in collate(features).items()}
        with autocast(precision, target):
            logits = model(**batch).logits.float().cpu()
        if regression:
            for value in logits.reshape(-1).tolist():
                yield {"prediction": value}
            continue
        probabilities = logits.double().softmax(dim=-1)
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            yield {"prediction": names[best], "probability": row[best],
                   "probabilities": dict(zip(names, row))}


def _writer(output: str):
    """(write(row), close()) for JSON lines (.jsonl, .json or "-") or CSV (.csv, .tsv) by the output's extension."""
    suffix = "" if output == "-" else Path(output).suffix.lower()
    if suffix not in ("", ".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"output {output!r}: unknown extension {suffix!r}; expected .jsonl, .json, .csv or .tsv "
                         "(or - for standard output, JSON lines)")
    if output == "-":
        handle = sys.stdout
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        handle = open(Path(output).with_name(Path(output).name + ".partial"), "w", encoding="utf-8", newline="")
    state: dict = {"csv": None}

    def write(row: dict) -> None:
        if suffix in (".csv", ".tsv"):
            flat = {k: v for k, v in row.items() if k != "probabilities"}
            flat.update({f"probability_{name}": p for name, p in row.get("probabilities", {}).items()})
            if state["csv"] is None:
                state["csv"] = csv.DictWriter(handle, fieldnames=list(flat), delimiter="," if suffix == ".csv" else "\t")
                state["csv"].writeheader()
            state["csv"].writerow(flat)
        else:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(ok: bool) -> None:
        if output == "-":
            handle.flush()
            return
        handle.close()
        partial = Path(output).with_name(Path(output).name + ".partial")
        if ok:
            os.replace(partial, output)  # a complete file or none: an existing output is kept on failure
        else:
            partial.unlink(missing_ok=True)

    return write, close


def predict_file(model_path: str | os.PathLike, source: str, output: str, text_columns: Sequence[str] | None = None,
                 batch_size: int = 64, max_seq_len: int | None = None, device: str = "auto",
                 precision: str = "fp32", progress: bool = True) -> int:
    """Writes one prediction per row of ``source`` to ``output``; returns the number of rows."""
    model, tokenizer, saved = load_classifier(model_path)
    table = _read_input(source)
    where = "standard input" if source == "-" else str(source)
    columns = _text_columns(table.column_names, text_columns, saved, where)
    texts = []
    for name in columns:
        values = list(table[name])
        bad = next((row for row, value in enumerate(values, start=1) if not isinstance(value, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: column {name!r} row {bad}: the text is {values[bad - 1]!r}, expected a string")
        texts.append(values)
    seq_len = max_seq_len or saved.get("max_seq_len", 128)
    write, close = _writer(output)
    rows = 0
    try:
        predictions = predict_rows(model, tokenizer, texts[0], texts[1] if len(texts) == 2 else None, batch_size,
                                   seq_len, device, precision, progress)
        for row, prediction in zip(table, predictions):
            write({**row, **prediction})
            rows += 1
    except BaseException:
        close(False)
        raise
    close(True)
    return rows
