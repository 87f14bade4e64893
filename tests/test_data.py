"""GLUE loaders on the real shared TSVs (row counts from data/README.md) and on malformed files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrsparse.data import (
    GLUE_TASKS,
    PaddingCollator,
    TokenizedDataset,
    get_task,
    load_glue,
    validate_glue_files,
)

# (train rows, dev rows) as documented in /work/shared/data/README.md
README_ROWS = {"sst2": (67_349, 872), "mrpc": (3_668, 408), "cola": (8_551, 1_043), "stsb": (5_749, 1_500)}


def _naive_rows(path: Path, header: bool) -> list[list[str]]:
    """Independent reader: plain str.split on tabs (valid for GLUE because it uses no quoting)."""
    lines = path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    rows = [line.split("\t") for line in lines if line]
    return rows[1:] if header else rows


@pytest.mark.parametrize("task", sorted(README_ROWS))
@pytest.mark.parametrize("split", ["train", "dev"])
def test_real_glue_row_counts_and_labels(data_dir, task, split):
    examples = load_glue(task, split, data_dir / "glue")
    spec = get_task(task)
    assert len(examples) == README_ROWS[task][split == "dev"]
    assert len(examples.texts_a) == len(examples)
    assert (examples.texts_b is not None) == spec.is_pair
    if spec.is_regression:
        assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in examples.labels)
    else:
        assert set(examples.labels) == set(range(spec.num_labels))
    # Labels and texts agree with an independent naive parse of the same file.
    rows = _naive_rows(data_dir / "glue" / spec.dir_name / f"{split}.tsv", spec.has_header)
    label_col = {"sst2": 1, "mrpc": 0, "cola": 1, "stsb": 9}[task]
    text_col = {"sst2": 0, "mrpc": 3, "cola": 3, "stsb": 7}[task]
    naive_labels = [float(r[label_col]) if spec.is_regression else int(r[label_col]) for r in rows]
    assert examples.labels == naive_labels
    assert examples.texts_a == [r[text_col] for r in rows]


def test_mrpc_bom_header_and_cola_without_header(data_dir):
    mrpc = load_glue("mrpc", "dev", data_dir / "glue")
    # The BOM must not have hidden the "Quality" column, and quotes stay verbatim (QUOTE_NONE).
    assert mrpc.texts_a[0].startswith("He said the foodservice pie business")
    assert mrpc.texts_b[0].startswith('" The foodservice pie business')
    cola = load_glue("cola", "dev", data_dir / "glue")
    # No header: the very first line is an example, not column names.
    assert cola.texts_a[0] == "The sailors rode the breeze clear of the rocks."
    assert cola.labels[0] == 1
    sst2 = load_glue("sst2", "dev", data_dir / "glue")
    assert sst2.texts_a[0] == "it 's a charming and often affecting journey . "  # GLUE's trailing space kept


def test_subsample_is_seeded_and_in_file_order(data_dir):
    full = load_glue("sst2", "dev", data_dir / "glue")
    first = load_glue("sst2", "dev", data_dir / "glue", max_samples=50, seed=1)
    again = load_glue("sst2", "dev", data_dir / "glue", max_samples=50, seed=1)
    other = load_glue("sst2", "dev", data_dir / "glue", max_samples=50, seed=2)
    assert len(first) == 50 and first.texts_a == again.texts_a and first.texts_a != other.texts_a
    positions = [full.texts_a.index(text) for text in first.texts_a]
    assert positions == sorted(positions)
    assert [full.labels[i] for i in positions] == first.labels
    assert len(load_glue("sst2", "dev", data_dir / "glue", max_samples=10_000)) == 872


def _write(root: Path, task_dir: str, split: str, text: str) -> Path:
    folder = root / task_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SST-2[/\\]train.tsv"):
        load_glue("sst2", "train", tmp_path)
    _write(tmp_path, "SST-2", "train", "sentence\tlabel\ngood \t1\n")
    with pytest.raises(FileNotFoundError, match="dev file not found"):
        validate_glue_files("sst2", tmp_path)


def test_missing_column(tmp_path):
    _write(tmp_path, "SST-2", "train", "sentence\tpolarity\ngood \t1\n")
    with pytest.raises(ValueError, match=r"column\(s\) \['label'\] missing"):
        load_glue("sst2", "train", tmp_path)


def test_bad_labels(tmp_path):
    _write(tmp_path, "SST-2", "train", "sentence\tlabel\ngood \t1\nbad \t2\n")
    with pytest.raises(ValueError, match=r"line 3: label '2' of sst2 is not one of \['0', '1'\]"):
        load_glue("sst2", "train", tmp_path)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(tmp_path, "STS-B", "dev", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t5.5\n")
    with pytest.raises(ValueError, match=r"label 5.5 of stsb is outside \[0.0, 5.0\]"):
        load_glue("stsb", "dev", tmp_path)
    _write(tmp_path, "STS-B", "dev", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\thigh\n")
    with pytest.raises(ValueError, match="label 'high' of stsb is not a number"):
        load_glue("stsb", "dev", tmp_path)


def test_empty_split(tmp_path):
    _write(tmp_path, "SST-2", "dev", "sentence\tlabel\n")
    with pytest.raises(ValueError, match="dev split of sst2 has no rows"):
        load_glue("sst2", "dev", tmp_path)
    _write(tmp_path, "SST-2", "train", "")
    with pytest.raises(ValueError, match="is empty"):
        load_glue("sst2", "train", tmp_path)
    _write(tmp_path, "CoLA", "dev", "\n")
    with pytest.raises(ValueError, match="dev split of cola has no rows"):
        load_glue("cola", "dev", tmp_path)


def test_wrong_delimiter(tmp_path):
    _write(tmp_path, "SST-2", "train", "sentence,label\ngood,1\n")
    with pytest.raises(ValueError, match="tab-separated"):
        load_glue("sst2", "train", tmp_path)
    _write(tmp_path, "CoLA", "train", "gj04,1,,The sailors rode.\n")
    with pytest.raises(ValueError, match="line 1 has 1 tab-separated column"):
        load_glue("cola", "train", tmp_path)


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="task 'imdb' is not a GLUE task"):
        load_glue("imdb", "train", "/nonexistent")
    with pytest.raises(ValueError, match="split 'test'"):
        load_glue("sst2", "test", "/nonexistent")
    with pytest.raises(ValueError, match="max_samples"):
        load_glue("sst2", "train", "/nonexistent", max_samples=0)
    assert get_task("SST-2") is GLUE_TASKS["sst2"]


def test_hub_path_maps_fields(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_glue("mnli", "dev")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert examples.texts_a == ["p1", "p2"] and examples.texts_b == ["h1", "h2"] and examples.labels == [2, 0]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: {"sentence": ["x"], "label": [-1]})
    with pytest.raises(ValueError, match="outside"):
        load_glue("sst2", "dev")  # the hub's unlabeled test rows use -1


def test_tokenized_dataset_and_dynamic_padding(data_dir, minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    examples = load_glue("mrpc", "dev", data_dir / "glue", max_samples=6, seed=0)
    dataset = TokenizedDataset(examples, tokenizer, max_seq_len=24)
    batch = PaddingCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    lengths = [dataset[i]["input_ids"].numel() for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) <= 24
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == examples.labels[:4]
    for i in range(4):
        expected = tokenizer(examples.texts_a[i], examples.texts_b[i], truncation=True, max_length=24)["input_ids"]
        assert batch["input_ids"][i, : lengths[i]].tolist() == expected
        assert (batch["input_ids"][i, lengths[i]:] == tokenizer.pad_token_id).all()
    stsb = TokenizedDataset(load_glue("stsb", "dev", data_dir / "glue", max_samples=3), tokenizer, 16)
    assert stsb[0]["labels"].dtype == torch.float32
