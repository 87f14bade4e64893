"""CUDA kernels of every lrsparse op: the reference checks on device "cuda", CPU-vs-CUDA agreement, opcheck,
gradcheck (mixed_rank_linear, float64) and torch.compile(mode="reduce-overhead").

Needs a GPU and lrsparse built with LRSPARSE_CUDA=ON (benchmarks/gpu_verify.sh does both steps).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lrsparse import ops, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA op tests need a visible CUDA GPU (torch.cuda.is_available() is False)"
)

CUDA = torch.device("cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy whose data pointer is one element past an aligned one: forces the scalar kernel paths."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def test_extension_has_cuda_kernels():
    assert ops.BUILD_INFO["cuda"], (
        "lrsparse was built without CUDA kernels although a GPU is visible: rebuild with LRSPARSE_CUDA=ON"
    )


# ----------------------------------------------------------------------------------------------------------------
# accumulate_importance_
# ----------------------------------------------------------------------------------------------------------------
def importance_inputs(shape, dtype, has_mask, has_fisher, device):
    gen = torch.Generator().manual_seed(1)
    state = {
        "ema": torch.rand(shape, generator=gen),
        "uncertainty": torch.rand(shape, generator=gen),
        "weight": torch.randn(shape, generator=gen).to(dtype),
        "grad": torch.randn(shape, generator=gen).to(dtype),
        "mask": (torch.rand(shape, generator=gen) < 0.6) if has_mask else None,
        "fisher": torch.rand(shape, generator=gen) if has_fisher else None,
    }
    return {k: (v.to(device) if v is not None else None) for k, v in state.items()}


def run_importance(fn, inputs, criterion, copy=lambda t: t.clone()):
    state = {k: (copy(v) if v is not None else None) for k, v in inputs.items()}
    fn(state["ema"], state["uncertainty"], state["weight"], state["grad"], state["mask"], state["fisher"],
       beta1=0.85, beta2=0.95, beta_fisher=0.99, criterion=criterion)
    return state


# (37, 53): odd numel, vector body plus scalar tail; (64, 96): whole vectors; (3,): tail only.
@pytest.mark.parametrize("shape", [(37, 53), (64, 96), (3,)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("criterion", ["sensitivity", "movement"])
@pytest.mark.parametrize("has_mask,has_fisher", list(itertools.product([False, True], [False, True])))
def test_accumulate_importance_bitwise_equal_to_reference(shape, dtype, criterion, has_mask, has_fisher):
    inputs = importance_inputs(shape, dtype, has_mask, has_fisher, CUDA)
    expected = run_importance(reference.accumulate_importance_, inputs, criterion)
    for copy in (lambda t: t.clone(), misaligned_copy):  # vectorized and scalar paths
        actual = run_importance(ops.accumulate_importance_, inputs, criterion, copy)
        for name in ("ema", "uncertainty", "fisher"):
            if expected[name] is not None:
                # Same float32 operations in the same order, no FMA contraction: exactly equal.
                assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("misaligned", ["ema", "uncertainty", "weight", "grad", "mask", "fisher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_importance_one_misaligned_tensor(misaligned, dtype):
    # One tensor off alignment at a time: with all of them misaligned at once, a kernel that checked only some of the
    # pointers would still take the scalar path and pass. (64, 96) is whole vectors, so only the check decides.
    inputs = importance_inputs((64, 96), dtype, True, True, CUDA)
    expected = run_importance(reference.accumulate_importance_, inputs, "sensitivity")
    state = {k: (misaligned_copy(v) if k == misaligned else v.clone()) for k, v in inputs.items()}
    assert state[misaligned].data_ptr() % 16 != 0
    ops.accumulate_importance_(state["ema"], state["uncertainty"], state["weight"], state["grad"], state["mask"],
                               state["fisher"], beta1=0.85, beta2=0.95, beta_fisher=0.99, criterion="sensitivity")
    for name in ("ema", "uncertainty", "fisher"):
        assert torch.equal(state[name], expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_importance_cpu_and_cuda_agree(dtype):
    inputs = importance_inputs((129, 67), dtype, True, True, "cpu")
    on_cpu = run_importance(ops.accumulate_importance_, inputs, "sensitivity")
    on_cuda = run_importance(ops.accumulate_importance_, {k: (v.to(CUDA) if v is not None else None)
                                                          for k, v in inputs.items()}, "sensitivity")
    for name in ("ema", "uncertainty", "fisher"):
        assert torch.equal(on_cuda[name].cpu(), on_cpu[name]), name


def test_accumulate_importance_rejects_state_on_another_device():
    inputs = importance_inputs((4, 5), torch.float32, False, False, CUDA)
    with pytest.raises(RuntimeError, match="ema must be on the device of weight"):
        ops.accumulate_importance_(inputs["ema"].cpu(), inputs["uncertainty"], inputs["weight"], inputs["grad"])


def test_accumulate_importance_opcheck():
    inputs = importance_inputs((9, 7), torch.bfloat16, True, True, CUDA)
    args = [inputs[k] for k in ("ema", "uncertainty", "weight", "grad", "mask", "fisher")]
    torch.library.opcheck(torch.ops.lrsparse.accumulate_importance_.default,
                          (*args, 0.85, 0.95, 0.99, "movement"))


# ----------------------------------------------------------------------------------------------------------------
# global_topk_threshold / apply_threshold_mask_
# ----------------------------------------------------------------------------------------------------------------
# Several 4096-entry tiles, a tensor smaller than one tile, an empty one and sizes that are not multiples of 256.
TOPK_SHAPES = [(96, 130), (7,), (0, 5), (33, 65), (4096,), (2, 3)]


def topk_state(with_uncertainty, with_masks, ties, device):
    gen = torch.Generator().manual_seed(2)
    ema, unc, masks = [], [], []
    for shape in TOPK_SHAPES:
        e = torch.randn(shape, generator=gen)
        if ties:  # few distinct values, both signs and signed zeros: many ties at every threshold
            e = torch.randint(-3, 4, shape, generator=gen).float() / 2
            e[e == 0] = torch.where(torch.rand(e[e == 0].shape, generator=gen) < 0.5, -0.0, 0.0)
        ema.append(e.to(device))
        unc.append((torch.randint(1, 3, shape, generator=gen).float() if ties else torch.rand(shape, generator=gen))
                   .to(device))
        masks.append((torch.rand(shape, generator=gen) < 0.7).to(device))
    return ema, (unc if with_uncertainty else None), (masks if with_masks else None)


def live_count(ema, masks):
    return sum(int(m.sum()) for m in masks) if masks else sum(e.numel() for e in ema)


def check_threshold_against_reference(ema, unc, masks, k):
    threshold, ties = ops.global_topk_threshold(ema, unc, masks, k)
    assert threshold.device.type == "cuda" and ties.device.type == "cuda"
    assert threshold.dtype == torch.float32 and ties.dtype == torch.int64
    expected_threshold, expected_ties = reference.global_topk_threshold(ema, unc or [], masks or [], k)
    assert threshold.item() == expected_threshold.item()
    assert ties.item() == expected_ties.item()
    return threshold, ties


@pytest.mark.parametrize("with_uncertainty", [False, True])
@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_threshold_and_apply_match_reference(with_uncertainty, with_masks, ties):
    ema, unc, masks = topk_state(with_uncertainty, with_masks, ties, CUDA)
    live = live_count(ema, masks)
    for k in sorted({1, 2, live // 3, live // 2, live - 1, live}):
        threshold, tie_count = check_threshold_against_reference(ema, unc, masks, k)
        apply_masks = [m.clone() for m in masks] if masks else [torch.ones_like(e, dtype=torch.bool) for e in ema]
        weights = [torch.randn(e.shape, device=CUDA) for e in ema]
        expected_masks, expected_weights = [m.clone() for m in apply_masks], [w.clone() for w in weights]
        ops.apply_threshold_mask_(apply_masks, weights, ema, unc, threshold, tie_count)
        reference.apply_threshold_mask_(expected_masks, expected_weights, ema, unc or [], threshold.cpu(),
                                        tie_count.cpu())
        for got, want in zip(apply_masks, expected_masks):
            assert torch.equal(got, want)
        for got, want in zip(weights, expected_weights):
            assert torch.equal(got, want)
        assert sum(int(m.sum()) for m in apply_masks) == k  # exactly k survive, ties included


def test_apply_tie_cut_beyond_the_first_scan_chunk():
    # The per-tile tie counts are scanned in chunks of one block (256 tiles of 4096 entries, ~1M entries); the
    # carry between chunks only matters when the tie budget runs out in a tile past the first chunk.
    gen = torch.Generator().manual_seed(7)
    ema = [(torch.randint(-3, 4, shape, generator=gen).float() / 2).to(CUDA) for shape in [(1100, 1200), (37,)]]
    scores = torch.cat([e.reshape(-1) for e in ema])
    value = 0.5
    above, tied = int((scores > value).sum()), int((scores == value).sum())
    k = above + (9 * tied) // 10  # keeps 90% of the ties at 0.5: the cut lands near tile 290 of 323
    tied_positions = (scores == value).nonzero().reshape(-1)
    assert int(tied_positions[k - above - 1]) > 256 * 4096, "the cut must fall past the first scan chunk"
    threshold, tie_count = check_threshold_against_reference(ema, None, None, k)
    assert threshold.item() == value and tie_count.item() == k - above
    masks = [torch.ones_like(e, dtype=torch.bool) for e in ema]
    weights = [torch.randn(e.shape, generator=gen).to(CUDA) for e in ema]
    expected_masks, expected_weights = [m.clone() for m in masks], [w.clone() for w in weights]
    ops.apply_threshold_mask_(masks, weights, ema, None, threshold, tie_count)
    reference.apply_threshold_mask_(expected_masks, expected_weights, ema, [], threshold.cpu(), tie_count.cpu())
    for got, want in zip(masks + weights, expected_masks + expected_weights):
        assert torch.equal(got, want)
    assert sum(int(m.sum()) for m in masks) == k


def test_topk_cpu_and_cuda_agree():
    ema, unc, masks = topk_state(True, True, True, "cpu")
    k = live_count(ema, masks) // 2
    cpu_threshold, cpu_ties = ops.global_topk_threshold(ema, unc, masks, k)
    to_cuda = lambda ts: [t.to(CUDA) for t in ts]  # noqa: E731
    cuda_threshold, cuda_ties = ops.global_topk_threshold(to_cuda(ema), to_cuda(unc), to_cuda(masks), k)
    assert cuda_threshold.item() == cpu_threshold.item() and cuda_ties.item() == cpu_ties.item()
    weights = [torch.randn(e.shape) for e in ema]
    cpu_masks, cpu_weights = [m.clone() for m in masks], [w.clone() for w in weights]
    cuda_masks, cuda_weights = to_cuda(masks), to_cuda(weights)
    ops.apply_threshold_mask_(cpu_masks, cpu_weights, ema, unc, cpu_threshold, cpu_ties)
    ops.apply_threshold_mask_(cuda_masks, cuda_weights, to_cuda(ema), to_cuda(unc), cuda_threshold, cuda_ties)
    for a, b in zip(cpu_masks + cpu_weights, cuda_masks + cuda_weights):
        assert torch.equal(a, b.cpu())


def test_topk_k_zero_keeps_nothing():
    ema, unc, masks = topk_state(True, True, False, CUDA)
    threshold, ties = ops.global_topk_threshold(ema, unc, masks, 0)
    assert threshold.item() == math.inf and ties.item() == 0
    weights = [torch.randn(e.shape, device=CUDA) for e in ema]
    ops.apply_threshold_mask_(masks, weights, ema, unc, threshold, ties)
    assert all(not m.any() for m in masks) and all((w == 0).all() for w in weights)


def test_topk_pruned_weights_are_exact_zeros_even_if_nonfinite():
    ema = [torch.arange(8.0, device=CUDA)]
    weights = [torch.full((8,), math.nan, device=CUDA)]
    masks = [torch.ones(8, dtype=torch.uint8, device=CUDA)]
    threshold, ties = ops.global_topk_threshold(ema, None, masks, 3)
    ops.apply_threshold_mask_(masks, weights, ema, None, threshold, ties)
    assert masks[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert (weights[0][:5] == 0).all() and not (torch.signbit(weights[0][:5])).any()


def test_topk_rejects_nan_scores():
    ema, unc, _ = topk_state(True, False, False, CUDA)
    unc[3][0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"ema\[3\] \* uncertainty\[3\] is NaN"):
        ops.global_topk_threshold(ema, unc, None, 5)


def test_topk_rejects_k_above_live_count():
    ema, unc, masks = topk_state(False, True, False, CUDA)
    live = live_count(ema, masks)
    with pytest.raises(RuntimeError, match=rf"k must be in \[0, {live}\]"):
        ops.global_topk_threshold(ema, unc, masks, live + 1)


def test_topk_rejects_mixed_devices():
    ema, unc, _ = topk_state(True, False, False, CUDA)
    unc[1] = unc[1].cpu()
    with pytest.raises(RuntimeError, match=r"uncertainty\[1\] must be on the device of ema\[1\]"):
        ops.global_topk_threshold(ema, unc, None, 5)


@pytest.mark.parametrize("value_device", ["cpu", "cuda"])
@pytest.mark.parametrize("threshold,ties,pattern", [
    (math.nan, 1, r"threshold must not be NaN"),
    (0.5, -1, r"ties_to_keep must be non-negative, got -1"),
])
def test_apply_rejects_bad_threshold_values_like_the_cpu_kernel(value_device, threshold, ties, pattern):
    ema, unc, masks = topk_state(True, True, False, CUDA)
    weights = [torch.randn(e.shape, device=CUDA) for e in ema]
    before = [m.clone() for m in masks] + [w.clone() for w in weights]
    threshold_t = torch.tensor(threshold, device=value_device)
    ties_t = torch.tensor(ties, device=value_device)
    with pytest.raises(RuntimeError, match=pattern):
        ops.apply_threshold_mask_(masks, weights, ema, unc, threshold_t, ties_t)
    # The CPU kernel raises the same error (the behavior being matched) ...
    with pytest.raises(RuntimeError, match=pattern):
        ops.apply_threshold_mask_([m.cpu() for m in masks], [w.cpu() for w in weights], [e.cpu() for e in ema],
                                  [u.cpu() for u in unc], threshold_t.cpu(), ties_t.cpu())
    # ... and neither changes anything before refusing.
    assert all(torch.equal(a, b) for a, b in zip(masks + weights, before))


def test_topk_opcheck():
    ema, unc, masks = topk_state(True, True, True, CUDA)
    k = live_count(ema, masks) // 3
    torch.library.opcheck(torch.ops.lrsparse.global_topk_threshold.default, (ema, unc, masks, k))
    threshold, ties = ops.global_topk_threshold(ema, unc, masks, k)
    weights = [torch.randn(e.shape, device=CUDA) for e in ema]
    torch.library.opcheck(torch.ops.lrsparse.apply_threshold_mask_.default,
                          ([m.clone() for m in masks], weights, ema, unc, threshold, ties))


# ----------------------------------------------------------------------------------------------------------------
# weighted_lowrank
# ----------------------------------------------------------------------------------------------------------------
def lowrank_problem(m=48, n=36, device=CUDA):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    omega = torch.rand(m, n, generator=gen, dtype=torch.float64)
    return weight.to(device), omega.to(device)


def test_weighted_lowrank_without_omega_is_the_truncated_svd():
    weight, _ = lowrank_problem()
    U, V = ops.weighted_lowrank(weight, 5)
    assert U.device.type == "cuda" and U.shape == (48, 5) and V.shape == (5, 36)
    optimal = torch.linalg.svdvals(weight.cpu())[5:].square().sum()  # Eckart-Young
    assert reference.weighted_error(weight, U, V).item() == pytest.approx(optimal.item(), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_lowrank_em_improves_on_svd_and_matches_reference(dtype):
    weight, omega = lowrank_problem()
    weight, omega = weight.to(dtype), omega.to(dtype)
    # oversample 20: the basis covers over half of min(m, n), so every iteration is an exact SVD as in the reference.
    U, V = ops.weighted_lowrank(weight, 5, omega, max_iters=200, tol=1e-10, oversample=20)
    svd_U, svd_V = reference.weighted_lowrank(weight, 5)
    error = reference.weighted_error(weight, U, V, omega).item()
    # EM started from the SVD only decreases the weighted error.
    assert error <= reference.weighted_error(weight, svd_U, svd_V, omega).item() * (1 + 1e-6)
    ref_U, ref_V = reference.weighted_lowrank(weight, 5, omega, max_iters=200, tol=1e-10)
    assert error == pytest.approx(reference.weighted_error(weight, ref_U, ref_V, omega).item(), rel=1e-3)


def test_weighted_lowrank_cpu_and_cuda_agree():
    weight, omega = lowrank_problem(64, 200, "cpu")  # wide, restricted-basis path (rank + oversample < k/2)
    cpu_U, cpu_V = ops.weighted_lowrank(weight, 4, omega, max_iters=20, oversample=6, seed=7)
    cuda_U, cuda_V = ops.weighted_lowrank(weight.to(CUDA), 4, omega.to(CUDA), max_iters=20, oversample=6, seed=7)
    cpu_error = reference.weighted_error(weight, cpu_U, cpu_V, omega).item()
    cuda_error = reference.weighted_error(weight, cuda_U.cpu(), cuda_V.cpu(), omega).item()
    assert cuda_error == pytest.approx(cpu_error, rel=1e-6)
    # Factors are unique up to the split, so compare the products.
    torch.testing.assert_close(cuda_U.cpu() @ cuda_V.cpu(), cpu_U @ cpu_V, rtol=1e-5, atol=1e-6)


def test_weighted_lowrank_is_deterministic_on_cuda():
    weight, omega = lowrank_problem(96, 80)
    first = ops.weighted_lowrank(weight, 6, omega, max_iters=10, seed=1)
    second = ops.weighted_lowrank(weight, 6, omega, max_iters=10, seed=1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_weighted_lowrank_rejects_omega_on_another_device():
    weight, omega = lowrank_problem()
    with pytest.raises(RuntimeError, match="omega must be on the device of weight"):
        ops.weighted_lowrank(weight, 3, omega.cpu())


# ----------------------------------------------------------------------------------------------------------------
# mixed_rank_linear
# ----------------------------------------------------------------------------------------------------------------
RELATIVE_TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_NAMES = ("x", "U", "V", "bias", "sparse_weight")


def mixed_inputs(lead, in_f, out_f, rank, dtype, device=CUDA, density=0.5, misaligned_mask=False):
    gen = torch.Generator().manual_seed(4)
    keep = torch.rand(out_f, in_f, generator=gen) < density
    inputs = {
        "x": torch.randn(*lead, in_f, generator=gen, dtype=torch.float64),
        "U": torch.randn(out_f, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank),
        "V": torch.randn(rank, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f),
        "bias": torch.randn(out_f, generator=gen, dtype=torch.float64),
        "sparse_weight": torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) * keep / math.sqrt(in_f),
        "sparse_mask": keep,
    }
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    if misaligned_mask:
        inputs["sparse_mask"] = misaligned_copy(inputs["sparse_mask"])
    return inputs


def forward_and_grads(fn, inputs, alpha, grad_out):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    y = fn(**leaves, alpha=alpha)
    grads = torch.autograd.grad(y, [leaves[k] for k in GRAD_NAMES], grad_out.to(y.dtype))
    return y, dict(zip(GRAD_NAMES, grads))


def assert_close_scaled(actual, expected, dtype, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= RELATIVE_TOL[dtype] * scale, f"{what}: max error {err:.3g} > {RELATIVE_TOL[dtype]} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
# 13 x 7 with a misaligned mask: scalar path only; 128 x 96: whole vectors; 19 x 11 = 209 entries, aligned: vector
# body plus a scalar tail (209 is not a multiple of any vector width: 2, 4 or 8 elements per 16 bytes).
@pytest.mark.parametrize("lead,in_f,out_f,rank", [((3, 5), 13, 7, 3), ((64,), 128, 96, 16), ((2, 3), 19, 11, 4)])
def test_mixed_rank_linear_matches_reference(dtype, alpha, lead, in_f, out_f, rank):
    inputs = mixed_inputs(lead, in_f, out_f, rank, torch.float64, misaligned_mask=in_f == 13)
    grad_out = torch.randn(*lead, out_f, dtype=torch.float64, device=CUDA)
    expected_y, expected_grads = forward_and_grads(reference.mixed_rank_linear, inputs, alpha, grad_out)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    y, grads = forward_and_grads(ops.mixed_rank_linear, cast, alpha, grad_out)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_close_scaled(y, expected_y, dtype, "y")
    for name in GRAD_NAMES:
        assert grads[name].dtype == dtype
        assert_close_scaled(grads[name], expected_grads[name], dtype, f"grad {name}")
    # The fused masking: pruned entries of grad(Ws) are exact zeros whatever alpha.
    assert (grads["sparse_weight"][~inputs["sparse_mask"].bool()] == 0).all()


def test_mixed_rank_linear_cpu_and_cuda_agree():
    inputs = mixed_inputs((4, 9), 40, 24, 6, torch.float32, device="cpu")
    grad_out = torch.randn(4, 9, 24)
    cpu_y, cpu_grads = forward_and_grads(ops.mixed_rank_linear, inputs, 0.3, grad_out)
    cuda_y, cuda_grads = forward_and_grads(ops.mixed_rank_linear, {k: v.to(CUDA) for k, v in inputs.items()}, 0.3,
                                           grad_out.to(CUDA))
    torch.testing.assert_close(cuda_y.cpu(), cpu_y, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        torch.testing.assert_close(cuda_grads[name].cpu(), cpu_grads[name], rtol=1e-5, atol=1e-5)


def test_mixed_rank_linear_rejects_weights_on_another_device():
    inputs = mixed_inputs((2,), 6, 5, 2, torch.float32)
    with pytest.raises(RuntimeError, match="U must be on the device of x"):
        ops.mixed_rank_linear(inputs["x"], inputs["U"].cpu(), inputs["V"])


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_mixed_rank_linear_gradcheck(alpha):
    inputs = mixed_inputs((2, 3), 5, 4, 2, torch.float64, density=0.6)
    mask = inputs["sparse_mask"]
    # Ws enters through its kept entries: pruned entries are frozen by the op, so their numerical derivative is
    # not the (zero) analytical one.
    kept = inputs["sparse_weight"][mask].clone().requires_grad_(True)
    x, U, V, b = (inputs[k].clone().requires_grad_(True) for k in ("x", "U", "V", "bias"))

    def fn(x, U, V, b, kept):
        ws = torch.zeros(mask.shape, dtype=kept.dtype, device=CUDA).masked_scatter(mask, kept)
        return ops.mixed_rank_linear(x, U, V, b, ws, mask, alpha)

    assert torch.autograd.gradcheck(fn, (x, U, V, b, kept))


def test_mixed_rank_linear_opcheck():
    inputs = mixed_inputs((3, 5), 6, 5, 2, torch.float32)
    args = [inputs[k].requires_grad_(True) if inputs[k].is_floating_point() else inputs[k]
            for k in ("x", "U", "V", "bias", "sparse_weight", "sparse_mask")]
    torch.library.opcheck(torch.ops.lrsparse.mixed_rank_linear.default, (*args, 0.3))
    grad_out = torch.randn(3, 5, 5, device=CUDA)
    torch.library.opcheck(torch.ops.lrsparse.mixed_rank_linear_backward.default,
                          (grad_out, *[a.detach() for a in args[:3]], args[4].detach(), args[5], 0.3,
                           [True, False, True, True, True]))


class MixedRankBlock(torch.nn.Module):
    def __init__(self, in_f, hidden, out_f):
        super().__init__()
        first, second = mixed_inputs((1,), in_f, hidden, 8, torch.float32), mixed_inputs((1,), hidden, out_f, 4,
                                                                                          torch.float32)
        self.params = torch.nn.ParameterDict(
            {f"{layer}_{k}": torch.nn.Parameter(v) for layer, d in (("a", first), ("b", second))
             for k, v in d.items() if k not in ("x", "sparse_mask")})
        self.register_buffer("mask_a", first["sparse_mask"])
        self.register_buffer("mask_b", second["sparse_mask"])

    def layer(self, x, name, mask, alpha):
        p = self.params
        return ops.mixed_rank_linear(x, p[f"{name}_U"], p[f"{name}_V"], p[f"{name}_bias"], p[f"{name}_sparse_weight"],
                                     mask, alpha)

    def forward(self, x):
        return self.layer(torch.nn.functional.gelu(self.layer(x, "a", self.mask_a, 0.25)), "b", self.mask_b, 0.75)


def test_torch_compile_reduce_overhead_matches_eager():
    model = MixedRankBlock(32, 48, 16).to(CUDA)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(4):  # warm-up runs, then CUDA-graph replays
            x = torch.randn(8, 32, device=CUDA)
            expected = model(x)
            actual = compiled(x).clone()  # replays overwrite the graph's output buffer
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
