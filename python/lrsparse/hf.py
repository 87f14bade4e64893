"""LPAF inside ``transformers.Trainer``: one callback per phase, one Trainer run per phase.

Phase 1, pruning while fine-tuning: ``PruningCallback(final_density, **pruner_options)``. At ``on_train_begin`` it
builds a :class:`~lrsparse.pruning.FirstOrderPruner` over the model with ``total_steps = state.max_steps``.

Phase 2, mixed-rank fine-tuning: call :func:`lrsparse.factorization.factorize_model` with ``callback.pruner``, then
train with ``MixedRankCallback`` in a NEW ``Trainer``. The factorization replaces the target layers by
MixedRankLinear modules with new parameters (U, V), so the optimizer of the first run cannot be reused: a new Trainer
creates its optimizer (and learning-rate schedule) from the factorized model when ``train()`` starts. The callback
checks that the optimizer holds every U and V and refuses to run otherwise.

Where the pruner runs. In transformers 5.x each optimizer step of ``Trainer`` is::

    backward (DDP all-reduces the gradients on the last micro-batch) -> clip_grad_norm_ -> on_pre_optimizer_step
    -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> model.zero_grad() -> global_step += 1
    -> on_step_end

``on_optimizer_step`` is the only hook that sees the updated weights while the gradients are still there, which is
exactly the plain loop's ``optimizer.step(); pruner.step(); optimizer.zero_grad()``: importance is read from the
(clipped, all-reduced) gradients there and the masks are re-applied to the freshly updated weights. ``on_step_end``
(gradients already zeroed) only verifies that this happened.

Loud failures rather than silent no-ops: a target that cannot get a gradient, an optimizer that does not hold the
target weights or the factors, ``on_optimizer_step`` not firing, importance that stays zero up to a mask update,
a live count that differs from the schedule's (a skipped mask update), pruned weights that became nonzero, and at
the end of training a density or rank budget that is not met all raise RuntimeError/ValueError with the reason.

Under DDP (``torchrun``), each rank runs the same callbacks on the same all-reduced gradients and so computes the
same masks; :func:`lrsparse.distributed.check_same_across_ranks` verifies it at each mask update. Only rank 0 writes
TensorBoard events. The mixed-rank phase drops the sparse weights from the model when alpha reaches 1; DDP then sees
parameters without gradients, which ``find_unused_parameters`` (Trainer's default for transformers models) handles.

TensorBoard: pass ``tensorboard_dir``; scalars ``pruning/density``, ``pruning/scheduled_density``,
``mixed_rank/alpha``, ``train/<logged value>`` (loss, learning rate, ...) and ``eval/<metric>`` are written there.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from torch import nn
from transformers import TrainerCallback

from lrsparse.layers import LowRankLinear, MixedRankLinear, MixedRankScheduler
from lrsparse.pruning import FirstOrderPruner, _check_density
from lrsparse.scalars import open_summary_writer, summary_writer_class

log = logging.getLogger("lrsparse.hf")


def _optimizer_parameter_ids(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class _PhaseCallback(TrainerCallback):
    """TensorBoard scalars of the Trainer's logs and evaluations, and checks shared by both phases."""

    phase = "phase"

    def __init__(self, tensorboard_dir: str | None = None) -> None:
        self.tensorboard_dir = tensorboard_dir
        if tensorboard_dir is not None:
            summary_writer_class(tensorboard_dir)  # a missing TensorBoard fails here, before any training
        self.writer = None
        self.used = False

    def _begin(self, state, optimizer) -> None:
        if self.used:
            raise RuntimeError(f"this {type(self).__name__} already ran a Trainer.train(): create a new one per run")
        if state.global_step != 0:
            raise RuntimeError(
                f"{type(self).__name__} cannot resume from a Trainer checkpoint (global_step {state.global_step}): "
                "its state is not part of Trainer checkpoints; run the phase from its start"
            )
        if optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: Trainer passed no optimizer to on_train_begin")
        self.used = True
        self.writer = open_summary_writer(self.tensorboard_dir)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("eval_"):
                self._scalar(f"{self.phase}/train/{key}", float(value), state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._scalar(f"{self.phase}/eval/{key.removeprefix('eval_')}", float(value), state.global_step)
        self._flush()

    def _flush(self) -> None:
        # Not closed at train end: trainer.evaluate() after train() still logs its metrics here.
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer (also done when the process exits)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _check_step_count(self, count: int, state) -> None:
        if count != state.global_step:
            raise RuntimeError(
                f"{type(self).__name__}: {count} on_optimizer_step calls for {state.global_step} optimizer steps; "
                "the Trainer did not call on_optimizer_step after each optimizer step (transformers 5.x does, right "
                "after optimizer.step(); a custom training loop must call callback_handler.on_optimizer_step)"
            )


class PruningCallback(_PhaseCallback):
    """Phase 1: first-order (PLATON) pruning to ``final_density`` during one ``Trainer.train()``.

    ``pruner_options`` go to :class:`~lrsparse.pruning.FirstOrderPruner` (``targets``, ``delta_t``, warmups,
    ``beta1``...); ``total_steps`` is the Trainer's ``max_steps``. After training, ``callback.pruner`` holds the
    masks and importance scores for :func:`~lrsparse.factorization.factorize_model`.
    """

    phase = "pruning"

    def __init__(self, final_density: float, *, tensorboard_dir: str | None = None, **pruner_options: Any) -> None:
        _check_density(final_density, "final_density")
        if "total_steps" in pruner_options:
            raise TypeError("total_steps comes from the Trainer (state.max_steps): set max_steps or epochs there")
        super().__init__(tensorboard_dir)
        self.final_density = float(final_density)
        self.pruner_options = pruner_options
        self.pruner: FirstOrderPruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._begin(state, optimizer)
        self.pruner = FirstOrderPruner(model, self.final_density, state.max_steps, **self.pruner_options)
        trained = _optimizer_parameter_ids(optimizer)
        for name, module in self.pruner.targets.items():
            if not module.weight.requires_grad:
                raise ValueError(f"target {name!r} has requires_grad=False: no gradient reaches it, so it has no "
                                 "importance to prune by (unfreeze it or leave it out of targets)")
            if id(module.weight) not in trained:
                raise ValueError(f"target {name!r}: its weight is not in the Trainer's optimizer, which must "
                                 "update the weights it prunes")
        log.info("pruning %d target matrices (%d weights) to density %.4f over %d steps", len(self.pruner.targets),
                 self.pruner.total_params, self.final_density, state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        pruner = self.pruner
        if pruner is None:
            raise RuntimeError("PruningCallback: on_optimizer_step before on_train_begin")
        pruner.step()
        if pruner.is_mask_step(pruner.step_count) and not self._has_importance():
            raise RuntimeError(
                f"importance is zero in every target at mask step {pruner.step_count} "
                f"({pruner.nonfinite_steps} non-finite steps skipped): no gradient reached the target layers, so "
                "the masks would be arbitrary; check that the loss depends on them and that gradients are finite"
            )

    def _has_importance(self) -> bool:
        return any(bool(self.pruner.scores(name).ne(0).any()) for name in self.pruner.targets)

    def on_step_end(self, args, state, control, **kwargs):
        pruner = self.pruner
        self._check_step_count(pruner.step_count, state)
        expected = pruner.scheduled_live_count()
        if pruner.live_count() != expected:
            raise RuntimeError(
                f"scheduled mask update skipped: after step {pruner.step_count} {pruner.live_count()} weights are "
                f"alive, the schedule says {expected} (density {expected / pruner.total_params:.6f})"
            )
        for name, module in pruner.targets.items():
            if bool(module.weight.detach().masked_select(pruner.masks[name].logical_not()).any()):
                raise RuntimeError(f"pruned weights of target {name!r} are nonzero after optimizer step "
                                   f"{state.global_step}: the masks were not re-applied")
        self._scalar("pruning/density", pruner.density(), state.global_step)
        self._scalar("pruning/scheduled_density", pruner.scheduled_density(), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        pruner = self.pruner
        if pruner.step_count == 0 or pruner.step_count == pruner.nonfinite_steps:
            raise RuntimeError(
                f"importance was never accumulated ({pruner.step_count} pruner steps, {pruner.nonfinite_steps} of "
                "them with non-finite gradients): the model was not pruned"
            )
        final_live = pruner.scheduled_live_count(pruner.total_steps)
        if pruner.live_count() != final_live:
            raise RuntimeError(
                f"final density not reached: {pruner.density():.6f} after {pruner.step_count} of "
                f"{pruner.total_steps} steps, target {final_live / pruner.total_params:.6f} (reached at step "
                f"{pruner.total_steps - pruner.final_warmup}); training stopped early?"
            )
        log.info("pruned to density %.6f in %d steps (%d mask updates)", pruner.density(), pruner.step_count,
                 pruner.mask_updates)


def low_rank_parameter_budget(shapes: Iterable[tuple[int, int]], keep: float) -> int:
    """Parameters the factors may use at ``keep``: ``floor(keep * sum(m * n))`` over the target matrices."""
    return int(keep * sum(m * n for m, n in shapes))


class MixedRankCallback(_PhaseCallback):
    """Phase 2: mixed-rank fine-tuning of a model factorized by :func:`~lrsparse.factorization.factorize_model`.

    Alpha goes 0 -> 1 over ``blend_fraction`` of the Trainer's ``max_steps``
    (:class:`~lrsparse.layers.MixedRankScheduler`); at alpha 1 the sparse weights are dropped from the model and the
    optimizer. At the end every factorized layer must be a LowRankLinear of its factorized rank, and with ``keep``
    the factors must fit ``keep`` times the parameters of the original matrices (checked at the start too;
    factorize_model's "budget" allocation gives a matrix pruned below ``m + n`` entries rank 1, which can exceed
    it on tiny models).
    """

    phase = "mixed_rank"

    def __init__(self, blend_fraction: float = 0.5, strategy: str = "blend", *, keep: float | None = None,
                 tensorboard_dir: str | None = None) -> None:
        if not 0.0 <= float(blend_fraction) <= 1.0:
            raise ValueError(f"blend_fraction must be in [0, 1], got {blend_fraction!r}")
        if keep is not None:
            _check_density(keep, "keep")
        super().__init__(tensorboard_dir)
        self.blend_fraction = float(blend_fraction)
        self.strategy = strategy
        self.keep = keep
        self.scheduler: MixedRankScheduler | None = None
        self.ranks: dict[str, int] = {}
        self._model: nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._begin(state, optimizer)
        mixed = {name: m for name, m in model.named_modules() if isinstance(m, MixedRankLinear)}
        if not mixed:
            raise ValueError("model has no MixedRankLinear layer: call factorize_model(model, ...) before the "
                             "mixed-rank Trainer run")
        trained = _optimizer_parameter_ids(optimizer)
        for name, module in mixed.items():
            if id(module.U) not in trained or id(module.V) not in trained:
                raise RuntimeError(
                    f"the optimizer does not hold the factors U, V of {name!r}: it was created before "
                    "factorize_model; run the mixed-rank phase with a new Trainer (it builds its optimizer from "
                    "the factorized model when train() starts)"
                )
        if self.keep is not None:
            self._check_budget({name: (m.out_features, m.in_features, m.rank) for name, m in mixed.items()})
        if args.world_size > 1 and args.ddp_find_unused_parameters is False and self.blend_fraction < 1.0:
            raise ValueError("ddp_find_unused_parameters=False: the sparse weights are dropped mid-run when alpha "
                             "reaches 1 and DDP would wait for their gradients; leave it unset (or True)")
        self.ranks = {name: m.rank for name, m in mixed.items()}
        self._model = model
        self.scheduler = MixedRankScheduler(model, state.max_steps, blend_fraction=self.blend_fraction,
                                            strategy=self.strategy, optimizer=optimizer)

    def _check_budget(self, layers: Mapping[str, tuple[int, int, int]]) -> None:
        used = sum(r * (m + n) for m, n, r in layers.values())
        budget = low_rank_parameter_budget([(m, n) for m, n, _ in layers.values()], self.keep)
        if used > budget:
            raise ValueError(f"rank budget exceeded: the factors hold {used} parameters, keep={self.keep} allows "
                             f"{budget}")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.scheduler is None:
            raise RuntimeError("MixedRankCallback: on_optimizer_step before on_train_begin")
        self.scheduler.step()

    def on_step_end(self, args, state, control, **kwargs):
        self._check_step_count(self.scheduler.step_count, state)
        self._scalar("mixed_rank/alpha", self.scheduler.alpha, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        scheduler = self.scheduler
        if not scheduler.finalized:
            raise RuntimeError(
                f"mixed-rank phase ended at alpha {scheduler.alpha:.4f} after {scheduler.step_count} of "
                f"{scheduler.total_steps} steps: the sparse path is still in the model (training stopped early?); "
                "train the full max_steps, or call lrsparse.layers.finalize_low_rank(model) to keep the low-rank "
                "path alone"
            )
        layers = {}
        for name, rank in self.ranks.items():
            module = self._model.get_submodule(name)
            if not isinstance(module, LowRankLinear) or module.rank != rank:
                raise RuntimeError(f"layer {name!r} should be a LowRankLinear of rank {rank} after mixed-rank "
                                   f"fine-tuning, found {module}")
            layers[name] = (module.out_features, module.in_features, module.rank)
        if self.keep is not None:
            self._check_budget(layers)
        log.info("mixed-rank fine-tuning done: %d low-rank layers, %d factor parameters", len(layers),
                 sum(r * (m + n) for m, n, r in layers.values()))
