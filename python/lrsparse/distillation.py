"""Knowledge distillation from a frozen teacher: the training objective of the pruning and mixed-rank stages.

``loss = (1 - weight) * task_loss + weight * output_loss + hidden_weight * hidden_loss`` where

* ``output_loss`` compares the student's task outputs with the teacher's: for class scores the KL divergence of the
  temperature-softened distributions times ``temperature**2`` (Hinton et al. 2015: keeps the gradient scale of the
  soft targets independent of the temperature), for a regression score (STS-B) the squared error; for question
  answering the start and end logits are two distributions over positions, their losses averaged; for sentence
  embeddings (which have no task loss: ``weight`` 1) the cosine distance ``1 - cos(e_s, e_t)``, averaged over the
  sentences, what cosine-similarity search sees (scale-free, and for normalized embeddings half their squared error);
* ``hidden_loss`` matches the hidden states of every layer (the embeddings' output and each encoder layer's), each
  as the relative squared error ``||h_s - h_t||^2 / ||h_t||^2`` over the real (unpadded) tokens, averaged over the
  layers: scale-free, so one weight suits every layer and model width. The compressed layers change exactly what
  these states are computed from, so this is the layer-wise signal that tells each block what it should compute.

The teacher runs without gradients, in eval mode (no dropout), under the same autocast as the student.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension, averaged over rows."""
    student = student.float().reshape(-1, student.shape[-1])
    teacher = teacher.float().reshape(-1, teacher.shape[-1])
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def cosine_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of ``1 - cos(student_row, teacher_row)``."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


OUTPUT_LOSSES = ("soft-targets", "mse", "cosine")


def hidden_state_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor | None) -> Tensor:
    """Mean over layers of ``||h_s - h_t||^2 / ||h_t||^2`` over the tokens whose attention mask is 1."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} hidden states, teacher {len(teacher)}: distillation of hidden "
                         "states needs the same number of layers")
    losses = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if s.shape != t.shape:
            raise ValueError(f"student hidden state of shape {tuple(s.shape)} differs from the teacher's "
                             f"{tuple(t.shape)}")
        if attention_mask is not None:
            keep = attention_mask.to(s.dtype).unsqueeze(-1)
            s, t = s * keep, t * keep
        losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(losses).mean()


class Distiller:
    """The distillation objective around a frozen ``teacher``: ``distiller(student, batch)`` runs both models on
    ``batch`` and returns the combined loss (see the module docstring).

    ``outputs`` names the model outputs to match ("logits", "start_logits"/"end_logits" for question answering,
    "sentence_embedding"); ``output_loss`` is how: "soft-targets" (class scores), "mse" (a regression score) or
    "cosine" (embeddings). A student without a task loss (no labels) needs ``weight`` 1. ``teacher_seconds``
    accumulates the time spent in the teacher's forward, ``last_parts`` holds the last step's loss terms.
    """

    def __init__(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0,
                 outputs: Sequence[str] = ("logits",), output_loss: str = "soft-targets") -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight!r}")
        if output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"output_loss must be one of {list(OUTPUT_LOSSES)}, got {output_loss!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature, self.hidden_weight = float(weight), float(temperature), float(hidden_weight)
        self.outputs, self.output_loss = tuple(outputs), output_loss
        self._teacher_seconds = 0.0
        self._cuda_events: list = []  # (start, end) per teacher forward on a GPU, read without a per-step sync
        self.last_parts: dict[str, Tensor] = {}

    @property
    def teacher_seconds(self) -> float:
        """Seconds spent in the teacher's forward so far (on a GPU, its kernels' time: synchronizes once)."""
        if self._cuda_events:
            self._cuda_events[-1][1].synchronize()
            self._teacher_seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1e3
            self._cuda_events = []
        return self._teacher_seconds

    @property
    def teacher_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.teacher.state_dict().values())

    def _output_loss(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
        losses = []
        for name in self.outputs:
            s, t = student[name], teacher[name]
            if self.output_loss == "mse":
                losses.append(F.mse_loss(s.float(), t.float()))
            elif self.output_loss == "cosine":
                losses.append(cosine_distance_loss(s, t))
            else:
                losses.append(soft_target_loss(s, t, self.temperature))
        return torch.stack(losses).mean()

    def __call__(self, student: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        hidden = self.hidden_weight > 0
        result = student(**batch, output_hidden_states=hidden)
        if result.loss is None and self.weight < 1:
            raise ValueError(f"the student returned no task loss (no labels in the batch): distillation weight must be "
                             f"1 to train on the teacher's outputs alone, got {self.weight}")
        if self.weight == 0 and not hidden:
            self.last_parts = {"task": result.loss.detach()}
            return result.loss
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
        on_gpu = next(self.teacher.parameters()).is_cuda
        start = torch.cuda.Event(enable_timing=True) if on_gpu else time.perf_counter()
        if on_gpu:
            start.record()
        with torch.no_grad():
            reference = self.teacher(**inputs, output_hidden_states=hidden)
        if on_gpu:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_events.append((start, end))
        else:
            self._teacher_seconds += time.perf_counter() - start
        loss = (1.0 - self.weight) * result.loss if self.weight < 1 else 0.0
        parts = {} if result.loss is None else {"task": result.loss.detach()}
        if self.weight > 0:
            output_loss = self._output_loss(result, reference)
            loss = loss + self.weight * output_loss
            parts["output"] = output_loss.detach()
        if hidden:
            hidden_loss = hidden_state_loss(result.hidden_states, reference.hidden_states,
                                            batch.get("attention_mask"))
            loss = loss + self.hidden_weight * hidden_loss
            parts["hidden"] = hidden_loss.detach()
        self.last_parts = parts
        return loss
