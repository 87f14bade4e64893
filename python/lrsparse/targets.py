"""Which linear layers of a transformer are compressed.

Only the blocks' attention projections and feed-forward layers are targets: embeddings, norms, the pooler and every
task or language-model head stay dense (they are small, or their outputs are directly supervised and fragile).

Targets are ``nn.Linear`` modules, or the ``Conv1D`` layers of GPT-2 (transformers.pytorch_utils.Conv1D:
``y = x W + b`` with ``W`` stored transposed, ``in x out``). Pruning works on a target's weight in its stored layout;
factorization and loading use :func:`out_in_weight` / :func:`linear_shape` to see every target as ``out x in``.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import Tensor, nn

# Regexes matched (re.search) against the names of nn.Linear modules from model.named_modules(); each is anchored on
# the encoder block prefix so that heads such as RoBERTa's "classifier.dense" or BERT's "pooler.dense" never match.
_BERT_STYLE = [
    r"(^|\.)encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    r"(^|\.)encoder\.layer\.\d+\.attention\.output\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.intermediate\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
]

# Llama-style decoders (grouped-query attention: k/v_proj may be narrower than q_proj; the patterns do not care).
_LLAMA_STYLE = [
    r"(^|\.)layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    r"(^|\.)layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)$",
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
    "mpnet": [
        r"(^|\.)encoder\.layer\.\d+\.attention\.attn\.(q|k|v|o)$",
        r"(^|\.)encoder\.layer\.\d+\.intermediate\.dense$",
        r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
    ],
    # ModernBERT fuses q, k, v into Wqkv and its GLU's input and gate into mlp.Wi.
    "modernbert": [
        r"(^|\.)layers\.\d+\.attn\.(Wqkv|Wo)$",
        r"(^|\.)layers\.\d+\.mlp\.(Wi|Wo)$",
    ],
    # GPT-2 blocks are transformer.h.N; its layers are Conv1D (see module docstring).
    "gpt2": [
        r"(^|\.)h\.\d+\.attn\.(c_attn|c_proj)$",
        r"(^|\.)h\.\d+\.mlp\.(c_fc|c_proj)$",
    ],
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
}


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain nn.Linear models
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a transformers Conv1D (a linear layer with its weight stored ``in x out``)."""
    conv1d = _conv1d_class()
    return conv1d is not None and type(module) is conv1d


def is_target_layer(module: nn.Module) -> bool:
    """Exactly nn.Linear or transformers Conv1D (subclasses such as the low-rank layers do not count)."""
    return type(module) is nn.Linear or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an nn.Linear or a Conv1D."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    raise TypeError(f"module must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def out_in_weight(module: nn.Module, tensor: Tensor | None = None) -> Tensor | None:
    """``tensor`` (default: the module's weight), laid out like that weight, as an ``out x in`` view.

    Also for per-entry statistics of the weight (masks, importance, Fisher) that were kept in its stored layout.
    """
    if not is_target_layer(module):
        raise TypeError(f"module must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
    tensor = module.weight if tensor is None else tensor
    if tensor is None or not is_conv1d(module):
        return tensor
    return tensor.t()


def _linear_names(model: nn.Module, most: int = 12) -> str:
    """The model's linear layer names, the first ``most`` and a count: what a user needs to write a pattern."""
    names = [name for name, module in model.named_modules() if is_target_layer(module)]
    shown = ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
    return shown or "none"


def default_patterns(model: nn.Module) -> list[str]:
    """The TARGET_PATTERNS entry for ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGET_PATTERNS:
        known = "no config.model_type" if model_type is None else f"no default targets for model_type {model_type!r}"
        raise ValueError(
            f"{known} (known: {', '.join(sorted(TARGET_PATTERNS))}): pass --targets (LPAFConfig.targets, or "
            "`targets=` in Python) with regexes over the names of the linear layers to compress, e.g. the blocks' "
            f"attention and feed-forward layers; the model's linear layers are: {_linear_names(model)}"
        )
    return TARGET_PATTERNS[model_type]


def find_targets(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Linear modules whose name matches any of ``patterns`` (default: by model type), in named_modules order.

    Only exact ``nn.Linear`` (or transformers ``Conv1D``) instances count, so layers already replaced by low-rank
    ones are not found again.
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
        if is_target_layer(module) and any(c.search(name) for c in compiled)
    }
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"no nn.Linear or Conv1D module of the model (model_type {model_type!r}) matches patterns {patterns}"
        )
    return found
