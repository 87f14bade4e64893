"""One record per compressed layer, and the one path that rebuilds a model's layers from records.

The same :class:`LayerRecord` describes a layer in the Compressor (``compressor.records``), in checkpoints, in the
saved model's manifest (``lrsparse_layers.json``), in exports and in ``report.json``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lrsparse.layers import LowRankLinear, MixedRankLinear, replace_module
from lrsparse.targets import is_target_layer, linear_shape

# low-rank: U V (+ bias); mixed: U V beside the sparse path (mixed-rank fine-tuning); sparse: a pruned matrix kept
# as it is (prune-only).
KINDS = ("low-rank", "mixed", "sparse")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class LayerRecord:
    name: str
    in_features: int
    out_features: int
    rank: int | None
    bias: bool = True
    kind: str = "low-rank"
    masked: bool = False  # mixed: the sparse path has a keep-mask (it was pruned)
    density: float = 1.0  # kept fraction of the original matrix's entries
    factorizer: str | None = None
    relative_error: float | None = None  # ||W - U V||_F / ||W||_F at factorization

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"layer record name must be a non-empty string, got {self.name!r}")
        where = f"layer record {self.name!r}"
        for key in ("in_features", "out_features"):
            if not _positive_int(getattr(self, key)):
                raise ValueError(f"{where}: {key} must be a positive int, got {getattr(self, key)!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "sparse":
            if self.rank is not None:
                raise ValueError(f"{where}: a sparse layer has no rank, got {self.rank!r}")
        elif not _positive_int(self.rank) or self.rank > min(self.in_features, self.out_features):
            raise ValueError(f"{where}: rank must be an int in [1, {min(self.in_features, self.out_features)}], "
                             f"got {self.rank!r}")
        for key in ("bias", "masked"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{where}: {key} must be a bool, got {getattr(self, key)!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) \
                or not 0.0 <= self.density <= 1.0:
            raise ValueError(f"{where}: density must be a number in [0, 1], got {self.density!r}")
        if self.factorizer is not None and not isinstance(self.factorizer, str):
            raise ValueError(f"{where}: factorizer must be a string or null, got {self.factorizer!r}")
        if self.relative_error is not None and (isinstance(self.relative_error, bool) or not isinstance(
                self.relative_error, (int, float)) or not math.isfinite(self.relative_error)):
            raise ValueError(f"{where}: relative_error must be a finite number or null, got {self.relative_error!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "layer record") -> "LayerRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}")
        missing = sorted({"name", "in_features", "out_features", "rank"} - set(data))
        if missing:
            raise ValueError(f"{where} is missing field(s) {missing}")
        try:
            return cls(**dict(data))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc


def record_of(name: str, module: nn.Module, **details) -> LayerRecord:
    """The record of a low-rank or mixed-rank module as it is now (``details``: density, factorizer, ...)."""
    if isinstance(module, MixedRankLinear):
        kind, masked = "mixed", module.sparse_mask is not None
    elif isinstance(module, LowRankLinear):
        kind, masked = "low-rank", False
    else:
        raise TypeError(f"module {name!r} must be a LowRankLinear or MixedRankLinear, got {type(module).__name__}")
    details.setdefault("factorizer", module.method)
    return LayerRecord(name, module.in_features, module.out_features, module.rank, bias=module.bias is not None,
                       kind=kind, masked=masked, **details)


def records_of(model: nn.Module) -> list[LayerRecord]:
    """Records of every low-rank and mixed-rank module of ``model``, in module order (its structure)."""
    return [record_of(name, module) for name, module in model.named_modules()
            if isinstance(module, (LowRankLinear, MixedRankLinear))]


def rebuild_layers(model: nn.Module, records: Iterable[LayerRecord], device: torch.device | str | None = None,
                   where: str = "records") -> None:
    """Replaces the original linear layer named by each low-rank / mixed record with an uninitialized module of the
    recorded shape (weights are loaded next). ``device="meta"`` allocates nothing (load with ``assign=True``)."""
    for record in records:
        if record.kind == "sparse":
            continue  # a pruned matrix keeps its original module
        try:
            old = model.get_submodule(record.name)
        except AttributeError as exc:
            raise ValueError(f"{where} name layer {record.name!r}, which the model has not") from exc
        if not is_target_layer(old) or linear_shape(old) != (record.in_features, record.out_features):
            raise ValueError(f"{where}: layer {record.name!r} ({record.in_features} -> {record.out_features}) does "
                             f"not match the model's {old}")
        # Uninitialized tensors: no random init (it would be overwritten, and would consume the RNG).
        options = {"dtype": old.weight.dtype, "device": old.weight.device if device is None else device}
        out_f, in_f, rank = record.out_features, record.in_features, record.rank
        U, V = torch.empty(out_f, rank, **options), torch.empty(rank, in_f, **options)
        bias = torch.empty(out_f, **options) if record.bias else None
        if record.kind == "low-rank":
            new = LowRankLinear.from_factors(U, V, bias, method=record.factorizer)
        else:
            mask = torch.ones(out_f, in_f, dtype=torch.bool, device=options["device"]) if record.masked else None
            new = MixedRankLinear(U, V, bias, torch.empty(out_f, in_f, **options), mask, method=record.factorizer)
        replace_module(model, record.name, new)
