"""``LPAFConfig``: every option of Low-Rank Prune-And-Factorize, and the presets of the baselines.

One dataclass holds the method (what to prune, how, how to factorize, how to allocate ranks, how to move from the
sparse to the low-rank path); the training recipe around it lives in :mod:`lrsparse.recipe`. Each field's default,
help and choices are declared once, in its ``metadata``; the CLI is generated from them (:mod:`lrsparse.cli`).
Choices of ``pruner``, ``factorizer`` and ``rank_allocation`` are the registered components
(:mod:`lrsparse.registry`). ``to_dict()`` / ``from_dict()`` carry a format version; the dict is saved with every
compressed model (``lrsparse_layers.json``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from lrsparse import registry

CONFIG_FORMAT = 2
# Fields of earlier formats that were removed, with why: a saved config that used one (a non-default value) cannot be
# rebuilt faithfully, so loading it is an error naming the field; at its default it is dropped.
REMOVED_FIELDS = {
    # format 2: the per-layer output matching of mixed-rank fine-tuning to the frozen sparse path; it measured no gain
    # over the blend (CoLA and MRPC, 3 seeds each, 2026-12-02) and no saving of time, so it did not earn its place.
    "mixed_rank_match": (1, 0.0),
}
CRITERIA = ("sensitivity", "movement")
MIXED_RANK_STRATEGIES = ("blend", "stochastic", "none")


def option(default: Any = dataclasses.MISSING, help: str = "", choices=None, registry_of: str | None = None,
           cli: str | None = None, required: bool = False, **kwargs) -> Any:
    """A dataclass field whose metadata the CLI reads: ``help``, static ``choices`` or the registry whose names
    are the choices (plus "none" where allowed), an explicit flag name ``cli``, ``required`` on the command line."""
    metadata = {"help": help, "choices": choices, "registry": registry_of, "cli": cli, "required": required}
    metadata.update(kwargs)
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def registry_choices(name: str, allow_none: bool) -> list[str]:
    registry.load_builtin_components()
    names = list({"pruner": registry.PRUNERS, "factorizer": registry.FACTORIZERS,
                  "rank_allocator": registry.RANK_ALLOCATORS}[name])
    return names + (["none"] if allow_none else [])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LPAFConfig:
    """The compression method. ``lrsparse.PRESETS`` holds the method and its baselines as values of this class
    (frozen: derive a variant with :meth:`replace`)."""

    keep: float = option(0.25, "fraction of the target layers' parameters to keep, in (0, 1]", required=True)
    targets: tuple[str, ...] | None = option(
        None, "regexes (re.search) of the linear layers to compress (default: the architecture's attention and "
        "feed-forward projections, see lrsparse.targets)", nargs="+")
    # ------------------------------------------------------------------ pruning during fine-tuning
    pruner: str = option("first-order", "pruning schedule during fine-tuning ('none': plain fine-tuning)",
                         registry_of="pruner", allow_none=True)
    criterion: str = option("sensitivity", "first-order score: sensitivity |w g| (PLATON) or movement -w g",
                            choices=CRITERIA)
    beta1: float = option(0.85, "EMA factor of the importance score (PLATON beta1)")
    beta2: float = option(0.95, "EMA factor of the importance's uncertainty (PLATON beta2)")
    beta_fisher: float = option(0.99, "EMA factor of the squared gradient (Fisher diagonal, for fwsvd)")
    initial_warmup_fraction: float = option(0.1, "fraction of the pruning steps before the first mask update")
    final_warmup_fraction: float = option(0.3, "fraction of the pruning steps trained at the final density")
    delta_t: int = option(10, "optimizer steps between mask updates")
    # ------------------------------------------------------------------ factorization
    # Default "activation" (fit each layer's outputs on calibration inputs): it beat "sparsity-aware" on every task
    # of the quality grid (benchmarks/results/quality.md, README "Quality protocol").
    factorizer: str = option("activation", "how each target matrix becomes U V ('none': keep it sparse); the "
                             "activation-aware ones fit each layer's outputs on calibration_samples training "
                             "examples (the API: compressor.factorize(calibration=...))",
                             registry_of="factorizer", allow_none=True, cli="factorization")
    factorization_iters: int = option(100, "EM iterations of the weighted low-rank fit (cost grows linearly)")
    factorization_tol: float = option(1e-6, "EM stops when the weighted error falls by less than this fraction")
    omega_pruned_weight: float = option(0.5, "sparsity-aware weight of pruned entries, in [0, 1]")
    omega_kept_floor: float = option(0.5, "sparsity-aware weight of the least important kept entries, in [0, 1]")
    omega_quantile: float = option(0.9, "importance quantile that gets the full weight 1, in [0, 1]")
    rank_allocation: str = option("budget", "how the parameter budget is split into per-layer ranks",
                                  registry_of="rank_allocator")
    rank_multiple: int = option(1, "round ranks down to a multiple of this (e.g. 8 for tensor cores)")
    min_rank: int = option(1, "rank floor of every layer (may exceed a layer's share of the budget)")
    calibration_samples: int = option(256, "training examples whose layer inputs calibrate an activation-aware "
                                      "factorizer (their input covariance)")
    activation_damping: float = option(0.01, "activation-aware factorizers: ridge added to the input covariance, as a "
                                       "fraction of its mean diagonal (keeps rarely used input directions fitted)")
    # ------------------------------------------------------------------ mixed-rank fine-tuning
    mixed_rank: str = option("blend", "how the sparse path hands over to U V: blend (alpha ramps 0 -> 1), "
                             "stochastic (per-forward choice with probability alpha), none (low-rank only)",
                             choices=MIXED_RANK_STRATEGIES)
    blend_fraction: float = option(0.5, "fraction of mixed-rank fine-tuning over which alpha goes 0 -> 1")

    def __post_init__(self) -> None:
        if not _is_number(self.keep) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.targets is not None:
            if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)) or not self.targets \
                    or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be a non-empty list of regex strings or None, got {self.targets!r}")
            for pattern in self.targets:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"targets: {pattern!r} is not a valid regex ({exc})") from exc
            object.__setattr__(self, "targets", tuple(self.targets))  # frozen: presets are shared
        for name, kind in (("pruner", "pruner"), ("factorizer", "factorizer"), ("rank_allocation", "rank_allocator")):
            choices = registry_choices(kind, allow_none=name != "rank_allocation")
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name, choices in (("criterion", CRITERIA), ("mixed_rank", MIXED_RANK_STRATEGIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "beta_fisher"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("initial_warmup_fraction", "final_warmup_fraction", "omega_pruned_weight", "omega_kept_floor",
                     "omega_quantile", "blend_fraction"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.initial_warmup_fraction + self.final_warmup_fraction >= 1.0:
            raise ValueError("initial_warmup_fraction + final_warmup_fraction must be < 1 (no steps left to prune)")
        if not _is_number(self.activation_damping) or self.activation_damping < 0:
            raise ValueError(f"activation_damping must be >= 0, got {self.activation_damping!r}")
        for name in ("delta_t", "factorization_iters", "rank_multiple", "min_rank", "calibration_samples"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_number(self.factorization_tol) or self.factorization_tol < 0:
            raise ValueError(f"factorization_tol must be >= 0, got {self.factorization_tol!r}")
        self._check_statistics()

    def _check_statistics(self) -> None:
        """The statistics the factorizer needs must be collected by the pruning stage: by the pruner, or (without
        one) by a first-order pruner that keeps every weight (see :meth:`statistics_pruner`)."""
        if self.factorizer == "none":
            if self.pruner == "none":
                raise ValueError("pruner and factorizer cannot both be 'none': the method would do nothing")
            return
        field_names = {f.name for f in dataclasses.fields(self)}
        unknown = {k: v for k, v in registry.FACTORIZERS[self.factorizer].options.items() if v not in field_names}
        if unknown:
            raise ValueError(f"factorizer {self.factorizer!r} was registered with options {unknown} naming no "
                             "LPAFConfig field")
        # Calibration statistics come from factorize(calibration=...), not from the pruning stage.
        needs = [n for n in registry.FACTORIZERS[self.factorizer].needs if n in registry.PRUNER_STATISTICS]
        if not needs:
            return
        source = self.statistics_pruner()
        provides = registry.PRUNERS[source].provides if source in registry.PRUNERS else ()
        missing = [need for need in needs if need not in provides]
        if missing:
            raise ValueError(f"factorizer {self.factorizer!r} needs {missing}, which pruner {self.pruner!r} does not "
                             f"collect (choose a pruner that provides them, e.g. 'first-order')")

    # ------------------------------------------------------------------ what the method implies
    @property
    def prunes(self) -> bool:
        return self.pruner != "none"

    @property
    def factorizes(self) -> bool:
        return self.factorizer != "none"

    def statistics_pruner(self) -> str | None:
        """The pruner that runs during the first training stage: the configured one, else "first-order" at
        density 1 when the factorizer needs statistics (it then collects them without pruning), else None."""
        if self.prunes:
            return self.pruner
        if self.factorizes and set(registry.FACTORIZERS[self.factorizer].needs) & set(registry.PRUNER_STATISTICS):
            return "first-order"
        return None

    @property
    def calibrates(self) -> bool:
        """Whether factorization needs calibration inputs (an activation-aware factorizer)."""
        return self.factorizes and "input_covariance" in registry.FACTORIZERS[self.factorizer].needs

    def factorizer_options(self) -> dict[str, Any]:
        """Keyword options of the factorizer, read from the fields its registration names."""
        return {key: getattr(self, name) for key, name in registry.FACTORIZERS[self.factorizer].options.items()}

    def solver_options(self, seed: int) -> dict[str, Any]:
        return {"max_iters": self.factorization_iters, "tol": self.factorization_tol, "seed": seed}

    def replace(self, **changes) -> "LPAFConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if values["targets"] is not None:
            values["targets"] = list(values["targets"])  # as JSON gives it back
        return {"format_version": CONFIG_FORMAT, **values}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LPAFConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"LPAFConfig data must be a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in range(1, CONFIG_FORMAT + 1):
            raise ValueError(f"LPAFConfig format_version must be 1 to {CONFIG_FORMAT}, got {version!r}")
        data = dict(data)
        for name, (last_format, default) in REMOVED_FIELDS.items():
            if version <= last_format and name in data:
                value = data.pop(name)
                if value != default:
                    raise ValueError(f"LPAFConfig field {name!r} (= {value!r}) was removed after format_version "
                                     f"{last_format}; this config needs an lrsparse that still has it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format_version"})
        if unknown:
            raise ValueError(f"LPAFConfig has no field(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k != "format_version"})


PRESETS: dict[str, LPAFConfig] = {
    # First-order pruning, activation-aware factorization of the pruned matrices, mixed-rank fine-tuning: the method.
    "lpaf": LPAFConfig(),
    # Baselines, each with the same training budget: plain fine-tuning then truncated SVD ...
    "svd": LPAFConfig(pruner="none", factorizer="svd"),
    # ... or Fisher-weighted SVD (Hsu et al. 2022; the Fisher diagonal is collected during fine-tuning) ...
    "fwsvd": LPAFConfig(pruner="none", factorizer="fwsvd"),
    # ... global magnitude pruning on the same schedule, then SVD ...
    "magnitude-svd": LPAFConfig(pruner="magnitude", factorizer="svd"),
    # ... and first-order pruning alone (a sparse model, not factorized).
    "prune-only": LPAFConfig(factorizer="none"),
}
