"""Property-based fuzzing (hypothesis) of the readers of users' files: the GLUE TSV reader (`load_glue`) and the
SQuAD JSON reader (`read_squad_json`).

Inputs are random valid files, random JSON documents, and real excerpts of the shared GLUE / SQuAD files (see
../shared/data/README.md) mutated at the line, field and byte level: dropped/added columns, tabs inside fields, a
deleted or repeated header, garbage and NaN/inf labels, BOMs, stray quotes, CR/CRLF line ends, fields past the csv
field-size limit, bytes that are not UTF-8, truncation; missing keys, wrong types, answers outside or not matching the
context, empty lists, lone surrogates, invalid JSON, huge numbers, deep nesting.

Each file is judged against an independent oracle written from the documented formats (str.split on tabs and line
breaks per physical line for the TSVs; a walk of the parsed JSON for SQuAD): either the reader returns exactly the
rows/questions the oracle extracts (row counts, texts, labels of the task's type and range, answers that sit at their
offsets), or it raises a plain ValueError naming the file and the line (TSV) or JSON field (SQuAD) the oracle flags.
Any other exception type, a wrong line/field, or a load that differs from the oracle fails. derandomize=True makes
every run draw the same examples, so a failure reproduces.
"""
from __future__ import annotations

import codecs
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lrsparse.data import GLUE_TASKS, load_glue, task_file
from lrsparse.squad import SquadExample, load_squad, read_squad_json


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


BOM = codecs.BOM_UTF8
CSV_FIELD_LIMIT = 131_072  # csv.field_size_limit() default: a longer field cannot be read
REAL_GLUE = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B"}
# Label sets from the README / GLUE: classification label strings, or the STS-B score range.
REAL_LABELS = {"sst2": ("0", "1"), "mrpc": ("0", "1"), "cola": ("0", "1")}
STSB_RANGE = (0.0, 5.0)
# (text column(s), label column) of the real files: header names, or positions in CoLA's 4 header-less columns.
REAL_COLUMNS = {"sst2": (("sentence",), "label"), "mrpc": (("#1 String", "#2 String"), "Quality"),
                "cola": ((3,), 1), "stsb": (("sentence1", "sentence2"), "score")}
COLA_COLUMNS = 4

# Text that fits in one TSV field: anything but tabs, line breaks and (unencodable) surrogates.
field_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\r\n"), max_size=24)
GARBAGE_FIELDS = [
    "", "2", "-1", "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "5.0000001", "-0.0001", "1_0", "0_5", " 1", "1 ",
    "\u0663", "0x1", "true", "None", "label", '"1"', "1.0", "3.8", "5", "0", "1", "0.", ".5", "1e0", '"', "'",
    '"quoted"', 'a"b', "\u2028", "\x00", "\x0b\x0c", "\ufeff", "\u00e9t\u00e9", "\U0001F600", "entailment",
]
field_values = st.one_of(st.sampled_from(GARBAGE_FIELDS), field_text)


# ================================================================================================= GLUE oracle
def _is_decimal_label(raw: str) -> bool:
    """A plain ASCII decimal number (what STS-B's score column holds); float() alone is laxer ("1_0", " 3")."""
    return bool(raw) and set(raw) <= set("0123456789+-.eE") and _float_or_none(raw) is not None


def _float_or_none(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


def _label_value(task: str, raw: str, label_values: tuple[str, ...] | None = None) -> int | float | None:
    """The label the reader must produce for `raw`, or None when `raw` is not a valid label of `task`."""
    if task == "stsb":
        if not _is_decimal_label(raw):
            return None
        value = float(raw)
        return value if STSB_RANGE[0] <= value <= STSB_RANGE[1] else None
    values = label_values if label_values is not None else REAL_LABELS[task]
    return values.index(raw) if raw in values else None


def glue_oracle(task: str, raw: bytes, columns=None, label_values=None, header_less_columns=None):
    """What reading `raw` as `task`'s TSV must give, from physical lines split on \\r\\n, \\r or \\n and fields split
    on tabs (GLUE uses no quoting).

    Returns ("ok", texts_a, texts_b, labels) or ("error", acceptable_lines, kind) where kind is "line" (the message
    must name one of the lines), "empty" (no header) or "no rows".
    """
    text_columns, label_column = columns or REAL_COLUMNS[task]
    has_header = not isinstance(label_column, int)
    if raw.startswith(BOM):
        raw = raw[len(BOM):]  # one BOM at the very start is not content (utf-8-sig)
    physical = re.split(rb"\r\n|\r|\n", raw)
    if physical[-1] == b"":
        physical.pop()  # a final line break ends the last line, it does not start another
    bad_utf8_line = None
    lines = []
    for number, line in enumerate(physical, 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad_utf8_line = number
            break
    structural = _glue_structure(task, lines, has_header, text_columns, label_column, label_values,
                                 header_less_columns)
    if bad_utf8_line is None:
        return structural
    # The reader decodes ahead of parsing, so an earlier structural error may or may not be reported first.
    acceptable = {bad_utf8_line}
    if structural[0] == "error" and structural[2] == "line" and min(structural[1]) < bad_utf8_line:
        acceptable |= structural[1]
    return ("error", acceptable, "line")


def _glue_structure(task, lines, has_header, text_columns, label_column, label_values, header_less_columns):
    if has_header:
        if not lines:
            return ("error", set(), "empty")
        header = lines[0].split("\t")
        wanted = (*text_columns, label_column)
        if any(len(name) > CSV_FIELD_LIMIT for name in header) or any(header.count(name) != 1 for name in wanted):
            return ("error", {1}, "line")
        text_idx = [header.index(name) for name in text_columns]
        label_idx = header.index(label_column)
        width, first = len(header), 1
    else:
        text_idx, label_idx = list(text_columns), label_column
        width, first = header_less_columns or COLA_COLUMNS, 0
    texts: list[list[str]] = [[] for _ in text_idx]
    labels = []
    for number, line in enumerate(lines[first:], first + 1):
        if line == "":
            continue  # blank line
        fields = line.split("\t")
        if any(len(value) > CSV_FIELD_LIMIT for value in fields) or len(fields) != width:
            return ("error", {number}, "line")
        label = _label_value(task, fields[label_idx], label_values)
        if label is None:
            return ("error", {number}, "line")
        labels.append(label)
        for column, idx in zip(texts, text_idx):
            column.append(fields[idx])
    if not labels:
        return ("error", set(), "no rows")
    return ("ok", texts[0], texts[1] if len(texts) == 2 else None, labels)


def check_glue_load(task: str, raw: bytes, split: str = "dev", **oracle_kwargs) -> str:
    """Writes `raw` as `split` of `task` in a fresh folder, loads it and compares with the oracle; returns the
    outcome ("ok" or the error kind) so that properties can check their inputs reach every branch."""
    expected = glue_oracle(task, raw, **oracle_kwargs)
    with tempfile.TemporaryDirectory() as root:
        path = task_file(task, split, root)
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        if expected[0] == "ok":
            got = load_glue(task, split, root)
            _, texts_a, texts_b, labels = expected
            spec = GLUE_TASKS[task]
            assert len(got) == len(labels) == len(got.texts_a)
            assert got.texts_a == texts_a and got.texts_b == texts_b
            assert all(isinstance(text, str) for text in got.texts_a + (got.texts_b or []))
            if spec.is_regression:
                assert all(type(y) is float and STSB_RANGE[0] <= y <= STSB_RANGE[1] for y in got.labels)
            else:
                assert all(type(y) is int and 0 <= y < spec.num_labels for y in got.labels)
            assert got.labels == labels and got.source == str(path)
            return "ok"
        with pytest.raises(Exception) as caught:
            load_glue(task, split, root)
    _, lines, kind = expected
    error = caught.value
    assert type(error) is ValueError, f"{type(error).__name__}: {error}"
    message = str(error)
    assert str(path) in message, message
    if kind == "line":  # "<file> line <n>...": the line right after the file name
        named = re.match(re.escape(str(path)) + r" line (\d+)\b", message)
        assert named and int(named[1]) in lines, f"expected line {sorted(lines)}: {message}"
    elif kind == "empty":
        assert "is empty" in message, message
    else:
        assert "has no rows" in message, message
    return kind


# ================================================================================================= GLUE properties
@st.composite
def valid_glue_files(draw):
    """(task, bytes, oracle kwargs) of a well-formed TSV of any GLUE task, with a random column order and filler
    columns, random texts (quotes, BOM characters, U+2028, NUL included), labels in the task's set or range written in
    several number formats, optional BOM, any line ends and trailing blank lines."""
    task = draw(st.sampled_from(sorted(GLUE_TASKS)))
    spec = GLUE_TASKS[task]
    rows = draw(st.integers(1, 8))
    if spec.has_header:
        names = [*spec.text_columns, spec.label_column]
        names += [f"extra{i}" for i in range(draw(st.integers(0, 3)))]
        names = draw(st.permutations(names))
        header = [names]
    else:
        names, header = ["source", spec.label_column, "original", *spec.text_columns], []
    body = []
    for _ in range(rows):
        values = []
        for name in names:
            if name == spec.label_column:
                if spec.is_regression:
                    score = draw(st.floats(*spec.label_range))
                    values.append(draw(st.sampled_from([f"{score:.3f}", repr(score), f"{score:e}", f"{score:g}",
                                                        str(int(score))])))
                else:
                    values.append(draw(st.sampled_from(spec.label_values)))
            else:
                values.append(draw(field_text))
        body.append(values)
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = ending.join("\t".join(map(str, row)) for row in header + body)
    text += draw(st.sampled_from(["", ending, ending * 3]))
    raw = draw(st.sampled_from([b"", BOM])) + text.encode("utf-8")
    # Tasks without a real file here (rte, mnli, ...) take their columns and label strings from the spec.
    return task, raw, {"columns": (spec.text_columns, spec.label_column), "label_values": spec.label_values,
                       "header_less_columns": len(names)}


@fuzz_settings(max_examples=200)
@given(case=valid_glue_files(), split=st.sampled_from(["train", "dev"]))
def test_valid_glue_files_of_every_task_load_exactly(case, split):
    task, raw, oracle_kwargs = case
    assert glue_oracle(task, raw, **oracle_kwargs)[0] == "ok"  # the generator only writes valid files
    assert check_glue_load(task, raw, split, **oracle_kwargs) == "ok"


@pytest.fixture(scope="module")
def glue_excerpts(data_dir) -> dict[str, tuple[bytes, list[str]]]:
    """task -> (leading BOM or b"", lines): the header (if any), the first 5 data rows and 2 rows with quotes of the
    real dev file."""
    excerpts = {}
    for task, folder in REAL_GLUE.items():
        raw = (data_dir / "glue" / folder / "dev.tsv").read_bytes()
        bom = BOM if raw.startswith(BOM) else b""
        lines = raw[len(bom):].decode("utf-8").split("\n")
        first = 0 if task == "cola" else 1
        body = [line for line in lines[first:] if line]
        quoted = [line for line in body[5:] if '"' in line][:2]
        excerpts[task] = (bom, lines[:first] + body[:5] + quoted)
    return excerpts


@st.composite
def glue_mutations(draw, lines: list[str]):
    """A mutated copy of `lines`: 0-4 line/field edits."""
    lines = list(lines)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["delete_line", "duplicate_line", "blank_line", "set_field", "set_field",
                                   "drop_field", "insert_field", "tab_in_field", "long_field", "swap_fields",
                                   "header_only", "clear"]))
        if op == "clear":
            lines = []
            continue
        if op == "header_only":
            lines = lines[:1]
            continue
        if not lines:
            lines = [draw(field_values)]
            continue
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete_line":
            del lines[i]
            continue
        if op == "duplicate_line":
            lines.insert(i, lines[i])
            continue
        if op == "blank_line":
            lines.insert(i, "")
            continue
        fields = lines[i].split("\t")
        j = draw(st.integers(0, len(fields) - 1))
        if op == "set_field":
            fields[j] = draw(field_values)
        elif op == "drop_field":
            del fields[j]
        elif op == "insert_field":
            fields.insert(j, draw(field_values))
        elif op == "tab_in_field":
            k = draw(st.integers(0, len(fields[j])))
            fields[j] = fields[j][:k] + "\t" + fields[j][k:]
        elif op == "long_field":
            fields[j] = "x" * draw(st.sampled_from([CSV_FIELD_LIMIT, CSV_FIELD_LIMIT + 1, 200_000]))
        elif op == "swap_fields":
            k = draw(st.integers(0, len(fields) - 1))
            fields[j], fields[k] = fields[k], fields[j]
        lines[i] = "\t".join(fields)
    return lines


INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80"]


@st.composite
def glue_bytes(draw, bom: bytes, lines: list[str]):
    """`lines` written with random line ends (LF, CRLF, CR or mixed), 0-2 BOMs, maybe invalid UTF-8 bytes inserted
    anywhere, maybe truncated at a random byte."""
    style = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    ends = [draw(st.sampled_from(["\n", "\r\n", "\r"])) if style == "mixed" else style for _ in lines]
    text = "".join(line + end for line, end in zip(lines, ends))
    if lines and draw(st.booleans()):
        text = text[: -len(ends[-1])]  # no line break after the last line
    raw = draw(st.sampled_from([b"", bom, BOM, BOM + BOM])) + text.encode("utf-8")
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    if draw(st.integers(0, 5)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def run_fuzz(max_examples: int, one_case) -> set[str]:
    """Runs ``one_case(data)`` (draws an input, loads it, returns its outcome) on hypothesis examples; returns the
    set of outcomes seen, so a test can check that every kind of outcome was reached."""
    outcomes = set()

    @fuzz_settings(max_examples=max_examples)
    @given(data=st.data())
    def fuzz(data):
        outcomes.add(one_case(data))

    fuzz()
    return outcomes


def test_mutated_real_glue_files_load_exactly_or_name_the_bad_line(glue_excerpts):
    def one_case(data):
        task = data.draw(st.sampled_from(sorted(REAL_GLUE)), label="task")
        bom, lines = glue_excerpts[task]
        mutated = data.draw(glue_mutations(lines), label="lines")
        raw = data.draw(glue_bytes(bom, mutated), label="bytes")
        return check_glue_load(task, raw, split=data.draw(st.sampled_from(["train", "dev"]), label="split"))

    outcomes = run_fuzz(300, one_case)
    # The mutations reach every outcome: loads, errors on a line, empty files, files without rows.
    assert outcomes == {"ok", "line", "empty", "no rows"}, outcomes


def test_unmutated_excerpts_load_as_written(glue_excerpts):
    """The oracle agrees with the reader on the real rows themselves (BOM, quotes, trailing spaces kept)."""
    for task, (bom, lines) in glue_excerpts.items():
        raw = bom + ("\n".join(lines) + "\n").encode("utf-8")
        assert check_glue_load(task, raw) == "ok"
        assert len(load_glue_bytes(task, raw)) == len(lines) - (task != "cola")


def load_glue_bytes(task: str, raw: bytes):
    with tempfile.TemporaryDirectory() as root:
        path = task_file(task, "dev", root)
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        return load_glue(task, "dev", root)


# Inputs that broke the reader before it was fixed: (task, bytes, line the error must name).
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
GLUE_REGRESSIONS = {
    # Raised a bare UnicodeDecodeError naming neither file nor line.
    "invalid utf-8": ("sst2", b"sentence\tlabel\ngood \t1\nbad \xff\t0\n", 3),
    # Raised a bare csv.Error ("field larger than field limit").
    "over-long field": ("sst2", b"sentence\tlabel\ngood \t1\n" + b"x" * (CSV_FIELD_LIMIT + 1) + b"\t1\n", 3),
    # A tab inside CoLA's sentence silently cut the sentence short.
    "tab in cola sentence": ("cola", b"gj04\t1\t\tThe sailors\trode the breeze.\n", 1),
    # A tab inside MRPC's #1 String silently moved half of it into #2 String.
    "tab in mrpc string": ("mrpc", BOM + b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe\tsaid\tShe said\n",
                           2),
    # A tab in an SST-2 sentence before a label-like word silently loaded the word as the label.
    "tab in sst2 sentence": ("sst2", b"sentence\tlabel\nscore\t1\tout of 10 \t0\n", 2),
    # A repeated label column silently used the first one.
    "repeated header column": ("sst2", b"sentence\tlabel\tlabel\ngood \t1\t0\n", 1),
    # float() read "0_5" as 5.0, " 3.0 " as 3.0 and Arabic-Indic digits as numbers.
    "underscore score": ("stsb", (STSB_HEADER + "0\tg\tf\ty\t0\tn\tn\ta\tb\t0_5\n").encode(), 2),
    "padded score": ("stsb", (STSB_HEADER + "0\tg\tf\ty\t0\tn\tn\ta\tb\t 3.0 \n").encode(), 2),
    "non-ascii digit score": ("stsb", (STSB_HEADER + "0\tg\tf\ty\t0\tn\tn\ta\tb\t\u0663\n").encode(), 2),
    # The missing-column message named the file but not the (header) line.
    "missing column": ("sst2", b"sentence\tpolarity\ngood \t1\n", 1),
}


@pytest.mark.parametrize("name", sorted(GLUE_REGRESSIONS))
def test_glue_reader_regressions(name):
    task, raw, line = GLUE_REGRESSIONS[name]
    assert glue_oracle(task, raw) == ("error", {line}, "line")
    assert check_glue_load(task, raw) == "line"


# ================================================================================================= SQuAD oracle
def _good_str(value) -> bool:
    if type(value) is not str:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogate from a "\ud800" escape
        return False
    return True


def _field_problems(node, where: str, checks) -> set[str]:
    """The paths a reader must name for ``node``: ``where`` itself when it is not an object, else each field whose
    check (``checks(node)`` gives (field, ok) pairs) fails; empty when the node is fine."""
    if type(node) is not dict:
        return {where}
    return {f"{where}.{key}" for key, ok in checks(node) if not ok}


def squad_oracle(payload):
    """What read_squad_json must make of the parsed JSON `payload`: ("ok", examples), ("error", fields, "field")
    where the message must name one of `fields` (paths like data[0].paragraphs[1].qas[2].answers[0].answer_start),
    ("error", None, "top") for a document that is not {"data": [...]}, or ("error", None, "no questions")."""
    if type(payload) is not dict or type(payload.get("data")) is not list:
        return ("error", None, "top")
    seen: set[str] = set()
    examples = []
    for i, article in enumerate(payload["data"]):
        where = f"data[{i}]"
        problems = _field_problems(article, where, lambda a: (("title", _good_str(a.get("title"))),
                                                              ("paragraphs", type(a.get("paragraphs")) is list)))
        if problems:
            return ("error", problems, "field")
        for p, paragraph in enumerate(article["paragraphs"]):
            p_where = f"{where}.paragraphs[{p}]"
            problems = _field_problems(paragraph, p_where, lambda g: (("context", _good_str(g.get("context"))),
                                                                      ("qas", type(g.get("qas")) is list)))
            if problems:
                return ("error", problems, "field")
            context = paragraph["context"]
            for q, qa in enumerate(paragraph["qas"]):
                q_where = f"{p_where}.qas[{q}]"
                problems = _field_problems(qa, q_where, lambda x: (("id", _good_str(x.get("id"))),
                                                                  ("question", _good_str(x.get("question"))),
                                                                  ("answers", type(x.get("answers")) is list)))
                answers = qa.get("answers") if type(qa) is dict else None
                if not problems and (answers == [] or qa["id"] in seen):
                    problems = {q_where}  # no answers, or a repeated id
                if problems:
                    return ("error", problems, "field")
                seen.add(qa["id"])
                texts, starts = [], []
                for a, answer in enumerate(answers):
                    a_where = f"{q_where}.answers[{a}]"
                    if type(answer) is not dict:
                        return ("error", {a_where}, "field")
                    text, start = answer.get("text"), answer.get("answer_start")
                    problems = {f"{a_where}.{key}" for key, ok in (("text", _good_str(text)),
                                                                   ("answer_start", type(start) is int)) if not ok}
                    if not problems:
                        if text == "":
                            problems.add(f"{a_where}.text")
                        if start < 0 or start + len(text) > len(context):
                            problems.add(f"{a_where}.answer_start")
                        if not problems and context[start:start + len(text)] != text:
                            problems.add(a_where)
                    if problems:
                        return ("error", problems, "field")
                    texts.append(text)
                    starts.append(start)
                examples.append(SquadExample(qa["id"], article["title"], context, qa["question"], tuple(texts),
                                             tuple(starts)))
    if not examples:
        return ("error", None, "no questions")
    return ("ok", examples)


def check_squad_load(raw: bytes) -> str:
    """Writes `raw` as a user's SQuAD JSON, reads it and compares with the oracle (invalid JSON, as judged by the
    json module itself, must be a ValueError naming the file); returns the outcome kind."""
    try:
        expected = squad_oracle(json.loads(raw.decode("utf-8")))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, a >4300-digit integer
        expected = ("error", None, "json")
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "train-v1.1.json"
        path.write_bytes(raw)
        if expected[0] == "ok":
            got = read_squad_json(path)
            assert got == expected[1]
            assert len({example.id for example in got}) == len(got)
            for example in got:
                assert all(isinstance(value, str) for value in (example.id, example.title, example.context,
                                                                 example.question, *example.answers))
                assert len(example.answers) == len(example.answer_starts) >= 1
                for text, start in zip(example.answers, example.answer_starts):
                    assert type(start) is int and 0 <= start and text != ""
                    assert example.context[start:start + len(text)] == text
            return "ok"
        with pytest.raises(Exception) as caught:
            read_squad_json(path)
    _, fields, kind = expected
    error = caught.value
    assert type(error) is ValueError, f"{type(error).__name__}: {error}"
    message = str(error)
    assert str(path) in message, message
    if kind == "field":
        assert any(re.search(re.escape(field) + r"(?![\w.\[])", message) for field in fields), \
            f"expected {sorted(fields)}: {message}"
    elif kind == "top":
        assert "'data' list" in message, message
    elif kind == "no questions":
        assert "holds no questions" in message, message
    else:
        assert "not valid JSON" in message or "nested too deeply" in message, message
    return kind


# ================================================================================================= SQuAD properties
SQUAD_KEYS = ["data", "title", "paragraphs", "context", "qas", "id", "question", "answers", "text", "answer_start"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                         st.sampled_from(["", "\ud800", "Ada", "0", "\ufeff"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(SQUAD_KEYS), st.text(max_size=6)), inner,
                                            max_size=4)),
    max_leaves=12,
)


def _dumps(payload, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate is written as its (invalid) UTF-8 bytes when not escaped.
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def squad_like_documents(draw):
    """Documents shaped like SQuAD where each field is right most of the time and a random JSON value otherwise;
    answers are cut from their context, then sometimes shifted, emptied, lengthened or moved out of range."""

    def field(valid):
        return draw(json_values) if draw(st.integers(0, 39)) == 0 else valid

    def new_id():  # unique, except for an occasional repeat
        ids.append(draw(st.sampled_from(ids)) if ids and draw(st.integers(0, 19)) == 0 else f"q{len(ids)}")
        return ids[-1]

    ids: list[str] = []
    data = []
    for _ in range(draw(st.integers(0, 3))):
        paragraphs = []
        for _ in range(draw(st.integers(0, 2))):
            context = draw(st.text(min_size=1, max_size=40))
            qas = []
            for _ in range(draw(st.integers(0, 2))):
                answers = []
                for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 0]))):
                    start = draw(st.integers(0, len(context) - 1))
                    text = context[start:draw(st.integers(start + 1, len(context)))]
                    change = draw(st.sampled_from(["none"] * 30 + ["shift", "negative", "huge", "empty", "longer",
                                                                   "other"]))
                    if change == "shift":
                        start += draw(st.sampled_from([-1, 1]))
                    elif change == "negative":
                        start -= len(context)  # Python's negative indexing finds the same text there
                    elif change == "huge":
                        start = draw(st.sampled_from([2**63, 10**30, -(10**30), len(context)]))
                    elif change == "empty":
                        text = ""
                    elif change == "longer":
                        text += draw(st.text(min_size=1, max_size=3))
                    elif change == "other":
                        text = draw(st.text(max_size=5))
                    answers.append(field({"text": field(text), "answer_start": field(start)}))
                qas.append(field({"id": field(new_id()), "question": field(draw(st.text(max_size=10))),
                                  "answers": field(answers)}))
            paragraphs.append(field({"context": field(context), "qas": field(qas)}))
        data.append(field({"title": field(draw(st.text(max_size=8))), "paragraphs": field(paragraphs)}))
    return field({"version": "1.1", "data": field(data)})


def test_random_json_documents_load_exactly_or_name_the_bad_field():
    outcomes = set()

    @fuzz_settings(max_examples=250)
    @given(payload=st.one_of(json_values, squad_like_documents(),
                             st.fixed_dictionaries({"data": st.lists(json_values)})),
           ascii_only=st.booleans())
    # One valid document always runs: whether the derandomized draws include a fully valid one has varied (a run of
    # the whole suite once drew none), and the outcome check below is about the other kinds.
    @example(payload={"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "a cat", "qas": [
        {"id": "q0", "question": "what?", "answers": [{"text": "cat", "answer_start": 2}]}]}]}]}, ascii_only=False)
    def fuzz(payload, ascii_only):
        outcomes.add(check_squad_load(_dumps(payload, ascii_only)))

    fuzz()
    assert outcomes == {"ok", "field", "top", "no questions", "json"}, outcomes


@pytest.fixture(scope="module")
def squad_excerpt(data_dir) -> dict:
    """The first 2 articles of the real dev file, cut to 2 paragraphs of 3 questions each (several answers each)."""
    real = json.loads((data_dir / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))
    return {"version": real["version"], "data": [
        {"title": article["title"], "paragraphs": [dict(paragraph, qas=paragraph["qas"][:3])
                                                   for paragraph in article["paragraphs"][:2]]}
        for article in real["data"][:2]
    ]}


def _containers(node, out):
    """Every (container, key) pair of a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((node, key))
        _containers(child, out)
    return out


@st.composite
def squad_mutations(draw, excerpt: dict):
    """A copy of the real excerpt with 1-3 edits at random places of the tree."""
    doc = json.loads(json.dumps(excerpt))
    for _ in range(draw(st.integers(1, 3))):
        places = _containers(doc, [])
        if not places:
            break
        parent, key = draw(st.sampled_from(places))
        value = parent[key]
        op = draw(st.sampled_from(["delete", "replace", "retype", "number", "text", "empty", "append", "duplicate"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "retype":  # the same content with a confusable type
            parent[key] = (str(value) if not isinstance(value, str) else
                           int(value) if value.isdigit() else [value])
        elif op == "number":
            if isinstance(value, int) and draw(st.booleans()):  # an offset moved a little, negative, far away
                parent[key] = value + draw(st.sampled_from([-1, 1, -value - 1, -value - 5, 10**9]))
            else:
                parent[key] = draw(st.sampled_from([-1, 0, 1, 10**6, 2**63, -(2**63), 10**100, 1.0, float("nan"),
                                                    float("inf"), True, "0"]))
        elif op == "text":
            if isinstance(value, str):
                parent[key] = draw(st.sampled_from([value.upper(), value + " ", value[1:], "", "\ud800" + value,
                                                    value.replace(" ", "\t")]))
        elif op == "empty":
            parent[key] = draw(st.sampled_from([[], {}, "", None]))
        elif op == "append" and isinstance(value, list):
            value.append(draw(json_values))
        elif op == "duplicate" and isinstance(value, list) and value:
            value.append(json.loads(json.dumps(value[0])))  # repeats question ids when value is a qas list
    return doc


@st.composite
def json_text_mutations(draw, raw: bytes):
    """Damage at the text level: truncation, stray bytes, a BOM, a >4300-digit integer, NaN, deep nesting."""
    op = draw(st.sampled_from(["none", "none", "truncate", "insert", "bom", "long int", "nan", "deep", "surrogate"]))
    if op == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if op == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b",", b"}", b"]", b'"', b"\\", b"\x00"])) + raw[at:]
    if op == "bom":
        return BOM + raw
    if op == "long int":
        return raw.replace(b'"answer_start": ', b'"answer_start": ' + b"9" * 5000, 1)
    if op == "nan":
        return raw.replace(b'"answer_start": ', b'"answer_start": NaN, "x": ', 1)
    if op == "deep":
        depth = draw(st.sampled_from([10, 100_000]))
        return raw.replace(b'"qas": ', b'"qas": ' + b"[" * depth + b"]" * depth + b', "y": ', 1)
    if op == "surrogate":
        return raw.replace(b'"question": "', b'"question": "\\udc00', 1)
    return raw


def test_mutated_real_squad_excerpt_loads_exactly_or_names_the_bad_field(squad_excerpt):
    def one_case(data):
        doc = data.draw(squad_mutations(squad_excerpt), label="document")
        raw = data.draw(json_text_mutations(_dumps(doc, data.draw(st.booleans(), label="ascii"))), label="bytes")
        return check_squad_load(raw)

    outcomes = run_fuzz(250, one_case)
    assert {"ok", "field", "json"} <= outcomes, outcomes


def test_unmutated_squad_excerpt_loads_as_written(squad_excerpt, tmp_path):
    raw = json.dumps(squad_excerpt).encode("utf-8")
    assert check_squad_load(raw) == "ok"
    questions = sum(len(p["qas"]) for article in squad_excerpt["data"] for p in article["paragraphs"])
    (tmp_path / "train-v1.1.json").write_bytes(raw)
    (tmp_path / "dev-v1.1.json").write_bytes(raw)
    assert len(load_squad("train", tmp_path)) == questions == 12


def _one_question(text="Ada", start=0, context="Ada wrote it.", question="Who?") -> dict:
    return {"data": [{"title": "A", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": question, "answers": [{"text": text, "answer_start": start}]}]}]}]}


ANSWER = "data[0].paragraphs[0].qas[0].answers[0]"
# Inputs that broke the reader before it was fixed: JSON text and the field (or kind) its error must name.
SQUAD_REGRESSIONS = {
    # Python's negative indexing found "it" at -3: loaded with answer_start -3.
    "negative answer_start": (json.dumps(_one_question("it", -3)), f"{ANSWER}.answer_start"),
    # An empty answer matched the empty slice anywhere, even past the end of the context.
    "empty answer past the context": (json.dumps(_one_question("", 99)), f"{ANSWER}.text"),
    # json.loads raised a bare RecursionError.
    "deep nesting": ('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}", "json"),
    # json.loads raised a ValueError about int digits that named neither the file nor the field.
    "5000-digit number": (json.dumps(_one_question()).replace('"answer_start": 0', '"answer_start": ' + "9" * 5000),
                          "json"),
    # A "\ud800" escape loaded fine, then the tokenizer failed with "TypeError: TextInputSequence must be str".
    "lone surrogate": (json.dumps(_one_question(context="\ud800Ada wrote it.", start=1)),
                       "data[0].paragraphs[0].context"),
}


@pytest.mark.parametrize("name", sorted(SQUAD_REGRESSIONS))
def test_squad_reader_regressions(name, tmp_path):
    text, field = SQUAD_REGRESSIONS[name]
    raw = text.encode("utf-8")
    assert check_squad_load(raw) == ("json" if field == "json" else "field")
    if field != "json":  # this exact field, not just one the oracle would accept
        assert field in squad_oracle(json.loads(text))[1]
        (tmp_path / "dev-v1.1.json").write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(field) + r"\W"):
            read_squad_json(tmp_path / "dev-v1.1.json")
