"""``RecipeConfig``: the training recipe around the method (task, data, stages, optimizer, runtime).

A run is ``RecipeConfig`` + an :class:`~lrsparse.config.LPAFConfig` (``recipe.lpaf``, usually a preset of
``lrsparse.PRESETS`` picked by ``method``). Defaults, help and choices are declared once in the field metadata;
``lrsparse compress`` is generated from both dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lrsparse.config import PRESETS, LPAFConfig, _is_number, option
from lrsparse.modeling import check_precision, default_model, resolve_device
from lrsparse.owndata import CLASS_METRICS, PROBLEM_TYPES, REGRESSION_METRICS, TEXT_TASK, DataSpec
from lrsparse.tasks import TASK_NAMES, resolve_task

DENSE_FINETUNE_MODES = ("auto", "force", "skip")
NONFINITE_GRAD_MODES = ("skip", "error")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTILL_TEACHERS = ("dense", "pruned")


@dataclass
class RecipeConfig:
    """Everything that determines a compression run besides the method (all but the runtime group must match to
    --resume)."""

    output_dir: str = option(help="run folder (checkpoint/, model/, report.json)", cli="output", required=True)
    task: str | None = option(None, f"GLUE task, squad, embedding (a sentence-transformers model, distilled on "
                              f"--train-text, scored on STS-B dev), or {TEXT_TASK} (your own labelled text: implied "
                              f"by --train-file or --dataset): {', '.join(TASK_NAMES)}")
    method: str = option("lpaf", "preset of the method (lrsparse.PRESETS); the method's own flags override it",
                         choices=list(PRESETS))
    lpaf: LPAFConfig | None = option(None, "the method's options (default: the preset named by method)", cli=False)
    model: str = option(default_model(), "checkpoint folder or hub name (default: the bundled all-MiniLM-L6-v2)")
    data_dir: str | None = option(None, "folder with <TASK>/{train,dev}.tsv in the GLUE layout, or for squad the "
                                  "official dev-v1.1.json (+ train-v1.1.json; without it the dev articles are split "
                                  "80/20) (default: the hub)")
    train_file: str | None = option(None, "your own training data: a CSV, TSV, JSON / JSON lines or Parquet file "
                                    "(by extension) or a folder written by datasets' save_to_disk", group="data")
    validation_file: str | None = option(None, "your own dev data, same format and columns (default: a seeded "
                                         "hold-out of the training data, see --validation-split)", group="data")
    dataset: str | None = option(None, "your own data through datasets.load_dataset(NAME) (a hub name, or a local "
                                 "path: works offline); its validation split is the dev set when it has one",
                                 group="data")
    dataset_config: str | None = option(None, "the configuration name of --dataset", group="data")
    text_columns: list[str] | None = option(None, "one text column, or two for a text pair (default: sentence1 "
                                            "sentence2, sentence or text, whichever the data has)", group="data")
    label_column: str = option("label", "the label column: class names or integers (classes), or numbers (a "
                               "regression)", group="data")
    problem_type: str = option("auto", "auto: strings and integers are classes, decimals a regression",
                               choices=list(PROBLEM_TYPES), group="data")
    metric: str | None = option(None, "the main metric of your own data (default: accuracy, or pearson for a "
                                "regression)", choices=[*CLASS_METRICS, *REGRESSION_METRICS], group="data")
    validation_split: float = option(0.1, "fraction of the training data held out as the dev set when there is "
                                     "no --validation-file (the same rows for every --seed)", group="data")
    train_text: str | None = option(None, "task embedding: the unlabelled training sentences, a UTF-8 text file with "
                                    "one per line, a table (CSV, TSV, JSON lines, Parquet: the texts of its "
                                    "--text-columns), or glue:TASK for the sentences of a GLUE task's train split "
                                    "(from --data-dir)")
    max_train_samples: int | None = option(None, "seeded subset of the training set (default: all of it)")
    max_eval_samples: int | None = option(None, "seeded subset of the dev set (default: all of it)")
    epochs: float = option(3.0, "epochs of each training stage")
    dense_epochs: float | None = option(None, "override --epochs for dense fine-tuning")
    prune_epochs: float | None = option(None, "override --epochs for fine-tuning with pruning (no pruner: plain "
                                        "fine-tuning)")
    mixed_epochs: float | None = option(None, "override --epochs for mixed-rank fine-tuning")
    batch_size: int = option(32, "training batch size, global: a torchrun launch splits it across its ranks")
    eval_batch_size: int = option(64, "evaluation batch size")
    lr: float = option(1e-4, "peak AdamW learning rate of every stage")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm gains)")
    warmup_ratio: float = option(0.06, "fraction of each stage's steps of linear LR warm-up")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)")
    max_seq_len: int = option(128, "tokens per example (question answering: per window)")
    doc_stride: int | None = option(None, "squad: tokens shared by consecutive windows of a long context "
                                    "(default max-seq-len/4)")
    seed: int = option(0, "seed of data order, subsets, new heads and the factorization")
    distill_weight: float = option(0.0, "distillation from the dense fine-tuned model in the pruning and mixed-rank "
                                   "stages: weight of the loss on the teacher's outputs (soft targets; squared error "
                                   "for regression), the task loss gets 1 - weight (0: none)")
    distill_temperature: float = option(2.0, "softmax temperature of the teacher's soft targets")
    distill_hidden_weight: float = option(0.0, "weight of the layer-wise loss matching every layer's hidden states to "
                                          "the teacher's (relative squared error; 0: none)")
    distill_teacher: str = option("dense", "teacher of the mixed-rank stage: the dense fine-tuned model (also the "
                                  "pruning stage's) or the pruned model as it leaves the pruning stage",
                                  choices=list(DISTILL_TEACHERS))
    precision: str = option("fp32", "fp32, or mixed precision for training and evaluation: bf16 (autocast; master "
                            "weights, optimizer and importance state stay fp32) or fp16 (CUDA only, with a gradient "
                            "scaler)", choices=list(PRECISIONS))
    dense_finetune: str = option("auto", "auto: only when the checkpoint has no trained head for the task",
                                 choices=DENSE_FINETUNE_MODES)
    allow_random_head: bool = option(False, "allow --dense-finetune skip on a model without a trained head for the "
                                     "task (its scores then come from a random head)")
    # Runtime: not part of the run's identity, may differ on --resume.
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; 1 is faster on a busy "
                                 "machine)")
    resume: bool = option(False, "continue from the last checkpoint")
    overwrite: bool = option(False, "start over in an output folder that has a run")
    checkpoint_every: int = option(200, "also checkpoint every N optimizer steps inside the training stages (0: only "
                                   "after each stage)")
    nonfinite_grads: str = option("skip", "a training step with non-finite gradients is skipped (and counted) or "
                                  "an error", choices=NONFINITE_GRAD_MODES)
    tensorboard_dir: str | None = option(None, "write TensorBoard scalars (loss, density, alpha, dev metrics) to DIR",
                                         cli="tensorboard")

    OWN_DATA = ("train_file", "validation_file", "dataset", "dataset_config", "text_columns", "label_column",
                "problem_type", "metric", "validation_split")
    RESUME_FREE = ("device", "threads", "resume", "overwrite", "output_dir", "checkpoint_every", "nonfinite_grads",
                   "tensorboard_dir")

    def __post_init__(self) -> None:
        if self.task is None and (self.train_file is not None or self.dataset is not None):
            self.task = TEXT_TASK
        if self.method not in PRESETS:
            raise ValueError(f"method must be one of {list(PRESETS)}, got {self.method!r}")
        if self.lpaf is None:
            self.lpaf = PRESETS[self.method]
        elif not isinstance(self.lpaf, LPAFConfig):
            raise ValueError(f"lpaf must be an LPAFConfig, got {type(self.lpaf).__name__}")
        self.validate()

    @classmethod
    def create(cls, task: str, keep: float, output_dir: str, method: str = "lpaf", **options) -> "RecipeConfig":
        """A recipe from one flat set of options: LPAFConfig fields override the ``method`` preset (with ``keep``),
        the others are recipe fields."""
        method_fields = {f.name for f in dataclasses.fields(LPAFConfig)}
        overrides = {k: options.pop(k) for k in list(options) if k in method_fields}
        if method not in PRESETS:
            raise ValueError(f"method must be one of {list(PRESETS)}, got {method!r}")
        lpaf = PRESETS[method].replace(keep=keep, **overrides)
        return cls(task=task, output_dir=output_dir, method=method, lpaf=lpaf, **options)

    def train_text_columns(self) -> tuple[str, ...] | None:
        """task embedding: the columns of a --train-text table (other tasks: None; their columns are the data's)."""
        if self.task != "embedding" or self.text_columns is None:
            return None
        return tuple(self.text_columns)

    def data_spec(self) -> DataSpec | None:
        """How the user's own data is read (None for a GLUE task, squad or embedding)."""
        if self.task != TEXT_TASK:
            return None
        values = {name: getattr(self, name) for name in self.OWN_DATA}
        values["text_columns"] = None if self.text_columns is None else tuple(self.text_columns)
        return DataSpec(**values)

    @property
    def keep(self) -> float:
        return self.lpaf.keep

    def stage_epochs(self, stage: str) -> float:
        value = {"dense": self.dense_epochs, "prune": self.prune_epochs, "mixed_rank": self.mixed_epochs}[stage]
        return self.epochs if value is None else value

    def validate(self) -> None:
        """Raises ValueError naming the first bad option (cheap checks only: no files, no model)."""
        for name in ("output_dir", "model", "method", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("data_dir", "tensorboard_dir", "train_text"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        for name in ("resume", "overwrite", "allow_random_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm", "epochs", "distill_weight",
                     "distill_temperature", "distill_hidden_weight"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("dense_epochs", "prune_epochs", "mixed_epochs"):
            if getattr(self, name) is not None and not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number or None, got {getattr(self, name)!r}")
        self._validate_own_data()
        task = resolve_task(self.task, self.train_text, self.data_spec(), self.train_text_columns())
        self._validate_for_task(task)
        for name, choices in (("dense_finetune", DENSE_FINETUNE_MODES), ("nonfinite_grads", NONFINITE_GRAD_MODES),
                              ("precision", PRECISIONS), ("distill_teacher", DISTILL_TEACHERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("batch_size", "eval_batch_size"):
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
        for name in ("epochs", "dense_epochs", "prune_epochs", "mixed_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.stage_epochs("prune") <= 0:
            raise ValueError(f"prune_epochs must be > 0 (pruning needs training steps), got "
                             f"{self.stage_epochs('prune')!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        if self.distill_hidden_weight < 0:
            raise ValueError(f"distill_hidden_weight must be >= 0, got {self.distill_hidden_weight!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        check_precision(self.precision, resolve_device(self.device))
        if self.tensorboard_dir is not None:
            from lrsparse.scalars import summary_writer_class

            summary_writer_class(self.tensorboard_dir)

    def _validate_own_data(self) -> None:
        if self.task is None:
            raise ValueError(f"task is required: one of {', '.join(TASK_NAMES)} (--task), or your own data through "
                             "--train-file FILE or --dataset NAME")
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty string, got {self.task!r}")
        if self.task == TEXT_TASK:
            if self.train_file is None and self.dataset is None:
                raise ValueError(f"task {TEXT_TASK} reads your own data: pass --train-file FILE or --dataset NAME")
            if self.data_dir is not None:
                raise ValueError("data_dir (--data-dir) is the GLUE / SQuAD folder; your own data comes from "
                                 "--train-file / --validation-file or --dataset")
            return
        given = [name for name in self.OWN_DATA
                 if getattr(self, name) != RecipeConfig.__dataclass_fields__[name].default
                 and not (name == "text_columns" and self.task == "embedding")]  # the columns of --train-text
        if given:
            raise ValueError(f"{', '.join(given)} read your own data, which task {self.task!r} does not take: leave "
                             f"--task out (it becomes {TEXT_TASK})")

    def _validate_for_task(self, task) -> None:
        if task.kind != "embedding":
            if self.train_text is not None:
                raise ValueError(f"train_text applies to task embedding only, not to task {task.name!r} (its "
                                 "training data comes from data_dir)")
            return
        if not self.train_text:
            raise ValueError("task embedding needs train_text (--train-text FILE with one sentence per line, or "
                             "glue:TASK for a GLUE task's train sentences): it distills on unlabelled text")
        if self.dense_finetune == "force":
            raise ValueError("dense_finetune 'force' does not apply to task embedding: it has no labels; the dense "
                             "model is the teacher as it is")
        if self.distill_weight != 0.0:
            raise ValueError("distill_weight applies to labelled tasks: task embedding always trains on the "
                             "distillation of the dense model's sentence embeddings alone (leave it at 0; "
                             "distill_hidden_weight adds the layer-wise matching)")

    def identity(self) -> dict[str, Any]:
        """The options that determine the result (compared on --resume), per-stage epochs resolved."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in self.RESUME_FREE and f.name not in self.OWN_DATA and f.name != "lpaf"}
        if self.data_spec() is not None:  # only then: checkpoints of the other tasks keep their identity
            values["data"] = self.data_spec().to_dict()
        if self.train_text_columns() is not None:
            values["train_text_columns"] = list(self.train_text_columns())
        for stage, name in (("dense", "dense_epochs"), ("prune", "prune_epochs"), ("mixed_rank", "mixed_epochs")):
            values[name] = self.stage_epochs(stage)
        values.pop("epochs")
        values["lpaf"] = self.lpaf.to_dict()
        return values

    @property
    def distills(self) -> bool:
        """Whether the training stages distill from a frozen teacher (always for task embedding: its only signal)."""
        return (self.distill_weight > 0 or self.distill_hidden_weight > 0
                or resolve_task(self.task, self.train_text, self.data_spec(), self.train_text_columns()).kind == "embedding")

    def stage_names(self) -> list[str]:
        names = ["dense", "prune" if self.lpaf.prunes else "finetune"]
        return names + (["factorize", "mixed_rank"] if self.lpaf.factorizes else [])
