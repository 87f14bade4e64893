"""Low-rank and mixed-rank linear layers, and the schedule that moves a model from one to the other.

Mixed-rank fine-tuning starts from the pruned (sparse, full-rank) weight ``Ws`` and its factorization ``U V`` and
blends ``y = (1 - alpha) x Ws^T + alpha x (U V)^T + b`` while ``alpha`` goes 0 -> 1; at alpha = 1 the sparse path
is dropped and only the dense low-rank layer remains.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lrsparse import ops

STRATEGIES = ("blend", "stochastic", "none")


def _as_parameter(tensor: Tensor | None, name: str) -> nn.Parameter | None:
    # Existing Parameter objects are kept as they are so that an optimizer holding them keeps working.
    if tensor is None or isinstance(tensor, nn.Parameter):
        return tensor
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    return nn.Parameter(tensor.detach())


def _check_factor_shapes(U: Tensor, V: Tensor, bias: Tensor | None) -> None:
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U and V must be 2-D, got U {tuple(U.shape)} and V {tuple(V.shape)}")
    if U.shape[1] != V.shape[0]:
        raise ValueError(f"U (out x r) and V (r x in) must share the rank, got U {tuple(U.shape)}, V {tuple(V.shape)}")
    if bias is not None and tuple(bias.shape) != (U.shape[0],):
        raise ValueError(f"bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b`` with ``U (out x rank)`` and ``V (rank x in)``.

    ``method`` records how the factors were obtained (saved with the model; informational only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__()
        for value, name in ((in_features, "in_features"), (out_features, "out_features"), (rank, "rank")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be at most min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, got {rank}")
        factory = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same output scale as nn.Linear's default init: Var(V x) ~ Var(x)/3, then U keeps that scale.
        if self.U.is_meta:
            return
        with torch.no_grad():
            bound_v = 1.0 / math.sqrt(self.in_features)
            self.V.uniform_(-bound_v, bound_v)
            bound_u = 1.0 / math.sqrt(self.rank)
            self.U.uniform_(-bound_u, bound_u)
            if self.bias is not None:
                self.bias.uniform_(-bound_v, bound_v)

    @classmethod
    def from_factors(
        cls, U: Tensor, V: Tensor, bias: Tensor | None = None, method: str | None = None
    ) -> "LowRankLinear":
        """Wraps existing factors; Parameter objects are reused (not copied)."""
        _check_factor_shapes(U, V, bias)
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, dtype=U.dtype, device="meta",
                    method=method)
        layer.U, layer.V = _as_parameter(U, "U"), _as_parameter(V, "V")
        layer.bias = _as_parameter(bias, "bias")
        return layer

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return ops.mixed_rank_linear(x, self.U, self.V, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, method={self.method}")


class MixedRankLinear(nn.Module):
    """``y = (1 - alpha) x Ws^T + alpha (x V^T) U^T + b`` during mixed-rank fine-tuning.

    ``sparse_weight`` (``Ws``) is the pruned weight (zero where pruned) and ``sparse_mask`` its keep-mask (None for
    a dense weight): the gradient of ``Ws`` is zero where the mask is 0, so pruned entries stay zero.
    ``strategy``: "blend" uses ``alpha`` as is; "stochastic" uses ``alpha_eff`` = 1 with probability alpha, else 0,
    drawn per forward in training (alpha itself in eval); "none" always uses the low-rank path only.
    """

    def __init__(
        self,
        U: Tensor,
        V: Tensor,
        bias: Tensor | None,
        sparse_weight: Tensor,
        sparse_mask: Tensor | None,
        method: str | None = None,
    ) -> None:
        super().__init__()
        _check_factor_shapes(U, V, bias)
        expected = (U.shape[0], V.shape[1])
        if tuple(sparse_weight.shape) != expected:
            raise ValueError(f"sparse_weight must have shape {expected} (out x in), got {tuple(sparse_weight.shape)}")
        if sparse_mask is not None:
            if tuple(sparse_mask.shape) != expected:
                raise ValueError(f"sparse_mask must have shape {expected}, got {tuple(sparse_mask.shape)}")
            if sparse_mask.dtype not in (torch.bool, torch.uint8):
                raise TypeError(f"sparse_mask must be bool or uint8, got {sparse_mask.dtype}")
        self.in_features, self.out_features = V.shape[1], U.shape[0]
        self.method = method
        self.U, self.V = _as_parameter(U, "U"), _as_parameter(V, "V")
        self.register_parameter("bias", _as_parameter(bias, "bias"))
        self.sparse_weight = _as_parameter(sparse_weight, "sparse_weight")
        self.register_buffer("sparse_mask", None if sparse_mask is None else sparse_mask.bool())
        self.alpha = 0.0
        self.strategy = "blend"

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def effective_alpha(self) -> float:
        if self.strategy == "none":
            return 1.0
        if self.strategy == "stochastic" and self.training:
            return 1.0 if torch.rand(()).item() < self.alpha else 0.0
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        return float(self.alpha)

    def forward(self, x: Tensor) -> Tensor:
        return ops.mixed_rank_linear(x, self.U, self.V, self.bias, self.sparse_weight, self.sparse_mask,
                                     self.effective_alpha())

    def to_low_rank(self) -> LowRankLinear:
        """The low-rank layer alone, sharing this layer's U, V and bias Parameter objects."""
        layer = LowRankLinear.from_factors(self.U, self.V, self.bias, method=self.method)
        layer.train(self.training)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:.3f}, strategy={self.strategy}, masked={self.sparse_mask is not None}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at the dotted path ``name`` of ``model`` (e.g. "encoder.layer.0.attention.self.query")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def finalize_low_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Replaces every MixedRankLinear by its LowRankLinear (the sparse path is freed); returns their names.

    U, V and bias stay the same Parameter objects, so an existing optimizer keeps stepping them; when ``optimizer``
    is given, the dropped sparse weights are also removed from its param groups and state.
    """
    mixed = [(name, m) for name, m in model.named_modules() if isinstance(m, MixedRankLinear)]
    dropped = []
    for name, module in mixed:
        replace_module(model, name, module.to_low_rank())
        dropped.append(module.sparse_weight)
    if optimizer is not None and dropped:
        _remove_from_optimizer(optimizer, dropped)
    return [name for name, _ in mixed]


def _remove_from_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    drop = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in drop]
    for p in params:
        optimizer.state.pop(p, None)


class MixedRankScheduler:
    """Sets alpha = min(1, t / (blend_fraction * total_steps)) on every MixedRankLinear after each optimizer step.

    When alpha reaches 1 the model is finalized (:func:`finalize_low_rank`). With strategy "none" (or
    blend_fraction 0) alpha is 1 from the start and the model is finalized at construction. Pass ``optimizer`` to
    have the dropped sparse weights removed from it at finalization (their memory is then actually freed).
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        blend_fraction: float = 0.5,
        strategy: str = "blend",
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not 0.0 <= float(blend_fraction) <= 1.0:
            raise ValueError(f"blend_fraction must be in [0, 1], got {blend_fraction!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model = model
        self.total_steps = total_steps
        self.blend_fraction = float(blend_fraction)
        self.strategy = strategy
        self.optimizer = optimizer
        self.step_count = 0
        self.finalized = False
        if not any(isinstance(m, MixedRankLinear) for m in model.modules()):
            raise ValueError("model has no MixedRankLinear layer: run factorize_model first")
        self._apply_alpha()

    @property
    def blend_steps(self) -> float:
        return self.blend_fraction * self.total_steps

    def alpha_at(self, step: int) -> float:
        if self.strategy == "none" or self.blend_steps == 0:
            return 1.0
        return min(1.0, step / self.blend_steps)

    @property
    def alpha(self) -> float:
        return self.alpha_at(self.step_count)

    def _apply_alpha(self) -> None:
        if self.finalized:
            return
        alpha = self.alpha
        for module in self.model.modules():
            if isinstance(module, MixedRankLinear):
                module.alpha = alpha
                module.strategy = self.strategy
        if alpha >= 1.0:
            finalize_low_rank(self.model, self.optimizer)
            self.finalized = True

    def step(self) -> None:
        self.step_count += 1
        self._apply_alpha()

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "total_steps": self.total_steps,
            "blend_fraction": self.blend_fraction,
            "strategy": self.strategy,
            "finalized": self.finalized,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"step", "total_steps", "blend_fraction", "strategy", "finalized"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        for key in ("total_steps", "blend_fraction", "strategy"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state {key} {state[key]!r} differs from this scheduler's {getattr(self, key)!r}")
        self.step_count = int(state["step"])
        self._apply_alpha()
