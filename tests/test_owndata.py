"""Your own data through the main job: CSV / TSV / JSON lines / Parquet / save_to_disk folders and datasets names,
checked against the GLUE loader on the same examples (bitwise equal metrics), against scikit-learn's metrics, and
for every kind of bad input (a clear error before any training, nothing written to --output)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from lrsparse.cli import main
from lrsparse.owndata import DataSpec, read_examples
from lrsparse.evaluation import evaluate_saved
from lrsparse.pipeline import run_compression
from lrsparse.recipe import RecipeConfig
from pipeline_helpers import save_tiny_bert_checkpoint, write_csv

SST2_NAMES = {"0": "negative", "1": "positive"}
TINY_RUN = dict(keep=0.5, epochs=1.0, batch_size=8, eval_batch_size=16, max_seq_len=32, threads=1)


def _glue_rows(path, header=True):
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write("\t".join(row) + "\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_path):
    return save_tiny_bert_checkpoint(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


@pytest.fixture(scope="module")
def sst2_subset(tmp_path_factory, data_dir):
    """40 training and 24 dev sentences of SST-2, as a GLUE-layout folder and as CSVs with other column names and
    the labels' names."""
    root = tmp_path_factory.mktemp("sst2")
    train = _glue_rows(data_dir / "glue" / "SST-2" / "train.tsv")[:40]
    dev = _glue_rows(data_dir / "glue" / "SST-2" / "dev.tsv")[:24]
    for split, rows in (("train", train), ("dev", dev)):
        _write_tsv(root / "glue" / "SST-2" / f"{split}.tsv", ["sentence", "label"], rows)
        with open(root / f"{split}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "sentiment"])
            writer.writerows([text, SST2_NAMES[label]] for text, label in rows)
    return root


def _stage_metrics(report):
    return [stage["metrics"] for stage in report["stages"]]


def test_sst2_as_csv_with_label_names_equals_the_glue_task_bitwise(sst2_subset, tiny_model, tmp_path):
    glue = run_compression(RecipeConfig.create(task="sst2", output_dir=str(tmp_path / "glue"), model=str(tiny_model),
                                               data_dir=str(sst2_subset / "glue"), **TINY_RUN))
    own = run_compression(RecipeConfig.create(
        task=None, output_dir=str(tmp_path / "own"), model=str(tiny_model), train_file=str(sst2_subset / "train.csv"),
        validation_file=str(sst2_subset / "dev.csv"), text_columns=["review"], label_column="sentiment", **TINY_RUN))
    assert own["task"] == "text-classification" and own["data"]["labels"] == ["negative", "positive"]
    for glue_stage, own_stage in zip(_stage_metrics(glue), _stage_metrics(own), strict=True):
        assert own_stage["accuracy"] == glue_stage["accuracy"]  # bit for bit: same examples, ids, seed
    assert [layer["rank"] for layer in own["layers"]] == [layer["rank"] for layer in glue["layers"]]
    config = json.loads((tmp_path / "own" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_stsb_as_parquet_regression_equals_the_glue_task_bitwise(data_dir, tiny_model, tmp_path):
    pandas = pytest.importorskip("pandas")  # a dependency of datasets
    header, *rows = _glue_rows(data_dir / "glue" / "STS-B" / "train.tsv", header=False)
    dev_header, *dev_rows = _glue_rows(data_dir / "glue" / "STS-B" / "dev.tsv", header=False)
    columns = [header.index(name) for name in ("sentence1", "sentence2", "score")]
    for split, head, body in (("train", header, rows[:40]), ("dev", dev_header, dev_rows[:24])):
        _write_tsv(tmp_path / "glue" / "STS-B" / f"{split}.tsv", head, body)
        frame = pandas.DataFrame({"first": [r[columns[0]] for r in body], "second": [r[columns[1]] for r in body],
                                  "similarity": [float(r[columns[2]]) for r in body]})
        frame.to_parquet(tmp_path / f"{split}.parquet")
    glue = run_compression(RecipeConfig.create(task="stsb", output_dir=str(tmp_path / "glue_run"),
                                               model=str(tiny_model), data_dir=str(tmp_path / "glue"), **TINY_RUN))
    own = run_compression(RecipeConfig.create(
        task=None, output_dir=str(tmp_path / "own_run"), model=str(tiny_model),
        train_file=str(tmp_path / "train.parquet"), validation_file=str(tmp_path / "dev.parquet"),
        text_columns=["first", "second"], label_column="similarity", problem_type="regression", **TINY_RUN))
    for glue_stage, own_stage in zip(_stage_metrics(glue), _stage_metrics(own), strict=True):
        assert (own_stage["pearson"], own_stage["spearman"]) == (glue_stage["pearson"], glue_stage["spearman"])
    assert own["data"]["problem_type"] == "regression"
    # predict writes the regression values; scipy's correlations of that file reproduce the run's final scores.
    from scipy.stats import pearsonr, spearmanr

    out = tmp_path / "scores.csv"
    assert main(["predict", str(tmp_path / "own_run"), "--input", str(tmp_path / "dev.parquet"), "--output",
                 str(out), "--no-progress"]) == 0
    with open(out, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["first", "second", "similarity", "prediction"]
    gold, predicted = [float(r["similarity"]) for r in rows], [float(r["prediction"]) for r in rows]
    assert pearsonr(predicted, gold)[0] == pytest.approx(own["final_metrics"]["pearson"], abs=1e-5)
    assert spearmanr(predicted, gold)[0] == pytest.approx(own["final_metrics"]["spearman"], abs=1e-5)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("three")
    words = {"sports": "match goal team", "politics": "vote law senate", "science": "atom cell physics"}
    for split, count in (("train", 36), ("validation", 18)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(count):
                topic = list(words)[i % 3]
                handle.write(json.dumps({"body": f"{words[topic]} item {i}", "topic": topic}) + "\n")
    run = root / "run"
    assert main(["compress", "--model", str(tiny_model), "--train-file", str(root / "train.jsonl"),
                 "--validation-file", str(root / "validation.jsonl"), "--text-columns", "body", "--label-column",
                 "topic", "--keep", "0.5", "--epochs", "2", "--batch-size", "8", "--max-seq-len", "16", "--output",
                 str(run), "--threads", "1", "--no-inspect"]) == 0
    return root, run


def test_three_string_classes_keep_their_names_in_every_export(three_class_run, tmp_path):
    root, run = three_class_run
    names = {0: "politics", 1: "science", 2: "sports"}  # sorted
    config = json.loads((run / "model" / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == names
    assert main(["export", str(run), "--format", "pytorch", "--out", str(tmp_path / "plain")]) == 0
    exported = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert {int(k): v for k, v in exported["id2label"].items()} == names
    assert exported["label2id"] == {v: k for k, v in names.items()}
    # Formats without a config carry the names too: a TorchScript extra file, ONNX model metadata.
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "model.pt")]) == 0
    extra = {"id2label.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert {int(k): v for k, v in json.loads(extra["id2label.json"]).items()} == names
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--format", "onnx", "--int8", "--out", str(tmp_path / "model.onnx")]) == 0
    metadata = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).get_modelmeta().custom_metadata_map
    assert {int(k): v for k, v in json.loads(metadata["id2label"]).items()} == names
    # predict reads the export (trust_remote_code) as it reads the run: the same labels and probabilities.
    for model, out in ((tmp_path / "plain", tmp_path / "from_export.jsonl"), (run, tmp_path / "from_run.jsonl")):
        assert main(["predict", str(model), "--input", str(root / "validation.jsonl"), "--output", str(out),
                     "--text-columns", "body", "--no-progress"]) == 0
    from_export, from_run = ([json.loads(line) for line in path.read_text().splitlines()]
                             for path in (tmp_path / "from_export.jsonl", tmp_path / "from_run.jsonl"))
    assert [r["prediction"] for r in from_export] == [r["prediction"] for r in from_run]
    for a, b in zip(from_export, from_run):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_predict_on_the_validation_file_reproduces_evaluate(three_class_run, tmp_path):
    root, run = three_class_run
    metrics = evaluate_saved(run, validation_file=str(root / "validation.jsonl"))
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(run), "--input", str(root / "validation.jsonl"), "--output", str(out),
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [row["topic"] for row in rows]
    predicted = [row["prediction"] for row in rows]
    assert accuracy_score(gold, predicted) == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert f1_score(gold, predicted, average="macro") == pytest.approx(metrics["macro_f1"], abs=1e-12)
    for row in rows:
        assert set(row["probabilities"]) == {"politics", "science", "sports"}
        assert math.isclose(sum(row["probabilities"].values()), 1.0, rel_tol=1e-9)
        assert row["probability"] == max(row["probabilities"].values())
    # The same file as CSV output: one probability column per class, and the input's columns kept.
    assert main(["predict", str(run / "model"), "--input", str(root / "validation.jsonl"), "--output",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 0
    with open(tmp_path / "p.csv", encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["body", "topic", "prediction", "probability", "probability_politics",
                              "probability_science", "probability_sports"]
    assert [row["prediction"] for row in table] == predicted


def test_predict_reads_standard_input_and_writes_standard_output(three_class_run):
    import subprocess
    import sys

    root, run = three_class_run
    lines = [json.dumps({"body": "vote law senate again"}), json.dumps({"body": "a goal in the match"})]
    done = subprocess.run([sys.executable, "-m", "lrsparse.cli", "predict", str(run), "--input", "-", "--output", "-",
                           "--no-progress"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["body"] for row in rows] == ["vote law senate again", "a goal in the match"]
    assert all(row["prediction"] in {"politics", "science", "sports"} for row in rows)
    assert "wrote 2 prediction(s) to standard output" in done.stderr


def test_evaluate_without_flags_scores_the_runs_dev_set(three_class_run):
    root, run = three_class_run
    report = json.loads((run / "report.json").read_text())
    assert evaluate_saved(run / "model") == pytest.approx(report["final_metrics"], abs=1e-9)
    assert main(["evaluate", "--model", str(run)]) == 0


def test_holdout_without_validation_file_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "all.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([f"sentence {i}", "yes" if i % 3 else "no"] for i in range(50))
    train, dev, labels = read_examples(DataSpec(train_file=str(path), validation_split=0.2))
    again = read_examples(DataSpec(train_file=str(path), validation_split=0.2))[1]
    assert len(dev) == 10 and len(train) == 40 and dev.texts_a == again.texts_a
    assert not set(dev.texts_a) & set(train.texts_a)
    assert sorted(dev.texts_a + train.texts_a) == sorted(f"sentence {i}" for i in range(50))
    assert labels.label_values == ("no", "yes") and "held out: 10 of 50" in dev.source


def test_resume_needs_no_data_flags(sst2_subset, tiny_model, tmp_path):
    args = ["compress", "--model", str(tiny_model), "--train-file", str(sst2_subset / "train.csv"), "--text-columns",
            "review", "--label-column", "sentiment", "--keep", "0.5", "--epochs", "1", "--batch-size", "8",
            "--max-seq-len", "16", "--output", str(tmp_path / "run"), "--threads", "1", "--no-inspect"]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert main(["compress", "--output", str(tmp_path / "run"), "--resume", "--model", str(tiny_model), "--keep",
                 "0.5", "--epochs", "1", "--batch-size", "8", "--max-seq-len", "16", "--no-inspect"]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report


def test_a_datasets_folder_and_a_dataset_name(sst2_subset, tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.load_dataset("csv", data_files=str(sst2_subset / "train.csv"), split="train")
    dev = datasets.load_dataset("csv", data_files=str(sst2_subset / "dev.csv"), split="train")
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(tmp_path / "saved"))
    spec = dict(text_columns=("review",), label_column="sentiment")
    expected = read_examples(DataSpec(train_file=str(sst2_subset / "train.csv"),
                                      validation_file=str(sst2_subset / "dev.csv"), **spec))
    from_folder = read_examples(DataSpec(dataset=str(tmp_path / "saved"), **spec))
    (tmp_path / "named").mkdir()  # a local dataset repository: datasets.load_dataset(path) infers its splits
    (tmp_path / "named" / "train.csv").write_bytes((sst2_subset / "train.csv").read_bytes())
    (tmp_path / "named" / "validation.csv").write_bytes((sst2_subset / "dev.csv").read_bytes())
    by_name = read_examples(DataSpec(dataset=str(tmp_path / "named"), **spec))
    for got in (from_folder, by_name):
        assert got[0].texts_a == expected[0].texts_a and got[0].labels == expected[0].labels
        assert got[1].texts_a == expected[1].texts_a  # its validation split is the dev set


def test_embedding_train_text_from_a_column_of_a_table(tmp_path):
    from lrsparse.embedding import read_sentences

    path = write_csv(tmp_path / "reviews.csv", ["id", "review"], [["1", " A fine film "], ["2", "Dull."],
                                                                    ["3", "A fine film"]])
    sentences, source = read_sentences(str(path), None, ("review",))
    assert sentences == ["A fine film", "Dull."] and "review" in source
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "two", "one"]))
    assert read_sentences(str(tmp_path / "lines.jsonl"), None)[0] == ["one", "two"]  # default column: text
    with pytest.raises(ValueError, match=r"text column\(s\) \['body'\] not found"):
        read_sentences(str(path), None, ("body",))
    with pytest.raises(ValueError, match="names columns of a table"):
        read_sentences(str(tmp_path / "x.txt"), None, ("review",))
    config = RecipeConfig.create(task="embedding", keep=0.5, output_dir=str(tmp_path / "run"), train_text=str(path),
                                 text_columns=["review"])
    assert config.identity()["train_text_columns"] == ["review"]
    # For own data the columns belong to the data spec only (they once leaked into the identity and broke --resume).
    own = RecipeConfig.create(task=None, keep=0.5, output_dir=str(tmp_path / "own"), train_file=str(path),
                              text_columns=["review"], label_column="id")
    assert "train_text_columns" not in own.identity() and own.identity()["data"]["text_columns"] == ["review"]

