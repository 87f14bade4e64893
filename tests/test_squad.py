"""SQuAD v1.1: loader and split by article on the real dev file, windowed tokenization against the answer text,
span post-processing, the official EM/F1, bad files, and a tiny `lrsparse compress --task squad` with the real
MiniLM."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lrsparse import pipeline
from lrsparse.cli import main
from lrsparse.data import PaddingCollator
from lrsparse.io import LAYERS_FILE
from lrsparse.recipe import RecipeConfig
from lrsparse.metrics import normalize_answer, squad_exact_match, squad_f1, squad_metrics
from lrsparse.squad import (
    ARTICLE_SPLIT_EVAL_FRACTION,
    MAX_ANSWER_TOKENS,
    QuestionAnsweringDataset,
    SquadExample,
    SquadSplit,
    best_spans,
    load_squad,
    read_squad_json,
    split_by_article,
)

DEV_QUESTIONS, DEV_ARTICLES = 10_570, 48  # /work/shared/data/README.md


@pytest.fixture(scope="module")
def squad_dir(data_dir) -> Path:
    return data_dir / "squad"


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def sample(squad_dir) -> SquadSplit:
    """300 real questions of the eval split (long contexts give several windows at max_seq_len 96)."""
    return load_squad("dev", squad_dir, max_samples=300, seed=5)


@pytest.fixture(scope="module")
def windows(sample, tokenizer) -> QuestionAnsweringDataset:
    return QuestionAnsweringDataset(sample, tokenizer, max_seq_len=96, doc_stride=24)


# ------------------------------------------------------------------------------------------------ data and split
def test_split_by_article_is_disjoint_complete_and_deterministic(squad_dir):
    every = read_squad_json(squad_dir / "dev-v1.1.json")
    assert len(every) == DEV_QUESTIONS
    assert len({example.title for example in every}) == DEV_ARTICLES
    train, evaluation = load_squad("train", squad_dir), load_squad("dev", squad_dir)
    assert train.titles().isdisjoint(evaluation.titles())
    assert len(evaluation.titles()) == round(ARTICLE_SPLIT_EVAL_FRACTION * DEV_ARTICLES)
    assert len(train.titles()) + len(evaluation.titles()) == DEV_ARTICLES
    assert len(train) + len(evaluation) == DEV_QUESTIONS
    assert sorted(e.id for e in train.examples + evaluation.examples) == sorted(e.id for e in every)
    # Deterministic, and a function of the set of articles only: the file order does not matter.
    shuffled = list(every)
    random.Random(1).shuffle(shuffled)
    again_train, again_eval = split_by_article(shuffled)
    assert {e.id for e in again_eval} == {e.id for e in evaluation.examples}
    assert [e.id for e in load_squad("dev", squad_dir).examples] == [e.id for e in evaluation.examples]
    # Another seed gives another split, still by article.
    other_train, other_eval = split_by_article(every, seed=1)
    assert {e.title for e in other_eval} != evaluation.titles()
    assert {e.title for e in other_train}.isdisjoint({e.title for e in other_eval})


def test_subsample_is_seeded_and_stays_inside_its_split(squad_dir, sample):
    again = load_squad("dev", squad_dir, max_samples=300, seed=5)
    assert [e.id for e in again.examples] == [e.id for e in sample.examples]
    assert sample.titles() <= load_squad("dev", squad_dir).titles()
    assert [e.id for e in load_squad("dev", squad_dir, max_samples=300, seed=6).examples] != [
        e.id for e in sample.examples]


def test_loader_keeps_the_json_fields(squad_dir):
    raw = json.loads((squad_dir / "dev-v1.1.json").read_text(encoding="utf-8"))
    article = raw["data"][0]
    paragraph = article["paragraphs"][0]
    qa = paragraph["qas"][0]
    first = read_squad_json(squad_dir / "dev-v1.1.json")[0]
    assert first == SquadExample(qa["id"], article["title"], paragraph["context"], qa["question"],
                                 tuple(a["text"] for a in qa["answers"]),
                                 tuple(a["answer_start"] for a in qa["answers"]))


# ------------------------------------------------------------------------------------------------ tokenization
def test_labels_point_at_the_tokens_that_cover_the_answer(windows, sample, tokenizer):
    labelled = set()
    for i, item in enumerate(windows.features):
        example = sample.examples[windows.feature_example[i]]
        offsets = windows.context_offsets[i]
        start_char = example.answer_starts[0]
        end_char = start_char + len(example.answers[0])
        start, end = int(item["start_positions"]), int(item["end_positions"])
        context_tokens = [t for t, o in enumerate(offsets) if o is not None]
        window_start, window_end = offsets[context_tokens[0]][0], offsets[context_tokens[-1]][1]
        # The question comes first, then the context tokens; token ids and offsets describe the same window.
        assert item["input_ids"].numel() == len(offsets) <= 96
        question_ids = tokenizer(example.question.lstrip(), add_special_tokens=False)["input_ids"]
        assert item["input_ids"][1:1 + len(question_ids)].tolist() == question_ids
        if start == 0 and end == 0:  # [CLS]: the answer is not entirely inside this window's context
            assert item["input_ids"][0] == tokenizer.cls_token_id
            assert window_start > start_char or window_end < end_char
            continue
        labelled.add(windows.feature_example[i])
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        # The span covers the answer text, and tightly: one token less on either side would cut it.
        assert offsets[start][0] <= start_char and offsets[end][1] >= end_char
        assert example.answers[0] in example.context[offsets[start][0]:offsets[end][1]]
        if start + 1 <= end:
            assert offsets[start + 1][0] > start_char
            assert offsets[end - 1][1] < end_char
    assert len(windows) > len(sample)  # some contexts do not fit one window
    assert len(labelled) >= 0.99 * len(sample)


def test_consecutive_windows_overlap_by_doc_stride(windows):
    checked = 0
    for i in range(len(windows) - 1):
        if windows.feature_example[i] != windows.feature_example[i + 1]:
            continue
        this = [o for o in windows.context_offsets[i] if o is not None]
        following = [o for o in windows.context_offsets[i + 1] if o is not None]
        assert this[-24:] == following[:24]
        assert following[24][0] > this[-1][0]  # and then moves on
        checked += 1
    assert checked > 20


def test_collator_stacks_span_labels_and_pads_inputs(windows, tokenizer):
    items = [windows[i] for i in range(5)]
    batch = PaddingCollator(tokenizer.pad_token_id)(items)
    assert batch["start_positions"].tolist() == [int(item["start_positions"]) for item in items]
    assert batch["end_positions"].tolist() == [int(item["end_positions"]) for item in items]
    length = max(item["input_ids"].numel() for item in items)
    assert batch["input_ids"].shape == (5, length)
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert batch["attention_mask"][row, n:].sum() == 0


def test_too_short_windows_for_the_stride_are_refused(sample, tokenizer):
    with pytest.raises(ValueError, match="doc_stride 40"):
        QuestionAnsweringDataset(sample, tokenizer, max_seq_len=48, doc_stride=40)
    with pytest.raises(ValueError, match="doc_stride must be a positive integer"):
        QuestionAnsweringDataset(sample, tokenizer, max_seq_len=96, doc_stride=0)


# ------------------------------------------------------------------------------------------------ post-processing
def _one_hot_logits(windows: QuestionAnsweringDataset, high: float = 10.0):
    starts, ends = [], []
    for item in windows.features:
        start, end = torch.zeros(item["input_ids"].numel() + 3), torch.zeros(item["input_ids"].numel() + 3)
        if int(item["start_positions"]) != 0:
            start[item["start_positions"]] = high
            end[item["end_positions"]] = high
        starts.append(start)  # + 3: batch padding beyond the window, which must be ignored
        ends.append(end)
    return starts, ends


def test_one_hot_logits_recover_the_gold_answers(windows, sample):
    predictions = best_spans(windows, *_one_hot_logits(windows))
    assert set(predictions) == {example.id for example in sample.examples}
    # Answers that start and end on token boundaries and fit the length limit come back exactly; the rest (an
    # answer cut inside a word piece, e.g. "four" of "fourth") come back as the covering tokens.
    exact = []
    for i, item in enumerate(windows.features):
        start, end = int(item["start_positions"]), int(item["end_positions"])
        if start == 0:
            continue
        example = sample.examples[windows.feature_example[i]]
        offsets = windows.context_offsets[i]
        start_char = example.answer_starts[0]
        aligned = offsets[start][0] == start_char and offsets[end][1] == start_char + len(example.answers[0])
        if aligned and end - start + 1 <= MAX_ANSWER_TOKENS:
            exact.append(example.id)
        else:
            assert example.answers[0] in predictions[example.id] or end - start + 1 > MAX_ANSWER_TOKENS
    exact = set(exact)
    assert len(exact) >= 0.97 * len(sample)
    assert all(predictions[qid] == example.answers[0] for example in sample.examples
               for qid in [example.id] if qid in exact)
    references = {example.id: example.answers for example in sample.examples if example.id in exact}
    assert squad_metrics({qid: predictions[qid] for qid in references}, references) == {
        "exact_match": 1.0, "f1": 1.0, "main": 1.0}


class _Toy(SimpleNamespace):
    """A stand-in for QuestionAnsweringDataset with hand-written windows (only what best_spans reads)."""

    def __len__(self):
        return len(self.context_offsets)


def test_span_selection_hand_computed():
    context = "alpha beta gamma delta"
    words = [(0, 5), (6, 10), (11, 16), (17, 22)]
    first = [None, None, words[0], words[1], words[2], None]  # [CLS] q [SEP] alpha beta gamma [SEP]
    second = [None, None, words[2], words[3], None]
    toy = _Toy(context_offsets=[first, second], feature_example=[0, 0],
               examples=SquadSplit("dev", [SquadExample("q1", "t", context, "?", ("x",), (0,))]))
    # Window 1: best start "beta" (3) + best end "gamma" (4) = 2 + 3 = 5; the question token (1) has the highest
    # logits of all but is not context. Window 2: start "gamma" 4, end "delta" 2 -> 6 wins across windows.
    starts = [torch.tensor([0., 9., 1., 2., 0., 0.]), torch.tensor([0., 0., 4., 0., 0.])]
    ends = [torch.tensor([0., 9., 0., 1., 3., 0.]), torch.tensor([0., 0., 1., 2., 0.])]
    assert best_spans(toy, starts, ends) == {"q1": "gamma delta"}
    assert best_spans(toy, starts[:1] + [torch.zeros(5)], ends[:1] + [torch.zeros(5)]) == {"q1": "beta gamma"}
    # The length limit: with max_answer_tokens=1 only single tokens qualify; window 2's "gamma" (4 + 1) wins.
    assert best_spans(toy, starts, ends, max_answer_tokens=1) == {"q1": "gamma"}
    # End before start (delta -> gamma, 5 + 4) is skipped; the best valid pair is "delta" alone (5 + 0) ...
    only_second = _Toy(context_offsets=[second], feature_example=[0], examples=toy.examples)
    crossed_starts, crossed_ends = [torch.tensor([0., 0., 0., 5., 0.])], [torch.tensor([0., 0., 4., 0., 0.])]
    assert best_spans(only_second, crossed_starts, crossed_ends) == {"q1": "delta"}
    # ... which n_best=1 never tries (top start delta, top end gamma only): no valid span, the empty answer.
    assert best_spans(only_second, crossed_starts, crossed_ends, n_best=1) == {"q1": ""}
    with pytest.raises(ValueError, match="one row per window"):
        best_spans(toy, starts[:1], ends)


# ------------------------------------------------------------------------------------------------ EM / F1
@pytest.mark.parametrize("text, normalized", [
    ("The Quick, Brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("theater Anthem", "theater anthem"),  # articles only as whole words
    ("  Hello\tworld \n", "hello world"),
    ("Denver Broncos'", "denver broncos"),
    ("A-B C.D.", "ab cd"),  # punctuation is deleted, not replaced by a space
    ("the", ""),
    ("Ça, c'est l'été", "ça cest lété"),  # non-ASCII letters stay; only string.punctuation goes
])
def test_normalize_answer_official_cases(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_known_answers():
    assert squad_exact_match("Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert squad_exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert squad_exact_match("Broncos team", ["Denver Broncos", "Broncos"]) == 0.0
    # pred {cat, sat} vs gold {cat, sat, on, mat}: precision 1, recall 1/2 -> F1 2/3
    assert squad_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(2 / 3)
    # The best ground truth counts: vs "cat" precision 1/2, recall 1 -> 2/3; vs "cat sat" -> 1.
    assert squad_f1("cat sat", ["cat", "cat sat"]) == pytest.approx(1.0)
    # Repeated tokens count with multiplicity: pred [a1, a1, b] (after "a" article drop: "x x y") vs "x y":
    # common {x: 1, y: 1} = 2, precision 2/3, recall 1 -> 0.8
    assert squad_f1("x x y", ["x y"]) == pytest.approx(0.8)
    assert squad_f1("", ["Denver"]) == 0.0 and squad_f1("the", ["a"]) == 0.0  # v1.1: empty is no overlap
    metrics = squad_metrics({"a": "Denver Broncos", "b": "the cat sat"},
                            {"a": ["Denver Broncos"], "b": ["cat sat on the mat", "dog"]})
    assert metrics == pytest.approx({"exact_match": 0.5, "f1": (1.0 + 2 / 3) / 2, "main": (1.0 + 2 / 3) / 2})


def test_metric_input_errors():
    with pytest.raises(ValueError, match="missing 1 of 2 question ids"):
        squad_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(TypeError, match="ground_truths must be a sequence"):
        squad_f1("x", "x")
    with pytest.raises(ValueError, match="ground_truths must hold at least one answer"):
        squad_exact_match("x", [])


# ------------------------------------------------------------------------------------------------ bad files
def _write_squad(folder: Path, payload) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (folder / "dev-v1.1.json").write_text(text, encoding="utf-8")
    return folder


def _article(title: str, answer_start: int = 0, **qa_overrides) -> dict:
    qa = {"id": f"{title}-1", "question": "Who?", "answers": [{"text": "Ada", "answer_start": answer_start}]}
    qa.update(qa_overrides)
    return {"title": title, "paragraphs": [{"context": "Ada wrote it.", "qas": [qa]}]}


@pytest.mark.parametrize("payload, error, message", [
    (None, FileNotFoundError, r"SQuAD dev file not found: neither .*dev-v1.1.json nor .*squad.dev-v1.1.json"),
    ("{not json", ValueError, r"dev-v1.1.json is not valid JSON"),
    ({"version": "1.1"}, ValueError, r"expected an object with a 'data' list of articles"),
    ({"data": [_article("A", answer_start=4)]}, ValueError, r"answers\[0\] \(id A-1\): answer 'Ada' is not at "
                                                             r"character 4"),
    ({"data": [_article("A", question=7)]}, ValueError, r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.question: "
                                                        r"expected the question text \(str\)"),
    ({"data": [_article("A", answers=[])]}, ValueError, r"qas\[0\] \(id A-1\) has no answers"),
    ({"data": [_article("A"), _article("B", id="A-1")]}, ValueError, r"question id 'A-1' appears twice"),
    ({"data": [{"title": "A"}]}, ValueError, r"data\[0\]\.paragraphs: expected a list of paragraphs"),
])
def test_bad_files_are_refused_naming_the_problem(tmp_path, payload, error, message):
    folder = tmp_path / "data"
    if payload is None:
        folder.mkdir()
    else:
        _write_squad(folder, payload)
    with pytest.raises(error, match=message):
        load_squad("train", folder)


def test_single_article_cannot_be_split_and_squad_subfolder_is_found(tmp_path):
    with pytest.raises(ValueError, match="at least 2 articles, got 1"):
        load_squad("train", _write_squad(tmp_path / "one", {"data": [_article("A")]}))
    root = tmp_path / "root"
    _write_squad(root / "squad", {"data": [_article("A"), _article("B")]})
    train, evaluation = load_squad("train", root), load_squad("dev", root)
    assert {len(train), len(evaluation)} == {1} and train.titles() != evaluation.titles()
    with pytest.raises(ValueError, match="split 'test' is not available for squad"):
        load_squad("test", root)


# ------------------------------------------------------------------------------------------------ end to end
def test_qa_head_is_not_a_target():
    from transformers import BertConfig, BertForQuestionAnswering

    from lrsparse.targets import find_targets

    model = BertForQuestionAnswering(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, vocab_size=50))
    targets = find_targets(model)
    assert len(targets) == 2 * 6 and not any("qa_outputs" in name for name in targets)


def _squad_argv(squad_dir: Path, model: Path, output: Path) -> list[str]:
    return ["compress", "--model", str(model), "--task", "squad", "--keep", "0.5", "--output", str(output),
            "--data-dir", str(squad_dir), "--max-train-samples", "6", "--max-eval-samples", "4",
            "--max-seq-len", "64", "--doc-stride", "16", "--batch-size", "8", "--epochs", "1",
            "--factorization-iters", "2", "--seed", "1", "--threads", "1", "--no-inspect"]


def test_compress_squad_end_to_end(tmp_path, squad_dir, minilm_path, tokenizer, monkeypatch, capsys):
    from lrsparse.io import load_compressed
    from lrsparse.report import validate_report

    runs = []
    run_once = pipeline.CompressionRun.run
    monkeypatch.setattr(pipeline.CompressionRun, "run", lambda self: runs.append(self) or run_once(self))
    output = tmp_path / "run"
    assert main(_squad_argv(squad_dir, minilm_path, output)) == 0
    report = validate_report(json.loads((output / "report.json").read_text()))
    assert [s["name"] for s in report["stages"]] == ["dense", "prune", "factorize", "mixed_rank"]
    for stage in report["stages"]:
        assert set(stage["metrics"]) == {"exact_match", "f1", "main"}
        assert stage["metrics"]["main"] == stage["metrics"]["f1"]
        assert 0.0 <= stage["metrics"]["exact_match"] <= stage["metrics"]["f1"] <= 1.0
    assert (report["train_examples"], report["eval_examples"]) == (6, 4)
    assert len(report["layers"]) == 36 and not any("qa_outputs" in layer["name"] for layer in report["layers"])

    # The saved model reloads as a span model with the run's final weights: same logits, same answers.
    run = runs[0]
    reloaded = load_compressed(output / "model")
    assert type(reloaded).__name__ == "BertForQuestionAnswering"
    batch = PaddingCollator(tokenizer.pad_token_id)(list(run.eval_set))
    inputs = {k: v for k, v in batch.items() if k not in QuestionAnsweringDataset.label_names}
    run.model.eval()
    with torch.no_grad():
        expected, actual = run.model(**inputs), reloaded(**inputs)
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5)
    assert best_spans(run.eval_set, actual.start_logits, actual.end_logits) == best_spans(
        run.eval_set, expected.start_logits, expected.end_logits)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(output), "--task", "squad", "--data-dir", str(squad_dir),
                 "--max-eval-samples", "4", "--max-seq-len", "64", "--doc-stride", "16", "--seed", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["final_metrics"])
    # Evaluating on another task is refused: by the task saved with the model, and for a model saved without one
    # (a span model is no classifier) by its class.
    argv = ["evaluate", "--model", str(output), "--task", "sst2", "--data-dir", str(squad_dir.parent / "glue"),
            "--max-eval-samples", "4"]
    assert main(argv) == 2
    assert "task 'sst2' differs from the task 'squad' the model" in capsys.readouterr().err
    untagged = tmp_path / "untagged"
    shutil.copytree(output / "model", untagged)
    manifest = json.loads((untagged / LAYERS_FILE).read_text())
    del manifest["extra"]["task"]
    (untagged / LAYERS_FILE).write_text(json.dumps(manifest))
    argv[argv.index("--model") + 1] = str(untagged)
    assert main(argv) == 2
    assert "is a BertForQuestionAnswering, but task sst2 needs a ...ForSequenceClassification" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("change, message", [
    ({"--data-dir": "EMPTY"}, r"SQuAD dev file not found: neither .*empty.dev-v1.1.json"),
    ({"--doc-stride": "64"}, r"doc_stride must be an integer in \[1, max_seq_len\), got 64"),
    ({"--task": "sst2"}, "doc_stride applies to question answering only, not to task 'sst2'"),
    ({"--max-seq-len": "12", "--doc-stride": "4"}, "max_seq_len must be an integer >= 16 for task 'squad', got 12"),
])
def test_bad_squad_input_fails_before_any_model_work(change, message, tmp_path, squad_dir, minilm_path, capsys,
                                                     monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(pipeline, "load_task_model", refuse)
    (tmp_path / "empty").mkdir()
    argv = _squad_argv(squad_dir, minilm_path, tmp_path / "out")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = str(tmp_path / "empty") if value == "EMPTY" else value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrsparse compress: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_validate_requires_a_question_answering_window(tmp_path):
    def config(task, max_seq_len):
        return RecipeConfig.create(task, 0.5, str(tmp_path), max_seq_len=max_seq_len)

    config("squad", 16).validate()
    config("sst2", 8).validate()  # classification keeps its lower bound
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 16 for task 'squad', got 15"):
        config("squad", 15).validate()
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 8 for task 'sst2', got 7"):
        config("sst2", 7).validate()
