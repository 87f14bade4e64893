"""``prepare(model, config, total_steps)`` -> :class:`Compressor`: the one object a training loop drives.

Two training phases around one call::

    compressor = lrsparse.prepare(model, lrsparse.PRESETS["lpaf"].replace(keep=0.25), total_steps=len(loader))
    for batch in loader:                      # phase 1: fine-tuning while pruning
        model(**batch).loss.backward(); optimizer.step(); compressor.step(); optimizer.zero_grad()
    records = compressor.factorize(total_steps=len(loader))   # target layers -> U V beside the sparse path
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # phase 2 trains the new factors
    for batch in loader:                      # phase 2: mixed-rank fine-tuning, sparse -> low-rank
        model(**batch).loss.backward()
        optimizer.step(); compressor.step(optimizer); optimizer.zero_grad()
    compressor.convert()                      # no-op once the schedule has dropped the sparse path
    lrsparse.save_compressed(model, "out/", config=compressor.config, records=compressor.records)

What runs in each phase follows from the config, not from a method name: the registered pruner (or, without one,
a first-order pruner at density 1 when the factorizer needs importance or Fisher statistics), the registered
factorizer and rank allocator, and the mixed-rank schedule.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Iterable, Mapping

import torch
from torch import nn

from lrsparse.activation import input_covariances
from lrsparse.calibration import CalibrationGatherer
from lrsparse.config import LPAFConfig
from lrsparse.factorization import factorize_model
from lrsparse.layers import MixedRankLinear, MixedRankScheduler, finalize_low_rank
from lrsparse.records import LayerRecord
from lrsparse.registry import PRUNERS
from lrsparse.targets import find_targets, is_target_layer, linear_shape

PHASES = ("prune", "mixed_rank", "done")
STATE_FORMAT = 1


def _check_steps(total_steps, name: str, minimum: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {total_steps!r}")
    return total_steps


class Compressor:
    """Drives LPAF (or a baseline preset) over a model through both training phases; see the module docstring."""

    def __init__(self, model: nn.Module, config: LPAFConfig, total_steps: int | None = None,
                 targets: Mapping[str, nn.Module] | Iterable[str] | None = None, seed: int = 0,
                 gather_calibration: bool = True) -> None:
        if not isinstance(config, LPAFConfig):
            raise TypeError(f"config must be an LPAFConfig (e.g. lrsparse.PRESETS['lpaf']), got "
                            f"{type(config).__name__}")
        self.model = model
        self.config = config
        self.seed = seed
        self._target_spec = config.targets if targets is None else targets
        self._targets: dict[str, nn.Module] | None = None
        self.phase = "prune"
        self.total_steps: int | None = None
        self.pruner = None
        self._pruner_takes_hint = False
        self.scheduler: MixedRankScheduler | None = None
        self.mixed_steps: int | None = None
        self._records: list[LayerRecord] = []
        # An activation-aware factorizer's calibration, gathered from the training forwards (lrsparse.calibration).
        self.gather_calibration = gather_calibration
        self.calibration: CalibrationGatherer | None = None
        if total_steps is not None:
            self.schedule(total_steps)

    @property
    def targets(self) -> dict[str, nn.Module]:
        """The layers the method compresses (name -> module), resolved on first use in the pruning phase."""
        if self._targets is None:
            spec = self._target_spec
            found = dict(spec) if isinstance(spec, Mapping) else find_targets(self.model, spec)
            for name, module in found.items():
                if not is_target_layer(module):
                    raise TypeError(f"target {name!r} must be an nn.Linear or a transformers Conv1D, got "
                                    f"{type(module).__name__}")
            self._targets = found
        return self._targets

    def _new_pruner(self):
        name = self.config.statistics_pruner()
        if name is None:
            return None
        # Without a pruner of its own the method still needs statistics: a first-order pruner at density 1
        # collects them without pruning anything.
        density = self.config.keep if self.config.prunes else 1.0
        pruner = PRUNERS[name].fn(self.model, density, self.total_steps, self.targets, self.config)
        # A registered pruner may predate the grads_finite hint: its step() is then called as it was.
        self._pruner_takes_hint = "grads_finite" in inspect.signature(pruner.step).parameters
        return pruner

    # ------------------------------------------------------------------------------------------------ the loop
    def schedule(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Sets the length (optimizer steps) of the current phase, when it was not given to :func:`prepare` or
        :meth:`factorize` (the Trainer integration passes ``state.max_steps``); a different length than the one
        already set is an error. In phase 2, ``optimizer`` (the phase's) loses the sparse weights when the
        schedule drops them, right away for a schedule that is low-rank from the start."""
        if self.phase == "prune":
            total_steps = _check_steps(total_steps, "total_steps", 1)
            if self.total_steps is None:
                self.total_steps = total_steps
                self.pruner = self._new_pruner()
                self._new_calibration()
            elif total_steps != self.total_steps:
                raise ValueError(f"the pruning phase was prepared for total_steps={self.total_steps}, got "
                                 f"{total_steps}: prepare the compressor with the training run's number of steps")
        elif self.phase == "mixed_rank":
            total_steps = _check_steps(total_steps, "total_steps", 0)
            if self.mixed_steps is None:
                self._start_mixed_rank(total_steps, optimizer)
            elif total_steps != self.mixed_steps:
                raise ValueError(f"the mixed-rank phase was set to total_steps={self.mixed_steps} by factorize(), "
                                 f"got {total_steps}")
        else:
            raise RuntimeError("the compressor is done (converted to low rank): there is no phase left to schedule")

    def _new_calibration(self) -> None:
        if not (self.config.calibrates and self.gather_calibration):
            return
        # The masks stop changing once the schedule reaches its final density (after the last mask update).
        final_warmup = getattr(self.pruner, "final_warmup", None) if self.config.prunes else None
        masks_final_after = 0 if final_warmup is None else self.total_steps - final_warmup
        self.calibration = CalibrationGatherer(self.model, self.targets, self.config.calibration_samples,
                                               self.total_steps, masks_final_after)

    def _start_mixed_rank(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.mixed_steps = total_steps
        if total_steps == 0:
            self.convert(optimizer)
            return
        self.scheduler = MixedRankScheduler(self.model, total_steps, blend_fraction=self.config.blend_fraction,
                                            strategy=self.config.mixed_rank, optimizer=optimizer)
        if self.scheduler.finalized:  # strategy "none" or blend_fraction 0: low-rank from the start
            self._converted()

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, grads_finite: bool = False) -> None:
        """After ``optimizer.step()``, before ``optimizer.zero_grad()``, in both phases. Phase 1: importance update,
        scheduled mask update, masks re-applied (``grads_finite=True``: the loop has checked the gradients, so the
        pruner skips its own check). Phase 2: the alpha schedule; pass the phase-2 ``optimizer`` so that the sparse
        weights leave it (and free their memory) when alpha reaches 1."""
        if self.phase == "prune":
            if self.total_steps is None:
                raise RuntimeError("the pruning phase has no length: pass total_steps to prepare() or call "
                                   "schedule(total_steps) before training")
            if self.pruner is not None:
                if grads_finite and self._pruner_takes_hint:
                    self.pruner.step(grads_finite=True)
                else:
                    self.pruner.step()
            if self.calibration is not None:
                self.calibration.step()
        elif self.phase == "mixed_rank":
            if self.scheduler is None:
                raise RuntimeError("the mixed-rank phase has no length: pass total_steps to factorize() or call "
                                   "schedule(total_steps) before training")
            if optimizer is not None:
                self.scheduler.optimizer = optimizer
            self.scheduler.step()
            if self.scheduler.finalized:
                self._converted()

    def factorize(self, total_steps: int | None = None, calibration: Iterable[Mapping] | None = None
                  ) -> list[LayerRecord]:
        """Ends phase 1: every target becomes a MixedRankLinear holding its factorization (ranks from the rank
        allocator) beside its pruned weight; ``total_steps`` is the length of phase 2 (0: convert right away; None:
        set later by :meth:`schedule`). An activation-aware factorizer fits each layer's outputs on the layer inputs
        the compressor gathered in the last steps of phase 1 (:mod:`lrsparse.calibration`), or on ``calibration``
        when given: batches of model inputs (e.g. the training DataLoader: only its first
        ``config.calibration_samples`` examples are read, in eval mode). Build the phase-2 optimizer after this
        call: the factors are new parameters."""
        if self.phase != "prune":
            raise RuntimeError(f"factorize() ends the pruning phase; the compressor is in phase {self.phase!r}")
        if not self.config.factorizes:
            raise RuntimeError("this config has factorizer 'none' (prune-only): there is nothing to factorize")
        if self.config.statistics_pruner() is not None and self.pruner is None:
            raise RuntimeError(f"factorizer {self.config.factorizer!r} needs the statistics of a pruning phase: "
                               "train phase 1 with compressor.step() first")
        if total_steps is not None:
            _check_steps(total_steps, "total_steps", 0)
        config = self.config
        covariances = None
        if config.calibrates:
            gathered = self.calibration
            if calibration is not None:
                covariances = input_covariances(self.model, self.targets, calibration,
                                                max_examples=config.calibration_samples)
            elif gathered is not None and gathered.seen > 0:
                covariances = gathered.covariances(next(self.model.parameters()).device)
            else:
                why = ("" if gathered is None else ": the compressor gathered none (the pruning phase had no step "
                       "after its masks were final, or no forward with gradients ran through the model)")
                raise ValueError(f"factorizer {config.factorizer!r} fits each layer's outputs: pass calibration= "
                                 f"(batches of model inputs, e.g. the training DataLoader; its first "
                                 f"{config.calibration_samples} examples are used){why}")
        if self.calibration is not None:  # the pruning phase is over: its hooks go (the sums stay for a retry)
            self.calibration.close()
        self._records = factorize_model(
            self.model, config.keep, method=config.factorizer, allocation=config.rank_allocation,
            rank_multiple=config.rank_multiple, pruner=self.pruner, targets=self.targets,
            options=config.factorizer_options(), solver_options=config.solver_options(self.seed),
            min_rank=config.min_rank, input_covariances=covariances)
        self.pruner = None  # its statistics are no longer needed
        self.calibration = None
        self.phase = "mixed_rank"
        if total_steps is not None:
            self._start_mixed_rank(total_steps)
        return self.records

    def convert(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Drops the sparse paths: every MixedRankLinear becomes its LowRankLinear (a no-op once done)."""
        if self.phase == "prune":
            raise RuntimeError("convert() needs factorize() first")
        finalize_low_rank(self.model, optimizer)
        self._converted()

    def _converted(self) -> None:
        self.phase = "done"
        self._records = [dataclasses.replace(r, kind="low-rank", masked=False) if r.kind == "mixed" else r
                         for r in self._records]

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def records(self) -> list[LayerRecord]:
        """One record per target layer: factorized ones after factorize(), pruned ("sparse") ones before."""
        if self.phase == "prune":
            masks = self.pruner.masks if self.pruner is not None else {}
            records = []
            for name, module in self.targets.items():
                in_f, out_f = linear_shape(module)
                density = float(masks[name].float().mean()) if name in masks else 1.0
                records.append(LayerRecord(name, in_f, out_f, None, bias=module.bias is not None, kind="sparse",
                                           density=density))
            return records
        return list(self._records)

    def density(self) -> float | None:
        return None if self.pruner is None else self.pruner.density()

    @property
    def alpha(self) -> float | None:
        return None if self.scheduler is None else self.scheduler.alpha

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "config": self.config.to_dict(), "phase": self.phase,
                "total_steps": self.total_steps, "mixed_steps": self.mixed_steps,
                "pruner": None if self.pruner is None else self.pruner.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "records": [r.to_dict() for r in self._records],
                "calibration": None if self.calibration is None else self.calibration.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a state saved by :meth:`state_dict` into a fresh compressor for the same model and config (not
        yet scheduled, or scheduled for the same length); in phase 2 the model must already hold the layers of that
        phase (rebuilt with :func:`lrsparse.records.rebuild_layers`). Everything is checked before anything
        changes."""
        keys = {"format", "config", "phase", "total_steps", "mixed_steps", "pruner", "scheduler", "records"}
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT or not keys <= set(state):
            raise ValueError(f"compressor state must be a dict of format {STATE_FORMAT} with keys {sorted(keys)}")
        if state["config"] != self.config.to_dict():
            raise ValueError("compressor state was saved with another config")
        if state["phase"] not in PHASES:
            raise ValueError(f"compressor state phase must be one of {PHASES}, got {state['phase']!r}")
        if self.phase != "prune" or getattr(self.pruner, "step_count", 0):
            raise ValueError("load_state_dict needs a fresh compressor (this one has already trained or factorized)")
        if self.total_steps is not None and state["total_steps"] != self.total_steps:
            raise ValueError(f"compressor state has total_steps={state['total_steps']}, this compressor "
                             f"{self.total_steps}")
        records = [LayerRecord.from_dict(r, f"compressor state records[{i}]") for i, r in enumerate(state["records"])]
        if state["phase"] == "mixed_rank" and state["scheduler"] is not None and not any(
                isinstance(m, MixedRankLinear) for m in self.model.modules()):
            raise ValueError("compressor state is in the mixed-rank phase but the model has no MixedRankLinear "
                             "layer: rebuild its layers from the checkpoint's records first")
        if state["phase"] == "prune":
            if state["total_steps"] is not None and self.total_steps is None:
                self.schedule(state["total_steps"])
            if (state["pruner"] is None) != (self.pruner is None):
                raise ValueError("compressor state and config disagree on whether there is a pruner")
            if self.pruner is not None:
                self.pruner.load_state_dict(state["pruner"])
            if state.get("calibration") is not None:
                if self.calibration is None:
                    raise ValueError("compressor state holds gathered calibration, but this compressor gathers none "
                                     "(gather_calibration=False)")
                self.calibration.load_state_dict(state["calibration"])
            elif self.calibration is not None and self.calibration.steps_done == 0 and self.pruner is not None:
                # A state saved without gathering (older lrsparse, or gather_calibration=False): count its steps.
                self.calibration.steps_done = getattr(self.pruner, "step_count", 0)
            self._records = records
            return
        self.total_steps, self.mixed_steps, self._records = state["total_steps"], state["mixed_steps"], records
        self.pruner, self.scheduler, self.phase = None, None, state["phase"]
        if self.phase == "mixed_rank" and state["scheduler"] is not None:
            self.scheduler = MixedRankScheduler(self.model, self.mixed_steps, blend_fraction=self.config.blend_fraction,
                                                strategy=self.config.mixed_rank)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scheduler.finalized:
                self._converted()


def prepare(model: nn.Module, config: LPAFConfig, total_steps: int | None = None,
            targets: Mapping[str, nn.Module] | Iterable[str] | None = None, seed: int = 0,
            gather_calibration: bool = True) -> Compressor:
    """A :class:`Compressor` over ``model`` for a pruning phase of ``total_steps`` optimizer steps (None: set by
    :meth:`Compressor.schedule`, as the Trainer integration does). ``targets``
    (patterns or a name -> module dict) overrides ``config.targets``; ``seed`` seeds the factorization;
    ``gather_calibration=False`` leaves calibration to ``factorize(calibration=...)`` (the CLI's way: a seeded
    subset of the training set in eval mode)."""
    return Compressor(model, config, total_steps, targets, seed, gather_calibration)
