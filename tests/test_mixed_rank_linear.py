"""mixed_rank_linear and mixed_rank_linear_backward (CPU) against lrsparse.reference in float64."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lrsparse import ops, reference

backward_op = torch.ops.lrsparse.mixed_rank_linear_backward


pytestmark = pytest.mark.usefixtures("single_thread")
GRAD_NAMES = ("x", "U", "V", "bias", "sparse_weight")

# Max error allowed relative to the largest reference magnitude, for results computed in each dtype.
RELATIVE_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(lead, in_f, out_f, rank, *, dtype=torch.float64, bias=True, sparse=True, density=0.5,
                mask_dtype=torch.bool, noncontiguous=False):
    """Inputs of roughly unit-scale outputs; Ws is zero where its mask is 0, as the op assumes."""
    inputs = {
        "x": torch.randn(*lead, in_f, dtype=torch.float64),
        "U": torch.randn(out_f, rank, dtype=torch.float64) / math.sqrt(rank),
        "V": torch.randn(rank, in_f, dtype=torch.float64) / math.sqrt(in_f),
        "bias": torch.randn(out_f, dtype=torch.float64) if bias else None,
        "sparse_weight": None,
        "sparse_mask": None,
    }
    if sparse:
        ws = torch.randn(out_f, in_f, dtype=torch.float64) / math.sqrt(in_f)
        if density is not None:
            keep = torch.rand(out_f, in_f) < density
            ws = ws * keep
            inputs["sparse_mask"] = keep.to(mask_dtype)
        inputs["sparse_weight"] = ws
    cast = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    if noncontiguous:
        # Same values with the feature dim strided: a non-contiguous, non-dense view.
        wide = torch.zeros(*lead, in_f, 2, dtype=dtype)
        wide[..., 0] = cast["x"]
        cast["x"] = wide[..., 0]
    return cast


def differentiable(inputs):
    return [k for k in GRAD_NAMES if inputs[k] is not None]


def run_with_grads(fn, inputs, alpha, grad_out=None, dtype=None):
    """Output of fn and the gradients of every tensor input; inputs are cast to dtype (leaves, requires_grad)."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            leaves[k] = None
            continue
        v = v.detach()  # an alias keeping the caller's strides, so requires_grad_ leaves the caller's tensor alone
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if v.is_floating_point():
            v.requires_grad_(True)
        leaves[k] = v
    y = fn(**leaves, alpha=alpha)
    if grad_out is None:
        grad_out = torch.randn(y.shape, dtype=torch.float64)
    names = differentiable(inputs)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad_out.to(y.dtype))
    return y, dict(zip(names, grads)), grad_out


def assert_close_scaled(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= RELATIVE_TOL[dtype] * scale, f"{what}: max error {err:.3g} > {RELATIVE_TOL[dtype]} * {scale:.3g}"


def check_against_reference(inputs, alpha, dtype):
    """Forward and all gradients of the op in `dtype` against the float64 reference on the same values."""
    expected_y, expected_grads, grad_out = run_with_grads(reference.mixed_rank_linear, inputs, alpha,
                                                          dtype=torch.float64)
    y, grads, _ = run_with_grads(ops.mixed_rank_linear, inputs, alpha, grad_out=grad_out, dtype=dtype)
    assert y.dtype == dtype
    assert_close_scaled(y, expected_y, dtype, "y")
    for name in expected_grads:
        assert grads[name].dtype == dtype
        assert_close_scaled(grads[name], expected_grads[name], dtype, f"grad {name}")
    if inputs["sparse_mask"] is not None:
        pruned = ~inputs["sparse_mask"].bool()
        assert (grads["sparse_weight"][pruned] == 0).all()


LEADS = [(1,), (7,), (3, 5)]
FEATURES = [1, 7, 127]
# (bias, sparse_weight, mask density or None for no mask)
CONFIGS = [(False, False, None), (True, True, None), (True, True, 0.1), (False, True, 0.5), (True, True, 1.0)]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rank", [1, 5, "min"])
@pytest.mark.parametrize("in_f,out_f", list(itertools.product(FEATURES, FEATURES)))
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_matches_reference_float64(lead, in_f, out_f, rank, alpha):
    rank = min(in_f, out_f) if rank == "min" else rank
    for bias, sparse, density in CONFIGS:
        inputs = make_inputs(lead, in_f, out_f, rank, bias=bias, sparse=sparse, density=density)
        check_against_reference(inputs, alpha, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("lead,in_f,out_f,rank", [((7,), 127, 7, 5), ((3, 5), 7, 127, 7), ((1,), 127, 127, 1)],
                         ids=str)
def test_low_precision_matches_float64_reference(dtype, alpha, lead, in_f, out_f, rank):
    for bias, sparse, density in CONFIGS:
        inputs = make_inputs(lead, in_f, out_f, rank, dtype=dtype, bias=bias, sparse=sparse, density=density)
        check_against_reference(inputs, alpha, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_transformer_sized_layer(dtype):
    inputs = make_inputs((128,), 768, 3072, 64, dtype=dtype, density=0.3)
    check_against_reference(inputs, 0.3, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=str)
def test_noncontiguous_x(dtype, lead):
    inputs = make_inputs(lead, 127, 7, 5, dtype=dtype, noncontiguous=True, mask_dtype=torch.uint8)
    check_against_reference(inputs, 0.3, dtype)
    # A transposed (dense but permuted) x as well.
    transposed = dict(inputs, x=inputs["x"].transpose(0, -1).contiguous().transpose(0, -1))
    assert not transposed["x"].is_contiguous() and not inputs["x"].is_contiguous()
    check_against_reference(transposed, 0.7, dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8], ids=str)
def test_pruned_weight_gradient_is_exactly_zero(mask_dtype):
    inputs = make_inputs((4, 3), 33, 17, 3, dtype=torch.float32, density=0.4, mask_dtype=mask_dtype)
    # Non-finite upstream gradients must not leak into pruned entries either (select, not multiply).
    grad_out = torch.randn(4, 3, 17, dtype=torch.float64)
    grad_out[0, 0, 0] = float("inf")
    grad_out[1, 2, 5] = float("nan")
    _, grads, _ = run_with_grads(ops.mixed_rank_linear, inputs, 0.4, grad_out=grad_out)
    pruned = inputs["sparse_mask"] == 0
    assert pruned.any() and (~pruned).any()
    assert (grads["sparse_weight"][pruned] == 0).all()
    finite_rows = torch.ones(17, dtype=torch.bool)
    finite_rows[[0, 5]] = False
    assert (grads["sparse_weight"][finite_rows][~pruned[finite_rows]] != 0).all()


def test_alpha_one_gives_zero_sparse_gradient_and_low_rank_output():
    inputs = make_inputs((5,), 7, 6, 2)
    y, grads, _ = run_with_grads(ops.mixed_rank_linear, inputs, 1.0)
    assert torch.equal(grads["sparse_weight"], torch.zeros(6, 7, dtype=torch.float64))
    x, U, V, b = inputs["x"], inputs["U"], inputs["V"], inputs["bias"]
    torch.testing.assert_close(y, x @ V.t() @ U.t() + b)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_backward_op_honors_output_mask(alpha):
    inputs = make_inputs((2, 3), 9, 4, 2, density=0.5)
    _, expected, grad_out = run_with_grads(reference.mixed_rank_linear, inputs, alpha)
    args = (grad_out, inputs["x"], inputs["U"], inputs["V"], inputs["sparse_weight"], inputs["sparse_mask"], alpha)
    for output_mask in itertools.product([False, True], repeat=5):
        grads = backward_op(*args, list(output_mask))
        assert len(grads) == 5
        for name, needed, grad in zip(GRAD_NAMES, output_mask, grads):
            if not needed:
                assert grad is None, f"{name} not requested but returned"
            else:
                assert_close_scaled(grad, expected[name], torch.float64, f"{name} with mask {output_mask}")


def test_backward_op_without_sparse_weight():
    inputs = make_inputs((3,), 5, 4, 2, sparse=False)
    _, expected, grad_out = run_with_grads(reference.mixed_rank_linear, inputs, 0.5)
    grads = backward_op(grad_out, inputs["x"], inputs["U"], inputs["V"], None, None, 0.5, [True] * 4 + [False])
    assert grads[4] is None
    for name, grad in zip(GRAD_NAMES[:4], grads[:4]):
        assert_close_scaled(grad, expected[name], torch.float64, name)


def opcheck_samples():
    for lead, noncontig, mask_dtype, sparse, alpha in [
        ((3, 5), True, torch.bool, True, 0.3),
        ((7,), False, torch.uint8, True, 0.0),
        ((2,), False, torch.bool, False, 1.0),
    ]:
        yield make_inputs(lead, 6, 5, 2, dtype=torch.float32, noncontiguous=noncontig, mask_dtype=mask_dtype,
                          sparse=sparse), alpha


def test_opcheck_forward():
    for inputs, alpha in opcheck_samples():
        args = [inputs[k] for k in ("x", "U", "V", "bias", "sparse_weight", "sparse_mask")]
        args = [a.requires_grad_(True) if a is not None and a.is_floating_point() else a for a in args]
        torch.library.opcheck(torch.ops.lrsparse.mixed_rank_linear.default, (*args, alpha))


def test_opcheck_backward():
    for (inputs, alpha), output_mask in zip(opcheck_samples(), ([True] * 5, [True, False, True, False, True],
                                                                 [False, True, False, True, False])):
        grad_out = torch.randn(*inputs["x"].shape[:-1], 5)
        args = (grad_out, inputs["x"], inputs["U"], inputs["V"], inputs["sparse_weight"], inputs["sparse_mask"],
                alpha, output_mask)
        torch.library.opcheck(backward_op.default, args)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.8, 1.0])
def test_gradcheck(alpha):
    inputs = make_inputs((2, 3), 5, 4, 2, density=0.6)
    mask = inputs["sparse_mask"]
    # Ws is fed through its kept entries: the op (like the reference) treats pruned entries as frozen, so a
    # numerical derivative with respect to them would not be zero.
    kept = inputs["sparse_weight"][mask].clone().requires_grad_(True)
    x, U, V, b = (inputs[k].clone().requires_grad_(True) for k in ("x", "U", "V", "bias"))

    def fn(x, U, V, b, kept):
        ws = torch.zeros(mask.shape, dtype=kept.dtype).masked_scatter(mask, kept)
        return ops.mixed_rank_linear(x, U, V, b, ws, mask, alpha)

    assert torch.autograd.gradcheck(fn, (x, U, V, b, kept))


class MixedRankLinear(torch.nn.Module):
    def __init__(self, in_f, out_f, rank, alpha, density):
        super().__init__()
        inputs = make_inputs((1,), in_f, out_f, rank, dtype=torch.float32, density=density)
        self.U = torch.nn.Parameter(inputs["U"])
        self.V = torch.nn.Parameter(inputs["V"])
        self.bias = torch.nn.Parameter(inputs["bias"])
        self.sparse_weight = torch.nn.Parameter(inputs["sparse_weight"])
        self.register_buffer("sparse_mask", inputs["sparse_mask"])
        self.alpha = alpha

    def forward(self, x):
        return ops.mixed_rank_linear(x, self.U, self.V, self.bias, self.sparse_weight, self.sparse_mask, self.alpha)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = MixedRankLinear(12, 20, 4, 0.3, 0.5)
        self.fc2 = MixedRankLinear(20, 6, 3, 0.7, 0.3)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TwoLayer()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 4, 12)
    grad_out = torch.randn(3, 4, 6)
    results = []
    for m in (model, compiled):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        y = m(xi)
        y.backward(grad_out)
        results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y_e, gx_e, gp_e), (y_c, gx_c, gp_c) = results
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gx_c, gx_e)
    for name in gp_e:
        torch.testing.assert_close(gp_c[name], gp_e[name], msg=name)
    for layer in (model.fc1, model.fc2):
        assert (layer.sparse_weight.grad[layer.sparse_mask == 0] == 0).all()


# --- bad input: each case edits valid inputs and names the argument in the error -------------------------------
def _valid():
    return make_inputs((3, 2), 6, 5, 2, dtype=torch.float32)


BAD_INPUTS = {
    "x_in_features": (lambda d: d.update(x=torch.randn(3, 2, 7)), r"x must have last dimension in_features"),
    "x_integer": (lambda d: d.update(x=torch.ones(3, 6, dtype=torch.int64)), r"x must be a floating-point"),
    "x_0d": (lambda d: d.update(x=torch.tensor(1.0)), r"x must have at least 1 dimension"),
    "U_rank": (lambda d: d.update(U=torch.randn(5, 3)), r"U must have U.size\(1\) == rank"),
    "U_3d": (lambda d: d.update(U=torch.randn(5, 2, 1)), r"U must be 2-D"),
    "V_1d": (lambda d: d.update(V=torch.randn(6)), r"V must be 2-D"),
    "U_dtype": (lambda d: d.update(U=d["U"].double()), r"U must have the dtype of x"),
    "V_dtype": (lambda d: d.update(V=d["V"].half()), r"V must have the dtype of x"),
    "bias_shape": (lambda d: d.update(bias=torch.randn(6)), r"bias must have shape \(out_features,\)"),
    "bias_2d": (lambda d: d.update(bias=torch.randn(1, 5)), r"bias must have shape"),
    "bias_dtype": (lambda d: d.update(bias=d["bias"].double()), r"bias must have the dtype of x"),
    "out_features": (lambda d: d.update(U=torch.randn(4, 2)), r"(bias|sparse_weight) must have shape"),
    "sparse_weight_shape": (lambda d: d.update(sparse_weight=torch.randn(5, 7), sparse_mask=None),
                            r"sparse_weight must have shape \(out_features, in_features\)"),
    "sparse_weight_dtype": (lambda d: d.update(sparse_weight=d["sparse_weight"].bfloat16()),
                            r"sparse_weight must have the dtype of x"),
    "mask_dtype": (lambda d: d.update(sparse_mask=d["sparse_mask"].float()), r"sparse_mask must be bool or uint8"),
    "mask_shape": (lambda d: d.update(sparse_mask=torch.ones(5, 5, dtype=torch.bool)),
                   r"sparse_mask must have the shape of sparse_weight"),
    "mask_without_weight": (lambda d: d.update(sparse_weight=None), r"sparse_mask was given without sparse_weight"),
    "alpha_negative": (lambda d: d.update(alpha=-0.1), r"alpha must be in \[0, 1\]"),
    "alpha_above_one": (lambda d: d.update(alpha=1.5), r"alpha must be in \[0, 1\]"),
}


# The backward op takes no bias.
BAD_CASES = [("forward", c) for c in BAD_INPUTS] + [("backward", c) for c in BAD_INPUTS if not c.startswith("bias")]


@pytest.mark.parametrize("which,case", BAD_CASES)
def test_bad_input_names_argument(which, case):
    edit, match = BAD_INPUTS[case]
    inputs = dict(_valid(), alpha=0.5)
    edit(inputs)
    if which == "forward":
        with pytest.raises(RuntimeError, match=match):
            ops.mixed_rank_linear(**inputs)
        return
    grad_out = torch.randn(3, 2, 5)
    with pytest.raises(RuntimeError, match=match):
        backward_op(grad_out, inputs["x"], inputs["U"], inputs["V"], inputs["sparse_weight"], inputs["sparse_mask"],
                    inputs["alpha"], [True] * 5)


@pytest.mark.parametrize("grad_out,match", [
    (torch.randn(3, 2, 4), r"grad_out must have shape"),
    (torch.randn(6, 5), r"grad_out must have shape"),
    (torch.randn(3, 2, 5, dtype=torch.float64), r"grad_out must have the dtype of x"),
])
def test_bad_grad_out_names_argument(grad_out, match):
    d = _valid()
    with pytest.raises(RuntimeError, match=match):
        backward_op(grad_out, d["x"], d["U"], d["V"], d["sparse_weight"], d["sparse_mask"], 0.5, [True] * 5)


def test_backward_sparse_grad_requested_without_weight_names_argument():
    d = _valid()
    with pytest.raises(RuntimeError, match=r"output_mask\[4\].*sparse_weight is None"):
        backward_op(torch.randn(3, 2, 5), d["x"], d["U"], d["V"], None, None, 0.5, [True] * 5)


@pytest.mark.parametrize("lead", [(), (0,), (2, 0)], ids=str)
def test_vector_and_empty_batches(lead):
    inputs = make_inputs(lead, 7, 5, 3, density=0.5)
    check_against_reference(inputs, 0.4, torch.float64)
