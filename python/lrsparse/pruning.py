"""First-order (PLATON) pruning during fine-tuning, and the magnitude baseline (both registered pruners).

PLATON (Zhang et al. 2022) scores each weight by an exponential moving average of its sensitivity ``|w * g|``
times an EMA of that sensitivity's deviation (its uncertainty), and prunes on ONE threshold shared by all target
matrices, so layers that matter keep more weights. The density follows a cubic schedule; masks are recomputed every
``delta_t`` steps (pruned entries never come back) and re-applied after every optimizer step.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from lrsparse import ops
from lrsparse.distributed import check_same_across_ranks
from lrsparse.registry import register_pruner
from lrsparse.targets import find_targets

CRITERIA = ("sensitivity", "movement")


def is_mask_step(step: int, total_steps: int, initial_warmup: int, final_warmup: int, delta_t: int) -> bool:
    """Whether optimizer step ``step`` (1-based) of a cubic-schedule pruner updates the masks: every ``delta_t``
    steps after the initial warm-up, and also on the step the schedule reaches its final density, so that density is
    met exactly whatever ``delta_t`` divides."""
    return step > initial_warmup and (step % delta_t == 0 or step == total_steps - final_warmup)


def cubic_density(step: int, final_density: float, total_steps: int, initial_warmup: int, final_warmup: int) -> float:
    """Density after ``step`` steps: 1 until ``initial_warmup``, a cubic decay to ``final_density`` at
    ``total_steps - final_warmup``, then ``final_density``."""
    _check_density(final_density, "final_density")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if initial_warmup < 0 or final_warmup < 0 or initial_warmup + final_warmup >= total_steps:
        raise ValueError(
            f"initial_warmup ({initial_warmup}) and final_warmup ({final_warmup}) must be >= 0 and leave at least "
            f"one pruning step before total_steps ({total_steps})"
        )
    if step <= initial_warmup:
        return 1.0
    decay_steps = total_steps - initial_warmup - final_warmup
    if step >= initial_warmup + decay_steps:
        return float(final_density)
    remaining = 1.0 - (step - initial_warmup) / decay_steps
    return float(final_density + (1.0 - final_density) * remaining**3)


def _check_density(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _warmup_steps(value: int | float, total_steps: int, name: str) -> int:
    # An int is a step count, a float a fraction of total_steps.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (steps) or a float (fraction of total_steps), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 steps, got {value}")
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} as a fraction must be in [0, 1), got {value}")
    return int(round(value * total_steps))


def resolve_targets(model: nn.Module, targets: Mapping[str, nn.Module] | Iterable[str] | None) -> dict[str, nn.Module]:
    """``targets`` as given (a name -> module dict), or found by patterns (a list of regexes, None for defaults)."""
    if isinstance(targets, Mapping):
        resolved = dict(targets)
        if not resolved:
            raise ValueError("targets is an empty dict: nothing to prune")
        for name, module in resolved.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                raise TypeError(f"targets[{name!r}] must be a module with a 2-D weight, got {type(module).__name__}")
        return resolved
    return find_targets(model, targets)


def _global_k(density: float, total: int) -> int:
    return int(round(density * total))


class FirstOrderPruner:
    """PLATON pruning of the target matrices of ``model`` to ``final_density`` over ``total_steps`` steps.

    Usage per training step: ``loss.backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()``.
    ``initial_warmup_fraction`` / ``final_warmup_fraction`` are fractions of total_steps (float) or step counts
    (int). ``criterion`` "sensitivity" scores by ema * uncertainty of ``|w g|``; "movement" by the ema of ``-w g``.
    ``track_fisher`` keeps an EMA of ``g^2`` (the empirical Fisher diagonal, used by FWSVD).
    Non-finite gradients: the importance update of that step is skipped and counted in ``nonfinite_steps``
    (``skip_nonfinite=False`` raises instead); the mask schedule goes on.
    """

    def __init__(
        self,
        model: nn.Module,
        final_density: float,
        total_steps: int,
        *,
        targets: Mapping[str, nn.Module] | Iterable[str] | None = None,
        initial_warmup_fraction: int | float = 0.1,
        final_warmup_fraction: int | float = 0.3,
        delta_t: int = 10,
        beta1: float = 0.85,
        beta2: float = 0.95,
        beta_fisher: float = 0.99,
        criterion: str = "sensitivity",
        track_fisher: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        _check_density(final_density, "final_density")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be a positive int, got {delta_t!r}")
        for value, name in ((beta1, "beta1"), (beta2, "beta2"), (beta_fisher, "beta_fisher")):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.final_density = float(final_density)
        self.total_steps = total_steps
        self.initial_warmup = _warmup_steps(initial_warmup_fraction, total_steps, "initial_warmup_fraction")
        self.final_warmup = _warmup_steps(final_warmup_fraction, total_steps, "final_warmup_fraction")
        cubic_density(0, final_density, total_steps, self.initial_warmup, self.final_warmup)  # validates the pair
        self.delta_t = delta_t
        self.beta1, self.beta2, self.beta_fisher = float(beta1), float(beta2), float(beta_fisher)
        self.criterion = criterion
        self.track_fisher = track_fisher
        self.skip_nonfinite = skip_nonfinite

        self.targets = resolve_targets(model, targets)
        self._ema, self._unc, self._fisher, self._masks = {}, {}, {}, {}
        for name, module in self.targets.items():
            weight = module.weight
            state = {"dtype": torch.float32, "device": weight.device}
            self._ema[name] = torch.zeros(weight.shape, **state)
            self._unc[name] = torch.zeros(weight.shape, **state)
            if track_fisher:
                self._fisher[name] = torch.zeros(weight.shape, **state)
            self._masks[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        self.total_params = sum(m.numel() for m in self._masks.values())
        self.step_count = 0
        self.nonfinite_steps = 0
        self.mask_updates = 0

    # ------------------------------------------------------------------------------------------------ schedule
    def scheduled_density(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        return cubic_density(step, self.final_density, self.total_steps, self.initial_warmup, self.final_warmup)

    def is_mask_step(self, step: int) -> bool:
        """Whether ``step()`` number ``step`` (1-based) updates the masks."""
        return is_mask_step(step, self.total_steps, self.initial_warmup, self.final_warmup, self.delta_t)

    def scheduled_live_count(self, step: int | None = None) -> int:
        """Entries alive after ``step`` steps (default: the steps taken) when every scheduled mask update ran:
        ``round(density * total_params)`` at the last mask step (the density never rises, pruned entries stay
        pruned), or all of them before the first mask step."""
        step = self.step_count if step is None else step
        last = self.total_steps - self.final_warmup
        if step < last:
            last = step - step % self.delta_t
        if last <= self.initial_warmup:
            return self.total_params
        return _global_k(self.scheduled_density(last), self.total_params)

    # ------------------------------------------------------------------------------------------------ training
    def step(self, grads_finite: bool = False) -> None:
        """Importance update from the current ``.grad`` of each target, scheduled mask update, mask re-apply.

        ``grads_finite=True`` (the caller has already checked every gradient, as lrsparse's training loop does)
        skips the pruner's own check, a pass over all target gradients that costs about as much as the update."""
        self.step_count += 1
        grads = {}
        for name, module in self.targets.items():
            if module.weight.grad is None:
                raise RuntimeError(
                    f"target {name!r} has no gradient: call pruner.step() after loss.backward() and "
                    "optimizer.step(), before optimizer.zero_grad()"
                )
            grads[name] = module.weight.grad
        with torch.no_grad():
            # max |g| is inf or NaN exactly when some entry is: one fused pass, no per-entry flags allocated.
            finite = grads_finite or bool(torch.stack(torch._foreach_norm(list(grads.values()), float("inf")))
                                          .isfinite().all())
            if finite:
                self._accumulate(grads)
            elif self.skip_nonfinite:
                self.nonfinite_steps += 1
            else:
                bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
                raise FloatingPointError(f"non-finite gradients in targets {bad} at step {self.step_count}")
            if self.is_mask_step(self.step_count):
                self.update_mask()
            self.apply_masks()

    def _accumulate(self, grads: Mapping[str, Tensor]) -> None:
        for name, module in self.targets.items():
            ops.accumulate_importance_(
                self._ema[name], self._unc[name], module.weight.detach(), grads[name], self._masks[name],
                self._fisher.get(name), beta1=self.beta1, beta2=self.beta2, beta_fisher=self.beta_fisher,
                criterion=self.criterion,
            )

    def _uncertainty_list(self) -> list[Tensor] | None:
        # "movement" ranks by the EMA alone (the ops take an absent uncertainty list to mean that).
        return None if self.criterion == "movement" else list(self._unc.values())

    @torch.no_grad()
    def update_mask(self, density: float | None = None) -> bool:
        """One global mask update to ``density`` (default: the scheduled one); returns whether anything was pruned.

        Exactly ``round(density * total_params)`` entries stay alive; pruned entries are never revived, so a
        density above the current one changes nothing.
        """
        density = self.scheduled_density() if density is None else density
        _check_density(density, "density")
        k = _global_k(density, self.total_params)
        if k >= self.live_count():
            return False
        names = list(self.targets)
        masks = [self._masks[n] for n in names]
        ema = [self._ema[n] for n in names]
        unc = self._uncertainty_list()
        threshold, ties = ops.global_topk_threshold(ema, unc, masks, k)
        weights = [self.targets[n].weight.detach() for n in names]
        ops.apply_threshold_mask_(masks, weights, ema, unc, threshold, ties)
        self.mask_updates += 1
        # Under DDP every rank prunes on its own; equal all-reduced gradients must give equal masks (a collective).
        check_same_across_ranks(masks + ema, "pruning masks and importance scores")
        return True

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Sets pruned weights to exactly zero (optimizers with momentum or weight decay move them)."""
        for name, module in self.targets.items():
            module.weight.detach().masked_fill_(self._masks[name].logical_not(), 0)

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def masks(self) -> dict[str, Tensor]:
        return dict(self._masks)

    def live_count(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def density(self) -> float:
        """Actual global density of the target matrices (kept / total)."""
        return self.live_count() / self.total_params

    def _check_name(self, name: str) -> None:
        if name not in self.targets:
            raise ValueError(f"name must be one of the pruned targets {list(self.targets)}, got {name!r}")

    def scores(self, name: str) -> Tensor:
        """Selection score of each entry of target ``name``: ema * uncertainty (ema alone for "movement")."""
        self._check_name(name)
        return self._ema[name].clone() if self.criterion == "movement" else self._ema[name] * self._unc[name]

    def fisher(self, name: str) -> Tensor:
        """EMA of the squared gradient of target ``name`` (the empirical Fisher diagonal)."""
        self._check_name(name)
        if not self.track_fisher:
            raise ValueError("fisher is not tracked: create the pruner with track_fisher=True")
        return self._fisher[name].clone()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _config(self) -> dict:
        return {
            "final_density": self.final_density, "total_steps": self.total_steps,
            "initial_warmup": self.initial_warmup, "final_warmup": self.final_warmup, "delta_t": self.delta_t,
            "criterion": self.criterion, "track_fisher": self.track_fisher,
        }

    def state_dict(self) -> dict:
        def copy(states: dict[str, Tensor]) -> dict[str, Tensor]:
            return {name: t.clone() for name, t in states.items()}

        return {
            "config": self._config(),
            "step": self.step_count,
            "nonfinite_steps": self.nonfinite_steps,
            "mask_updates": self.mask_updates,
            "ema": copy(self._ema),
            "uncertainty": copy(self._unc),
            "fisher": copy(self._fisher),
            "masks": copy(self._masks),
        }

    def load_state_dict(self, state: Mapping) -> None:
        required = {"config", "step", "nonfinite_steps", "mask_updates", "ema", "uncertainty", "fisher", "masks"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"pruner state is missing keys {sorted(missing)}")
        if dict(state["config"]) != self._config():
            raise ValueError(f"pruner state config {state['config']} differs from this pruner's {self._config()}")
        groups = [("ema", self._ema), ("uncertainty", self._unc), ("fisher", self._fisher), ("masks", self._masks)]
        for key, own in groups:
            given = state[key]
            if set(given) != set(own):
                raise ValueError(f"pruner state {key!r} has targets {sorted(given)}, expected {sorted(own)}")
            for name, tensor in given.items():
                if tuple(tensor.shape) != tuple(own[name].shape):
                    raise ValueError(f"pruner state {key}[{name!r}] has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(own[name].shape)}")
        for key, own in groups:
            for name, tensor in state[key].items():
                own[name].copy_(tensor)
        self.step_count = int(state["step"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.mask_updates = int(state["mask_updates"])
        self.apply_masks()


@torch.no_grad()
def magnitude_prune(
    model: nn.Module, density: float, targets: Mapping[str, nn.Module] | Iterable[str] | None = None
) -> dict[str, Tensor]:
    """Keeps the ``round(density * total)`` largest ``|w|`` over all targets (one global threshold), zeroes the
    rest in place and returns the keep-masks (name -> bool tensor)."""
    _check_density(density, "density")
    resolved = resolve_targets(model, targets)
    names = list(resolved)
    weights = [resolved[n].weight.detach() for n in names]
    magnitudes = [w.abs().float().contiguous() for w in weights]
    masks = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    total = sum(w.numel() for w in weights)
    threshold, ties = ops.global_topk_threshold(magnitudes, None, None, _global_k(density, total))
    ops.apply_threshold_mask_(masks, weights, magnitudes, None, threshold, ties)
    return dict(zip(names, masks))


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
    def step(self, grads_finite: bool = False) -> None:
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


# ---------------------------------------------------------------------------------------------------- registered
# Pruners of LPAFConfig.pruner: fn(model, final_density, total_steps, targets, config) -> the training-step hook.
@register_pruner("first-order", provides=("importance", "fisher"))
def _first_order(model: nn.Module, final_density: float, total_steps: int, targets, config) -> FirstOrderPruner:
    from lrsparse.registry import FACTORIZERS

    # The Fisher EMA is a third state tensor per weight to read and write every step: kept only when used.
    track_fisher = config.factorizes and "fisher" in FACTORIZERS[config.factorizer].needs
    return FirstOrderPruner(model, final_density, total_steps, targets=targets, track_fisher=track_fisher,
                            initial_warmup_fraction=config.initial_warmup_fraction,
                            final_warmup_fraction=config.final_warmup_fraction, delta_t=config.delta_t,
                            beta1=config.beta1, beta2=config.beta2, beta_fisher=config.beta_fisher,
                            criterion=config.criterion)


@register_pruner("magnitude")
def _magnitude(model: nn.Module, final_density: float, total_steps: int, targets, config) -> MagnitudePruningSchedule:
    return MagnitudePruningSchedule(model, final_density, total_steps, dict(targets),
                                    config.initial_warmup_fraction, config.final_warmup_fraction, config.delta_t)
