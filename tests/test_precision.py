"""Mixed precision: the autocast rule of mixed_rank_linear (against float64 and the eager reference under the same
autocast, opcheck, torch.compile), the recipe's precision option, fp16 loss scaling in the training loop, and a
short real run in bf16 that ends within a stated tolerance of the same run in fp32."""
from __future__ import annotations

import math

import pytest
import torch

from lrsparse import ops, reference
from lrsparse.data import PaddingCollator
from lrsparse.recipe import RecipeConfig
from lrsparse.training import train
from pipeline_helpers import VOCAB, save_tiny_bert_checkpoint, tiny_bert

pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = ("x", "U", "V", "bias", "sparse_weight")


def _inputs(seed=0, lead=(3, 5), in_f=24, out_f=16, rank=4, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(out_f, in_f, generator=gen) < density
    values = {"x": torch.randn(*lead, in_f, generator=gen),
              "U": torch.randn(out_f, rank, generator=gen) / math.sqrt(rank),
              "V": torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f),
              "bias": torch.randn(out_f, generator=gen),
              "sparse_weight": torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f) * keep}
    return {k: v.requires_grad_(True) for k, v in values.items()}, keep


def _forward_backward(fn, inputs, mask, alpha, grad_out):
    out = fn(*(inputs[k] for k in NAMES), mask, alpha)
    out.backward(grad_out.to(out.dtype))
    grads = {k: inputs[k].grad.clone() for k in NAMES}
    for k in NAMES:
        inputs[k].grad = None
    return out, grads


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_autocast_bf16_casts_inputs_and_keeps_fp32_gradients(alpha):
    inputs, mask = _inputs()
    grad_out = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _forward_backward(ops.mixed_rank_linear, inputs, mask, alpha, grad_out)
    assert out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())
    # float64 on the bf16-rounded inputs: the op's only other rounding is the bf16 output of each product.
    rounded = {k: v.detach().bfloat16().double().requires_grad_(True) for k, v in inputs.items()}
    expected, expected_grads = _forward_backward(reference.mixed_rank_linear, rounded, mask, alpha,
                                                 grad_out.bfloat16().double())
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= 2e-2 * scale
    for name in NAMES:
        error = (grads[name].double() - expected_grads[name]).abs().max()
        assert error <= 3e-2 * expected_grads[name].abs().max() + 1e-6, name
    assert torch.all(grads["sparse_weight"][~mask] == 0)
    # The eager reference under the same autocast (its products cast by ATen's own rules) agrees too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, _ = _forward_backward(reference.mixed_rank_linear, inputs, mask, alpha, grad_out)
    assert (out.double() - eager.double()).abs().max() <= 2e-2 * scale


def test_autocast_leaves_float64_alone_and_is_a_noop_when_disabled():
    inputs, mask = _inputs()
    args = [v.detach() for v in inputs.values()]
    plain = ops.mixed_rank_linear(*args, mask, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(ops.mixed_rank_linear(*args, mask, 0.3), plain)
    doubles = [a.double() for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.mixed_rank_linear(*doubles, mask, 0.3)
    assert out.dtype == torch.float64
    assert torch.equal(out, ops.mixed_rank_linear(*doubles, mask, 0.3))


def test_opcheck_under_autocast():
    inputs, mask = _inputs(lead=(2, 3), in_f=6, out_f=5, rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.library.opcheck(torch.ops.lrsparse.mixed_rank_linear.default,
                              (*(inputs[k] for k in NAMES), mask, 0.3))


def test_torch_compile_fullgraph_under_autocast_matches_eager():
    torch._dynamo.reset()
    inputs, mask = _inputs()
    args = [inputs[k].detach() for k in NAMES]

    def fn(x, U, V, bias, ws):
        return torch.nn.functional.gelu(ops.mixed_rank_linear(x, U, V, bias, ws, mask, 0.6))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True)(*args)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def _config(tmp_path, **overrides) -> RecipeConfig:
    settings = dict(task="sst2", keep=0.5, output_dir=str(tmp_path), batch_size=4, lr=1e-3, checkpoint_every=0)
    settings.update(overrides)
    return RecipeConfig.create(**settings)


@pytest.mark.parametrize("precision, message", [
    ("fp16", "precision 'fp16' needs a CUDA device"),
    ("int8", r"precision must be one of \['fp32', 'bf16', 'fp16'\], got 'int8'"),
])
def test_unusable_precision_is_refused_naming_the_option(tmp_path, precision, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, precision=precision, device="cpu")


def test_fp16_overflow_skips_the_step_and_backs_the_scale_off(tmp_path):
    """The loop's GradScaler path (used on CUDA) on the CPU: an infinite gradient is an overflow, even with
    nonfinite_grads="error": skipped, counted, the scale halved, the weights untouched."""
    config = _config(tmp_path, nonfinite_grads="error")
    object.__setattr__(config, "precision", "fp16")  # validation refuses fp16 on the CPU; the loop logic is the same
    model = tiny_bert()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 2 else grad

    model.get_parameter("bert.encoder.layer.0.attention.self.query.weight").register_hook(poison)
    scales, snapshots = [], []
    original_update = torch.amp.GradScaler.update

    def update(self, new_scale=None):
        original_update(self, new_scale)
        scales.append(float(self.get_scale()))

    gen = torch.Generator().manual_seed(3)
    dataset = [{"input_ids": torch.randint(1, VOCAB, (8,), generator=gen),
                "labels": torch.randint(0, 2, (), generator=gen)} for _ in range(12)]
    model.register_forward_pre_hook(lambda m, a: snapshots.append(m.classifier.weight.detach().clone()))
    torch.amp.GradScaler.update = update
    try:
        stats = train(model, dataset, config, 3, 0, "finetune", PaddingCollator(0), torch.device("cpu"))
    finally:
        torch.amp.GradScaler.update = original_update
    assert (stats["overflow_steps"], stats["skipped_steps"], stats["nonfinite_grad_steps"]) == (1, 1, 0)
    assert scales[1] == scales[0] / 2  # GradScaler's backoff factor 0.5 after the overflow of step 2
    assert torch.equal(snapshots[1], snapshots[2])  # step 2 applied nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_short_real_run_in_bf16_ends_close_to_fp32(tmp_path, minilm_path, data_dir):
    """The whole pipeline (dense, prune, factorize, mixed rank) on real SST-2 sentences with a small model, in fp32
    and in bf16: the stated tolerance is 5% relative on every stage's mean training loss and 5 points of dev
    accuracy after every stage."""
    from lrsparse.pipeline import run_compression

    checkpoint = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path, layers=2)
    reports = {}
    for precision in ("fp32", "bf16"):
        config = RecipeConfig.create(
            task="sst2", keep=0.5, output_dir=str(tmp_path / precision), model=str(checkpoint),
            data_dir=str(data_dir / "glue"), max_train_samples=256, max_eval_samples=200, epochs=1, batch_size=16,
            lr=1e-3, max_seq_len=32, precision=precision, device="cpu", checkpoint_every=0)
        reports[precision] = run_compression(config)
    stages = {p: {s["name"]: s for s in r["stages"]} for p, r in reports.items()}
    assert list(stages["fp32"]) == list(stages["bf16"]) == ["dense", "prune", "factorize", "mixed_rank"]
    for name, fp32 in stages["fp32"].items():
        bf16 = stages["bf16"][name]
        if "mean_loss" in fp32:
            assert abs(bf16["mean_loss"] - fp32["mean_loss"]) <= 0.05 * fp32["mean_loss"], name
        assert abs(bf16["metrics"]["accuracy"] - fp32["metrics"]["accuracy"]) <= 0.05, name
    assert reports["bf16"]["config"]["precision"] == "bf16"
    # bf16 did run in bf16: the losses are close, not equal.
    assert stages["bf16"]["prune"]["mean_loss"] != stages["fp32"]["prune"]["mean_loss"]


def test_bf16_speed_probe_matches_timed_matrix_products():
    """The probe behind the bf16 warning against an independent timing of the same products (medians of 5 runs of
    each dtype, one thread): both say whether bf16 is the faster one on this CPU, unless the two are within 25%."""
    import statistics
    import time

    from lrsparse.modeling import cpu_bf16_gemm_speedup, has_fast_bf16

    probe = cpu_bf16_gemm_speedup()
    assert math.isfinite(probe) and probe > 0
    assert has_fast_bf16(torch.device("cpu")) == (probe > 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        medians = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(512, 512).to(dtype)
            a @ a
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                a @ a
                runs.append(time.perf_counter() - start)
            medians[dtype] = statistics.median(runs)
    finally:
        torch.set_num_threads(threads)
    measured = medians[torch.float32] / medians[torch.bfloat16]
    if not 0.8 < measured < 1.25:  # a clear answer either way must agree with the probe's
        assert (measured > 1.0) == (probe > 1.0), (measured, probe)


def test_bf16_on_a_cpu_where_it_is_slower_warns_with_the_measured_ratio(tmp_path, minilm_path, data_dir,
                                                                      monkeypatch, caplog):
    from lrsparse import modeling
    from lrsparse.pipeline import run_compression

    monkeypatch.setattr(modeling, "cpu_bf16_gemm_speedup", lambda: 0.54)
    checkpoint = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path, layers=1)
    config = RecipeConfig.create(task="sst2", keep=0.5, output_dir=str(tmp_path / "run"), model=str(checkpoint),
                                 data_dir=str(data_dir / "glue"), max_train_samples=32, max_eval_samples=16, epochs=1,
                                 batch_size=16, max_seq_len=16, precision="bf16", device="cpu", checkpoint_every=0)
    with caplog.at_level("WARNING", logger="lrsparse.pipeline"):
        run_compression(config)
    assert "multiplies bf16 matrices 0.54x as fast as fp32" in caplog.text
