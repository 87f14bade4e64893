"""SQuAD v1.1: loading (hub or the official JSON), the offline split by article, tokenization into overlapping
windows with start/end token labels, and the span post-processing that turns logits back into answer text.

Local layout: ``<data_dir>/train-v1.1.json`` and ``<data_dir>/dev-v1.1.json`` (or the same files in
``<data_dir>/squad``), in the official format ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}]}]}]}]}``. When only the dev file is there (the usual offline case:
the official train file is 30 MB and rarely kept around), its articles are split by :func:`split_by_article`:
``ARTICLE_SPLIT_EVAL_FRACTION`` of the articles (seeded, independent of the run's seed so that every run scores on
the same questions) become the eval split and the rest the train split. Splitting by article rather than by question
keeps paragraphs, and near-duplicate questions about them, from appearing on both sides.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lrsparse.data import subsample_indices

__all__ = [
    "SquadExample",
    "SquadSplit",
    "read_squad_json",
    "split_by_article",
    "squad_files",
    "load_squad",
    "QuestionAnsweringDataset",
    "best_spans",
    "ARTICLE_SPLIT_EVAL_FRACTION",
    "ARTICLE_SPLIT_SEED",
]

SQUAD_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
ARTICLE_SPLIT_EVAL_FRACTION = 0.2
ARTICLE_SPLIT_SEED = 0
# Shortest window with room for a question, its context and the special tokens.
MIN_SEQ_LEN = 16
# Post-processing defaults of the reference implementations (BERT's run_squad.py, transformers' run_qa.py).
N_BEST = 20
MAX_ANSWER_TOKENS = 30


@dataclass(frozen=True)
class SquadExample:
    """One question about one paragraph; ``answers[i]`` starts at character ``answer_starts[i]`` of ``context``."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass
class SquadSplit:
    """The questions of one split, in file order."""

    split: str
    examples: list[SquadExample]
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def select(self, indices: Sequence[int]) -> "SquadSplit":
        return SquadSplit(self.split, [self.examples[i] for i in indices], self.source)

    def titles(self) -> set[str]:
        return {example.title for example in self.examples}

    def references(self) -> dict[str, tuple[str, ...]]:
        """Question id -> its ground-truth answers, as the SQuAD metrics take them."""
        return {example.id: example.answers for example in self.examples}


def _expect(value: Any, kind: type, where: str, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: expected {what} ({kind.__name__}), got {type(value).__name__} {value!r:.60}")
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to text no tokenizer takes
            raise ValueError(f"{where}: {what} holds an unpaired surrogate {value[exc.start]!r} at character "
                             f"{exc.start}") from None
    return value


def _parse_article(article: Any, where: str, seen_ids: set[str]) -> list[SquadExample]:
    _expect(article, dict, where, "an article object with 'title' and 'paragraphs'")
    title = _expect(article.get("title"), str, f"{where}.title", "the article title")
    paragraphs = _expect(article.get("paragraphs"), list, f"{where}.paragraphs", "a list of paragraphs")
    examples = []
    for p, paragraph in enumerate(paragraphs):
        p_where = f"{where}.paragraphs[{p}]"
        _expect(paragraph, dict, p_where, "a paragraph object with 'context' and 'qas'")
        context = _expect(paragraph.get("context"), str, f"{p_where}.context", "the paragraph text")
        for q, qa in enumerate(_expect(paragraph.get("qas"), list, f"{p_where}.qas", "a list of questions")):
            q_where = f"{p_where}.qas[{q}]"
            _expect(qa, dict, q_where, "a question object with 'id', 'question' and 'answers'")
            qid = _expect(qa.get("id"), str, f"{q_where}.id", "the question id")
            question = _expect(qa.get("question"), str, f"{q_where}.question", "the question text")
            answers = _expect(qa.get("answers"), list, f"{q_where}.answers", "a list of answers")
            if not answers:
                raise ValueError(f"{q_where} (id {qid}) has no answers; SQuAD v1.1 questions all have at least one")
            if qid in seen_ids:
                raise ValueError(f"{q_where}: question id {qid!r} appears twice")
            seen_ids.add(qid)
            texts, starts = [], []
            for a, answer in enumerate(answers):
                a_where = f"{q_where}.answers[{a}]"
                _expect(answer, dict, a_where, "an answer object with 'text' and 'answer_start'")
                text = _expect(answer.get("text"), str, f"{a_where}.text", "the answer text")
                start = _expect(answer.get("answer_start"), int, f"{a_where}.answer_start", "a character offset")
                if not text:
                    raise ValueError(f"{a_where}.text (id {qid}): the answer is empty; SQuAD v1.1 answers are "
                                     "non-empty spans of the context")
                if not 0 <= start <= len(context) - len(text):
                    raise ValueError(f"{a_where}.answer_start (id {qid}): {start} does not leave room for the "
                                     f"{len(text)}-character answer in the {len(context)}-character context")
                if context[start:start + len(text)] != text:
                    raise ValueError(f"{a_where} (id {qid}): answer {text!r} is not at character {start} of the "
                                     f"context (found {context[start:start + len(text)]!r})")
                texts.append(text)
                starts.append(start)
            examples.append(SquadExample(qid, title, context, question, tuple(texts), tuple(starts)))
    return examples


def read_squad_json(path: str | os.PathLike) -> list[SquadExample]:
    """Every question of an official-format SQuAD v1.1 JSON file; malformed content raises naming its position."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise ValueError(f"{path} is not valid JSON ({exc}); expected the official SQuAD v1.1 format") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid SQuAD JSON: its arrays/objects are nested too deeply to read; "
                         "expected the official SQuAD v1.1 format") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list of articles (the official SQuAD v1.1 "
                         "format)")
    seen_ids: set[str] = set()
    examples = [example for i, article in enumerate(payload["data"])
                for example in _parse_article(article, f"{path} data[{i}]", seen_ids)]
    if not examples:
        raise ValueError(f"{path} holds no questions")
    return examples


def split_by_article(examples: Sequence[SquadExample], eval_fraction: float = ARTICLE_SPLIT_EVAL_FRACTION,
                     seed: int = ARTICLE_SPLIT_SEED) -> tuple[list[SquadExample], list[SquadExample]]:
    """(train, eval): the questions of a seeded ``eval_fraction`` of the articles (at least one) go to eval.

    Articles are identified by title and shuffled from sorted order, so the split depends on the set of articles
    only, not on their order in the file; each side keeps file order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    titles = sorted({example.title for example in examples})
    if len(titles) < 2:
        raise ValueError(f"splitting by article needs at least 2 articles, got {len(titles)}")
    random.Random(seed).shuffle(titles)
    eval_count = min(len(titles) - 1, max(1, round(eval_fraction * len(titles))))
    eval_titles = set(titles[:eval_count])
    train = [example for example in examples if example.title not in eval_titles]
    evaluation = [example for example in examples if example.title in eval_titles]
    return train, evaluation


def squad_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The official SQuAD files present in ``data_dir`` (or its ``squad`` subfolder): split -> path.

    The dev file is required; the train file is optional (without it, the dev file is split by article).
    """
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / "squad"):
        if (folder / SQUAD_FILES["dev"]).is_file():
            return {split: folder / name for split, name in SQUAD_FILES.items() if (folder / name).is_file()}
    raise FileNotFoundError(
        f"SQuAD dev file not found: neither {data_dir / SQUAD_FILES['dev']} nor "
        f"{data_dir / 'squad' / SQUAD_FILES['dev']} exists (expected the official SQuAD v1.1 JSON files "
        f"{SQUAD_FILES['dev']} and optionally {SQUAD_FILES['train']} in data_dir)"
    )


def _load_local(split: str, data_dir: str | os.PathLike) -> SquadSplit:
    files = squad_files(data_dir)
    if "train" in files:
        return SquadSplit(split, read_squad_json(files[split]), str(files[split]))
    train, evaluation = split_by_article(read_squad_json(files["dev"]))
    source = (f"{files['dev']} split by article ({1 - ARTICLE_SPLIT_EVAL_FRACTION:.0%} train / "
              f"{ARTICLE_SPLIT_EVAL_FRACTION:.0%} eval, seed {ARTICLE_SPLIT_SEED})")
    return SquadSplit(split, train if split == "train" else evaluation, source)


def _load_hub(split: str) -> SquadSplit:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading SQuAD from the hub needs `pip install datasets` (or pass data_dir)") from exc
    hub_split = {"train": "train", "dev": "validation"}[split]
    try:
        rows = datasets.load_dataset("squad", split=hub_split)
    except Exception as exc:  # offline or hub errors: all mean "no data", say how to fix it
        raise ValueError(f"could not load squad from the hub ({type(exc).__name__}: {exc}); pass data_dir "
                         "(--data-dir) with the official SQuAD v1.1 JSON files instead") from exc
    examples = [
        SquadExample(row["id"], row["title"], row["context"], row["question"], tuple(row["answers"]["text"]),
                     tuple(int(s) for s in row["answers"]["answer_start"]))
        for row in rows
    ]
    if not examples:
        raise ValueError(f"hub squad {hub_split} has no rows")
    return SquadSplit(split, examples, f"hub squad {hub_split}")


def load_squad(split: str, data_dir: str | os.PathLike | None = None, max_samples: int | None = None,
               seed: int = 0) -> SquadSplit:
    """Questions of ``split`` ("train" or "dev") from the local JSON files in ``data_dir`` or, when it is None, the
    hub; ``max_samples`` keeps a seeded random subset of the questions, in file order."""
    if split not in SQUAD_FILES:
        raise ValueError(f"split {split!r} is not available for squad; expected one of {sorted(SQUAD_FILES)}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    examples = _load_hub(split) if data_dir is None else _load_local(split, data_dir)
    if max_samples is not None and max_samples < len(examples):
        examples = examples.select(subsample_indices(len(examples), max_samples, seed))
    return examples


def _answer_token_span(offsets: list[tuple[int, int]], sequence_ids: list[int | None], start_char: int,
                       end_char: int) -> tuple[int, int] | None:
    """First and last token of the window covering characters [start_char, end_char), or None when the answer is
    not entirely inside the window's context."""
    context = [i for i, sid in enumerate(sequence_ids) if sid == 1]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


class QuestionAnsweringDataset(torch.utils.data.Dataset):
    """Question + context windows of a :class:`SquadSplit` with start/end token labels.

    Each question is paired with its context truncated from the context side only; a context longer than the
    window continues in further windows that overlap the previous one by ``doc_stride`` tokens. A window's labels
    are the first and last token of the first ground-truth answer, or the [CLS] token when the answer is not
    entirely inside the window. ``feature_example[i]`` is the example index of window ``i`` and
    ``context_offsets[i][t]`` the (start, end) characters of its token ``t`` in the context, None for question and
    special tokens: the post-processing needs both to map token spans back to text.
    """

    label_names = ("start_positions", "end_positions")

    def __init__(self, examples: SquadSplit, tokenizer, max_seq_len: int = 384, doc_stride: int | None = None):
        if max_seq_len < MIN_SEQ_LEN:
            raise ValueError(f"max_seq_len must be at least {MIN_SEQ_LEN} tokens for question answering, "
                             f"got {max_seq_len}")
        doc_stride = max_seq_len // 4 if doc_stride is None else doc_stride
        if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 1:
            raise ValueError(f"doc_stride must be a positive integer, got {doc_stride!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"question answering needs a fast tokenizer (offset mappings); "
                             f"{type(tokenizer).__name__} is not one")
        # Leading spaces in some SQuAD questions only waste window tokens.
        questions = [example.question.lstrip() for example in examples.examples]
        self._check_room_for_context(tokenizer, questions, max_seq_len, doc_stride)
        encoded = tokenizer(questions, [example.context for example in examples.examples],
                            truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
        self.examples = examples
        self.features: list[dict[str, torch.Tensor]] = []
        self.feature_example: list[int] = []
        self.context_offsets: list[list[tuple[int, int] | None]] = []
        model_keys = [key for key in encoded.keys() if key not in ("offset_mapping", "overflow_to_sample_mapping")]
        for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
            example = examples.examples[example_index]
            sequence_ids = encoded.sequence_ids(i)
            offsets = encoded["offset_mapping"][i]
            start_char = example.answer_starts[0]
            span = _answer_token_span(offsets, sequence_ids, start_char, start_char + len(example.answers[0]))
            if span is None:
                cls_index = encoded["input_ids"][i].index(tokenizer.cls_token_id)
                span = (cls_index, cls_index)
            item = {key: torch.tensor(encoded[key][i], dtype=torch.long) for key in model_keys}
            item["start_positions"] = torch.tensor(span[0], dtype=torch.long)
            item["end_positions"] = torch.tensor(span[1], dtype=torch.long)
            self.features.append(item)
            self.feature_example.append(example_index)
            self.context_offsets.append([tuple(o) if sid == 1 else None for o, sid in zip(offsets, sequence_ids)])

    @staticmethod
    def _check_room_for_context(tokenizer, questions: list[str], max_seq_len: int, doc_stride: int) -> None:
        # The tokenizer needs more context tokens per window than the stride, or it cannot make progress.
        longest = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        room = max_seq_len - longest - specials
        if room <= doc_stride:
            raise ValueError(f"max_seq_len {max_seq_len} leaves {room} context tokens next to the longest question "
                             f"({longest} tokens), which must exceed doc_stride {doc_stride}: raise max_seq_len or "
                             "lower doc_stride")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.features[index]


def best_spans(dataset: QuestionAnsweringDataset, start_logits: Sequence[torch.Tensor],
               end_logits: Sequence[torch.Tensor], n_best: int = N_BEST,
               max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, str]:
    """Question id -> predicted answer text.

    ``start_logits[i]`` / ``end_logits[i]`` are the logits of window ``i`` (1-D, at least as long as the window;
    padding beyond it is ignored). Within each window the ``n_best`` highest start and end logits over context
    tokens are paired; pairs with the end before the start or longer than ``max_answer_tokens`` are skipped; the
    pair with the highest start + end logit over all windows of a question gives its answer, cut from the context
    by the tokens' character offsets. A question without any valid pair gets the empty answer.
    """
    if len(start_logits) != len(dataset) or len(end_logits) != len(dataset):
        raise ValueError(f"start_logits and end_logits need one row per window ({len(dataset)}), got "
                         f"{len(start_logits)} and {len(end_logits)}")
    if n_best < 1 or max_answer_tokens < 1:
        raise ValueError(f"n_best and max_answer_tokens must be positive, got {n_best} and {max_answer_tokens}")
    best: dict[int, tuple[float, str]] = {}
    for i, offsets in enumerate(dataset.context_offsets):
        length = len(offsets)
        starts, ends = (torch.as_tensor(row, dtype=torch.float64).reshape(-1) for row in (start_logits[i],
                                                                                          end_logits[i]))
        if starts.numel() < length or ends.numel() < length:
            raise ValueError(f"window {i} has {length} tokens but only {min(starts.numel(), ends.numel())} logits")
        is_context = torch.tensor([o is not None for o in offsets])
        starts = starts[:length].masked_fill(~is_context, -torch.inf)
        ends = ends[:length].masked_fill(~is_context, -torch.inf)
        k = min(n_best, int(is_context.sum()))
        top_starts = torch.topk(starts, k).indices
        top_ends = torch.topk(ends, k).indices
        span_tokens = top_ends[None, :] - top_starts[:, None] + 1
        scores = (starts[top_starts][:, None] + ends[top_ends][None, :]).masked_fill(
            (span_tokens < 1) | (span_tokens > max_answer_tokens), -torch.inf)
        flat = int(torch.argmax(scores))
        score = float(scores.reshape(-1)[flat])
        if not math.isfinite(score):  # no valid span in the window (or non-finite logits)
            continue
        s, e = int(top_starts[flat // k]), int(top_ends[flat % k])
        example_index = dataset.feature_example[i]
        if example_index not in best or score > best[example_index][0]:
            context = dataset.examples.examples[example_index].context
            best[example_index] = (score, context[offsets[s][0]:offsets[e][1]])
    return {example.id: best[j][1] if j in best else "" for j, example in enumerate(dataset.examples.examples)}
