"""Registries of the method's components: factorizers, rank allocators and pruners.

A component is one decorated function in one file. Registering it makes its name a valid :class:`~lrsparse.config
.LPAFConfig` value and a CLI choice of any parser built afterwards (the CLI reads the registries when it builds its
parser: register in your script, then call ``lrsparse.cli.main``)::

    @lrsparse.register_factorizer("my-svd")
    def my_svd(weight, rank, stats, *, max_iters, tol, seed):
        ...
        return U, V

What the rest of the method needs from a component is declared at registration, never tested by name: a
factorizer's ``needs`` ("importance", "fisher") decide whether the pruning stage must collect those statistics
("input_covariance": whether factorization needs calibration inputs, see :mod:`lrsparse.activation`); a
pruner's ``provides`` says which it collects; an allocator's ``needs_spectra`` whether singular values are
computed for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor

PRUNER_STATISTICS = ("importance", "fisher")  # collected by a pruner during the first training stage
CALIBRATION_STATISTICS = ("input_covariance",)  # collected by a forward pass over calibration inputs
STATISTICS = PRUNER_STATISTICS + CALIBRATION_STATISTICS


@dataclass(frozen=True)
class LayerStatistics:
    """What the pruning stage learned about one target matrix, laid out ``out x in`` (None when not collected)."""

    mask: Tensor | None = None
    importance: Tensor | None = None
    fisher: Tensor | None = None
    input_covariance: Tensor | None = None  # E[x x^T] of the layer's inputs (in x in, float64)


@dataclass(frozen=True)
class Factorizer:
    """``fn(weight, rank, stats, *, max_iters, tol, seed, **options) -> (U, V)`` on a float32 ``out x in`` weight.

    ``needs``: statistics the fit requires. ``options``: keyword -> LPAFConfig field passed to ``fn``.
    ``spectrum_matrix(weight, stats, **options)``: the matrix whose singular values rank allocation by energy
    compares (the matrix the method actually truncates); the weight itself when None.
    """

    name: str
    fn: Callable
    needs: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    spectrum_matrix: Callable | None = None


@dataclass(frozen=True)
class RankAllocator:
    """``fn(shapes_nnz, keep, multiple, spectra) -> {name: rank}`` (``spectra`` is None unless ``needs_spectra``)."""

    name: str
    fn: Callable
    needs_spectra: bool = False


@dataclass(frozen=True)
class Pruner:
    """``fn(model, final_density, total_steps, targets, config) -> object`` with ``step()`` (after each optimizer
    step; a ``grads_finite=False`` keyword, if it has one, is set when the caller has checked the gradients), ``masks`` (name -> bool keep-mask, in the weight's layout), ``density()``, ``state_dict()``,
    ``load_state_dict()``, plus ``scores(name)`` / ``fisher(name)`` for the statistics it ``provides``."""

    name: str
    fn: Callable
    provides: tuple[str, ...] = ()


FACTORIZERS: dict[str, Factorizer] = {}
RANK_ALLOCATORS: dict[str, RankAllocator] = {}
PRUNERS: dict[str, Pruner] = {}


def _check_name(name: str, registry: dict, kind: str) -> None:
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"{kind} name must be a non-empty string other than 'none', got {name!r}")
    if name in registry:
        raise ValueError(f"a {kind} named {name!r} is already registered")


def _check_statistics(values, argument: str, allowed: tuple[str, ...] = STATISTICS) -> tuple[str, ...]:
    values = tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{argument} must be a subset of {allowed}, got {unknown}")
    return values


def register_factorizer(name: str, *, needs=(), options: Mapping[str, str] | None = None,
                        spectrum_matrix: Callable | None = None):
    """Decorator registering a factorization under ``name`` (see :class:`Factorizer`)."""
    _check_name(name, FACTORIZERS, "factorizer")
    needs = _check_statistics(needs, "needs")

    def decorate(fn: Callable) -> Callable:
        FACTORIZERS[name] = Factorizer(name, fn, needs, dict(options or {}), spectrum_matrix)
        return fn

    return decorate


def register_rank_allocator(name: str, *, needs_spectra: bool = False):
    """Decorator registering a rank allocation scheme under ``name`` (see :class:`RankAllocator`)."""
    _check_name(name, RANK_ALLOCATORS, "rank allocator")

    def decorate(fn: Callable) -> Callable:
        RANK_ALLOCATORS[name] = RankAllocator(name, fn, bool(needs_spectra))
        return fn

    return decorate


def register_pruner(name: str, *, provides=()):
    """Decorator registering a pruning schedule under ``name`` (see :class:`Pruner`)."""
    _check_name(name, PRUNERS, "pruner")
    provides = _check_statistics(provides, "provides", PRUNER_STATISTICS)

    def decorate(fn: Callable) -> Callable:
        PRUNERS[name] = Pruner(name, fn, provides)
        return fn

    return decorate


def unregister(kind: str, name: str) -> None:
    """Removes a registered component (``kind``: "factorizer", "rank_allocator" or "pruner"); for tests and
    notebooks that register a component more than once."""
    registries = {"factorizer": FACTORIZERS, "rank_allocator": RANK_ALLOCATORS, "pruner": PRUNERS}
    if kind not in registries:
        raise ValueError(f"kind must be one of {sorted(registries)}, got {kind!r}")
    registries[kind].pop(name, None)


def load_builtin_components() -> None:
    """Imports the modules whose decorators register the built-in components."""
    import lrsparse.activation  # noqa: F401  activation-aware factorizers
    import lrsparse.factorization  # noqa: F401  factorizers and rank allocators
    import lrsparse.pruning  # noqa: F401  pruners (imported by factorization too; named for clarity)
