"""The training loop of every stage (one flat loop, top to bottom) and evaluation.

Each step: forward (under autocast for bf16/fp16), backward (fp16: of the scaled loss, then unscaled), clip and apply
the gradients (a step with non-finite loss or gradients is skipped),
``compressor.step(optimizer)`` (pruning, or the mixed-rank schedule), zero the gradients, advance the LR schedule,
and every ``checkpoint_every`` steps hand the loop's state to ``save_progress`` so a killed run continues exactly.
"""
from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from lrsparse.checkpoint import CheckpointError
from lrsparse.distributed import gather_objects, is_distributed, is_main_process, rank, shard_bounds, world_size
from lrsparse.layers import MixedRankLinear
from lrsparse.modeling import autocast
from lrsparse.tasks import resolve_task

log = logging.getLogger("lrsparse.training")

# fp16: consecutive gradient overflows after which the scaler is not finding a scale but the gradients are broken.
OVERFLOW_STREAK_LIMIT = 20


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal only, so logs and CI output stay clean; one bar per run (rank 0's).
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None if is_main_process() else True,
                file=sys.stderr)


def seed_stage(seed: int, stage_index: int) -> int:
    """Seeds torch for one stage; the stage's data order uses the returned seed too (the same on every rank of a
    data-parallel run, while dropout draws differ per rank, as every rank's shard of the batch is other examples)."""
    stage_seed = seed * 1000 + stage_index
    torch.manual_seed(stage_seed + 1_000_003 * rank() if is_distributed() else stage_seed)
    return stage_seed


class _BatchStream:
    """Endless shuffled batches of ``dataset``. Epoch ``e`` is a permutation drawn from a generator seeded with
    ``(seed, e)``, so the position (epoch, batches taken in it) is all a resumed stage needs to see the same batches.
    The last batch of an epoch may be smaller (as a DataLoader without drop_last).

    ``batch_size`` is global: in a data-parallel run every rank draws the same global batch and takes its contiguous
    share. Each batch comes with the weight ``n_rank * world / n`` of its share's mean loss, so that DDP's average of
    the ranks' gradients is the gradient of the global batch's mean loss also when the shares differ (1 when they are
    equal, and always in one process). A rank whose share is empty (a last batch smaller than the world) gets one
    example at weight 0, so that every rank still joins the gradient all-reduce."""

    def __init__(self, dataset, batch_size: int, collate, seed: int):
        self.dataset, self.batch_size, self.collate, self.seed = dataset, batch_size, collate, seed
        self.rank, self.world = rank(), world_size()
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
        indices = self._order[start:start + self.batch_size]
        low, high = shard_bounds(len(indices), self.rank, self.world)
        weight = (high - low) * self.world / len(indices)
        mine = indices[low:high] or indices[:1]
        return self.collate([self.dataset[i] for i in mine]), weight

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
    """This process's RNG state; in a data-parallel run every rank's, in rank order (a collective), since each
    rank draws its own dropout."""
    local = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None}
    return {"ranks": gather_objects(local)}


def _set_rng_state(state: dict, device: torch.device) -> None:
    if "ranks" in state:
        if len(state["ranks"]) != world_size():
            raise CheckpointError(f"the checkpoint was made by {len(state['ranks'])} rank(s), this run has "
                                  f"{world_size()}: resume with the same number of processes")
        state = state["ranks"][rank()]
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


def train(model: nn.Module, dataset, config, steps: int, stage_seed: int, desc: str, collate, device: torch.device,
          compressor=None, resume: dict | None = None, save_progress: Callable[[dict], None] | None = None,
          writer=None, distiller=None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict:
    """``steps`` AdamW steps with linear warmup/decay; ``config`` is the run's :class:`~lrsparse.recipe.RecipeConfig`.

    ``compressor.step(optimizer)`` (a :class:`~lrsparse.compressor.Compressor`, or None) runs after each optimizer
    step, before the gradients are cleared; it gets the optimizer because the mixed-rank schedule drops the sparse
    weights from it. Steps with a non-finite loss are skipped and counted; so are steps with non-finite gradients,
    unless ``config.nonfinite_grads`` is "error" (FloatingPointError naming the step and the parameters).
    ``config.precision`` "bf16"/"fp16" runs the forward under autocast (the model's weights, the optimizer and the
    compressor's state stay fp32); fp16 scales the loss with a GradScaler, and a step whose scaled gradients
    overflow is skipped (counted in ``overflow_steps``) while the scale backs off, as ``GradScaler.step`` does.

    Every ``config.checkpoint_every`` steps ``save_progress(training_state)`` gets what is needed, besides the model
    and the compressor, to continue exactly (optimizer, LR schedule, data position, RNG, counters); ``resume`` is
    such a state. ``writer`` (a TensorBoard SummaryWriter) gets ``<desc>/loss`` and the density or alpha per step.
    ``distiller`` (a :class:`~lrsparse.distillation.Distiller`) replaces the task loss by the distillation objective.
    ``wrap`` (data-parallel runs) gives the module the forward runs through, e.g. DistributedDataParallel over
    ``model``; it is called again when the compressor's mixed-rank schedule drops the sparse weights (the parameters
    change). In such a run ``config.batch_size`` is the global batch and every rank trains on its share of it.
    """
    model.train()
    forward = model if wrap is None else wrap(model)
    optimizer = _optimizer(model, config.lr, config.weight_decay)
    scheduler = _linear_schedule(optimizer, steps, config.warmup_ratio)
    batches = _BatchStream(dataset, config.batch_size, collate, stage_seed)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    counters = {"step": 0, "skipped_steps": 0, "nonfinite_grad_steps": 0, "overflow_steps": 0, "loss_sum": 0.0}

    def training_state() -> dict:
        return {"counters": dict(counters), "optimizer": _optimizer_state(optimizer, model),
                "lr_scheduler": scheduler.state_dict(), "grad_scaler": None if scaler is None else scaler.state_dict(),
                "batches": batches.state_dict(), "rng": _rng_state(device)}

    if resume is not None:
        if resume["counters"]["step"] >= steps:
            raise CheckpointError(f"{desc}: checkpoint at step {resume['counters']['step']} of a {steps}-step stage")
        _load_optimizer_state(optimizer, model, resume["optimizer"])
        scheduler.load_state_dict(resume["lr_scheduler"])
        batches.load_state_dict(resume["batches"])
        counters.update(resume["counters"])
        if scaler is not None and resume.get("grad_scaler") is not None:
            scaler.load_state_dict(resume["grad_scaler"])
        _set_rng_state(resume["rng"], device)
        log.info("%s: resuming at step %d of %d", desc, counters["step"], steps)
    overflow_streak = 0
    with _progress(steps, desc) as bar:
        bar.update(counters["step"])
        while counters["step"] < steps:
            step = counters["step"] + 1
            batch, weight = next(batches)
            batch = _to_device(batch, device)
            with autocast(config.precision, device):
                loss = forward(**batch).loss if distiller is None else distiller(forward, batch)
            if weight != 1.0:  # an uneven share of a data-parallel batch (see _BatchStream)
                loss = loss * weight
            if not torch.isfinite(loss):
                counters["skipped_steps"] += 1
                log.warning("%s step %d: non-finite loss %s, step skipped", desc, step, float(loss))
            else:
                if scaler is None:
                    loss.backward()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                applied = _apply_gradients(model, optimizer, config, desc, step, overflow_expected=scaler is not None)
                if scaler is not None:
                    scaler.update()  # backs the scale off after an overflow, grows it after a run of good steps
                overflow_streak = 0 if applied or scaler is None else overflow_streak + 1
                if overflow_streak == OVERFLOW_STREAK_LIMIT:
                    # The scaler backs off by half per overflow: this many in a row is not scaling but a gradient
                    # that is non-finite at any scale.
                    message = (f"{desc} step {step}: {OVERFLOW_STREAK_LIMIT} fp16 overflows in a row (loss scale now "
                               f"{scaler.get_scale():.3g}): the gradients are non-finite at any scale")
                    if config.nonfinite_grads == "error":
                        raise FloatingPointError(message)
                    log.warning("%s; steps keep being skipped", message)
                if applied:
                    if compressor is not None:  # _apply_gradients has checked that every gradient is finite
                        phase = None if wrap is None else compressor.phase
                        compressor.step(optimizer, grads_finite=True)
                        if wrap is not None and compressor.phase != phase:  # the sparse weights left the model
                            forward = wrap(model)
                    counters["loss_sum"] += loss.item()
                    if writer is not None:
                        _write_step_scalars(writer, desc, step, loss.item(), compressor)
                else:
                    counters["skipped_steps"] += 1
                    counters["overflow_steps" if scaler is not None else "nonfinite_grad_steps"] += 1
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
            "nonfinite_grad_steps": counters["nonfinite_grad_steps"], "overflow_steps": counters["overflow_steps"],
            "mean_loss": counters["loss_sum"] / max(1, done)}


def _write_step_scalars(writer, desc: str, step: int, loss: float, compressor) -> None:
    writer.add_scalar(f"{desc}/loss", loss, step)
    if compressor is None:
        return
    if compressor.phase == "prune" and compressor.density() is not None:
        writer.add_scalar(f"{desc}/density", compressor.density(), step)
    elif compressor.alpha is not None:
        writer.add_scalar(f"{desc}/alpha", float(compressor.alpha), step)


def _apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, config, desc: str,
                     step: int, overflow_expected: bool = False) -> bool:
    """Clips and applies the gradients; returns False (nothing applied) when they are not all finite.

    A non-finite gradient would turn every weight into NaN through the clipping factor and Adam's moments, so such
    a step is skipped, or with ``nonfinite_grads="error"`` raises naming the step and the parameters. Under fp16
    loss scaling (``overflow_expected``) an overflow is the scaler's normal probing: skipped quietly.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    total_norm = nn.utils.get_total_norm([p.grad for p in params])
    if not bool(torch.isfinite(total_norm)):
        if overflow_expected:
            log.debug("%s step %d: fp16 gradient overflow, step skipped, loss scale reduced", desc, step)
            return False
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
def evaluate(model: nn.Module, dataset, task, batch_size: int, collate, device: torch.device,
             desc: str = "eval", precision: str = "fp32") -> dict:
    """Task metrics (with "main") of ``model`` on ``dataset`` (forward under the autocast of ``precision``)."""
    task = resolve_task(task)
    was_training = model.training
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in task.output_names}
    # Data-parallel: every rank scores a contiguous block of the examples; the outputs are gathered in rank order, so
    # every rank computes the metrics of the whole set.
    low, high = shard_bounds(len(dataset), rank(), world_size())
    shard = dataset if (low, high) == (0, len(dataset)) else torch.utils.data.Subset(dataset, range(low, high))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with _progress(len(loader), desc) as bar:
        for batch in loader:
            inputs = {key: value for key, value in batch.items() if key not in task.label_names}
            with autocast(precision, device):
                result = model(**_to_device(inputs, device))
            for name, batches in outputs.items():
                batches.append(result[name].float().cpu())
            bar.update(1)
    model.train(was_training)
    if is_distributed():
        outputs = {name: [batch for part in gather_objects(batches) for batch in part]
                   for name, batches in outputs.items()}
    return task.metrics(outputs, dataset)


def steps_for(epochs: float, examples: int, batch_size: int) -> int:
    return math.ceil(epochs * math.ceil(examples / batch_size)) if epochs > 0 else 0
