"""Sentence-embedding models as a compression task: a sentence-transformers folder in, the same embeddings out.

A sentence-transformers model is a transformer encoder followed by a pooling of its token states (mean, CLS or max)
and optionally an L2 normalization (``modules.json`` lists them). :class:`SentenceEmbeddingModel` is that stack as
one module, so the pipeline, the compressor and the exporters handle it like any task model: its forward returns
``sentence_embedding`` (and ``hidden_states`` on request); the encoder's linear layers are the compression targets.

:class:`EmbeddingTask` is the task the pipeline runs (``--task embedding``): there are no labels, so the training
signal is distillation from the dense model's embeddings (:class:`~lrsparse.distillation.Distiller` with the cosine
loss), on unlabelled sentences from a text file or a GLUE train split; the dev score is the Spearman correlation of
the cosine similarity of the STS-B dev pairs with their gold scores, as sentence-transformers'
``EmbeddingSimilarityEvaluator`` computes it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("lrsparse.embedding")

# Config attribute holding what follows the encoder: {"pooling": ..., "normalize": ..., "max_seq_length": ...}.
# Saved with every checkpoint and compressed model, so a model is rebuilt from its config alone.
EMBEDDING_KEY = "lrsparse_sentence_embedding"
# sentence-transformers' Pooling config flag of each supported mode.
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
GLUE_PREFIX = "glue:"


def _local_folder(source: str | os.PathLike) -> Path:
    """``source`` as a local folder: itself, or the hub snapshot of a model name."""
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as exc:  # offline, unknown repository: say what was expected
        raise ValueError(f"model {str(source)!r} is neither a local sentence-transformers folder nor a model on the "
                         f"hub that can be downloaded ({type(exc).__name__}: {exc})") from exc


def read_sentence_transformers(source: str | os.PathLike) -> dict[str, Any]:
    """The structure of a sentence-transformers folder: ``transformer`` (the encoder's folder), ``pooling``,
    ``normalize`` and ``max_seq_length``. Raises ValueError for a folder that is not one, or has modules beyond
    Transformer -> Pooling (mean, CLS or max) -> Normalize."""
    folder = _local_folder(source)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise ValueError(f"model {str(source)!r} is not a sentence-transformers folder: it has no modules.json "
                         "(task embedding needs one, e.g. the bundled all-MiniLM-L6-v2)")
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{modules_file} is not valid JSON: {exc}") from exc
    types = [m.get("type") for m in modules] if isinstance(modules, list) else None
    if not types or types[0] != TRANSFORMER_MODULE or len(types) < 2 or types[1] != POOLING_MODULE \
            or types[2:] not in ([], [NORMALIZE_MODULE]):
        raise ValueError(f"{modules_file} lists modules {types}; lrsparse supports "
                         f"[Transformer, Pooling] optionally followed by Normalize")
    transformer = folder / modules[0].get("path", "")
    settings: dict[str, Any] = {"transformer": transformer, "normalize": len(types) == 3, "max_seq_length": None}
    bert_config = transformer / "sentence_bert_config.json"
    if bert_config.is_file():
        settings["max_seq_length"] = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
    pooling_file = folder / modules[1].get("path", "") / "config.json"
    if not pooling_file.is_file():
        raise ValueError(f"{pooling_file} not found: the Pooling module of {folder} has no config")
    pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
    modes = [mode for mode, flag in POOLING_FLAGS.items() if pooling.get(flag)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v and k not in POOLING_FLAGS.values()]
    if len(modes) != 1 or others:
        raise ValueError(f"{pooling_file}: lrsparse supports exactly one of {list(POOLING_FLAGS.values())}, "
                         f"got {[k for k, v in pooling.items() if k.startswith('pooling_mode') and v]}")
    settings["pooling"] = modes[0]
    return settings


def transformer_folder(source: str | os.PathLike) -> str:
    """The folder of a model's encoder (config, weights, tokenizer): the Transformer module's folder of a
    sentence-transformers model, ``source`` itself for any other folder or hub name."""
    path = Path(source)
    if path.is_dir() and (path / "modules.json").is_file():
        return str(read_sentence_transformers(path)["transformer"])
    return str(source)


def pool(token_states: Tensor, attention_mask: Tensor | None, mode: str) -> Tensor:
    """One vector per sequence from its token states, over the real (unpadded) tokens, as sentence-transformers'
    Pooling computes it."""
    if attention_mask is None:
        attention_mask = token_states.new_ones(token_states.shape[:2])
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    if mode == "mean":
        return (token_states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if mode == "cls":
        return token_states[:, 0]
    if mode == "max":
        return token_states.masked_fill(mask == 0, torch.finfo(token_states.dtype).min).amax(1)
    raise ValueError(f"pooling mode must be one of {list(POOLING_FLAGS)}, got {mode!r}")


@functools.cache
def _embedding_output_class():
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class SentenceEmbeddingOutput(ModelOutput):
        loss: Tensor | None = None  # no labels: the training signal is distillation
        sentence_embedding: Tensor | None = None
        hidden_states: tuple[Tensor, ...] | None = None

    return SentenceEmbeddingOutput


class SentenceEmbeddingModel(nn.Module):
    """Encoder + pooling (+ L2 normalization): ``model(input_ids, attention_mask, ...)`` returns a ModelOutput with
    ``sentence_embedding``. ``config`` is the encoder's transformers config with the pooling settings under
    :data:`EMBEDDING_KEY`; ``encoder`` is the transformers model (its ``encoder.layer.N...`` linears are targets)."""

    def __init__(self, config, encoder: nn.Module | None = None):
        super().__init__()
        settings = getattr(config, EMBEDDING_KEY, None)
        if not isinstance(settings, dict) or settings.get("pooling") not in POOLING_FLAGS:
            raise ValueError(f"config has no valid {EMBEDDING_KEY} (pooling, normalize): not a sentence-embedding "
                             "model's config")
        if encoder is None:
            from transformers import AutoModel

            encoder = AutoModel.from_config(config)
        self.config = config
        self.encoder = encoder
        self.pooling = settings["pooling"]
        self.normalize = bool(settings["normalize"])

    @classmethod
    def from_config(cls, config) -> "SentenceEmbeddingModel":
        return cls(config)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        output_loading_info: bool = False, **ignored):
        """Loads a sentence-transformers folder (or hub name); with ``output_loading_info`` also returns the
        encoder's loading info (missing keys etc.), as transformers does."""
        from transformers import AutoModel

        settings = read_sentence_transformers(source)
        encoder, info = AutoModel.from_pretrained(settings["transformer"], dtype=dtype, output_loading_info=True)
        setattr(encoder.config, EMBEDDING_KEY, {k: settings[k] for k in ("pooling", "normalize", "max_seq_length")})
        model = cls(encoder.config, encoder)
        return (model, info) if output_loading_info else model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True):
        # No **kwargs: labels or other task inputs passed here are a mistake to report, not to drop.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        result = self.encoder(**inputs, output_hidden_states=output_hidden_states, return_dict=True)
        embedding = pool(result.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            embedding = F.normalize(embedding, p=2, dim=-1)
        return _embedding_output_class()(sentence_embedding=embedding,
                            hidden_states=result.hidden_states if output_hidden_states else None)


# ---------------------------------------------------------------------------------------------------------------
# Data: unlabelled training sentences, STS-B dev pairs
# ---------------------------------------------------------------------------------------------------------------
def read_sentences(source: str, data_dir: str | os.PathLike | None,
                   text_columns: tuple[str, ...] | None = None) -> tuple[list[str], str]:
    """The training sentences named by ``train_text``: a UTF-8 text file (one sentence per line, blank lines
    skipped), a table (CSV, TSV, JSON lines, Parquet or a save_to_disk folder: the distinct texts of its
    ``text_columns``, default sentence1 + sentence2, sentence or text), or ``glue:TASK``: every distinct sentence of
    that GLUE task's train split. Returns (sentences, where they came from)."""
    from lrsparse.data import load_glue
    from lrsparse.owndata import TABLE_SUFFIXES, DataSpec, read_table, text_columns_of

    if Path(source).suffix.lower() in TABLE_SUFFIXES or Path(source).is_dir():
        table = read_table(source, "train_text")
        columns = text_columns_of(table.column_names, DataSpec(train_file=source, text_columns=text_columns), source)
        texts = [text for column in columns for text in table[column] if isinstance(text, str)]
        sentences = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        if not sentences:
            raise ValueError(f"train_text {source!r}: its column(s) {list(columns)} hold no text")
        return sentences, f"{source} (column(s) {', '.join(columns)})"
    if text_columns is not None:
        raise ValueError(f"text_columns (--text-columns) names columns of a table; train_text {source!r} is not one "
                         f"(expected one of {sorted(TABLE_SUFFIXES)})")
    if source.startswith(GLUE_PREFIX):
        examples = load_glue(source[len(GLUE_PREFIX):], "train", data_dir)
        texts = examples.texts_a + (examples.texts_b or [])
        sentences = list(dict.fromkeys(t.strip() for t in texts if t.strip()))  # distinct, in file order
        return sentences, f"{examples.source} (train split)"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"train_text {source!r}: no such file (expected a UTF-8 text file with one sentence "
                                f"per line, or {GLUE_PREFIX}TASK for a GLUE task's train sentences)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"train_text {source!r} is not UTF-8 text ({exc})") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError(f"train_text {source!r} holds no sentences (one sentence per line expected)")
    return sentences, str(path)


class SentenceSplit:
    """Unlabelled sentences (the embedding task's training split)."""

    def __init__(self, sentences: list[str], source: str):
        self.sentences, self.source = sentences, source

    def __len__(self) -> int:
        return len(self.sentences)


def _tokenized(texts: Sequence[str], tokenizer, max_seq_len: int) -> list[dict[str, Tensor]]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_seq_len, padding=False)
    return [{key: torch.tensor(values[i], dtype=torch.long) for key, values in encoded.items()}
            for i in range(len(texts))]


class SentenceDataset(torch.utils.data.Dataset):
    """Sentences tokenized once (unpadded), no labels."""

    def __init__(self, sentences: Sequence[str], tokenizer, max_seq_len: int):
        self.sentences = list(sentences)
        self.features = _tokenized(self.sentences, tokenizer, max_seq_len)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.features[index]


class SimilarityDataset(SentenceDataset):
    """Sentence pairs with gold similarity scores: each distinct sentence is embedded once; ``pairs`` (N x 2) index
    the sentences of each pair, ``scores`` hold the gold scores."""

    def __init__(self, examples, tokenizer, max_seq_len: int):
        sentences = list(dict.fromkeys(examples.texts_a + examples.texts_b))
        index = {sentence: i for i, sentence in enumerate(sentences)}
        super().__init__(sentences, tokenizer, max_seq_len)
        self.pairs = torch.tensor([[index[a], index[b]] for a, b in zip(examples.texts_a, examples.texts_b)])
        self.scores = torch.tensor(examples.labels, dtype=torch.float64)


def similarity_metrics(embeddings: Tensor, pairs: Tensor, scores: Tensor) -> dict[str, float]:
    """Pearson and Spearman (main) correlation of the pairs' cosine similarity with the gold scores."""
    from lrsparse.metrics import pearson, spearman

    embeddings = embeddings.double()
    cosine = F.cosine_similarity(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], dim=-1)
    results = {"pearson_cosine": pearson(cosine, scores), "spearman_cosine": spearman(cosine, scores)}
    results["main"] = results["spearman_cosine"]
    return results


class EmbeddingTask:
    """Compress a sentence-transformers model: distill its sentence embeddings on unlabelled ``train_text``
    sentences, score STS-B dev (cosine similarity vs gold, Spearman)."""

    kind = "embedding"
    name = "embedding"
    main_metric = "spearman_cosine"
    min_seq_len = 8
    label_names: tuple[str, ...] = ()
    output_names = ("sentence_embedding",)
    eval_task = "stsb"

    def __init__(self, train_text: str | None = None, text_columns: tuple[str, ...] | None = None):
        self.train_text = train_text
        self.text_columns = text_columns

    def load(self, split: str, data_dir: str | os.PathLike | None, max_samples: int | None, seed: int):
        from lrsparse.data import load_glue, subsample_indices

        if split == "dev":
            return load_glue(self.eval_task, "dev", data_dir, max_samples, seed)
        if split != "train":
            raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
        if self.train_text is None:
            raise ValueError(f"task embedding needs train_text (--train-text FILE, or {GLUE_PREFIX}TASK for the "
                             "sentences of a GLUE task's train split): its training signal is distillation on "
                             "unlabelled sentences")
        sentences, source = read_sentences(self.train_text, data_dir, self.text_columns)
        sentences = self._without_dev_sentences(sentences, data_dir)
        if max_samples is not None and max_samples < len(sentences):
            sentences = [sentences[i] for i in subsample_indices(len(sentences), max_samples, seed)]
        return SentenceSplit(sentences, source)

    def _without_dev_sentences(self, sentences: list[str], data_dir) -> list[str]:
        """``sentences`` without those of the STS-B dev set: distilling on the evaluation sentences would make the
        dev score partly a training score (STS-B's train split itself repeats 249 of its dev captions)."""
        try:
            dev = self.load("dev", data_dir, None, 0)
        except (OSError, ValueError, ImportError):
            return sentences  # the dev split's own error surfaces when the pipeline loads it
        dev_sentences = set(dev.texts_a + dev.texts_b)
        kept = [s for s in sentences if s not in dev_sentences]
        if len(kept) < len(sentences):
            log.info("train_text: %d of %d sentences are STS-B dev sentences and are left out, so that the dev score "
                     "stays held out", len(sentences) - len(kept), len(sentences))
        if not kept:
            raise ValueError(f"train_text {self.train_text!r}: every sentence is an STS-B dev sentence; nothing is "
                             "left to train on")
        return kept

    def tokenize(self, examples, tokenizer, max_seq_len: int, doc_stride: int | None = None):
        if doc_stride is not None:
            raise ValueError("doc_stride applies to question answering only, not to task embedding")
        if isinstance(examples, SentenceSplit):
            return SentenceDataset(examples.sentences, tokenizer, max_seq_len)
        return SimilarityDataset(examples, tokenizer, max_seq_len)

    def auto_model_class(self):
        return SentenceEmbeddingModel

    def head_config(self) -> dict[str, Any]:
        return {}

    def has_trained_head(self, model_config) -> bool:
        # The "head" is the pooling: nothing to train, the dense model is the teacher as it is.
        return True

    def check_model(self, model: nn.Module, where: str) -> None:
        if not isinstance(model, SentenceEmbeddingModel):
            raise ValueError(f"model in {where} is a {type(model).__name__}, but task embedding needs a "
                             "sentence-embedding model (a sentence-transformers folder)")

    def metrics(self, outputs: dict[str, Sequence[Tensor]], dataset: SimilarityDataset) -> dict:
        return similarity_metrics(torch.cat(list(outputs["sentence_embedding"])), dataset.pairs, dataset.scores)
