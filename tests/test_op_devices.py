"""Every operator refuses tensors on different devices with a message naming the argument and both devices.

Without a GPU the second device is ``meta``: a call mixing it with CPU tensors dispatches to the fake kernels of
lrsparse.ops (Meta outranks CPU), which must apply the same rule as csrc/checks.h instead of returning a result.
"""
from __future__ import annotations

import re

import pytest
import torch

from lrsparse import ops

M, N, R = 4, 6, 2


def _f(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


def _accumulate_args():
    return {"ema": _f(M, N), "uncertainty": _f(M, N), "weight": _f(M, N), "grad": _f(M, N),
            "mask": torch.ones(M, N, dtype=torch.bool), "fisher": _f(M, N)}


def _mixed_args():
    return {"x": _f(3, N), "U": _f(M, R), "V": _f(R, N), "bias": _f(M), "sparse_weight": _f(M, N),
            "sparse_mask": torch.ones(M, N, dtype=torch.bool)}


def _to_meta(args: dict, name: str) -> dict:
    """``args`` with the tensor called ``name`` (``"ema[1]"`` for a list element) moved to the meta device."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]", name)
    if match:
        key, index = match.group(1), int(match.group(2))
        args[key] = [t.to("meta") if i == index else t for i, t in enumerate(args[key])]
    else:
        args[name] = args[name].to("meta")
    return args


def _list_args(with_weights: bool):
    args = {"ema": [_f(M, N), _f(N, M)], "uncertainty": [_f(M, N), _f(N, M)],
            "masks": [torch.ones(M, N, dtype=torch.bool), torch.ones(N, M, dtype=torch.bool)]}
    if with_weights:
        args["weights"] = [_f(M, N), _f(N, M)]
    return args


# (operator call, fresh CPU arguments, the argument moved to meta, the reference argument its message names)
CASES = [
    *[(lambda a: ops.accumulate_importance_(**a), _accumulate_args, name, "weight")
      for name in ("grad", "ema", "uncertainty", "mask", "fisher")],
    *[(lambda a: ops.global_topk_threshold(k=3, **a), lambda: _list_args(False), name, "ema[0]")
      for name in ("ema[1]", "uncertainty[0]", "uncertainty[1]", "masks[1]")],
    *[(lambda a: ops.apply_threshold_mask_(threshold=torch.tensor(0.5), ties_to_keep=torch.tensor(0), **a),
       lambda: _list_args(True), name, "ema[0]")
      for name in ("ema[1]", "uncertainty[1]", "masks[0]", "weights[0]", "weights[1]")],
    (lambda a: ops.weighted_lowrank(a["weight"], R, a["omega"], max_iters=2),
     lambda: {"weight": _f(M, N), "omega": _f(M, N)}, "omega", "weight"),
    *[(lambda a: ops.mixed_rank_linear(alpha=0.5, **a), _mixed_args, name, "x")
      for name in ("U", "V", "bias", "sparse_weight", "sparse_mask")],
    *[(lambda a: torch.ops.lrsparse.mixed_rank_linear_backward(
        a["grad_out"], a["x"], a["U"], a["V"], a["sparse_weight"], a["sparse_mask"], 0.5, [True] * 5),
       lambda: {**_mixed_args(), "grad_out": _f(3, M)}, name, "x")
      for name in ("grad_out", "U", "V", "sparse_weight", "sparse_mask")],
]


@pytest.mark.parametrize("call, make_args, meta_arg, reference_arg", CASES,
                         ids=[f"{i}-{case[2]}" for i, case in enumerate(CASES)])
def test_meta_tensor_among_cpu_tensors_is_refused(call, make_args, meta_arg, reference_arg):
    args = _to_meta(make_args(), meta_arg)
    message = rf"{re.escape(meta_arg)} must be on the device of {re.escape(reference_arg)} \(cpu\), got meta"
    with pytest.raises(RuntimeError, match=message):
        call(args)


def test_cpu_tensor_among_meta_tensors_is_refused():
    # The reference argument itself on meta: the message names the CPU tensor and the meta device.
    args = {k: v.to("meta") for k, v in _mixed_args().items()}
    args["bias"] = _f(M)
    with pytest.raises(RuntimeError, match=r"bias must be on the device of x \(meta\), got cpu"):
        ops.mixed_rank_linear(alpha=0.5, **args)


def test_all_meta_calls_still_give_meta_results_of_the_cpu_shapes():
    # The checks must not refuse consistent meta calls (shape inference, torch.compile tracing).
    meta = {k: v.to("meta") for k, v in _mixed_args().items()}
    cpu = _mixed_args()
    expected = ops.mixed_rank_linear(alpha=0.5, **cpu)
    out = ops.mixed_rank_linear(alpha=0.5, **meta)
    assert out.device.type == "meta" and out.shape == expected.shape
    U, V = ops.weighted_lowrank(torch.empty(M, N, device="meta"), R, torch.empty(M, N, device="meta"))
    assert (U.shape, V.shape, U.device.type) == ((M, R), (R, N), "meta")
    threshold, ties = ops.global_topk_threshold([t.to("meta") for t in _list_args(False)["ema"]], None, None, 3)
    assert threshold.device.type == ties.device.type == "meta"
