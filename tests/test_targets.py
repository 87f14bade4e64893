"""Target selection: exactly the encoder's attention and feed-forward projections, never heads or embeddings."""
from __future__ import annotations

import os

import pytest
from torch import nn
from transformers import (
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lrsparse.targets import TARGET_PATTERNS, find_targets
from pipeline_helpers import tiny_bert

BERT_BLOCK = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def expected_bert_targets(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}encoder.layer.{i}.{suffix}" for i in range(layers) for suffix in BERT_BLOCK]


def test_bert_targets_are_the_encoder_projections_in_module_order():
    model = tiny_bert()
    targets = find_targets(model)
    assert list(targets) == expected_bert_targets("bert.", 2)
    assert all(type(m) is nn.Linear for m in targets.values())
    assert targets["bert.encoder.layer.1.output.dense"] is model.bert.encoder.layer[1].output.dense


def test_roberta_classifier_dense_is_not_a_target():
    model = RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=100))
    targets = find_targets(model)
    assert list(targets) == expected_bert_targets("roberta.", 1)


def test_distilbert_targets():
    model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                                 vocab_size=100))
    names = list(find_targets(model))
    expected = [f"distilbert.transformer.layer.0.{s}" for s in
                ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"]]
    assert names == expected


def test_custom_patterns_select_only_matching_linears():
    model = tiny_bert()
    assert list(find_targets(model, [r"layer\.1\.intermediate\.dense$"])) == ["bert.encoder.layer.1.intermediate.dense"]


def test_errors_name_model_type_and_patterns():
    model = tiny_bert()
    with pytest.raises(ValueError, match="patterns"):
        find_targets(model, [r"no_such_module$"])
    with pytest.raises(TypeError, match="patterns"):
        find_targets(model, r"query$")
    model.config.model_type = "unknown-arch"
    with pytest.raises(ValueError, match="model_type 'unknown-arch'"):
        find_targets(model)
    with pytest.raises(ValueError, match="model_type"):
        find_targets(nn.Sequential(nn.Linear(2, 2)))


def test_replaced_layers_are_not_found_again():
    model = tiny_bert()
    model.bert.encoder.layer[0].attention.self.query = nn.Identity()
    names = find_targets(model)
    assert "bert.encoder.layer.0.attention.self.query" not in names and len(names) == 11


def test_real_minilm_has_36_targets(minilm_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = BertModel.from_pretrained(minilm_path)
    targets = find_targets(model)
    assert list(targets) == expected_bert_targets("", 6)
    sizes = {tuple(m.weight.shape) for m in targets.values()}
    assert sizes == {(384, 384), (1536, 384), (384, 1536)}
    assert set(TARGET_PATTERNS["bert"]) == set(TARGET_PATTERNS["roberta"])
    assert sum(m.weight.numel() for m in targets.values()) == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
