"""LowRankLinear / MixedRankLinear against float64 formulas; the alpha schedule and the sparse-path drop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsparse.factorization import factorize_model
from lrsparse.layers import LowRankLinear, MixedRankLinear, MixedRankScheduler, finalize_low_rank
from pipeline_helpers import random_batches, tiny_bert, train


def random_mixed(out_features=6, in_features=5, rank=2, density=0.5, bias=True):
    U, V = torch.randn(out_features, rank), torch.randn(rank, in_features)
    mask = torch.rand(out_features, in_features) < density
    sparse = torch.randn(out_features, in_features) * mask
    b = torch.randn(out_features) if bias else None
    return MixedRankLinear(U, V, b, sparse, mask)


def mixed_formula(layer, x, alpha):
    """(1 - alpha) x Ws^T + alpha x (U V)^T + b in float64."""
    x64 = x.double()
    y = (1 - alpha) * x64 @ layer.sparse_weight.double().t() + alpha * x64 @ (layer.U.double() @ layer.V.double()).t()
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_matches_factor_product(bias):
    layer = LowRankLinear(5, 7, 3, bias=bias)
    assert (layer.U.shape, layer.V.shape, layer.rank) == ((7, 3), (3, 5), 3)
    x = torch.randn(2, 4, 5)
    expected = x.double() @ (layer.U.double() @ layer.V.double()).t()
    if bias:
        expected = expected + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert "rank=3" in repr(layer)
    assert ("bias" in dict(layer.named_parameters())) == bias


def test_low_rank_linear_rejects_bad_sizes():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 6, 5)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 6, 1)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixed_rank_linear_output_is_the_blend(alpha):
    layer = random_mixed()
    layer.alpha = alpha
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x).double(), mixed_formula(layer, x, alpha), rtol=1e-5, atol=1e-5)


def test_sparse_weight_gradient_is_masked():
    layer = random_mixed()
    layer.alpha = 0.25
    x = torch.randn(8, 5)
    grad_out = torch.randn(8, 6)
    layer(x).backward(grad_out)
    mask = layer.sparse_mask
    dense_grad = (1 - 0.25) * grad_out.double().t() @ x.double()
    torch.testing.assert_close(layer.sparse_weight.grad.double(), dense_grad * mask, rtol=1e-5, atol=1e-5)
    assert torch.all(layer.sparse_weight.grad[~mask] == 0)
    grad_U = 0.25 * grad_out.double().t() @ (x.double() @ layer.V.detach().double().t())
    torch.testing.assert_close(layer.U.grad.double(), grad_U, rtol=1e-5, atol=1e-5)


def test_stochastic_strategy_picks_one_path_in_training_and_blends_in_eval():
    layer = random_mixed()
    layer.strategy, layer.alpha = "stochastic", 0.5
    x = torch.randn(3, 5)
    sparse_only, low_rank_only = mixed_formula(layer, x, 0.0), mixed_formula(layer, x, 1.0)
    picks = []
    for _ in range(40):
        y = layer(x).double()
        is_sparse = torch.allclose(y, sparse_only, atol=1e-5)
        assert is_sparse or torch.allclose(y, low_rank_only, atol=1e-5)
        picks.append(is_sparse)
    assert 0 < sum(picks) < 40  # both paths drawn (each with probability 1/2: failure chance 2^-39)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), mixed_formula(layer, x, 0.5), rtol=1e-5, atol=1e-5)


def test_mixed_rank_linear_checks_shapes():
    U, V = torch.randn(6, 2), torch.randn(2, 5)
    with pytest.raises(ValueError, match="sparse_weight"):
        MixedRankLinear(U, V, None, torch.randn(5, 6), None)
    with pytest.raises(ValueError, match="sparse_mask"):
        MixedRankLinear(U, V, None, torch.randn(6, 5), torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rank"):
        MixedRankLinear(U, torch.randn(3, 5), None, torch.randn(6, 5), None)


def test_to_low_rank_shares_parameters_and_output():
    layer = random_mixed()
    low = layer.to_low_rank()
    assert low.U is layer.U and low.V is layer.V and low.bias is layer.bias
    x = torch.randn(4, 5)
    torch.testing.assert_close(low(x).double(), mixed_formula(layer, x, 1.0), rtol=1e-5, atol=1e-5)


def factorized_tiny_bert():
    model = tiny_bert()
    factorize_model(model, keep=0.5, method="svd")
    return model


def mixed_layers(model):
    return [m for m in model.modules() if isinstance(m, MixedRankLinear)]


def test_scheduler_alpha_schedule_then_sparse_path_dropped():
    model = factorized_tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    total = 10
    scheduler = MixedRankScheduler(model, total_steps=total, blend_fraction=0.5, optimizer=optimizer)
    assert all(m.alpha == 0.0 for m in mixed_layers(model))
    u_before = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".U")}
    batches = random_batches(total)
    seen = []

    def record():
        scheduler.step()
        layers = mixed_layers(model)
        seen.append(layers[0].alpha if layers else None)

    train(model, optimizer, batches[:4], after_step=record)
    assert seen == [pytest.approx(t / 5) for t in range(1, 5)]
    train(model, optimizer, batches[4:5], after_step=record)
    assert seen[-1] is None and scheduler.finalized  # alpha reached 1 at t = 5 = 0.5 * total
    assert not mixed_layers(model)
    assert not [n for n, _ in model.named_parameters() if "sparse_weight" in n]
    assert len([m for m in model.modules() if isinstance(m, LowRankLinear)]) == 12
    optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    u_mid = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".U")}
    train(model, optimizer, batches[5:], after_step=scheduler.step)
    for name, p in model.named_parameters():
        if name.endswith(".U"):
            assert not torch.equal(p, u_mid[name]) and not torch.equal(u_mid[name], u_before[name])


def test_scheduler_none_strategy_finalizes_at_once_and_state_round_trips():
    model = factorized_tiny_bert()
    MixedRankScheduler(model, total_steps=4, strategy="none")
    assert not mixed_layers(model)

    model_a, model_b = factorized_tiny_bert(), factorized_tiny_bert()
    sched_a = MixedRankScheduler(model_a, total_steps=20, blend_fraction=0.5, strategy="stochastic")
    for _ in range(3):
        sched_a.step()
    sched_b = MixedRankScheduler(model_b, total_steps=20, blend_fraction=0.5, strategy="stochastic")
    sched_b.load_state_dict(sched_a.state_dict())
    assert [(m.alpha, m.strategy) for m in mixed_layers(model_b)] == [(0.3, "stochastic")] * 12
    with pytest.raises(ValueError, match="total_steps"):
        sched_b.load_state_dict({**sched_a.state_dict(), "total_steps": 7})


def test_scheduler_rejects_bad_arguments():
    model = factorized_tiny_bert()
    with pytest.raises(ValueError, match="total_steps"):
        MixedRankScheduler(model, total_steps=0)
    with pytest.raises(ValueError, match="strategy"):
        MixedRankScheduler(model, total_steps=5, strategy="linear")
    with pytest.raises(ValueError, match="blend_fraction"):
        MixedRankScheduler(model, total_steps=5, blend_fraction=1.5)
    with pytest.raises(ValueError, match="MixedRankLinear"):
        MixedRankScheduler(tiny_bert(), total_steps=5)


def test_finalize_returns_swapped_names():
    model = factorized_tiny_bert()
    names = finalize_low_rank(model)
    assert names == [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert isinstance(model.classifier, nn.Linear)
