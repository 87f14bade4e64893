"""The public compression API: LPAFConfig, PRESETS, the registries, prepare()/Compressor, LayerRecord manifests.

A factorizer registered from outside the package (an independent numpy SVD) runs end to end through the Python API
and through the CLI's entry point; the Compressor's plain loop is checked against the building blocks it drives
(FirstOrderPruner + factorize_model + MixedRankScheduler, called by hand); the saved manifest is fuzzed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrsparse
from lrsparse import registry
from lrsparse.activation import input_covariances
from lrsparse.factorization import factorize_model
from lrsparse.io import LAYERS_FILE
from lrsparse.layers import LowRankLinear, MixedRankLinear, MixedRankScheduler
from lrsparse.pruning import FirstOrderPruner
from pipeline_helpers import random_batches, save_tiny_bert_checkpoint, tiny_bert

NUMPY_SVD = "test-numpy-svd"


@pytest.fixture
def numpy_svd_factorizer():
    """A factorizer registered the way a user would: one decorated function, outside the package."""
    calls = []

    @lrsparse.register_factorizer(NUMPY_SVD)
    def numpy_svd(weight, rank, stats, *, max_iters, tol, seed):
        calls.append((tuple(weight.shape), rank, stats.mask is not None))
        u, s, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
        U = torch.from_numpy(u[:, :rank] * s[:rank]).float()
        return U, torch.from_numpy(vh[:rank]).float()

    yield calls
    registry.unregister("factorizer", NUMPY_SVD)


# ------------------------------------------------------------------------------------------------ LPAFConfig
@pytest.mark.parametrize("changes, message", [
    ({"keep": 0.0}, r"keep must be a fraction in \(0, 1\]"),
    ({"pruner": "random"}, r"pruner must be one of \['first-order', 'magnitude', 'none'\]"),
    ({"factorizer": "qr"}, "factorizer must be one of"),
    ({"rank_allocation": "none"}, "rank_allocation must be one of"),
    ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"delta_t": 0}, "delta_t must be a positive integer"),
    ({"min_rank": True}, "min_rank must be a positive integer"),
    ({"initial_warmup_fraction": 0.6, "final_warmup_fraction": 0.5}, "no steps left to prune"),
    ({"targets": "query"}, "targets must be a non-empty list"),
    ({"pruner": "magnitude", "factorizer": "fwsvd"}, r"needs \['fisher'\], which pruner 'magnitude'"),
    ({"pruner": "none", "factorizer": "none"}, "cannot both be 'none'"),
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        lrsparse.LPAFConfig(**changes)


def test_config_dict_round_trip_and_version():
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.3, targets=["query$"], delta_t=5)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == 2 and lrsparse.LPAFConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="format_version must be 1 to 2, got 7"):
        lrsparse.LPAFConfig.from_dict({**data, "format_version": 7})
    with pytest.raises(ValueError, match=r"has no field\(s\) \['colour'\]"):
        lrsparse.LPAFConfig.from_dict({**data, "colour": "red"})


def test_config_of_format_1_loads_unless_it_used_a_removed_field():
    """Models saved before mixed_rank_match was removed (format 1) still load; one trained with it is an error."""
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.3)
    old = {**config.to_dict(), "format_version": 1, "mixed_rank_match": 0.0}
    assert lrsparse.LPAFConfig.from_dict(old) == config
    with pytest.raises(ValueError, match=r"field 'mixed_rank_match' \(= 1.0\) was removed after format_version 1"):
        lrsparse.LPAFConfig.from_dict({**old, "mixed_rank_match": 1.0})
    with pytest.raises(ValueError, match=r"has no field\(s\) \['mixed_rank_match'\]"):
        lrsparse.LPAFConfig.from_dict({**config.to_dict(), "mixed_rank_match": 0.0})  # format 2 never had it


def test_presets_say_what_they_need():
    implied = {name: (c.prunes, c.factorizes, c.statistics_pruner()) for name, c in lrsparse.PRESETS.items()}
    assert implied == {"lpaf": (True, True, "first-order"), "svd": (False, True, None),
                       "fwsvd": (False, True, "first-order"), "magnitude-svd": (True, True, "magnitude"),
                       "prune-only": (True, False, "first-order")}


def test_registering_a_name_twice_is_an_error(numpy_svd_factorizer):
    with pytest.raises(ValueError, match="already registered"):
        lrsparse.register_factorizer(NUMPY_SVD)(lambda *a, **k: None)
    with pytest.raises(ValueError,
                       match=r"needs must be a subset of \('importance', 'fisher', 'input_covariance'\)"):
        lrsparse.register_factorizer("other", needs=("hessian",))


# ------------------------------------------------------------------------------------------------ Compressor
def _train(model, optimizer, batches, step):
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        step(optimizer)
        optimizer.zero_grad()


def test_plain_loop_matches_the_building_blocks_driven_by_hand():
    """prepare/step/factorize/step/convert equals FirstOrderPruner + input_covariances + factorize_model +
    MixedRankScheduler called by hand on an identical model: bitwise the same factors and outputs."""
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.4, delta_t=2, factorization_iters=5, blend_fraction=0.5)
    assert config.factorizer == "activation"  # the default method calibrates
    prune_batches, mixed_batches = random_batches(10, seed=1), random_batches(6, seed=2)
    calibration = random_batches(3, seed=4)

    model = tiny_bert(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compressor = lrsparse.prepare(model, config, total_steps=10)
    _train(model, optimizer, prune_batches, lambda opt: compressor.step())
    records = compressor.factorize(total_steps=6, calibration=calibration)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, optimizer, mixed_batches, compressor.step)
    compressor.convert()

    by_hand = tiny_bert(seed=3)
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-3)
    pruner = FirstOrderPruner(by_hand, 0.4, 10, delta_t=2)
    _train(by_hand, optimizer, prune_batches, lambda opt: pruner.step())
    covariances = input_covariances(by_hand, {r.name: by_hand.get_submodule(r.name) for r in records}, calibration)
    expected = factorize_model(by_hand, 0.4, method="activation", pruner=pruner, input_covariances=covariances,
                               solver_options={"max_iters": 5, "tol": 1e-6, "seed": 0})
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-3)
    scheduler = MixedRankScheduler(by_hand, 6, blend_fraction=0.5, optimizer=optimizer)
    _train(by_hand, optimizer, mixed_batches, lambda opt: scheduler.step())

    assert compressor.phase == "done" and scheduler.finalized
    assert [dataclasses.replace(r, kind="low-rank", masked=False) for r in expected] == compressor.records
    assert [r.kind for r in records] == ["mixed"] * len(records)
    for (name, a), (_, b) in zip(model.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(isinstance(model.get_submodule(r.name), LowRankLinear) for r in compressor.records)


def test_compressor_state_round_trip_mid_phase_two():
    config = lrsparse.PRESETS["svd"].replace(keep=0.5, blend_fraction=1.0)
    model = tiny_bert(seed=4)
    compressor = lrsparse.prepare(model, config, total_steps=3)
    compressor.factorize(total_steps=4)
    compressor.step()
    state = compressor.state_dict()
    restored = lrsparse.Compressor(model, config)
    restored.load_state_dict(state)
    assert (restored.phase, restored.alpha, restored.records) == ("mixed_rank", 0.25, compressor.records)
    with pytest.raises(ValueError, match="another config"):
        lrsparse.Compressor(model, config.replace(keep=0.3)).load_state_dict(state)


def test_phase_errors_say_what_to_do():
    model = tiny_bert()
    compressor = lrsparse.prepare(model, lrsparse.PRESETS["lpaf"].replace(keep=0.5))
    with pytest.raises(RuntimeError, match=r"pass total_steps to prepare\(\) or call schedule"):
        compressor.step()
    with pytest.raises(RuntimeError, match="needs the statistics of a pruning phase"):
        compressor.factorize(total_steps=2)
    compressor.schedule(5)
    with pytest.raises(ValueError, match="prepared for total_steps=5, got 6"):
        compressor.schedule(6)
    only_prune = lrsparse.prepare(tiny_bert(), lrsparse.PRESETS["prune-only"].replace(keep=0.5), total_steps=2)
    with pytest.raises(RuntimeError, match="factorizer 'none'"):
        only_prune.factorize(total_steps=1)


# ------------------------------------------------------------------------------------------------ registry e2e
def test_registered_factorizer_end_to_end_python_api(numpy_svd_factorizer, tmp_path):
    config = lrsparse.PRESETS["svd"].replace(keep=0.5, factorizer=NUMPY_SVD)
    model = tiny_bert(seed=5)
    compressor = lrsparse.prepare(model, config, total_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, optimizer, random_batches(2), compressor.step)
    dense = {r: model.get_submodule(r).weight.detach().double().clone() for r in compressor.targets}
    records = compressor.factorize(total_steps=0)  # straight to low rank
    assert compressor.phase == "done" and len(numpy_svd_factorizer) == len(records) == 12
    for record in records:
        layer = model.get_submodule(record.name)
        assert isinstance(layer, LowRankLinear) and record.factorizer == NUMPY_SVD
        s = torch.linalg.svdvals(dense[record.name])
        optimal = float(s[record.rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert record.relative_error == pytest.approx(optimal, rel=1e-4)
    lrsparse.save_compressed(model, tmp_path / "model", config=config, records=compressor.records)
    manifest = lrsparse.read_manifest(tmp_path / "model")
    assert manifest["config"] == config and manifest["records"] == compressor.records
    loaded = lrsparse.load_compressed(tmp_path / "model")
    ids = random_batches(1, seed=9)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_registered_factorizer_end_to_end_cli(numpy_svd_factorizer, tmp_path, data_dir, minilm_path):
    from lrsparse.cli import main

    model_dir = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path)
    output = tmp_path / "run"
    argv = ["compress", "--model", str(model_dir), "--task", "sst2", "--keep", "0.4", "--output", str(output),
            "--data-dir", str(Path(data_dir) / "glue"), "--max-train-samples", "16", "--max-eval-samples", "8",
            "--max-seq-len", "16", "--batch-size", "8", "--epochs", "1", "--threads", "1", "--method", "svd",
            "--factorization", NUMPY_SVD, "--no-inspect"]
    assert main(argv) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["factorization"] == NUMPY_SVD and report["config"]["lpaf"]["factorizer"] == NUMPY_SVD
    assert {layer["factorizer"] for layer in report["layers"]} == {NUMPY_SVD} and len(numpy_svd_factorizer) == 6
    assert lrsparse.read_manifest(output / "model")["config"].factorizer == NUMPY_SVD


# ------------------------------------------------------------------------------------------------ manifest fuzzing
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_bert(seed=6)
    compressor = lrsparse.prepare(model, lrsparse.PRESETS["svd"].replace(keep=0.5), total_steps=1)
    compressor.factorize(total_steps=0)
    folder = tmp_path_factory.mktemp("saved") / "model"
    lrsparse.save_compressed(model, folder, config=compressor.config, records=compressor.records)
    return folder, json.loads((folder / LAYERS_FILE).read_text()), model.eval()


def _mutations():
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=12), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.none()))
    record_keys = st.sampled_from(["name", "in_features", "out_features", "rank", "bias", "kind", "masked", "density",
                                   "factorizer", "relative_error", "unknown"])
    top_keys = st.sampled_from(["format_version", "layers", "lpaf_config", "tied_weights", "extra", "model_class"])
    return st.one_of(
        st.tuples(st.just("record"), st.integers(0, 11), record_keys, values),
        st.tuples(st.just("drop"), st.integers(0, 11), record_keys, st.none()),
        st.tuples(st.just("top"), st.just(0), top_keys, values),
        st.tuples(st.just("config"), st.just(0), st.sampled_from(["keep", "pruner", "delta_t", "format_version"]),
                  values),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutations(), min_size=1, max_size=3))
def test_fuzzed_manifest_loads_correctly_or_names_the_field(saved_model, tmp_path_factory, mutations):
    folder, manifest, model = saved_model
    manifest = json.loads(json.dumps(manifest))
    for kind, index, key, value in mutations:
        layers = manifest.get("layers")
        record = layers[index] if isinstance(layers, list) and index < len(layers) else None
        if kind == "record" and isinstance(record, dict):
            record[key] = value
        elif kind == "drop" and isinstance(record, dict):
            record.pop(key, None)
        elif kind == "top":
            manifest[key] = value
        elif kind == "config" and isinstance(manifest.get("lpaf_config"), dict):
            manifest["lpaf_config"][key] = value
    mutated = tmp_path_factory.mktemp("mutated")
    for path in folder.iterdir():
        (mutated / path.name).write_bytes(path.read_bytes())
    (mutated / LAYERS_FILE).write_text(json.dumps(manifest))
    try:
        loaded = lrsparse.load_compressed(mutated)
    except ValueError as error:
        assert str(mutated / LAYERS_FILE) in str(error) or LAYERS_FILE in str(error) or "model.safetensors" in str(
            error), str(error)
        return
    # A load that succeeds is the saved model, every weight from the file.
    ids = random_batches(1, seed=11)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert not any(isinstance(m, MixedRankLinear) for m in loaded.modules())


def test_model_of_an_unregistered_component_still_loads(numpy_svd_factorizer, tmp_path, caplog):
    """Loading must not depend on the components registered in the loading process: the config is kept as a dict."""
    config = lrsparse.PRESETS["svd"].replace(keep=0.5, factorizer=NUMPY_SVD)
    model = tiny_bert(seed=7)
    compressor = lrsparse.prepare(model, config, total_steps=1)
    compressor.factorize(total_steps=0)
    lrsparse.save_compressed(model, tmp_path / "m", config=config, records=compressor.records)
    registry.unregister("factorizer", NUMPY_SVD)  # as in a process that never registered it
    loaded = lrsparse.load_compressed(tmp_path / "m")
    manifest = lrsparse.read_manifest(tmp_path / "m")
    assert manifest["config"] is None and manifest["config_dict"]["factorizer"] == NUMPY_SVD
    assert "kept as a dict" in caplog.text
    ids = random_batches(1, seed=2)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_save_refuses_records_that_would_not_load(tmp_path):
    model = tiny_bert(seed=8)
    compressor = lrsparse.prepare(model, lrsparse.PRESETS["svd"].replace(keep=0.5), total_steps=1)
    early = compressor.records  # phase 1: "sparse" records of layers about to be replaced
    records = compressor.factorize(total_steps=0)
    records = compressor.records
    cases = [(early, "sparse record of layer .* does not match"), (records + records[:1], "twice"),
             ([dataclasses.replace(records[0], bias=False)] + records[1:], "bias=False.* does not match"),
             (records[1:], "do not describe the model's low-rank layers")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            lrsparse.save_compressed(model, tmp_path / "bad", records=bad)
    assert not (tmp_path / "bad").exists()


def test_presets_are_frozen_and_configs_check_regexes_and_types():
    with pytest.raises(dataclasses.FrozenInstanceError):
        lrsparse.PRESETS["lpaf"].keep = 0.9
    assert lrsparse.PRESETS["lpaf"].keep == 0.25
    with pytest.raises(ValueError, match=r"targets: '\(' is not a valid regex"):
        lrsparse.LPAFConfig(targets=["("])
    from lrsparse.recipe import RecipeConfig

    for field, value, message in [("lr", True, "lr must be a finite number"), ("resume", "no", "resume must be True"),
                                  ("lr", "1e-4", "lr must be a finite number"), ("model", 3, "model must be")]:
        with pytest.raises(ValueError, match=message):
            RecipeConfig.create("sst2", 0.5, "out", **{field: value})


def test_a_pruner_without_the_grads_finite_hint_still_steps():
    """A registered pruner written against the plain ``step()`` contract keeps working when the training loop
    passes grads_finite=True."""
    calls = []

    class Legacy:
        masks, targets = {}, {}

        def step(self):
            calls.append("step")

        def density(self):
            return 1.0

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    lrsparse.register_pruner("legacy-step")(lambda model, density, steps, targets, config: Legacy())
    try:
        compressor = lrsparse.prepare(tiny_bert(), lrsparse.PRESETS["prune-only"].replace(pruner="legacy-step"),
                                      total_steps=2)
        compressor.step(grads_finite=True)
        compressor.step()
    finally:
        registry.unregister("pruner", "legacy-step")
    assert calls == ["step", "step"]
