"""PLATON pruning: schedule closed form, exact global density, masks that hold through AdamW, importance
recurrences re-computed in float64, checkpoint continuation and non-finite gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from lrsparse.pruning import FirstOrderPruner, cubic_density, magnitude_prune
from lrsparse.targets import find_targets
from pipeline_helpers import random_batches, tiny_bert, train

T, FINAL, WARM_I, WARM_F, DELTA = 24, 0.3, 4, 6, 3


def make_pruner(model, **overrides):
    settings = dict(final_density=FINAL, total_steps=T, initial_warmup_fraction=WARM_I,
                    final_warmup_fraction=WARM_F, delta_t=DELTA)
    settings.update(overrides)
    return FirstOrderPruner(model, settings.pop("final_density"), settings.pop("total_steps"), **settings)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.0), (10, 1.0), (20, 0.2 + 0.8 * (5 / 6) ** 3), (40, 0.2 + 0.8 * 0.125), (70, 0.2), (85, 0.2), (100, 0.2),
     (130, 0.2)],
)
def test_cubic_density_closed_form(step, expected):
    assert cubic_density(step, 0.2, 100, 10, 30) == pytest.approx(expected, rel=1e-12)


def test_cubic_density_rejects_bad_arguments():
    with pytest.raises(ValueError, match="initial_warmup"):
        cubic_density(5, 0.2, 100, 70, 30)
    with pytest.raises(ValueError, match="final_density"):
        cubic_density(5, 0.0, 100, 10, 30)
    with pytest.raises(ValueError, match="final_warmup_fraction"):
        FirstOrderPruner(tiny_bert(), 0.5, 10, final_warmup_fraction=1.5)
    with pytest.raises(ValueError, match="criterion"):
        FirstOrderPruner(tiny_bert(), 0.5, 10, criterion="random")


def test_warmup_fractions_and_step_counts():
    pruner = FirstOrderPruner(tiny_bert(), 0.5, 200, initial_warmup_fraction=0.1, final_warmup_fraction=0.3)
    assert (pruner.initial_warmup, pruner.final_warmup) == (20, 60)
    pruner = FirstOrderPruner(tiny_bert(), 0.5, 200, initial_warmup_fraction=7, final_warmup_fraction=0)
    assert (pruner.initial_warmup, pruner.final_warmup) == (7, 0)


def test_training_keeps_exact_global_density_and_pruned_weights_zero():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    pruner = make_pruner(model)
    targets = find_targets(model)
    total = sum(m.weight.numel() for m in targets.values())
    state = {"masks": {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in targets.items()}, "updates": 0}

    def check():
        before = state["masks"]
        pruner.step()
        step = pruner.step_count
        masks = pruner.masks
        kept = sum(int(m.sum()) for m in masks.values())
        if pruner.mask_updates > state["updates"]:
            state["updates"] = pruner.mask_updates
            assert kept == round(cubic_density(step, FINAL, T, WARM_I, WARM_F) * total), step
        for name, module in targets.items():
            assert torch.all(module.weight[~masks[name]] == 0)
            assert not torch.any(masks[name] & ~before[name])  # pruned entries stay pruned
        state["masks"] = {n: m.clone() for n, m in masks.items()}

    train(model, optimizer, random_batches(T + 2), after_step=check)
    assert state["updates"] >= 5
    assert pruner.density() == round(FINAL * total) / total
    # The masks actually bind: AdamW (momentum, weight decay) would have moved pruned entries without them.
    assert all(torch.count_nonzero(m.weight) <= pruner.masks[n].sum() for n, m in targets.items())


def reference_importance(records, beta1, beta2, beta_fisher, criterion):
    """PLATON recurrences in float64 from recorded (weight, grad, mask) triples of one matrix."""
    ema = unc = fisher = torch.zeros_like(records[0][0], dtype=torch.float64)
    for weight, grad, mask in records:
        w, g = weight.double(), grad.double()
        importance = (w * g).abs() if criterion == "sensitivity" else -(w * g)
        new_ema = beta1 * ema + (1 - beta1) * importance
        new_unc = beta2 * unc + (1 - beta2) * (importance - new_ema).abs()
        fisher = torch.where(mask, beta_fisher * fisher + (1 - beta_fisher) * g * g, fisher)
        ema, unc = torch.where(mask, new_ema, ema), torch.where(mask, new_unc, unc)
    return ema, unc, fisher


@pytest.mark.parametrize("criterion", ["sensitivity", "movement"])
def test_importance_matches_float64_recurrences(criterion):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    # Warm-up of 2 steps then a mask update every step: the records span masked and unmasked updates.
    pruner = make_pruner(model, total_steps=8, initial_warmup_fraction=2, final_warmup_fraction=2, delta_t=1,
                         beta1=0.8, beta2=0.9, criterion=criterion)
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    records = {n: [] for n in names}

    def record_then_step():
        for n in names:
            module = pruner.targets[n]
            records[n].append((module.weight.detach().clone(), module.weight.grad.clone(), pruner.masks[n].clone()))
        pruner.step()

    train(model, optimizer, random_batches(6), after_step=record_then_step)
    assert pruner.mask_updates >= 3
    for n in names:
        ema, unc, fisher = reference_importance(records[n], 0.8, 0.9, 0.99, criterion)
        expected_score = ema if criterion == "movement" else ema * unc
        torch.testing.assert_close(pruner.scores(n).double(), expected_score, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(pruner.fisher(n).double(), fisher, rtol=1e-4, atol=1e-14)


def test_state_dict_round_trip_continues_identically():
    batches = random_batches(T)
    model_a = tiny_bert()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=5e-3)
    pruner_a = make_pruner(model_a)
    train(model_a, opt_a, batches[:12], after_step=lambda: pruner_a.step())
    saved = copy.deepcopy((model_a.state_dict(), opt_a.state_dict(), pruner_a.state_dict()))
    train(model_a, opt_a, batches[12:], after_step=lambda: pruner_a.step())

    model_b = tiny_bert(seed=5)
    model_b.load_state_dict(saved[0])
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=5e-3)
    opt_b.load_state_dict(saved[1])
    pruner_b = make_pruner(model_b)
    pruner_b.load_state_dict(saved[2])
    assert pruner_b.step_count == 12
    train(model_b, opt_b, batches[12:], after_step=lambda: pruner_b.step())

    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = pruner_a.state_dict(), pruner_b.state_dict()
    for key in ("ema", "uncertainty", "fisher", "masks"):
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), (key, name)
    assert (sa["step"], sa["mask_updates"]) == (sb["step"], sb["mask_updates"]) == (T, pruner_a.mask_updates)


def test_state_dict_rejects_mismatch():
    pruner = make_pruner(tiny_bert())
    state = pruner.state_dict()
    other = make_pruner(tiny_bert(), final_density=0.5)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(state)
    name = next(iter(state["ema"]))
    state["ema"][name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        pruner.load_state_dict(state)


def test_nonfinite_gradient_step_is_skipped_and_counted():
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = make_pruner(model)
    train(model, optimizer, random_batches(2), after_step=pruner.step)
    before = pruner.state_dict()
    batch = random_batches(1, seed=9)[0]
    model(**batch).loss.backward()
    pruner.targets["bert.encoder.layer.0.intermediate.dense"].weight.grad[3, 4] = float("nan")
    pruner.step()
    assert pruner.nonfinite_steps == 1 and pruner.step_count == 3
    after = pruner.state_dict()
    for name in before["ema"]:
        assert torch.equal(before["ema"][name], after["ema"][name])
        assert torch.equal(before["fisher"][name], after["fisher"][name])

    strict = make_pruner(model, skip_nonfinite=False)
    pruner.targets["bert.encoder.layer.1.output.dense"].weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


def test_step_without_gradient_explains_the_call_order():
    pruner = make_pruner(tiny_bert())
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        pruner.step()


def test_fisher_requires_tracking_and_names_are_checked():
    pruner = make_pruner(tiny_bert(), track_fisher=False)
    with pytest.raises(ValueError, match="track_fisher"):
        pruner.fisher("bert.encoder.layer.0.attention.self.query")
    with pytest.raises(ValueError, match="name"):
        pruner.scores("classifier")


def test_magnitude_prune_keeps_global_top_magnitudes():
    model = tiny_bert()
    targets = find_targets(model)
    magnitudes = torch.cat([m.weight.detach().abs().double().flatten() for m in targets.values()])
    k = round(0.25 * magnitudes.numel())
    expected_keep = torch.zeros_like(magnitudes, dtype=torch.bool)
    expected_keep[torch.topk(magnitudes, k).indices] = True
    masks = magnitude_prune(model, 0.25)
    assert list(masks) == list(targets)
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), expected_keep)
    for name, module in targets.items():
        assert torch.all(module.weight[~masks[name]] == 0)
    with pytest.raises(ValueError, match="density"):
        magnitude_prune(model, 1.5)


def test_explicit_mask_update_is_exact_and_never_regrows():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    pruner = make_pruner(model)
    train(model, optimizer, random_batches(2), after_step=pruner.step)
    assert pruner.density() == 1.0
    assert pruner.update_mask(0.5) is True
    assert pruner.live_count() == round(0.5 * pruner.total_params)
    kept_scores = torch.cat([pruner.scores(n)[m].flatten() for n, m in pruner.masks.items()])
    pruned_scores = torch.cat([pruner.scores(n)[~m].flatten() for n, m in pruner.masks.items()])
    assert kept_scores.min() >= pruned_scores.max()  # the global top half by ema * uncertainty
    assert pruner.update_mask(0.8) is False and pruner.live_count() == round(0.5 * pruner.total_params)
