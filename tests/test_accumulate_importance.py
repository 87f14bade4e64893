"""lrsparse.ops.accumulate_importance_ (CPU kernel) against lrsparse.reference.accumulate_importance_."""
from __future__ import annotations

import pytest
import torch

from lrsparse import ops, reference

SMALL_SHAPES = [(1, 1), (7, 13), (127, 61)]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASK_DENSITIES = [None, 0.0, 0.1, 0.5, 1.0]
STEPS = 3
# Same float32 operations in the same order as the reference: agreement to about one ulp (bitwise in practice).
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def make_state(shape, with_fisher: bool) -> dict[str, torch.Tensor | None]:
    return {
        "ema": torch.rand(shape),
        "uncertainty": torch.rand(shape) * 0.1,
        "fisher": torch.rand(shape) * 0.01 if with_fisher else None,
    }


def clone_state(state):
    return {name: None if t is None else t.clone() for name, t in state.items()}


def make_mask(shape, density, dtype=torch.bool):
    if density is None:
        return None
    live = torch.rand(shape) < density
    if dtype == torch.uint8:
        return live.to(torch.uint8) * torch.randint(1, 5, shape, dtype=torch.uint8)  # any nonzero byte is live
    return live


def run_steps(shape, dtype, density, criterion, with_fisher, mask_dtype=torch.bool, betas=(0.85, 0.95, 0.99)):
    """STEPS consecutive updates with fresh weights/grads through the kernel and the reference."""
    mask = make_mask(shape, density, mask_dtype)
    state = make_state(shape, with_fisher)
    initial = clone_state(state)
    expected = clone_state(state)
    beta1, beta2, beta_fisher = betas
    for _ in range(STEPS):
        weight = torch.randn(shape).to(dtype)
        grad = (torch.randn(shape) * 0.1).to(dtype)
        kwargs = dict(beta1=beta1, beta2=beta2, beta_fisher=beta_fisher, criterion=criterion)
        ops.accumulate_importance_(state["ema"], state["uncertainty"], weight, grad, mask, state["fisher"], **kwargs)
        reference.accumulate_importance_(
            expected["ema"], expected["uncertainty"], weight, grad, mask, expected["fisher"], **kwargs
        )
    return state, expected, initial, mask


def assert_state_matches(state, expected, initial, mask, expect_update=True):
    for name, tensor in state.items():
        if tensor is None:
            continue
        torch.testing.assert_close(tensor, expected[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")
        if mask is not None:
            frozen = ~mask.bool()
            assert torch.equal(tensor[frozen], initial[name][frozen]), f"{name} changed at masked-out entries"
            if expect_update and frozen.any() and not frozen.all():
                assert not torch.equal(tensor[~frozen], initial[name][~frozen]), f"{name} not updated where live"


@pytest.mark.parametrize("with_fisher", [False, True])
@pytest.mark.parametrize("criterion", ["sensitivity", "movement"])
@pytest.mark.parametrize("density", MASK_DENSITIES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_matches_reference(shape, dtype, density, criterion, with_fisher):
    assert_state_matches(*run_steps(shape, dtype, density, criterion, with_fisher))


@pytest.mark.parametrize("criterion", ["sensitivity", "movement"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_bert_sized(dtype, criterion):
    assert_state_matches(*run_steps((768, 3072), dtype, 0.5, criterion, with_fisher=True))


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_uint8_mask_any_nonzero_byte_is_live(density):
    assert_state_matches(*run_steps((127, 61), torch.float32, density, "sensitivity", True, mask_dtype=torch.uint8))


def test_float64_inputs_are_rounded_to_float32_like_the_reference():
    assert_state_matches(*run_steps((7, 13), torch.float64, 0.5, "movement", with_fisher=True))


@pytest.mark.parametrize("betas", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.3, 0.7, 0.5)])
def test_extreme_betas(betas):
    frozen_by_betas = betas == (1.0, 1.0, 1.0)
    result = run_steps((127, 61), torch.float32, 0.5, "sensitivity", True, betas=betas)
    assert_state_matches(*result, expect_update=not frozen_by_betas)
    if frozen_by_betas:
        state, _, initial, _ = result
        assert all(torch.equal(state[name], initial[name]) for name in state)


def test_criteria_differ_on_sign():
    # Guards against the two criteria collapsing into one: movement keeps the sign of -w*g.
    weight, grad = torch.tensor([[2.0, -1.0]]), torch.tensor([[3.0, -4.0]])
    sens, move = make_state((1, 2), False), make_state((1, 2), False)
    for s in (sens, move):
        s["ema"].zero_()
        s["uncertainty"].zero_()
    ops.accumulate_importance_(sens["ema"], sens["uncertainty"], weight, grad, beta1=0.5, beta2=0.5)
    ops.accumulate_importance_(move["ema"], move["uncertainty"], weight, grad, beta1=0.5, beta2=0.5, criterion="movement")
    assert sens["ema"].tolist() == [[3.0, 2.0]]  # 0.5 * |w*g|
    assert move["ema"].tolist() == [[-3.0, -2.0]]  # 0.5 * -(w*g)
    assert sens["uncertainty"].tolist() == [[1.5, 1.0]]  # 0.5 * |I - ema|


def small_args(with_mask=True, with_fisher=True):
    shape = (5, 7)
    return (
        torch.rand(shape),
        torch.rand(shape),
        torch.randn(shape),
        torch.randn(shape),
        (torch.rand(shape) < 0.5) if with_mask else None,
        torch.rand(shape) if with_fisher else None,
        0.85,
        0.95,
        0.99,
        "movement",
    )


@pytest.mark.parametrize("with_mask,with_fisher", [(True, True), (False, False)])
def test_opcheck(with_mask, with_fisher):
    torch.library.opcheck(torch.ops.lrsparse.accumulate_importance_.default, small_args(with_mask, with_fisher))


def test_torch_compile_fullgraph_matches_eager():
    def step(ema, uncertainty, weight, grad, mask, fisher):
        ops.accumulate_importance_(ema, uncertainty, weight, grad, mask, fisher, beta1=0.8, criterion="sensitivity")
        return ema.sum() + uncertainty.sum()

    # aot_eager traces through dynamo, the fake kernel and functionalization of the in-place op, which is what is
    # under test here; inductor would add a C++ compile of its own (tens of seconds on the shared CI cores).
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = small_args()[:6]
    eager_args = [None if t is None else t.clone() for t in args]
    initial_ema = args[0].clone()
    compiled_total = compiled(*args)
    eager_total = step(*eager_args)
    for name, got, want in zip(("ema", "uncertainty", "fisher"), (args[0], args[1], args[5]),
                               (eager_args[0], eager_args[1], eager_args[5])):
        assert torch.equal(got, want), name
    assert torch.equal(compiled_total, eager_total)
    assert not torch.equal(args[0], initial_ema), "the compiled call did not update ema in place"


def bad_input_cases():
    shape = (4, 6)

    def good():
        return dict(
            ema=torch.rand(shape), uncertainty=torch.rand(shape), weight=torch.randn(shape), grad=torch.randn(shape),
            mask=torch.rand(shape) < 0.5, fisher=torch.rand(shape),
        )

    cases = []

    def case(label, pattern, **changes):
        cases.append(pytest.param(changes, pattern, id=label))

    case("ema_float64", r"ema must be float32", ema=torch.rand(shape, dtype=torch.float64))
    case("ema_shape", r"ema must have the shape of weight", ema=torch.rand(shape[0], shape[1] + 1))
    case("ema_noncontiguous", r"ema must be contiguous", ema=torch.rand(shape[1], shape[0]).t())
    case("uncertainty_bf16", r"uncertainty must be float32", uncertainty=torch.rand(shape).bfloat16())
    case("uncertainty_shape", r"uncertainty must have the shape", uncertainty=torch.rand(shape[0] * shape[1]))
    case("weight_int", r"weight must be a floating-point", weight=torch.ones(shape, dtype=torch.int32),
         grad=torch.ones(shape, dtype=torch.int32))
    case("weight_noncontiguous", r"weight must be contiguous", weight=torch.randn(shape[1], shape[0]).t())
    case("grad_dtype", r"grad must have the dtype of weight", grad=torch.randn(shape).half())
    case("grad_shape", r"grad must have the shape of weight", grad=torch.randn(shape[0], shape[1] + 2))
    case("grad_noncontiguous", r"grad must be contiguous", grad=torch.randn(shape[1], shape[0]).t())
    case("mask_float", r"mask must be bool or uint8", mask=torch.ones(shape))
    case("mask_shape", r"mask must have the shape of weight", mask=torch.ones(shape[0], 1, dtype=torch.bool))
    case("fisher_float64", r"fisher must be float32", fisher=torch.rand(shape, dtype=torch.float64))
    case("fisher_shape", r"fisher must have the shape of weight", fisher=torch.rand(shape[1], shape[0]))
    case("beta1_above_one", r"beta1 must be in \[0, 1\]", beta1=1.5)
    case("beta2_negative", r"beta2 must be in \[0, 1\]", beta2=-0.1)
    case("beta_fisher_nan", r"beta_fisher must be in \[0, 1\]", beta_fisher=float("nan"))
    case("criterion", r"criterion must be one of \"sensitivity\", \"movement\", got \"magnitude\"",
         criterion="magnitude")
    return good, cases


_good_inputs, _bad_cases = bad_input_cases()


@pytest.mark.parametrize("changes,pattern", _bad_cases)
def test_bad_input_names_the_argument(changes, pattern):
    kwargs = _good_inputs()
    kwargs.update(changes)
    before = {name: t.clone() for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(RuntimeError, match=pattern):
        ops.accumulate_importance_(**kwargs)
    for name, t in before.items():
        assert torch.equal(kwargs[name], t), f"{name} modified by a call that failed validation"
