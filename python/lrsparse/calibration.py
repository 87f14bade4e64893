"""Calibration gathered by the Compressor from the training forwards it already sees, so that an activation-aware
factorizer needs no ``calibration=`` in the user's loop or the Trainer.

The covariances are taken where they describe the model that gets factorized: in the last steps of the pruning phase,
after the pruner's masks have reached their final density (the cubic schedule's fixed-density tail), over the first
``calibration_samples`` training examples of that window. How many steps the window needs follows from the examples
per optimizer step measured on the phase's first step (gradient accumulation included): the window opens
``ceil(calibration_samples / examples_per_step)`` steps before the end, or when the masks are final if that is later
(then fewer examples are gathered, and a warning says so). Only forwards with gradients enabled count (an evaluation
under ``torch.no_grad()`` in the middle of the phase does not), and padding tokens are left out through the attention mask. Under a process group each
rank gathers its own examples (``calibration_samples`` per rank, as ``input_covariances``' ``max_examples``) and the
sums are pooled over the ranks when :meth:`CalibrationGatherer.covariances` is called.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from torch import Tensor, nn

from lrsparse.activation import CovarianceSums, batch_size_of

log = logging.getLogger("lrsparse.calibration")

__all__ = ["CalibrationGatherer"]


class CalibrationGatherer:
    """Forward hooks on ``model`` and its ``targets`` during the pruning phase; see the module docstring."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Module], samples: int, total_steps: int,
                 masks_final_after: int):
        self.model = model
        self.samples = samples
        self.total_steps = total_steps
        self.masks_final_after = masks_final_after  # optimizer steps after which the masks no longer change
        self.sums = CovarianceSums(targets)
        self.steps_done = 0
        self.examples_per_step: int | None = None
        self._step_examples = 0  # examples of the training forwards since the last optimizer step
        self.seen = 0  # examples gathered
        self._take = 0  # rows of the current forward's batch that are gathered
        self._mask: Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._model_hook, with_kwargs=True)]
        self._handles += [module.register_forward_pre_hook(self._layer_hook(name))
                          for name, module in targets.items()]

    @property
    def window_start(self) -> int | None:
        """Optimizer steps done when gathering starts (None until the examples per step are known)."""
        if self.examples_per_step is None:
            return None
        needed = math.ceil(self.samples / self.examples_per_step)
        return max(self.masks_final_after, self.total_steps - needed)

    def _model_hook(self, module, args, kwargs):
        if not torch.is_grad_enabled():  # an evaluation, not a training step
            self._take = 0
            return
        inputs = dict(kwargs)
        if args and torch.is_tensor(args[0]):
            inputs.setdefault("input_ids", args[0])
        size = batch_size_of(inputs)
        self._step_examples += size
        start = self.window_start
        gathering = start is not None and self.steps_done >= start and self.seen < self.samples
        self._take = min(size, self.samples - self.seen) if gathering else 0
        self.seen += self._take
        mask = inputs.get("attention_mask")
        self._mask = mask[:self._take] if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _layer_hook(self, name: str):
        @torch.no_grad()
        def gather(module, args):
            if self._take:
                self.sums.add(name, args[0][:self._take], self._mask)
        return gather

    def step(self) -> None:
        """After each optimizer step of the pruning phase (called by :meth:`Compressor.step`)."""
        if self.examples_per_step is None and self._step_examples:
            self.examples_per_step = self._step_examples
        self._step_examples = 0
        self.steps_done += 1

    def covariances(self, device: torch.device | None = None) -> dict[str, Tensor]:
        if self.seen == 0:
            raise ValueError("no calibration was gathered: the pruning phase ended before its last steps (or saw no "
                             "training-mode forward); pass calibration= (batches of model inputs) to factorize()")
        if self.seen < self.samples:
            log.warning("calibration gathered %d of calibration_samples=%d examples: the masks were final for only "
                        "the last %d steps", self.seen, self.samples, self.total_steps - self.masks_final_after)
        return self.sums.covariances(device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "examples_per_step": self.examples_per_step, "seen": self.seen,
                "sums": self.sums.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.steps_done, self.examples_per_step = int(state["steps_done"]), state["examples_per_step"]
        self.seen = int(state["seen"])
        self.sums.load_state_dict(state["sums"])
