"""Bad own data: every case is a clear error naming the file, column and row before any training, and --output is
left as it was. Plus hypothesis round trips of the readers (CSV, TSV, JSON lines, Parquet) against the rows written."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrsparse.cli import main
from lrsparse.owndata import DataSpec, read_examples
from pipeline_helpers import write_csv


def _compress(tmp_path, *flags):
    return main(["compress", "--output", str(tmp_path / "out"), "--epochs", "1", "--keep", "0.5", "--no-inspect",
                 *flags])


GOOD = [["a fine film", "pos"], ["a dull film", "neg"], ["great", "pos"], ["awful", "neg"]]


def _case(name, tmp_path):
    """(flags, expected fragments of the message) of one bad input."""
    good = write_csv(tmp_path / "good.csv", ["text", "label"], GOOD)
    if name == "missing file":
        return ["--train-file", str(tmp_path / "nope.csv")], ["train file not found", "nope.csv"]
    if name == "missing column":
        return ["--train-file", str(good), "--label-column", "sentiment"], ["'sentiment' not found", "['text', 'label']"]
    if name == "missing text column":
        return ["--train-file", str(good), "--text-columns", "review"], ["['review'] not found", "['text', 'label']"]
    if name == "empty file":
        (tmp_path / "empty.csv").write_bytes(b"")
        return ["--train-file", str(tmp_path / "empty.csv")], ["empty.csv is empty"]
    if name == "header only":
        write_csv(tmp_path / "header.csv", ["text", "label"], [])
        return ["--train-file", str(tmp_path / "header.csv")], ["header.csv has no rows after its header"]
    if name == "not utf-8":
        (tmp_path / "latin.csv").write_bytes("text,label\nok,pos\ncaf\xe9,neg\n".encode("latin-1"))
        return ["--train-file", str(tmp_path / "latin.csv")], ["latin.csv line 3", "0xe9", "not UTF-8"]
    if name == "unseen validation label":
        dev = write_csv(tmp_path / "dev.csv", ["text", "label"], [["fine", "pos"], ["meh", "neutral"]])
        return ["--train-file", str(good), "--validation-file", str(dev)], ["dev.csv", "row 2", "'neutral'",
                                                                            "['neg', 'pos']"]
    if name == "single class":
        one = write_csv(tmp_path / "one.csv", ["text", "label"], [["a", "pos"], ["b", "pos"]])
        return ["--train-file", str(one)], ["single class 'pos'"]
    if name == "nan target":
        bad = write_csv(tmp_path / "nan.csv", ["text", "label"], [["a", "0.5"], ["b", "nan"], ["c", "1.5"]])
        return ["--train-file", str(bad)], ["row 2", "not finite"]
    if name == "inf target":
        bad = write_csv(tmp_path / "inf.csv", ["text", "label"], [["a", "0.5"], ["b", "2.5"], ["c", "-inf"]])
        return ["--train-file", str(bad), "--problem-type", "regression"], ["row 3", "not finite"]
    if name == "mixed labels":
        bad = write_csv(tmp_path / "mixed.csv", ["text", "label"], [["a", "positive"], ["b", "1"], ["c", "0"]])
        return ["--train-file", str(bad)], ["mixes numbers (row 2: '1')", "strings (row 1: 'positive')"]
    if name == "empty text":
        bad = write_csv(tmp_path / "blank.csv", ["text", "label"], [["a", "pos"], ["b", "neg"], ["  ", "pos"]])
        return ["--train-file", str(bad)], ["column 'text' row 3", "empty"]
    if name == "three text columns":
        return ["--train-file", str(good), "--text-columns", "a", "b", "c"], ["text_columns", "one or two",
                                                                           "['a', 'b', 'c']"]
    if name == "task and own data":
        return ["--task", "sst2", "--train-file", str(good)], ["train_file", "leave --task out"]
    if name == "unknown extension":
        (tmp_path / "data.xlsx").write_bytes(b"PK")
        return ["--train-file", str(tmp_path / "data.xlsx")], ["unknown file type '.xlsx'"]
    if name == "metric of the other kind":
        return ["--train-file", str(good), "--metric", "pearson"], ["metric 'pearson'", "classes"]
    raise AssertionError(name)


CASES = ["missing file", "missing column", "missing text column", "empty file", "header only", "not utf-8",
         "unseen validation label", "single class", "nan target", "inf target", "mixed labels", "empty text",
         "three text columns", "task and own data", "unknown extension", "metric of the other kind"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_before_training_and_output_is_untouched(case, tmp_path, capsys):
    flags, fragments = _case(case, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the user's file")
    assert _compress(tmp_path, *flags, "--overwrite") == 2
    message = capsys.readouterr().err
    assert message.startswith("lrsparse compress: error: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_a_label_of_the_wrong_kind_in_json_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": label})
                              for t, label in [("a", "x"), ("b", "y"), ("c", None)]))
    with pytest.raises(ValueError, match=r"column 'label' row 3: the label is missing"):
        read_examples(DataSpec(train_file=str(path)))


# --------------------------------------------------------------------------------------------------- round trips
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30).filter(
    lambda s: s.strip())
ROWS = st.lists(st.tuples(TEXT, TEXT, st.sampled_from(["alpha", "beta", "gamma"])), min_size=3, max_size=12).filter(
    lambda rows: len({label for _, _, label in rows}) >= 2)


def _write(path, rows, kind):
    if kind == "csv":
        write_csv(path, ["first", "second", "label"], rows)
    elif kind == "tsv":  # GLUE's convention: no quoting, a quote or backslash is text (no control characters here)
        path.write_text("".join("\t".join(row) + "\n" for row in [("first", "second", "label"), *rows]),
                        encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(["first", "second", "label"], row))) + "\n" for row in rows),
                        encoding="utf-8")
    else:
        import pandas

        pandas.DataFrame(rows, columns=["first", "second", "label"]).to_parquet(path)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_reader_round_trip(kind, rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / f"data.{kind}"
    _write(path, rows, kind)
    train, dev, labels = read_examples(DataSpec(train_file=str(path), validation_file=str(path),
                                                text_columns=("first", "second")))
    names = sorted({label for _, _, label in rows})
    assert labels.label_values == tuple(names)
    assert dev.texts_a == [a for a, _, _ in rows] and dev.texts_b == [b for _, b, _ in rows]
    assert dev.labels == [names.index(label) for _, _, label in rows]
