"""lrsparse.ops.global_topk_threshold and apply_threshold_mask_ (CPU kernels) against lrsparse.reference."""
from __future__ import annotations

import pytest
import torch

from lrsparse import ops, reference

# 56 tensors of mixed sizes: 1x1, thin, odd, and a few spanning several 64K-entry kernel chunks.
FIXED_SHAPES = [(1, 1), (1, 7), (13, 1), (3, 5), (1, 1), (257, 3), (64, 64), (300, 251), (1, 1), (131, 523)]


def mixed_shapes(count: int = 56) -> list[tuple[int, int]]:
    shapes = list(FIXED_SHAPES)
    while len(shapes) < count:
        rows, cols = torch.randint(1, 80, (2,)).tolist()
        shapes.append((rows, cols))
    return shapes


def random_masks(shapes, density: float | None, dtype=torch.bool):
    if density is None:
        return []
    masks = [torch.rand(s) < density for s in shapes]
    if dtype == torch.uint8:
        return [m.to(torch.uint8) * torch.randint(1, 9, s, dtype=torch.uint8) for m, s in zip(masks, shapes)]
    return masks


def live_count(shapes, masks) -> int:
    return sum(int(m.bool().sum()) for m in masks) if masks else sum(s[0] * s[1] for s in shapes)


def flat_scores(ema, uncertainty):
    return torch.cat([reference.importance_score(e, uncertainty[i] if uncertainty else None).reshape(-1)
                      for i, e in enumerate(ema)])


def flat_live(shapes, masks):
    if not masks:
        return torch.ones(sum(s[0] * s[1] for s in shapes), dtype=torch.bool)
    return torch.cat([m.reshape(-1).bool() for m in masks])


def threshold_and_apply(ema, uncertainty, masks, k, weight_dtype=torch.float32):
    """Runs both ops and both references on copies; checks the threshold and returns the kernel's results."""
    shapes = [tuple(e.shape) for e in ema]
    threshold, ties = ops.global_topk_threshold(ema, uncertainty, masks, k)
    want_threshold, want_ties = reference.global_topk_threshold(ema, uncertainty, masks, k)
    assert threshold.dtype == torch.float32 and threshold.dim() == 0
    assert ties.dtype == torch.int64 and ties.dim() == 0
    assert threshold.item() == want_threshold.item(), (threshold, want_threshold)
    assert ties.item() == want_ties.item(), (ties, want_ties)

    start_masks = masks if masks else [torch.ones(s, dtype=torch.bool) for s in shapes]
    weights = [torch.randn(s).to(weight_dtype) for s in shapes]
    got_masks, got_weights = [m.clone() for m in start_masks], [w.clone() for w in weights]
    want_masks, want_weights = [m.clone() for m in start_masks], [w.clone() for w in weights]
    ops.apply_threshold_mask_(got_masks, got_weights, ema, uncertainty, threshold, ties)
    reference.apply_threshold_mask_(want_masks, want_weights, ema, uncertainty, want_threshold, want_ties)
    assert all(g.dtype == m.dtype for g, m in zip(got_masks, start_masks))
    flat = lambda tensors: torch.cat([t.reshape(-1) for t in tensors])  # noqa: E731
    for i, (got, want) in enumerate(zip(got_masks, want_masks)):
        assert torch.equal(got, want), f"masks[{i}] differs from the reference"
    got_w, want_w, start_w = flat(got_weights), flat(want_weights), flat(weights)
    assert torch.equal(got_w, want_w), "weights differ from the reference"
    kept, started_live = flat(got_masks).bool(), flat(start_masks).bool()
    assert torch.equal(got_w[kept], start_w[kept]), "weights changed at kept entries"
    assert (got_w[~kept] == 0).all(), "weights not zeroed where pruned"
    assert not (kept & ~started_live).any(), "a pruned entry was revived"
    assert int(kept.sum()) == k
    return threshold, ties, got_masks


@pytest.mark.parametrize("with_uncertainty", [True, False])
@pytest.mark.parametrize("density", [None, 0.7])
def test_kept_set_equals_topk_of_the_concatenation(with_uncertainty, density):
    shapes = mixed_shapes()
    ema = [torch.rand(s) for s in shapes]
    uncertainty = [torch.rand(s) for s in shapes] if with_uncertainty else []
    masks = random_masks(shapes, density)
    live = flat_live(shapes, masks)
    scores = flat_scores(ema, uncertainty)
    live_scores, live_index = scores[live], torch.nonzero(live).reshape(-1)
    ordered = torch.sort(live_scores, descending=True).values
    # k where the k-th and (k+1)-th live scores differ, so that the top-k set is unambiguous.
    candidates = [k for k in (1, 2, 1000, live_scores.numel() // 3, live_scores.numel() - 1)
                  if ordered[k - 1] != ordered[k]]
    assert len(candidates) >= 3
    for k in candidates:
        _, _, got_masks = threshold_and_apply(ema, uncertainty, masks, k)
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected[live_index[torch.topk(live_scores, k).indices]] = True
        assert torch.equal(torch.cat([m.reshape(-1).bool() for m in got_masks]), expected), k


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_heavy_ties_keep_exactly_k_in_reference_order(mask_dtype):
    shapes = mixed_shapes()
    ema = [torch.randint(0, 4, s).float() for s in shapes]
    uncertainty = [torch.randint(1, 3, s).float() for s in shapes]  # integer scores 0..6: mostly ties
    masks = random_masks(shapes, 0.8, mask_dtype)
    live = live_count(shapes, masks)
    for k in (1, 7, live // 4, live // 2 + 1, live - 3):
        _, ties, _ = threshold_and_apply(ema, uncertainty, masks, k)
        assert ties.item() >= 1


def test_movement_scores_negative_and_signed_zeros():
    shapes = mixed_shapes()
    ema = [torch.randn(s) for s in shapes]
    # Exact zeros of both signs tie with each other (as in the reference's float comparisons).
    for e in ema[::3]:
        e.view(-1)[::5] = 0.0
        e.view(-1)[1::5] = -0.0
    masks = random_masks(shapes, 0.9)
    live = live_count(shapes, masks)
    scores = flat_scores(ema, [])[flat_live(shapes, masks)]
    above_zero = int((scores > 0).sum())
    for k in (1, live // 5, above_zero + 1, above_zero + 3, live - 1):
        threshold_and_apply(ema, [], masks, k)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_partially_pruned_masks_stay_pruned(weight_dtype):
    shapes = mixed_shapes(52)
    ema = [torch.rand(s) for s in shapes]
    uncertainty = [torch.rand(s) for s in shapes]
    masks = random_masks(shapes, 0.4)
    threshold_and_apply(ema, uncertainty, masks, live_count(shapes, masks) // 2, weight_dtype)


@pytest.mark.parametrize("masks_kind", ["none", "bool", "uint8"])
def test_k_zero_and_k_all_live(masks_kind):
    shapes = mixed_shapes()
    ema = [torch.randint(0, 3, s).float() for s in shapes]
    uncertainty = [torch.rand(s) for s in shapes]
    masks = {"none": [], "bool": random_masks(shapes, 0.5), "uint8": random_masks(shapes, 0.5, torch.uint8)}[masks_kind]
    threshold, ties, got_masks = threshold_and_apply(ema, uncertainty, masks, 0)
    assert threshold.item() == float("inf") and ties.item() == 0
    assert not any(m.any() for m in got_masks)
    _, _, got_masks = threshold_and_apply(ema, uncertainty, masks, live_count(shapes, masks))
    start = masks if masks else [torch.ones(s, dtype=torch.bool) for s in shapes]
    assert all(torch.equal(g.bool(), m.bool()) for g, m in zip(got_masks, start))


def test_bert_sized_tensors():
    shapes = [(768, 3072), (3072, 768), (768, 768), (1, 1)]
    ema = [torch.rand(s) for s in shapes]
    uncertainty = [torch.rand(s) for s in shapes]
    masks = random_masks(shapes, 0.6)
    threshold_and_apply(ema, uncertainty, masks, live_count(shapes, masks) // 3)


def test_nan_at_a_pruned_entry_is_ignored():
    shapes = [(5, 5), (3, 4)]
    ema = [torch.rand(s) for s in shapes]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    ema[1][2, 1] = float("nan")
    masks[1][2, 1] = False
    threshold_and_apply(ema, [], masks, 10)


def small_lists(count=3):
    shapes = [(4, 5), (1, 1), (3, 7)][:count]
    return ([torch.rand(s) for s in shapes], [torch.rand(s) for s in shapes],
            [torch.rand(s) < 0.7 for s in shapes], [torch.randn(s) for s in shapes])


def test_opcheck_global_topk_threshold():
    ema, uncertainty, masks, _ = small_lists()
    torch.library.opcheck(torch.ops.lrsparse.global_topk_threshold.default, (ema, uncertainty, masks, 9))
    torch.library.opcheck(torch.ops.lrsparse.global_topk_threshold.default, (ema, [], [], 4))


def test_opcheck_apply_threshold_mask():
    ema, uncertainty, masks, weights = small_lists()
    threshold, ties = ops.global_topk_threshold(ema, uncertainty, masks, 9)
    torch.library.opcheck(torch.ops.lrsparse.apply_threshold_mask_.default,
                          (masks, weights, ema, uncertainty, threshold, ties))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["negative", "above_live"])
def test_k_out_of_range(which):
    ema, uncertainty, masks, _ = small_lists()
    bad_k = -1 if which == "negative" else sum(int(m.sum()) for m in masks) + 1
    with pytest.raises(RuntimeError, match=r"k must be"):
        ops.global_topk_threshold(ema, uncertainty, masks, bad_k)


def test_k_range_counts_only_live_entries():
    ema, uncertainty, masks, _ = small_lists()
    live = sum(int(m.sum()) for m in masks)
    with pytest.raises(RuntimeError, match=rf"k must be in \[0, {live}\]"):
        ops.global_topk_threshold(ema, uncertainty, masks, sum(e.numel() for e in ema))


def test_nan_score_names_the_tensors():
    ema, uncertainty, masks, _ = small_lists()
    masks[2][1, 3] = True
    uncertainty[2][1, 3] = float("inf")
    ema[2][1, 3] = 0.0  # inf * 0 = NaN
    with pytest.raises(RuntimeError, match=r"ema\[2\] \* uncertainty\[2\] is NaN"):
        ops.global_topk_threshold(ema, uncertainty, masks, 1)
    ema[2][1, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"ema\[2\] is NaN"):
        ops.global_topk_threshold(ema, [], masks, 1)


def _threshold_inputs():
    ema, uncertainty, masks, weights = small_lists()
    return dict(ema=ema, uncertainty=uncertainty, masks=masks, weights=weights)


def _replace(name, index, value):
    def change(inputs):
        inputs[name][index] = value
    return change


BAD_LIST_CASES = [
    ("uncertainty_length", lambda d: d["uncertainty"].pop(), r"uncertainty must be empty or hold one tensor per ema"),
    ("masks_length", lambda d: d["masks"].pop(), r"masks must"),
    ("mask_float", _replace("masks", 1, torch.ones(1, 1)), r"masks\[1\] must be bool or uint8"),
    ("mask_shape", _replace("masks", 2, torch.ones(7, 3, dtype=torch.bool)), r"masks\[2\] must have the shape of ema\[2\]"),
    ("ema_float64", _replace("ema", 1, torch.rand(1, 1, dtype=torch.float64)), r"ema\[1\] must be float32"),
    ("ema_noncontiguous", _replace("ema", 0, torch.rand(5, 4).t()), r"ema\[0\] must be contiguous"),
    ("uncertainty_shape", _replace("uncertainty", 0, torch.rand(20)), r"uncertainty\[0\] must have the shape of ema\[0\]"),
    ("uncertainty_half", _replace("uncertainty", 2, torch.rand(3, 7).half()), r"uncertainty\[2\] must be float32"),
]


@pytest.mark.parametrize("change,pattern", [pytest.param(c, p, id=i) for i, c, p in BAD_LIST_CASES])
def test_bad_lists_global_topk_threshold(change, pattern):
    inputs = _threshold_inputs()
    change(inputs)
    with pytest.raises(RuntimeError, match=pattern):
        ops.global_topk_threshold(inputs["ema"], inputs["uncertainty"], inputs["masks"], 1)


APPLY_ONLY_CASES = [
    ("weights_length", lambda d: d["weights"].pop(), r"weights must hold one tensor per ema tensor"),
    ("masks_missing", lambda d: d["masks"].clear(), r"masks must hold one tensor per ema tensor"),
    ("weights_int", _replace("weights", 1, torch.ones(1, 1, dtype=torch.int64)), r"weights\[1\] must be a floating"),
    ("weights_shape", _replace("weights", 0, torch.randn(5, 4)), r"weights\[0\] must have the shape of ema\[0\]"),
    ("weights_noncontiguous", _replace("weights", 2, torch.randn(7, 3).t()), r"weights\[2\] must be contiguous"),
]


@pytest.mark.parametrize("change,pattern",
                         [pytest.param(c, p, id=i) for i, c, p in BAD_LIST_CASES + APPLY_ONLY_CASES])
def test_bad_lists_apply_threshold_mask(change, pattern):
    inputs = _threshold_inputs()
    threshold, ties = ops.global_topk_threshold(inputs["ema"], inputs["uncertainty"], inputs["masks"], 5)
    change(inputs)
    before = [m.clone() for m in inputs["masks"]]
    with pytest.raises(RuntimeError, match=pattern):
        ops.apply_threshold_mask_(inputs["masks"], inputs["weights"], inputs["ema"], inputs["uncertainty"],
                                  threshold, ties)
    assert all(torch.equal(m, b) for m, b in zip(inputs["masks"], before)), "masks modified by a rejected call"


@pytest.mark.parametrize("threshold,ties,pattern", [
    (torch.tensor([0.5]), torch.tensor(1), r"threshold must be a 0-d floating-point tensor"),
    (torch.tensor(1), torch.tensor(1), r"threshold must be a 0-d floating-point tensor"),
    (torch.tensor(float("nan")), torch.tensor(1), r"threshold must not be NaN"),
    (torch.tensor(0.5), torch.tensor(-1), r"ties_to_keep must be non-negative"),
    (torch.tensor(0.5), torch.tensor(1.0), r"ties_to_keep must be a 0-d integer tensor"),
])
def test_bad_threshold_arguments(threshold, ties, pattern):
    ema, uncertainty, masks, weights = small_lists()
    with pytest.raises(RuntimeError, match=pattern):
        ops.apply_threshold_mask_(masks, weights, ema, uncertainty, threshold, ties)
