"""End-to-end compression of a fine-tuned (or to-be-fine-tuned) transformer on the user's own labelled text, a GLUE
task or SQuAD, or of a sentence-embedding model (task embedding: distillation on unlabelled text). Launched by
torchrun, every training stage is data-parallel (``--batch-size`` global, split across the ranks).

The CLI recipe: a :class:`~lrsparse.recipe.RecipeConfig` (task, data, stages) around an
:class:`~lrsparse.config.LPAFConfig` (the method), driving one :class:`~lrsparse.compressor.Compressor` through
stages, each followed by an evaluation on the dev split and an atomic checkpoint (:mod:`lrsparse.checkpoint`):

1. ``dense``: fine-tunes the dense model when the checkpoint has no trained head for the task (else evaluates it).
2. ``prune`` (a config with a pruner: the cubic density schedule to ``keep``) or ``finetune`` (no pruner: the same
   number of plain fine-tuning steps, so every method gets the same training budget; statistics the factorizer
   needs, such as the Fisher diagonal, are collected meanwhile).
3. ``factorize``: ``compressor.factorize``: every target layer becomes U V. Its evaluation uses the low-rank path.
4. ``mixed_rank``: fine-tuning that moves from the sparse path to the low-rank one, ending low-rank.

A config without a factorizer (prune-only) stops after stage 2 and saves the sparse model. The result is saved with
:func:`lrsparse.io.save_compressed` in ``<output>/model`` and described in ``<output>/report.json``. Inside the
training stages a checkpoint is also taken every ``checkpoint_every`` steps, so ``--resume`` continues at that step;
every stage seeds the RNGs from (seed, stage index), so a resumed run repeats an uninterrupted one exactly (CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lrsparse.checkpoint import CHECKPOINT_FORMAT, CheckpointError, CheckpointStore, atomic_write_json, \
    config_differences
from lrsparse.compressor import Compressor, prepare
from lrsparse.data import PaddingCollator
from lrsparse.distillation import Distiller
from lrsparse.distributed import (check_same_across_ranks, gather_objects, is_distributed, is_main_process, rank,
                                  setup_from_launcher, shard_bounds, world_size)
from lrsparse.embedding import transformer_folder
from lrsparse.factorization import FactorizationError
from lrsparse.io import save_compressed
from lrsparse.modeling import (check_tokenizer_fits, count_parameters, has_fast_bf16, load_model_config,
                               load_task_model, resolve_device)
from lrsparse.recipe import RecipeConfig
from lrsparse.records import LayerRecord, rebuild_layers, records_of
from lrsparse.report import build_report, plot_report
from lrsparse.tasks import resolve_task
from lrsparse.training import evaluate, low_rank_only, seed_stage, steps_for, train

log = logging.getLogger("lrsparse.pipeline")

# Frozen teachers of the distillation objective, kept beside the checkpoint while the run needs them: a resumed stage
# must distill from the same teacher, and the run's states hold only the student's latest weights.
TEACHER_FILES = {"dense": "teacher_dense.safetensors", "pruned": "teacher_pruned.safetensors"}

# Called with (run, record) after every committed checkpoint (stage ends and intra-stage ones; ``record["step"]``
# is set for the latter): e.g. to copy the checkpoint elsewhere, or by tests to stop a run at a known point.
CHECKPOINT_OBSERVERS: list[Callable[["CompressionRun", dict], None]] = []


@dataclass
class _RunState:
    model: nn.Module
    compressor: Compressor | None = None
    training: dict | None = None  # the training loop's state of an intra-stage checkpoint to continue from


class CompressionRun:
    """One run of :func:`run_compression`; stage methods transform the run state and return extra record fields."""

    def __init__(self, config: RecipeConfig):
        config.validate()
        self.config = config
        self.lpaf = config.lpaf
        self.writer = None  # TensorBoard, opened by run() when config.tensorboard_dir is set
        self.task = resolve_task(config.task, config.train_text, config.data_spec(), config.train_text_columns())
        self.output_dir = Path(config.output_dir)
        self.store = CheckpointStore(self.output_dir)
        # Under torchrun: join the process group; every rank trains on its share of each global batch.
        launch = setup_from_launcher(config.device)
        self.device, self.backend = launch if launch is not None else (resolve_device(config.device), None)
        if config.batch_size % world_size():
            raise ValueError(f"batch_size {config.batch_size} is the global batch: it must be divisible by the "
                             f"{world_size()} ranks of this launch")
        self.stage_names = config.stage_names()
        self._check_output_dir()
        # Data errors surface here, before the model is touched.
        self.train_examples = self.task.load("train", config.data_dir, config.max_train_samples, config.seed)
        self.eval_examples = self.task.load("dev", config.data_dir, config.max_eval_samples, config.seed)
        self.data_description = self._describe_data()
        self.model_config = load_model_config(config.model)
        self.head_trained = self.task.has_trained_head(self.model_config)
        self.run_dense = config.dense_finetune == "force" or (config.dense_finetune == "auto"
                                                              and not self.head_trained)
        if config.dense_finetune == "skip" and not self.head_trained:
            if not config.allow_random_head:
                raise ValueError(f"--dense-finetune skip: model {config.model!r} has no trained {self.task.name} "
                                 "head, so every score would come from a randomly initialized head; use "
                                 "--dense-finetune auto, or pass --allow-random-head to do it anyway")
            log.warning("--dense-finetune skip on a model without a trained %s head: its head is random",
                        self.task.name)
        self._set_steps(len(self.train_examples))
        self._teachers: dict[str, nn.Module] = {}

    def _describe_data(self) -> dict | None:
        """Where the user's own examples came from and what their labels are (for the log and the report)."""
        spec = self.config.data_spec()
        if spec is None:
            return None
        labels = self.task.spec
        description = {"train": self.train_examples.source, "dev": self.eval_examples.source,
                       "problem_type": labels.problem_type, "labels": list(labels.label_values),
                       "main_metric": labels.main_metric, "holdout": spec.describe_holdout()}
        log.info("data: %d train examples from %s, %d dev examples from %s; %s", len(self.train_examples),
                 description["train"], len(self.eval_examples), description["dev"],
                 "a regression" if labels.is_regression else f"classes {description['labels']}")
        if description["holdout"]:
            log.info("%s", description["holdout"])
        return description

    def _set_steps(self, train_size: int) -> None:
        config = self.config
        self.steps = {
            "dense": steps_for(config.stage_epochs("dense"), train_size, config.batch_size) if self.run_dense else 0,
            "prune": max(1, steps_for(config.stage_epochs("prune"), train_size, config.batch_size)),
            "mixed_rank": steps_for(config.stage_epochs("mixed_rank"), train_size, config.batch_size),
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

        self.tokenizer = AutoTokenizer.from_pretrained(transformer_folder(self.config.model))
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
        structure = [LayerRecord.from_dict(r, f"checkpoint structure[{i}]")
                     for i, r in enumerate(json.loads(state["structure"]))]
        rebuild_layers(model, structure, where="checkpoint structure")
        model.load_state_dict(state["model"], strict=True)
        return model.to(self.device)

    def _compressor(self, model: nn.Module) -> Compressor:
        # The pipeline calibrates on a seeded training subset in eval mode (_calibration_batches), not on the forwards.
        return prepare(model, self.lpaf, self.steps["prune"], seed=self.config.seed, gather_calibration=False)

    # --------------------------------------------------------------------------------------------- stages
    def _train(self, state: _RunState, stage: str, steps: int, stage_seed: int, compressor=None,
               teacher: str | None = None) -> dict:
        """``train`` for the stage in progress, continuing ``state.training`` and checkpointing along the way;
        with distillation on, ``teacher`` names the frozen model the stage distills from."""
        resume, state.training = state.training, None
        save = None if self._save_progress is None else functools.partial(self._save_progress, state)
        distiller = self._distiller(teacher, state) if teacher is not None and self.config.distills else None
        stats = train(state.model, self.train_set, self.config, steps, stage_seed, stage, self.collate, self.device,
                      wrap=self._data_parallel if is_distributed() else None,
                      compressor=compressor, resume=resume, save_progress=save, writer=self.writer,
                      distiller=distiller)
        if distiller is not None:
            stats.update(teacher=teacher, teacher_seconds=distiller.teacher_seconds,
                         teacher_bytes=distiller.teacher_bytes)
        return stats

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over ``model`` (a new wrapper whenever the parameters change). Unused parameters
        are allowed: the embedding task never uses the encoder's pooler, the stochastic mixed-rank strategy one of a
        layer's two paths per forward."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def _check_launch(self) -> None:
        """Every rank of a data-parallel run must have the same options and the same tokenized data."""
        import hashlib

        if not is_distributed():
            return
        digest = hashlib.sha256()
        for dataset in (self.train_set, self.eval_set):
            for i in range(len(dataset)):
                for key, value in sorted(dataset[i].items()):
                    digest.update(key.encode() + value.numpy().tobytes())
        mine = {"config": self.config.identity(), "data": digest.hexdigest()}
        for other, theirs in enumerate(gather_objects(mine)):
            if theirs != mine:
                what = [key for key in mine if mine[key] != theirs[key]]
                details = config_differences(theirs["config"], mine["config"]) if "config" in what else []
                raise ValueError(f"rank {rank()} and rank {other} of this launch disagree on {' and '.join(what)}"
                                 + (f" ({'; '.join(details)})" if details else " (the input files differ)")
                                 + ": every rank must run the same command on the same files")

    def _calibration_batches(self, seed: int):
        """A seeded subset of ``calibration_samples`` training examples, in evaluation batches (None when the
        factorizer does not calibrate)."""
        if not self.lpaf.calibrates:
            return None
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_set), generator=generator)[:self.lpaf.calibration_samples].tolist()
        low, high = shard_bounds(len(order), rank(), world_size())  # data-parallel: the covariances are pooled
        order = order[low:high]
        size = self.config.eval_batch_size
        return [self.collate([self.train_set[i] for i in order[start:start + size]])
                for start in range(0, len(order), size)]

    # --------------------------------------------------------------------------------------------- teachers
    def _freeze_teacher(self, state: _RunState, kind: str) -> None:
        """The current model becomes the frozen teacher ``kind``, in memory and in the checkpoint folder."""
        teacher = copy.deepcopy(state.model).eval().requires_grad_(False)
        self._teachers = {kind: teacher}  # a teacher no later stage uses is freed
        if is_main_process():
            from safetensors.torch import save_model

            path = self.store.directory / TEACHER_FILES[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_model(teacher, str(partial))
            os.replace(partial, path)

    def _distiller(self, kind: str, state: _RunState) -> Distiller:
        teacher = self._teachers.get(kind)
        if teacher is None:  # a resumed stage: the teacher frozen when the stage first started
            from safetensors.torch import load_model

            path = self.store.directory / TEACHER_FILES[kind]
            if not path.is_file():
                raise CheckpointError(f"distillation teacher {path} is missing: the checkpoint cannot continue with "
                                      "distillation; rerun without --resume")
            teacher = self.task.auto_model_class().from_config(state.model.config)
            load_model(teacher, str(path), device=str(self.device))
            self._teachers = {kind: teacher.to(self.device)}
        if self.task.kind == "embedding":  # no labels: the teacher's embeddings are the whole training signal
            weight, output_loss = 1.0, "cosine"
        else:
            # From the task, not the model config: transformers sets problem_type only at a first forward with labels.
            regression = self.task.kind == "classification" and self.task.spec.is_regression
            weight, output_loss = self.config.distill_weight, "mse" if regression else "soft-targets"
        return Distiller(teacher, weight=weight, temperature=self.config.distill_temperature,
                         hidden_weight=self.config.distill_hidden_weight, outputs=self.task.output_names,
                         output_loss=output_loss)

    def _stage_dense(self, state: _RunState, stage_seed: int) -> dict:
        if self.steps["dense"] == 0:
            return {"trained": False, "steps": 0}
        stats = self._train(state, "dense", self.steps["dense"], stage_seed)
        return {"trained": True, **stats}

    def _stage_prune(self, state: _RunState, stage_seed: int) -> dict:
        # A resumed intra-stage checkpoint brings its compressor (with the pruner's state); otherwise a new one.
        if state.compressor is None:
            state.compressor = self._compressor(state.model)
            if self.config.distills:  # the stage starts from the dense fine-tuned model: it is the teacher
                self._freeze_teacher(state, "dense")
        name = "prune" if self.lpaf.prunes else "finetune"
        stats = self._train(state, name, self.steps["prune"], stage_seed, state.compressor, teacher="dense")
        density = state.compressor.density()
        return dict(stats, **({} if density is None else {"density": density}))

    def _stage_factorize(self, state: _RunState, stage_seed: int) -> dict:
        if self.config.distills and self.config.distill_teacher == "pruned":
            self._freeze_teacher(state, "pruned")
        try:
            records = state.compressor.factorize(total_steps=self.steps["mixed_rank"],
                                                 calibration=self._calibration_batches(stage_seed))
        except FactorizationError as error:
            # The prune checkpoint is intact: keep the failing inputs beside it and say how to continue.
            if is_main_process():
                error.save(self.store.directory / f"factorization_failure_{error.layer}.safetensors")
            error.hint = (f". The checkpoint of the previous stage in {self.store.directory} is kept: once the "
                          "cause is fixed, rerun the same command with --resume to continue from it")
            raise
        # Every rank factorizes every layer from the same pooled statistics: check that they agree.
        check_same_across_ranks([p for name, p in state.model.named_parameters() if name.endswith((".U", ".V"))],
                                "factors")
        return {"mean_relative_error": sum(r.relative_error for r in records) / max(1, len(records))}

    def _stage_mixed_rank(self, state: _RunState, stage_seed: int) -> dict:
        steps = self.steps["mixed_rank"]
        if steps == 0:
            state.compressor.convert()
            return {"steps": 0}
        stats = self._train(state, "mixed_rank", steps, stage_seed, state.compressor,
                            teacher=self.config.distill_teacher)
        state.compressor.convert()  # no-op when alpha reached 1 (blend_fraction < 1)
        return stats

    # --------------------------------------------------------------------------------------------- checkpoints
    def _state_payload(self, state: _RunState, training: dict | None = None) -> dict:
        return {
            "model_config": state.model.config.to_json_string(use_diff=False),
            "structure": json.dumps([r.to_dict() for r in records_of(state.model)]),
            "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
            "compressor": None if state.compressor is None else state.compressor.state_dict(),
            "training": training,
        }

    def _restore(self, stage_record: dict) -> _RunState:
        payload = self.store.load_state(stage_record)
        model = self._model_from_state(payload)
        state = _RunState(model=model, training=payload.get("training"))
        if payload["compressor"] is not None:
            # Unscheduled: the saved state brings its phase (and, in the pruning phase, its length).
            state.compressor = Compressor(model, self.lpaf, seed=self.config.seed, gather_calibration=False)
            state.compressor.load_state_dict(payload["compressor"])
        return state

    def _commit_progress(self, manifest: dict, index: int, name: str, state: _RunState, training: dict) -> None:
        """Commits an intra-stage checkpoint of stage ``index``: the run state plus the training loop's state."""
        step = training["counters"]["step"]
        record = {"name": name, "index": index, "step": step}
        self.store.commit(manifest, record, self._state_payload(state, training), in_progress=True)
        log.info("checkpoint: %s step %d", name, step)
        self._notify(record)

    def _notify(self, record: dict) -> None:
        for observer in CHECKPOINT_OBSERVERS:
            observer(self, record)

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
        self._check_launch()
        if manifest is not None and manifest.get("world_size", 1) != world_size():
            raise CheckpointError(f"--resume: the checkpoint in {self.output_dir} was made by "
                                  f"{manifest.get('world_size', 1)} process(es), this launch has {world_size()}: "
                                  "resume with the same number")
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
            targets = Compressor(state.model, self.lpaf, gather_calibration=False).targets  # what the method will compress, for the counts
            dense = count_parameters(state.model, list(targets), sparse=False)
            manifest = {"format_version": CHECKPOINT_FORMAT, "config": config.identity(), "dense_params": dense,
                        "stages": [], "completed": False, "world_size": world_size()}
        log.info("task %s, method %s, keep %.3f, %d train / %d eval examples, steps %s, device %s",
                 self.task.name, config.method, config.keep, len(self.train_set), len(self.eval_set),
                 {k: v for k, v in self.steps.items() if k != "finetune"}, self.device)

        if config.precision == "bf16" and not has_fast_bf16(self.device):
            from lrsparse.modeling import cpu_bf16_gemm_speedup

            log.warning("precision bf16: this CPU multiplies bf16 matrices %.2fx as fast as fp32 (measured now), so "
                        "bf16 training is slower here than fp32 (an Intel Xeon with avx512_bf16 but no AMX: 1.5x "
                        "slower per all-mpnet-base-v2 step; AVX2 only: 16x, benchmarks/results/training_cpu.md); use "
                        "--precision fp32", cpu_bf16_gemm_speedup())
        stage_functions = {"dense": self._stage_dense, "prune": self._stage_prune, "finetune": self._stage_prune,
                           "factorize": self._stage_factorize, "mixed_rank": self._stage_mixed_rank}
        for index in range(len(manifest["stages"]), len(self.stage_names)):
            name = self.stage_names[index]
            stage_seed = seed_stage(config.seed, index)
            t0 = time.perf_counter()
            self._save_progress = functools.partial(self._commit_progress, manifest, index, name)
            extra = stage_functions[name](state, stage_seed)
            self._save_progress = None
            train_seconds = time.perf_counter() - t0
            with low_rank_only(state.model):
                metrics = evaluate(state.model, self.eval_set, self.task, config.eval_batch_size, self.collate,
                                   self.device, desc=f"eval {name}", precision=config.precision)
            seconds = time.perf_counter() - t0
            log.info("stage %s done in %.1f s (%.1f s before evaluation): %s", name, seconds, train_seconds,
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            for metric, value in metrics.items():  # x axis: the stage index
                self._scalar(f"eval/{metric}", value, index)
            record = {"name": name, "index": index, "metrics": metrics, "seconds": seconds, **extra}
            self.store.commit(manifest, record, self._state_payload(state))
            self._notify(record)

        return self._finish(state, manifest, time.perf_counter() - started)

    def _finish(self, state: _RunState, manifest: dict, seconds: float) -> dict:
        compressor = state.compressor
        self.model = state.model
        records = compressor.records
        compressed = count_parameters(state.model, [r.name for r in records], sparse=not self.lpaf.factorizes)
        report = build_report(self.config, manifest, records, compressed, checkpoint_bytes=0,
                              head_trained=self.head_trained, train_examples=len(self.train_examples),
                              eval_examples=len(self.eval_examples), steps=self.steps)
        model_dir = self.output_dir / "model"
        report["checkpoint_bytes"] = save_compressed(
            state.model.cpu(), model_dir, tokenizer=self.tokenizer, config=self.lpaf, records=records,
            extra={"task": self.task.name, "method": self.config.method,
                   **{name: getattr(self.config, name) for name in EVALUATION_SETTINGS},
                   **({} if self.config.data_spec() is None else {"data": self.config.data_spec().to_dict()})})
        report["run_seconds"] = seconds
        report["distributed"] = {"world_size": world_size(), "backend": self.backend,
                                 "global_batch": self.config.batch_size,
                                 "per_rank_batch": self.config.batch_size // world_size()}
        if self.data_description is not None:
            report["data"] = self.data_description
        if not is_main_process():  # rank 0 writes the report and the manifest
            return report
        atomic_write_json(self.output_dir / "report.json", report)
        manifest["completed"] = True
        atomic_write_json(self.store.manifest_path, manifest)
        # The saved model supersedes the last stage's state; the manifest keeps every stage's record.
        self.store.remove_states()
        for filename in TEACHER_FILES.values():
            (self.store.directory / filename).unlink(missing_ok=True)
        log.info("saved %s (%d bytes) and %s", model_dir, report["checkpoint_bytes"], self.output_dir / "report.json")
        _write_report_plot(report, self.output_dir / "report.png")
        return report


def _write_report_plot(report: dict, path: Path) -> None:
    # The plot is a convenience: a run whose model and report.json are saved must not fail over it.
    try:
        plot_report(report, path)
    except ImportError as exc:
        log.warning("report plot skipped (matplotlib unavailable: %s)", exc)


def run_compression(config: RecipeConfig) -> dict:
    """Runs (or with ``config.resume`` continues) the compression pipeline; returns the report dict."""
    return CompressionRun(config).run()


# Settings of a run that change its dev scores: saved with the model so that `evaluate` scores it the same way.
EVALUATION_SETTINGS = ("max_seq_len", "doc_stride", "seed")


def finetune_dense(config: RecipeConfig, directory: str | os.PathLike) -> dict:
    """Fine-tunes ``config.model`` densely on ``config.task`` (its dense epochs) and saves it as a plain
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
                           desc="eval dense", precision=config.precision)
    directory = Path(directory)
    if not is_main_process():
        return metrics
    state.model.cpu().save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
    atomic_write_json(directory / "dense_metrics.json", {"metrics": metrics, "seconds": time.perf_counter() - t0,
                                                          "train_examples": len(run.train_examples),
                                                          "eval_examples": len(run.eval_examples)})
    return metrics
