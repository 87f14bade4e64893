"""Which nn.Linear layers of a transformer are compressed.

Only the encoder's attention projections and feed-forward layers are targets: embeddings, LayerNorm, the pooler and
every task head stay dense (they are small, or their outputs are directly supervised and fragile).
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

# Regexes matched (re.search) against the names of nn.Linear modules from model.named_modules(); each is anchored on
# the encoder block prefix so that heads such as RoBERTa's "classifier.dense" or BERT's "pooler.dense" never match.
_BERT_STYLE = [
    r"(^|\.)encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    r"(^|\.)encoder\.layer\.\d+\.attention\.output\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.intermediate\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
]

TARGET_PATTERNS: dict[str, list[str]] = {
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "camembert": _BERT_STYLE,
    "electra": _BERT_STYLE,
    "distilbert": [
        r"(^|\.)transformer\.layer\.\d+\.attention\.(q_lin|k_lin|v_lin|out_lin)$",
        r"(^|\.)transformer\.layer\.\d+\.ffn\.(lin1|lin2)$",
    ],
    "deberta-v2": [
        r"(^|\.)encoder\.layer\.\d+\.attention\.self\.(query_proj|key_proj|value_proj)$",
        r"(^|\.)encoder\.layer\.\d+\.attention\.output\.dense$",
        r"(^|\.)encoder\.layer\.\d+\.intermediate\.dense$",
        r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
    ],
}


def default_patterns(model: nn.Module) -> list[str]:
    """The TARGET_PATTERNS entry for ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(
            "model has no config.model_type: pass `patterns` (regexes over nn.Linear module names) explicitly"
        )
    if model_type not in TARGET_PATTERNS:
        raise ValueError(
            f"no default target patterns for model_type {model_type!r} (known: {sorted(TARGET_PATTERNS)}): "
            "pass `patterns` explicitly"
        )
    return TARGET_PATTERNS[model_type]


def find_targets(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """nn.Linear modules whose name matches any of ``patterns`` (default: by model type), in named_modules order.

    Only exact ``nn.Linear`` instances count, so layers already replaced by low-rank ones are not found again.
    """
    if patterns is None:
        patterns = default_patterns(model)
    if isinstance(patterns, str):
        raise TypeError(f"patterns must be a list of regex strings, got the single string {patterns!r}")
    patterns = list(patterns)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ValueError(f"patterns contains an invalid regex: {exc}") from exc
    found = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and any(c.search(name) for c in compiled)
    }
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"no nn.Linear module of the model (model_type {model_type!r}) matches patterns {patterns}"
        )
    return found
