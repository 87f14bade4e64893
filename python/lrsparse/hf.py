"""LPAF inside ``transformers.Trainer``: one callback driving a :class:`~lrsparse.compressor.Compressor`, one
``Trainer.train()`` per phase::

    compressor = lrsparse.prepare(model, lrsparse.PRESETS["lpaf"].replace(keep=0.25))  # no total_steps: see below
    callback = CompressorCallback(compressor)
    pruning = Trainer(model=model, args=..., callbacks=[callback])
    pruning.train()                                                 # phase 1: fine-tuning while pruning
    compressor.factorize(calibration=pruning.get_train_dataloader())  # targets -> U V beside the sparse path
    Trainer(model=model, args=..., callbacks=[callback]).train()    # phase 2 in a NEW Trainer: mixed-rank
    lrsparse.save_compressed(model, "out/", config=compressor.config, records=compressor.records)

``on_train_begin`` calls ``compressor.schedule(state.max_steps)``: a phase lasts the Trainer's max_steps. The same
callback may drive both phases (or give the second Trainer a new ``CompressorCallback(compressor)``). factorize()
puts new parameters (U, V) in the model, so phase 2 needs a new Trainer: it builds its optimizer (and learning-rate
schedule) from the factorized model when ``train()`` starts; the callback checks that it holds every U and V.

Where the compressor steps. In transformers 5.x each optimizer step of ``Trainer`` is::

    backward (DDP all-reduces the gradients on the last micro-batch) -> clip_grad_norm_ -> on_pre_optimizer_step
    -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> model.zero_grad() -> global_step += 1
    -> on_step_end

``on_optimizer_step`` is the only hook that sees the updated weights while the gradients are still there, which is
exactly the plain loop's ``optimizer.step(); compressor.step(); optimizer.zero_grad()``: importance is read from the
(clipped, all-reduced) gradients there and the masks are re-applied to the freshly updated weights; in phase 2 the
alpha schedule advances there, and the sparse weights leave the Trainer's optimizer when alpha reaches 1.
``on_step_end`` (gradients already zeroed) only verifies that this happened.

Loud failures rather than silent no-ops: a target that cannot get a gradient, an optimizer that does not hold the
target weights or the factors, ``on_optimizer_step`` not firing, importance that stays zero up to a mask update,
a live count that differs from the schedule's (a skipped mask update), pruned weights that became nonzero, a second
run of the same phase (e.g. phase 2 without ``compressor.factorize()``), and at the end of a run a density that is
not reached, a sparse path still in the model, or (``check_budget``) factors over ``keep`` times the parameters of
the original matrices all raise RuntimeError/ValueError with the reason.

Under DDP (``torchrun``), each rank runs the same callback on the same all-reduced gradients and so computes the same
masks; :func:`lrsparse.distributed.check_same_across_ranks` verifies it at each mask update. Only rank 0 writes
TensorBoard events. Phase 2 drops the sparse weights from the model when alpha reaches 1; DDP then sees parameters
without gradients, which ``find_unused_parameters`` (Trainer's default for transformers models) handles.

Distillation: :class:`DistillationTrainer` is a ``Trainer`` whose training loss is a
:class:`~lrsparse.distillation.Distiller`'s objective (evaluation keeps the task loss)::

    teacher = copy.deepcopy(model)  # the dense fine-tuned model, before phase 1
    DistillationTrainer(model=model, args=..., callbacks=[callback], distiller=lrsparse.Distiller(teacher)).train()

TensorBoard (``tensorboard_dir``): ``pruning/density``, ``pruning/scheduled_density``, ``mixed_rank/alpha``,
``<phase>/train/<logged value>`` (loss, learning rate, ...), ``<phase>/eval/<metric>`` (phase: pruning, mixed_rank).
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

from transformers import Trainer, TrainerCallback

from lrsparse.compressor import Compressor
from lrsparse.distillation import Distiller
from lrsparse.layers import LowRankLinear, MixedRankLinear
from lrsparse.scalars import open_summary_writer, summary_writer_class

log = logging.getLogger("lrsparse.hf")

TAGS = {"prune": "pruning", "mixed_rank": "mixed_rank"}  # compressor phase -> TensorBoard tag prefix


def _optimizer_parameter_ids(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def low_rank_parameter_budget(shapes: Iterable[tuple[int, int]], keep: float) -> int:
    """Parameters the factors may use at ``keep``: ``floor(keep * sum(m * n))`` over the target matrices."""
    return int(keep * sum(m * n for m, n in shapes))


class CompressorCallback(TrainerCallback):
    """Drives ``compressor`` through the ``Trainer.train()`` of its current phase (see the module docstring).

    ``tensorboard_dir``: write the scalars there (rank 0). ``check_budget``: the factors must fit
    ``compressor.config.keep`` times the parameters of the original matrices, checked at the start and the end of
    phase 2 (the "budget" rank allocation gives a matrix pruned below ``m + n`` entries ``min_rank``, which can
    exceed it on tiny models; "uniform" fits it).
    """

    def __init__(self, compressor: Compressor, *, tensorboard_dir: str | None = None,
                 check_budget: bool = False) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a lrsparse Compressor (lrsparse.prepare(model, config)), got "
                            f"{type(compressor).__name__}")
        if tensorboard_dir is not None:
            summary_writer_class(tensorboard_dir)  # a missing TensorBoard fails here, before any training
        self.compressor = compressor
        self.tensorboard_dir = tensorboard_dir
        self.check_budget = bool(check_budget)
        self.writer = None
        self.phase: str | None = None  # the phase of the current (or last) Trainer run: "prune" or "mixed_rank"
        self.phases_run: list[str] = []
        self.steps = 0  # on_optimizer_step calls in the current run
        self.ranks: dict[str, int] = {}
        self._optimizer = None

    # ------------------------------------------------------------------------------------------------ begin
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        compressor = self.compressor
        phase = compressor.phase
        if phase == "done":
            raise RuntimeError("the compressor is done (converted to low rank): no phase left for CompressorCallback; "
                               "call compressor.factorize() without total_steps so that the Trainer run sets the "
                               "mixed-rank phase's length")
        if phase in self.phases_run:
            hint = ("call compressor.factorize() before the mixed-rank Trainer run" if phase == "prune"
                    else "one Trainer.train() per phase")
            raise RuntimeError(f"this CompressorCallback already ran the {phase!r} phase: {hint}")
        if phase == "prune" and getattr(compressor.pruner, "step_count", 0) > 0:
            raise RuntimeError(f"the compressor's pruning phase already ran {compressor.pruner.step_count} steps: "
                               "call compressor.factorize() before the mixed-rank Trainer run")
        if state.global_step != 0:
            raise RuntimeError(
                f"CompressorCallback cannot resume from a Trainer checkpoint (global_step {state.global_step}): "
                "the compressor's state is not part of Trainer checkpoints; run the phase from its start"
            )
        if optimizer is None:
            raise RuntimeError("CompressorCallback: Trainer passed no optimizer to on_train_begin")
        if model is not compressor.model and not any(m is compressor.model for m in model.modules()):
            raise ValueError("the Trainer's model is not the model the compressor was prepared on")
        self.phase, self.steps, self._optimizer = phase, 0, optimizer
        if phase == "prune":
            self._begin_pruning(state, optimizer)
        else:
            self._begin_mixed_rank(args, state, optimizer)
        self.phases_run.append(phase)  # only once the checks passed: a refused run may be retried
        if self.writer is None:
            self.writer = open_summary_writer(self.tensorboard_dir)

    def _begin_pruning(self, state, optimizer) -> None:
        compressor = self.compressor
        compressor.schedule(state.max_steps)
        pruner = compressor.pruner
        if pruner is None:
            log.info("no pruning stage in this config: plain fine-tuning for %d steps", state.max_steps)
            return
        trained = _optimizer_parameter_ids(optimizer)
        for name, module in compressor.targets.items():
            if not module.weight.requires_grad:
                raise ValueError(f"target {name!r} has requires_grad=False: no gradient reaches it, so it has no "
                                 "importance to prune by (unfreeze it or leave it out of targets)")
            if id(module.weight) not in trained:
                raise ValueError(f"target {name!r}: its weight is not in the Trainer's optimizer, which must "
                                 "update the weights it prunes")
        log.info("pruning %d target matrices to density %.4f over %d steps (%s)", len(compressor.targets),
                 compressor.config.keep if compressor.config.prunes else 1.0, state.max_steps,
                 type(pruner).__name__)

    def _begin_mixed_rank(self, args, state, optimizer) -> None:
        compressor, config = self.compressor, self.compressor.config
        mixed = {n: m for n, m in compressor.model.named_modules() if isinstance(m, MixedRankLinear)}
        if not mixed:
            raise ValueError("model has no MixedRankLinear layer: it was converted to low rank outside the "
                             "compressor; run the mixed-rank phase right after compressor.factorize()")
        trained = _optimizer_parameter_ids(optimizer)
        for name, module in mixed.items():
            if id(module.U) not in trained or id(module.V) not in trained:
                raise RuntimeError(
                    f"the optimizer does not hold the factors U, V of {name!r}: it was created before "
                    "compressor.factorize(); run the mixed-rank phase with a new Trainer (it builds its optimizer "
                    "from the factorized model when train() starts)"
                )
        if self.check_budget:
            self._check_budget({name: (m.out_features, m.in_features, m.rank) for name, m in mixed.items()})
        if args.world_size > 1 and args.ddp_find_unused_parameters is False and (
                config.mixed_rank == "none" or config.blend_fraction < 1.0):
            raise ValueError("ddp_find_unused_parameters=False: the sparse weights are dropped mid-run when alpha "
                             "reaches 1 and DDP would wait for their gradients; leave it unset (or True)")
        self.ranks = {name: m.rank for name, m in mixed.items()}
        # The optimizer too: a schedule that is low-rank from the start drops the sparse weights from it at once.
        compressor.schedule(state.max_steps, optimizer)

    def _check_budget(self, layers: Mapping[str, tuple[int, int, int]]) -> None:
        keep = self.compressor.config.keep
        used = sum(r * (m + n) for m, n, r in layers.values())
        budget = low_rank_parameter_budget([(m, n) for m, n, _ in layers.values()], keep)
        if used > budget:
            raise ValueError(f"rank budget exceeded: the factors hold {used} parameters, keep={keep} allows {budget}")

    # ------------------------------------------------------------------------------------------------ steps
    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.phase is None:
            raise RuntimeError("CompressorCallback: on_optimizer_step before on_train_begin")
        self.steps += 1
        if self.phase == "mixed_rank":
            self.compressor.step(self._optimizer)
            return
        self.compressor.step()
        pruner = self.compressor.pruner
        if hasattr(pruner, "is_mask_step") and hasattr(pruner, "scores") and pruner.is_mask_step(pruner.step_count) \
                and not any(bool(pruner.scores(name).ne(0).any()) for name in pruner.targets):
            raise RuntimeError(
                f"importance is zero in every target at mask step {pruner.step_count} "
                f"({getattr(pruner, 'nonfinite_steps', 0)} non-finite steps skipped): no gradient reached the "
                "target layers, so the masks would be arbitrary; check that the loss depends on them and that "
                "gradients are finite"
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps != state.global_step:
            raise RuntimeError(
                f"CompressorCallback: {self.steps} on_optimizer_step calls for {state.global_step} optimizer steps; "
                "the Trainer did not call on_optimizer_step after each optimizer step (transformers 5.x does, right "
                "after optimizer.step(); a custom training loop must call callback_handler.on_optimizer_step)"
            )
        if self.phase == "mixed_rank":
            alpha = self.compressor.alpha
            self._scalar("mixed_rank/alpha", 1.0 if alpha is None else alpha, state.global_step)
            return
        pruner = self.compressor.pruner
        if pruner is None:
            return
        if hasattr(pruner, "scheduled_live_count"):
            expected, live = pruner.scheduled_live_count(), pruner.live_count()
            if live != expected:
                raise RuntimeError(
                    f"scheduled mask update skipped: after step {pruner.step_count} {live} weights are alive, the "
                    f"schedule says {expected} (density {expected / pruner.total_params:.6f})"
                )
        masks = pruner.masks
        for name, module in self.compressor.targets.items():
            if bool(module.weight.detach().masked_select(masks[name].logical_not()).any()):
                raise RuntimeError(f"pruned weights of target {name!r} are nonzero after optimizer step "
                                   f"{state.global_step}: the masks were not re-applied")
        self._scalar("pruning/density", pruner.density(), state.global_step)
        if hasattr(pruner, "scheduled_density"):
            self._scalar("pruning/scheduled_density", pruner.scheduled_density(), state.global_step)

    # ------------------------------------------------------------------------------------------------ end
    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        if self.phase == "prune":
            self._end_pruning()
        elif self.phase == "mixed_rank":
            self._end_mixed_rank()

    def _end_pruning(self) -> None:
        compressor = self.compressor
        pruner = compressor.pruner
        if pruner is None:
            return
        nonfinite = getattr(pruner, "nonfinite_steps", 0)
        if self.steps == 0 or self.steps == nonfinite:
            raise RuntimeError(f"importance was never accumulated ({self.steps} pruner steps, {nonfinite} of them "
                               "with non-finite gradients): the model was not pruned")
        masks = pruner.masks.values()
        total, live = sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)
        if hasattr(pruner, "scheduled_live_count"):
            final = pruner.scheduled_live_count(pruner.total_steps)
        else:
            final = round((compressor.config.keep if compressor.config.prunes else 1.0) * total)
        if live != final:
            reached = getattr(pruner, "final_warmup", None)
            at = "" if reached is None else f" (reached at step {compressor.total_steps - reached})"
            raise RuntimeError(f"final density not reached: {live / total:.6f} after {self.steps} of "
                               f"{compressor.total_steps} steps, target {final / total:.6f}{at}; training stopped "
                               "early?")
        log.info("pruned to density %.6f in %d steps", live / total, self.steps)

    def _end_mixed_rank(self) -> None:
        compressor = self.compressor
        if compressor.phase != "done":
            scheduler = compressor.scheduler
            raise RuntimeError(
                f"mixed-rank phase ended at alpha {scheduler.alpha:.4f} after {scheduler.step_count} of "
                f"{scheduler.total_steps} steps: the sparse path is still in the model (training stopped early?); "
                "train the full max_steps, or call compressor.convert() to keep the low-rank path alone"
            )
        layers = {}
        for name, rank in self.ranks.items():
            module = compressor.model.get_submodule(name)
            if not isinstance(module, LowRankLinear) or module.rank != rank:
                raise RuntimeError(f"layer {name!r} should be a LowRankLinear of rank {rank} after mixed-rank "
                                   f"fine-tuning, found {module}")
            layers[name] = (module.out_features, module.in_features, module.rank)
        if self.check_budget:
            self._check_budget(layers)
        log.info("mixed-rank fine-tuning done: %d low-rank layers, %d factor parameters", len(layers),
                 sum(r * (m + n) for m, n, r in layers.values()))

    # ------------------------------------------------------------------------------------------------ TensorBoard
    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("eval_"):
                self._scalar(f"{TAGS.get(self.phase)}/train/{key}", float(value), state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._scalar(f"{TAGS.get(self.phase)}/eval/{key.removeprefix('eval_')}", float(value),
                             state.global_step)
        self._flush()

    def _flush(self) -> None:
        # Not closed at train end: trainer.evaluate() after train() still logs its metrics here, and the same
        # callback may drive the next phase.
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer (also done when the process exits)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class DistillationTrainer(Trainer):
    """``Trainer`` training on ``distiller``'s objective; the teacher follows the model to its device."""

    def __init__(self, *args, distiller: Distiller, **kwargs):
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be an lrsparse.Distiller, got {type(distiller).__name__}")
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        # The objective is a mean over the batch: Trainer must divide it by the gradient-accumulation steps itself.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:  # evaluation and prediction: the task loss and outputs
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        device = next(model.parameters()).device
        if next(self.distiller.teacher.parameters()).device != device:
            self.distiller.teacher.to(device)
        # accelerate puts autocast around the student's forward only: the teacher needs it too (bf16/fp16 args).
        with self.accelerator.autocast():
            return self.distiller(model, inputs)
