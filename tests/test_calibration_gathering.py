"""Calibration gathered by the Compressor from the training forwards (lrsparse.calibration): the documented loop
prepare -> step -> factorize() -> convert works for every preset without calibration=; the gathered covariances equal
a float64 reference over exactly the examples of the window (padding left out); calibration= still overrides, equal
to a compressor that gathers nothing; a state saved inside the window resumes to the same factors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import lrsparse
from lrsparse.calibration import CalibrationGatherer
from lrsparse.layers import LowRankLinear
from lrsparse.targets import find_targets
from pipeline_helpers import VOCAB, tiny_bert

STEPS = 10


def padded_batches(count: int, batch: int = 4, length: int = 8, seed: int = 3) -> list[dict]:
    """Batches whose last examples are padded (attention_mask 0 on their tail), so masking matters."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[batch // 2:, length // 2:] = 0
        batches.append({"input_ids": torch.randint(1, VOCAB, (batch, length), generator=gen), "attention_mask": mask,
                        "labels": torch.randint(0, 2, (batch,), generator=gen)})
    return batches


def run_loop(model, config, batches, calibration=None, gather=True, stop_after=None):
    """The documented loop; returns the compressor (after factorize and convert, unless ``stop_after`` steps)."""
    compressor = lrsparse.prepare(model, config, total_steps=STEPS, gather_calibration=gather)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(STEPS if stop_after is None else stop_after):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        compressor.step()
        optimizer.zero_grad()
    if stop_after is not None:
        return compressor, optimizer
    return finish(model, compressor, batches, calibration)


def finish(model, compressor, batches, calibration=None):
    compressor.factorize(total_steps=4, calibration=calibration)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        compressor.step(optimizer)
        optimizer.zero_grad()
    compressor.convert()
    return compressor


def factors(model) -> dict[str, torch.Tensor]:
    return {name: torch.cat([m.U.detach().reshape(-1), m.V.detach().reshape(-1)])
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("preset", sorted(lrsparse.PRESETS))
def test_every_preset_runs_the_documented_loop_without_calibration(preset):
    config = lrsparse.PRESETS[preset].replace(keep=0.5, calibration_samples=12)
    model = tiny_bert()
    compressor = lrsparse.prepare(model, config, total_steps=STEPS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = padded_batches(3)
    for step in range(STEPS):
        model(**batches[step % 3]).loss.backward()
        optimizer.step()
        compressor.step()
        optimizer.zero_grad()
    if not config.factorizes:
        assert compressor.calibration is None and compressor.density() == pytest.approx(0.5, abs=0.02)
        return
    assert (compressor.calibration is not None) == config.calibrates
    if config.calibrates:
        assert compressor.calibration.seen == 12 and compressor.calibration.examples_per_step == 4
    finish(model, compressor, batches)
    assert compressor.phase == "done" and factors(model)
    assert all(r.kind == "low-rank" and r.rank >= 1 for r in compressor.records)


def test_gathered_covariance_equals_a_float64_reference_over_the_window():
    model = tiny_bert()  # dropout 0: a training-mode forward computes what the reference computes
    targets = find_targets(model)
    batches = padded_batches(6)
    gatherer = CalibrationGatherer(model, targets, samples=10, total_steps=6, masks_final_after=2)
    with torch.no_grad():  # an evaluation between steps: not counted
        model(**batches[0])
    for step, batch in enumerate(batches):
        model(**batch)
        gatherer.step()
        if step == 3:
            with torch.no_grad():
                model(**batches[1])
    assert gatherer.examples_per_step == 4 and gatherer.window_start == 3 and gatherer.seen == 10
    gathered = gatherer.covariances()
    gatherer.close()

    window = [(batches[3], 4), (batches[4], 4), (batches[5], 2)]  # the steps after 3 done, up to 10 examples
    inputs = {name: [] for name in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0].double()))
               for name, m in targets.items()]
    with torch.no_grad():
        for batch, take in window:
            for name in inputs:
                inputs[name].append(("mask", batch["attention_mask"][:take]))
            model(**{k: v[:take] for k, v in batch.items()})
    for handle in handles:
        handle.remove()
    for name in targets:
        rows = []
        for mask, x in zip(inputs[name][0::2], inputs[name][1::2]):
            rows.append(x.reshape(-1, x.shape[-1])[mask[1].reshape(-1).bool()])
        x = torch.cat(rows)
        assert x.shape[0] == 24 + 24 + 16  # batches 3 and 4: 2 full rows and 2 half-padded ones; 2 full rows of 5
        torch.testing.assert_close(gathered[name], x.t() @ x / x.shape[0], rtol=1e-12, atol=1e-12)


def test_explicit_calibration_overrides_and_equals_a_compressor_that_gathers_nothing():
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.5, calibration_samples=8)
    batches = padded_batches(3)
    calibration = padded_batches(2, seed=9)
    gathering = tiny_bert()
    run_loop(gathering, config, batches, calibration=calibration, gather=True)
    plain = tiny_bert()
    run_loop(plain, config, batches, calibration=calibration, gather=False)
    got, want = factors(gathering), factors(plain)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # And the gathered calibration is really used when none is passed: other factors.
    gathered = tiny_bert()
    run_loop(gathered, config, batches)
    assert any(not torch.equal(factors(gathered)[k], want[k]) for k in want)


def test_without_gathering_factorize_asks_for_calibration():
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.5)
    compressor, _ = run_loop(tiny_bert(), config, padded_batches(3), gather=False, stop_after=STEPS)
    with pytest.raises(ValueError, match="pass calibration="):
        compressor.factorize()


def test_a_state_saved_inside_the_window_resumes_to_the_same_factors():
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.5, calibration_samples=12)
    batches = padded_batches(3)
    uninterrupted = tiny_bert()
    run_loop(uninterrupted, config, batches)

    model = tiny_bert()
    compressor, optimizer = run_loop(model, config, batches, stop_after=STEPS - 2)  # window: the last 3 steps
    assert 0 < compressor.calibration.seen < 12
    state = copy.deepcopy(compressor.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = lrsparse.prepare(resumed_model, config, total_steps=STEPS)
    resumed.load_state_dict(state)
    resumed_optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_model.train()
    for step in range(STEPS - 2, STEPS):
        resumed_model(**batches[step % 3]).loss.backward()
        resumed_optimizer.step()
        resumed.step()
        resumed_optimizer.zero_grad()
    assert resumed.calibration.seen == 12
    finish(resumed_model, resumed, batches)
    got, want = factors(resumed_model), factors(uninterrupted)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_short_fixed_density_tail_gathers_what_it_has_and_says_so(caplog):
    model = tiny_bert()
    gatherer = CalibrationGatherer(model, find_targets(model), samples=100, total_steps=5, masks_final_after=3)
    for batch in padded_batches(5):
        model(**batch)
        gatherer.step()
    assert gatherer.window_start == 3 and gatherer.seen == 8 and math.ceil(100 / 4) > 2
    with caplog.at_level("WARNING", logger="lrsparse.calibration"):
        gatherer.covariances()
    assert "gathered 8 of calibration_samples=100" in caplog.text
