"""Factorizing (pruned) weight matrices into low-rank ``U V`` and swapping them into the model.

Methods
-------
``svd``
    Truncated SVD of the weight (the pruned weight when there is a mask): the best rank-r fit in Frobenius norm.
``fwsvd``
    Fisher-weighted SVD (Hsu et al. 2022): with row importance ``s_i = sqrt(sum_j F_ij)`` (F the empirical Fisher
    diagonal), ``W ~ diag(1/s) trunc_r(diag(s) W)``, the exact minimizer of ``sum_ij s_i^2 (W - U V)_ij^2``.
``sparsity-aware``
    Weighted low-rank fit ``min sum omega * (W - U V)^2`` (ops.weighted_lowrank, EM) of the pruned weight, with
    ``omega`` high on kept entries in proportion to their importance and lower on pruned ones (see
    :func:`sparsity_aware_omega`): pruned entries were pruned because the loss is insensitive to them, so the
    factorization need not reproduce their zeros exactly, while important kept entries should be met.

Weighting defaults (``pruned_weight`` 0.5, ``kept_floor`` 0.5, ``quantile`` 0.9)
    Measured with ``benchmarks/omega_weighting.py --steps 40 --dev-pairs 400 --settings ...`` (2 shared CPU
    cores, torch 2.13): all-MiniLM-L6-v2 pruned to density 0.25 by FirstOrderPruner during 40 steps of STS-B
    fine-tuning, every one of the 36 target matrices factorized at its budget rank. Errors are relative squared
    errors summed over layers: on kept entries weighted by importance (imp), on kept entries (kept), on the
    layer's output for real STS-B dev activations (out); zero-shot = STS-B dev Spearman (first 400 pairs) with all
    36 layers replaced and no further training (dense pretrained 0.922, the pruned model 0.896, for scale)::

        omega (pruned_weight:kept_floor)  imp    kept   out    zero-shot  seconds
        plain svd (= 1:1)                 0.123  0.350  0.172  0.857        7
        0.05:0.5                          0.025  0.093  0.389  0.350      325
        0.2:0.5                           0.049  0.196  0.208  0.798      307
        0.5:0.5  (default)                0.065  0.312  0.160  0.874      165
        0.5:1.0                           0.111  0.252  0.186  0.854      565

    A small weight on pruned entries fits the kept (important) entries best but lets ``U V`` grow large where the
    pruned matrix is zero; real activations are dense, so the layer outputs and the zero-shot score suffer (and
    EM converges slowly). Importance-proportional weights on kept entries (floor 0.5 rather than 1) lower the
    importance-weighted and output errors and raise zero-shot quality (the unweighted kept error rises a little).
    0.5:0.5 halves the importance-weighted error of plain SVD while beating it on output error and zero-shot
    quality, which is what mixed-rank fine-tuning starts from; it costs EM iterations (165 s vs 7 s). One run, one
    seed, one task: results are in benchmarks/results/omega_weighting.{md,json}.

Balance
    Every factorizer's ``U V`` leaves :func:`factorize_matrix` with each rank-1 component's norm split evenly between
    ``U[:, k]`` and ``V[k, :]`` (:func:`balance_factors`), as the truncated SVD splits the singular values: the
    unscaling of fwsvd and of the activation-aware factorizers otherwise leaves one factor many times larger, and
    Adam's equal-sized steps then move the product unevenly in mixed-rank fine-tuning.
"""
from __future__ import annotations

import heapq
from fractions import Fraction
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from lrsparse import ops
from lrsparse.layers import MixedRankLinear, replace_module
from lrsparse.pruning import resolve_targets
from lrsparse.records import LayerRecord
from lrsparse.registry import (FACTORIZERS, RANK_ALLOCATORS, LayerStatistics, register_factorizer,
                               register_rank_allocator)
from lrsparse.targets import is_conv1d, is_target_layer, out_in_weight

# Defaults of the omega weighting; see sparsity_aware_omega for how they were chosen.
DEFAULT_PRUNED_WEIGHT = 0.5
DEFAULT_KEPT_FLOOR = 0.5
DEFAULT_QUANTILE = 0.9


# ---------------------------------------------------------------------------------------------------- rank budget
def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")


def _round_rank(raw: int, multiple: int, full_rank: int) -> int:
    # Down to a multiple of `multiple` when one fits; otherwise the raw rank itself (still within budget); >= 1.
    rank = min(raw, full_rank)
    aligned = (rank // multiple) * multiple
    return aligned if aligned >= 1 else max(1, rank)


def allocate_ranks(
    shapes_nnz: Mapping[str, tuple[int, int, int]],
    keep: float,
    scheme: str = "budget",
    multiple: int = 1,
    spectra: Mapping[str, Tensor] | None = None,
) -> dict[str, int]:
    """Rank of each matrix ``name -> (m, n, nnz)`` so that the factors (``r (m + n)`` parameters) fit the budget,
    by the registered rank allocator ``scheme`` (built in: "budget", "uniform", "energy", see below).

    Ranks are rounded down to a multiple of ``multiple`` (when at least one multiple fits), capped at
    ``min(m, n)``, and at least 1 (the only case where a budget can be exceeded: one smaller than ``m + n``).
    """
    _check_keep(keep)
    if scheme not in RANK_ALLOCATORS:
        raise ValueError(f"scheme must be one of {sorted(RANK_ALLOCATORS)}, got {scheme!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if not shapes_nnz:
        raise ValueError("shapes_nnz is empty")
    for name, entry in shapes_nnz.items():
        if len(entry) != 3 or not all(isinstance(v, int) and v >= 0 for v in entry) or min(entry[:2]) < 1:
            raise ValueError(f"shapes_nnz[{name!r}] must be (m, n, nnz) of non-negative ints, got {entry!r}")
    allocator = RANK_ALLOCATORS[scheme]
    if allocator.needs_spectra and (spectra is None or set(spectra) != set(shapes_nnz)):
        raise ValueError(f"spectra must give the singular values of every matrix for scheme {scheme!r}")
    return allocator.fn(shapes_nnz, keep, multiple, spectra if allocator.needs_spectra else None)


@register_rank_allocator("budget")
def _budget_ranks(shapes_nnz, keep, multiple, spectra) -> dict[str, int]:
    """``r_i = floor(nnz_i / (m_i + n_i))``: each layer gets the parameters its pruned matrix kept."""
    return {name: _round_rank(nnz // (m + n), multiple, min(m, n)) for name, (m, n, nnz) in shapes_nnz.items()}


@register_rank_allocator("uniform")
def _uniform_ranks(shapes_nnz, keep, multiple, spectra) -> dict[str, int]:
    """``r_i = floor(keep m_i n_i / (m_i + n_i))``: the same fraction of every layer."""
    exact_keep = Fraction(keep)  # exact arithmetic: a float floor could land one rank over the budget
    return {name: _round_rank(int(exact_keep * m * n // (m + n)), multiple, min(m, n))
            for name, (m, n, _) in shapes_nnz.items()}


@register_rank_allocator("energy", needs_spectra=True)
def _energy_ranks(shapes_nnz, keep, multiple, spectra) -> dict[str, int]:
    """Greedy over all layers on the retained energy (squared singular values of the matrices each factorizer
    truncates) per parameter, under the total budget ``keep * sum(m_i n_i)``."""
    budget = Fraction(keep) * sum(m * n for m, n, _ in shapes_nnz.values())
    return _allocate_by_energy(shapes_nnz, spectra, budget, multiple)


def _allocate_by_energy(shapes_nnz, spectra, budget: Fraction, multiple: int) -> dict[str, int]:
    energy, cost, full = {}, {}, {}
    for name, (m, n, _) in shapes_nnz.items():
        full[name] = min(m, n)
        values = torch.as_tensor(spectra[name]).detach().double().flatten()[: full[name]]
        energy[name] = torch.cat([values.square(), values.new_zeros(full[name] - values.numel())]).tolist()
        cost[name] = m + n

    def next_rank(name: str, rank: int) -> int:
        return min((rank // multiple + 1) * multiple, full[name])

    first = {name: min(multiple, full[name]) for name in shapes_nnz}
    if sum(first[name] * cost[name] for name in shapes_nnz) > budget:
        first = dict.fromkeys(shapes_nnz, 1)
    ranks = dict(first)
    spent = sum(ranks[name] * cost[name] for name in shapes_nnz)

    # Max-heap on retained energy per parameter of each layer's next chunk of ranks; singular values decrease, so
    # a layer's later chunks never beat its earlier ones and greedy order is the order of the LP relaxation.
    heap = []

    def push(name: str) -> None:
        rank = ranks[name]
        if rank < full[name]:
            upper = next_rank(name, rank)
            gain = sum(energy[name][rank:upper])
            heapq.heappush(heap, (-gain / ((upper - rank) * cost[name]), name, upper))

    for name in shapes_nnz:
        push(name)
    while heap:
        _, name, upper = heapq.heappop(heap)
        extra = (upper - ranks[name]) * cost[name]
        if spent + extra > budget:
            continue  # this layer's chunk does not fit; smaller chunks of other layers may
        ranks[name], spent = upper, spent + extra
        push(name)
    return ranks


# ---------------------------------------------------------------------------------------------------- weighting
def sparsity_aware_omega(
    weight: Tensor,
    mask: Tensor | None = None,
    importance: Tensor | None = None,
    *,
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    kept_floor: float = DEFAULT_KEPT_FLOOR,
    quantile: float = DEFAULT_QUANTILE,
) -> Tensor:
    """Weights in [0, 1] for the sparsity-aware fit of ``weight``.

    Pruned entries (``mask`` 0; without a mask, the zeros of ``weight``) get ``pruned_weight``. Kept entries get
    ``kept_floor + (1 - kept_floor) * min(1, importance / q)`` with ``q`` the ``quantile`` of the importance over
    the kept entries: a per-matrix normalization robust to the heavy tail of PLATON scores (the top entries do not
    flatten the rest), clipped so omega stays <= 1 as the EM iteration requires. Without importance, kept entries
    get 1. Negative importance (movement scores) counts as 0.
    """
    for value, name in ((pruned_weight, "pruned_weight"), (kept_floor, "kept_floor"), (quantile, "quantile")):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    kept = (weight != 0) if mask is None else mask.bool()
    if tuple(kept.shape) != tuple(weight.shape):
        raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(kept.shape)}")
    kept_omega = torch.ones(weight.shape, dtype=torch.float32, device=weight.device)
    if importance is not None:
        if tuple(importance.shape) != tuple(weight.shape):
            raise ValueError(
                f"importance must have the shape of weight {tuple(weight.shape)}, got {tuple(importance.shape)}"
            )
        score = importance.detach().float().clamp_min(0)
        live = score[kept]
        if live.numel():
            # kthvalue rather than torch.quantile, which refuses inputs above 2^24 entries.
            position = min(live.numel(), max(1, int(round(quantile * live.numel()))))
            scale = float(live.kthvalue(position).values)
            if scale > 0:
                kept_omega = kept_floor + (1.0 - kept_floor) * (score / scale).clamp_max(1.0)
    return torch.where(kept, kept_omega, torch.full_like(kept_omega, float(pruned_weight))).contiguous()


def fisher_row_scale(fisher_rows: Tensor, out_features: int) -> Tensor:
    """FWSVD row scale ``sqrt(sum_j F_ij)`` from the Fisher matrix (``m x n``) or its row sums (``m``)."""
    rows = fisher_rows.detach().double()
    if rows.dim() == 2:
        rows = rows.sum(dim=1)
    if rows.dim() != 1 or rows.numel() != out_features:
        raise ValueError(
            f"fisher_rows must be the Fisher matrix ({out_features} x in) or its {out_features} row sums, "
            f"got shape {tuple(fisher_rows.shape)}"
        )
    if not bool(torch.isfinite(rows).all()) or bool((rows < 0).any()) or float(rows.max()) <= 0:
        raise ValueError("fisher_rows must be finite, non-negative and not all zero")
    scale = rows.sqrt()
    # Rows without any Fisher mass would divide by zero; they get a negligible (not zero) weight instead.
    return scale.clamp_min(float(scale.max()) * 1e-6).float()


# ---------------------------------------------------------------------------------------------------- factorizers
# Each takes a float32 out x in weight and returns float32 factors; registered names are LPAFConfig.factorizer values.
@register_factorizer("svd")
def truncated_svd(weight: Tensor, rank: int, stats: LayerStatistics, *, max_iters: int, tol: float,
                  seed: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD of the weight (the pruned weight when there is a mask): the best rank-r Frobenius fit."""
    return ops.weighted_lowrank(weight, rank, None, max_iters=max_iters, tol=tol, seed=seed)


def _fisher_scaled(weight: Tensor, stats: LayerStatistics) -> Tensor:
    if stats.fisher is None:
        raise ValueError("fisher_rows is required for method 'fwsvd' (the Fisher information of the weight)")
    return fisher_row_scale(stats.fisher, weight.shape[0]).to(weight.device)[:, None] * weight


@register_factorizer("fwsvd", needs=("fisher",), spectrum_matrix=lambda weight, stats: _fisher_scaled(weight, stats))
def fisher_weighted_svd(weight: Tensor, rank: int, stats: LayerStatistics, *, max_iters: int, tol: float,
                        seed: int) -> tuple[Tensor, Tensor]:
    """Fisher-weighted SVD (Hsu et al. 2022): ``diag(1/s) trunc_r(diag(s) W)`` with ``s_i = sqrt(sum_j F_ij)``."""
    scale = fisher_row_scale(stats.fisher, weight.shape[0]).to(weight.device) if stats.fisher is not None else None
    U, V = ops.weighted_lowrank(_fisher_scaled(weight, stats).contiguous(), rank, None, max_iters=max_iters, tol=tol,
                                seed=seed)
    return U / scale[:, None], V


_OMEGA_OPTIONS = {"pruned_weight": "omega_pruned_weight", "kept_floor": "omega_kept_floor",
                  "quantile": "omega_quantile"}


@register_factorizer("sparsity-aware", needs=("importance",), options=_OMEGA_OPTIONS,
                     spectrum_matrix=lambda weight, stats, **omega: sparsity_aware_omega(
                         weight, stats.mask, stats.importance, **omega).sqrt() * weight)
def sparsity_aware_svd(weight: Tensor, rank: int, stats: LayerStatistics, *, max_iters: int, tol: float, seed: int,
                       pruned_weight: float = DEFAULT_PRUNED_WEIGHT, kept_floor: float = DEFAULT_KEPT_FLOOR,
                       quantile: float = DEFAULT_QUANTILE) -> tuple[Tensor, Tensor]:
    """Weighted low-rank fit ``min sum omega (W - U V)^2`` with :func:`sparsity_aware_omega` (EM)."""
    omega = sparsity_aware_omega(weight, stats.mask, stats.importance, pruned_weight=pruned_weight,
                                 kept_floor=kept_floor, quantile=quantile)
    return ops.weighted_lowrank(weight, rank, omega, max_iters=max_iters, tol=tol, seed=seed)


# ---------------------------------------------------------------------------------------------------- one matrix
def factorize_matrix(
    weight: Tensor,
    rank: int,
    method: str = "sparsity-aware",
    mask: Tensor | None = None,
    importance: Tensor | None = None,
    fisher_rows: Tensor | None = None,
    input_covariance: Tensor | None = None,
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    **options,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``U (m x r)``, ``V (r x n)`` of ``weight`` (in its dtype) by the registered
    factorizer ``method``; ``options`` are its own keyword options (e.g. the omega weighting of "sparsity-aware").

    ``mask``/``importance`` feed the sparsity-aware omega; ``fisher_rows`` is required by "fwsvd",
    ``input_covariance`` (in x in) by the activation-aware factorizers.
    ``max_iters``/``tol``/``seed`` go to ops.weighted_lowrank's EM.
    """
    if method not in FACTORIZERS:
        raise ValueError(f"method must be one of {sorted(FACTORIZERS)}, got {method!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [1, {min(m, n)}], got {rank!r}")
    factorizer = FACTORIZERS[method]
    unknown = sorted(set(options) - set(factorizer.options))
    if unknown:
        raise TypeError(f"options {unknown} do not apply to method {method!r} (its options: "
                        f"{sorted(factorizer.options) or 'none'})")
    work = weight.detach().float().contiguous()
    stats = LayerStatistics(mask, importance, fisher_rows, input_covariance)
    U, V = balance_factors(*factorizer.fn(work, rank, stats, max_iters=max_iters, tol=tol, seed=seed, **options))
    return U.to(weight.dtype).contiguous(), V.to(weight.dtype).contiguous()


# Components whose norms already agree to this relative tolerance (those of every factorizer that splits the singular
# values evenly) are left bit-identical.
BALANCE_TOLERANCE = 1e-4


def balance_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """``U diag(c)``, ``diag(1/c) V`` with ``c_k = sqrt(|V_k,:| / |U_:,k|)``: the same product, each rank-1 component's
    norm split evenly between its two factors.

    Why: fine-tuning trains U and V with Adam, whose steps are about the same size for every entry; with one factor
    many times larger than the other (FWSVD's ``diag(1/s)`` unscaling makes ``|U_k|/|V_k|`` 4-26 on MiniLM), a step
    on the small factor moves the product that many times further than a step on the large one, which the learning
    rate was not chosen for (FWSVD runs on CoLA collapsed to a constant predictor in mixed-rank fine-tuning)."""
    u_norms, v_norms = U.double().norm(dim=0), V.double().norm(dim=1)
    live = (u_norms > 0) & (v_norms > 0)
    scale = torch.where(live, (v_norms / torch.where(live, u_norms, 1.0)).sqrt(), 1.0)
    scale = torch.where((scale.square() - 1).abs() <= BALANCE_TOLERANCE, 1.0, scale)
    if bool((scale == 1).all()):
        return U, V
    return U * scale.to(U.dtype), V / scale.to(V.dtype)[:, None]


def singular_values(matrix: Tensor) -> Tensor:
    """All ``min(m, n)`` singular values of ``matrix``, descending, in float64, without failing on finite input.

    As in ops.weighted_lowrank: all-zero rows and columns (pruning leaves many) are deflated first, since they only
    add zero singular values, and a LAPACK refusal of the remaining clustered spectrum falls back to the
    eigenvalues of the Gram matrix of the shorter side (exact squares of the singular values).
    """
    x = matrix.detach().double()
    full = min(x.shape)
    nonzero = x != 0
    live = x[nonzero.any(dim=1)][:, nonzero.any(dim=0)]
    if live.numel() == 0:
        return x.new_zeros(full)
    try:
        values = torch.linalg.svdvals(live)
    except torch.linalg.LinAlgError:
        gram = live @ live.T if live.shape[0] <= live.shape[1] else live.T @ live
        values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
    return torch.cat([values, values.new_zeros(full - values.numel())])


def _spectrum(weight: Tensor, method: str, stats: LayerStatistics, options: Mapping) -> Tensor:
    """Singular values of the matrix each method actually truncates (energy allocation compares these)."""
    factorizer = FACTORIZERS[method]
    work = weight.detach().float()
    if factorizer.spectrum_matrix is not None:
        work = factorizer.spectrum_matrix(work, stats, **options)
    return singular_values(work)


# ---------------------------------------------------------------------------------------------------- whole model
@torch.no_grad()
def _relative_error(weight: Tensor, U: Tensor, V: Tensor) -> float:
    """||W - U V||_F / ||W||_F; a fully pruned W (norm 0) reports the absolute error ||U V||_F instead."""
    residual = float(torch.linalg.matrix_norm(weight.double() - U.double() @ V.double()))
    norm = float(torch.linalg.matrix_norm(weight.double()))
    return residual / norm if norm > 0 else residual


class FactorizationError(RuntimeError):
    """The factorization of one layer failed. Carries the layer's name, the call's arguments and its input
    tensors, so that the caller can save them for a bug report (:meth:`save`) without losing the run."""

    def __init__(self, layer: str, arguments: Mapping, inputs: Mapping[str, Tensor | None], cause: BaseException):
        self.layer = layer
        self.arguments = dict(arguments)
        self.inputs = {name: t.detach().cpu().contiguous() for name, t in inputs.items() if t is not None}
        self.cause = cause
        self.saved_to = None
        self.hint = ""
        super().__init__(layer, arguments, cause)

    def __str__(self) -> str:
        described = ", ".join(f"{key}={value!r}" for key, value in self.arguments.items())
        shapes = ", ".join(f"{name} {tuple(t.shape)} {t.dtype}" for name, t in self.inputs.items())
        saved = f"; its inputs are saved in {self.saved_to}" if self.saved_to else ""
        return (f"factorization of layer {self.layer!r} failed ({described}; inputs: {shapes}): "
                f"{type(self.cause).__name__}: {self.cause}{saved}{self.hint}")

    def save(self, path) -> None:
        """Writes the inputs and the arguments (as metadata) to a safetensors file, for a bug report."""
        from safetensors.torch import save_file

        tensors = {name: (t.float() if t.dtype == torch.bool else t) for name, t in self.inputs.items()}
        metadata = {key: str(value) for key, value in self.arguments.items()}
        metadata.update(layer=self.layer, error=f"{type(self.cause).__name__}: {self.cause}",
                        torch=torch.__version__, threads=str(torch.get_num_threads()))
        save_file(tensors, str(path), metadata=metadata)
        self.saved_to = str(path)


def factorize_model(
    model: nn.Module,
    keep: float,
    method: str = "sparsity-aware",
    allocation: str = "budget",
    rank_multiple: int = 1,
    pruner=None,
    targets: Mapping[str, nn.Module] | Iterable[str] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    options: Mapping | None = None,
    solver_options: Mapping | None = None,
    min_rank: int = 1,
    input_covariances: Mapping[str, Tensor] | None = None,
) -> list[LayerRecord]:
    """Replaces each target nn.Linear (or GPT-2 Conv1D) by a MixedRankLinear holding its rank-r factorization by
    the registered factorizer ``method``; returns one :class:`~lrsparse.records.LayerRecord` per layer.

    The sparse path is the layer's own weight Parameter (pruned in place by ``pruner``, or by
    :func:`lrsparse.pruning.magnitude_prune` whose ``masks`` are passed) with its mask, or the dense weight and no
    mask when neither is given. Ranks come from :func:`allocate_ranks` with ``nnz`` = kept entries (pruned) or
    ``keep * m * n`` (dense), then at least ``min_rank``. The statistics a factorizer ``needs`` come from
    ``pruner``: importance from ``pruner.scores``, Fisher from ``pruner.fisher`` (a pruner with final_density=1
    collects them without pruning). ``options`` are the factorizer's own options, ``solver_options``
    max_iters/tol/seed of the weighted fit, ``input_covariances`` (name -> in x in, from
    :func:`lrsparse.activation.input_covariances`) what activation-aware factorizers need. Create the optimizer
    for mixed-rank fine-tuning after this call.
    A Conv1D target (weight stored ``in x out``; its mask and statistics in that layout) gets a MixedRankLinear in
    the ``out x in`` orientation: its sparse path is a new Parameter holding the transposed weight.
    """
    _check_keep(keep)
    if method not in FACTORIZERS:
        raise ValueError(f"method must be one of {sorted(FACTORIZERS)}, got {method!r}")
    if allocation not in RANK_ALLOCATORS:
        raise ValueError(f"allocation must be one of {sorted(RANK_ALLOCATORS)}, got {allocation!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be a positive int, got {min_rank!r}")
    if pruner is not None and masks is not None:
        raise ValueError("pass either pruner or masks, not both")
    if pruner is not None:
        resolved = dict(pruner.targets) if targets is None else resolve_targets(model, targets)
        # A pruner that pruned nothing (final_density 1, kept only to collect statistics for the factorizer) gives
        # statistics, not masks: the ranks must then come from the keep budget, not from its all-ones masks.
        masks = pruner.masks if pruner.density() < 1.0 else None
    else:
        resolved = resolve_targets(model, targets)
    factorizer = FACTORIZERS[method]
    # A pruner provides what it has a method for (FirstOrderPruner's Fisher statistics only with track_fisher).
    if "fisher" in factorizer.needs and not (hasattr(pruner, "fisher") and getattr(pruner, "track_fisher", True)):
        raise ValueError(f"method {method!r} needs Fisher information: pass a pruner with fisher(name) (a "
                         "FirstOrderPruner created with track_fisher=True)")
    if "importance" in factorizer.needs and pruner is not None and not hasattr(pruner, "scores"):
        raise ValueError(f"method {method!r} needs importance scores: pruner {type(pruner).__name__} has no "
                         "scores(name)")
    if "input_covariance" in factorizer.needs and (input_covariances is None
                                                  or not set(resolved) <= set(input_covariances)):
        raise ValueError(f"method {method!r} needs the input covariance of every target: pass input_covariances "
                         "(lrsparse.activation.input_covariances over calibration batches)")
    options = dict(options or {})
    solver_options = dict(solver_options or {})

    layer_masks = {}
    shapes_nnz = {}
    for name, module in resolved.items():
        if not is_target_layer(module):
            raise TypeError(f"target {name!r} must be an nn.Linear or a transformers Conv1D, "
                            f"got {type(module).__name__}")
        if masks is not None and name not in masks:
            raise ValueError(f"masks has no entry for target {name!r}")
        # Everything below sees weights and per-entry statistics as out x in (Conv1D stores in x out).
        layer_masks[name] = None if masks is None else out_in_weight(module, masks[name])
        m, n = out_in_weight(module).shape
        nnz = int(layer_masks[name].sum()) if masks is not None else int(Fraction(keep) * m * n)
        shapes_nnz[name] = (m, n, nnz)

    def statistics(name: str) -> LayerStatistics:
        # Computed per layer when needed: holding every layer's scores at once would double the model's memory.
        module = resolved[name]
        importance = pruner.scores(name) if (pruner is not None and "importance" in factorizer.needs) else None
        fisher = pruner.fisher(name) if "fisher" in factorizer.needs else None
        # out_in_weight(module, None) is the weight itself: absent statistics must stay None.
        covariance = input_covariances[name] if "input_covariance" in factorizer.needs else None
        return LayerStatistics(layer_masks[name], None if importance is None else out_in_weight(module, importance),
                               None if fisher is None else out_in_weight(module, fisher), covariance)

    spectra = None
    if RANK_ALLOCATORS[allocation].needs_spectra:
        spectra = {name: _spectrum(out_in_weight(resolved[name]), method, statistics(name), options)
                   for name in resolved}
    ranks = allocate_ranks(shapes_nnz, keep, allocation, rank_multiple, spectra)
    ranks = {name: max(rank, min(min_rank, min(shapes_nnz[name][:2]))) for name, rank in ranks.items()}

    records = []
    for name, module in resolved.items():
        weight, mask = out_in_weight(module), layer_masks[name]
        stats = statistics(name)
        try:
            U, V = factorize_matrix(weight, ranks[name], method, stats.mask, stats.importance, stats.fisher,
                                    stats.input_covariance, **solver_options, **options)
        except Exception as error:
            arguments = {"rank": ranks[name], "method": method, **solver_options, **options}
            inputs = {"weight": weight, "mask": stats.mask, "importance": stats.importance, "fisher": stats.fisher,
                      "input_covariance": stats.input_covariance}
            raise FactorizationError(name, arguments, inputs, error) from error
        relative_error = _relative_error(weight, U, V)
        if is_conv1d(module):
            weight = nn.Parameter(weight.detach().contiguous(), requires_grad=module.weight.requires_grad)
        sparse_mask = None if mask is None else mask.contiguous().clone()
        mixed = MixedRankLinear(U, V, module.bias, weight, sparse_mask, method=method)
        mixed.train(module.training)
        replace_module(model, name, mixed)
        m, n, nnz = shapes_nnz[name]
        density = nnz / (m * n) if mask is not None else 1.0
        records.append(LayerRecord(name, n, m, ranks[name], bias=module.bias is not None, kind="mixed",
                                   masked=mask is not None, density=density, factorizer=method,
                                   relative_error=relative_error))
    return records
