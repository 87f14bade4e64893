"""Activation-aware factorization: the calibration covariance against the embeddings computed directly, both
factorizers against a brute-force numerical minimization of their objectives (scipy) and Eckart-Young in the
weighted coordinates, and the compressor and pipeline calibrating from real batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import lrsparse
from lrsparse import pipeline
from lrsparse.activation import activation_aware_svd, activation_importance_svd, input_covariances
from lrsparse.recipe import RecipeConfig
from lrsparse.registry import LayerStatistics
from pipeline_helpers import VOCAB, save_tiny_bert_checkpoint, tiny_bert

pytestmark = pytest.mark.usefixtures("single_thread")
SOLVER = {"max_iters": 100, "tol": 1e-6, "seed": 0}


def _batches(count=3, batch=4, length=9, seed=4):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(batch, dtype=torch.long)})
    return out


def test_input_covariance_is_that_of_the_real_tokens():
    model = tiny_bert().eval()
    query = "bert.encoder.layer.0.attention.self.query"
    covariances = input_covariances(model, {query: model.get_submodule(query)}, _batches())
    rows = []
    with torch.no_grad():
        for batch in _batches():  # the first layer's input is the embeddings' output
            hidden = model.bert.embeddings(input_ids=batch["input_ids"])
            rows.append(hidden[batch["attention_mask"].bool()].double())
    x = torch.cat(rows)
    torch.testing.assert_close(covariances[query], x.t() @ x / x.shape[0], rtol=1e-10, atol=1e-12)


def test_max_examples_reads_only_the_first_examples_of_an_iterable():
    """A whole loader may be passed: with max_examples=6 the covariance is that of the first 6 examples (the second
    batch cut after its 2nd row), computed directly from the embeddings, and batches past them are never read."""
    model = tiny_bert().eval()
    query = "bert.encoder.layer.0.attention.self.query"
    batches = _batches()
    read = []

    def loader():  # a (1, L) position_ids first: the batch size is read from the token inputs, not from it
        for index, batch in enumerate(batches):
            read.append(index)
            yield {"position_ids": torch.arange(batch["input_ids"].shape[1])[None], **batch}

    covariances = input_covariances(model, {query: model.get_submodule(query)}, loader(), max_examples=6)
    assert read == [0, 1]
    with torch.no_grad():
        ids = torch.cat([batches[0]["input_ids"], batches[1]["input_ids"][:2]])
        mask = torch.cat([batches[0]["attention_mask"], batches[1]["attention_mask"][:2]])
        x = model.bert.embeddings(input_ids=ids)[mask.bool()].double()
    torch.testing.assert_close(covariances[query], x.t() @ x / x.shape[0], rtol=1e-10, atol=1e-12)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_examples must be a positive integer"):
            input_covariances(model, {query: model.get_submodule(query)}, batches, max_examples=bad)


def test_without_gathering_the_default_method_asks_for_calibration_by_name():
    model = tiny_bert(seed=2)
    compressor = lrsparse.prepare(model, lrsparse.PRESETS["lpaf"].replace(keep=0.5, delta_t=1), total_steps=2,
                                  gather_calibration=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in _batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        compressor.step()
        optimizer.zero_grad()
    with pytest.raises(ValueError, match="factorizer 'activation' fits each layer's outputs: pass calibration="):
        compressor.factorize(total_steps=0)
    assert compressor.phase == "prune"  # nothing was lost: the call can be repeated with calibration
    records = compressor.factorize(total_steps=0, calibration=_batches())
    assert compressor.phase == "done" and {r.factorizer for r in records} == {"activation"}


def _factors(config, calibration):
    model = tiny_bert(seed=2)
    compressor = lrsparse.prepare(model, config, total_steps=1)
    model(**_batches(1)[0]).loss.backward()
    compressor.step()
    compressor.factorize(total_steps=0, calibration=calibration)
    return {name: (m.U.detach(), m.V.detach()) for name, m in model.named_modules()
            if isinstance(m, lrsparse.LowRankLinear)}


def test_factorize_reads_calibration_samples_examples_of_a_loader():
    """calibration_samples=6 over three batches of 4 equals calibrating on exactly the first 6 examples, and
    differs from using all 12."""
    config = lrsparse.PRESETS["lpaf"].replace(keep=0.5, delta_t=1, initial_warmup_fraction=0.0,
                                              final_warmup_fraction=0.0)
    first6 = _batches(3)[:2]
    first6[1] = {key: value[:2] for key, value in first6[1].items()}
    limited = _factors(config.replace(calibration_samples=6), _batches(3))
    explicit = _factors(config, first6)
    everything = _factors(config, _batches(3))
    assert limited.keys() == explicit.keys() and len(limited) == 12
    for name in limited:
        assert all(torch.equal(a, b) for a, b in zip(limited[name], explicit[name])), name
    assert any(not torch.equal(limited[name][0], everything[name][0]) for name in limited)


def _problem(seed=0, m=6, n=5, samples=40):
    gen = np.random.default_rng(seed)
    weight = gen.standard_normal((m, n))
    inputs = gen.standard_normal((samples, n)) @ gen.standard_normal((n, n))  # correlated inputs
    covariance = inputs.T @ inputs / samples
    importance = gen.random((m, n)) ** 2
    return weight, covariance, importance


def _brute_force(objective, m, n, rank, starts=12):
    gen = np.random.default_rng(1)
    best = np.inf
    for _ in range(starts):
        result = minimize(objective, gen.standard_normal(rank * (m + n)), method="BFGS", options={"gtol": 1e-10})
        best = min(best, result.fun)
    return best


@pytest.mark.parametrize("rows", [False, True])
def test_factorizers_reach_the_minimum_output_error(rows):
    weight, covariance, importance = _problem()
    m, n, rank = 6, 5, 2
    scale = np.sqrt(importance.sum(axis=1)) if rows else np.ones(m)

    def error(U, V):
        residual = scale[:, None] * (weight - U @ V)
        return float(np.trace(residual @ covariance @ residual.T))

    stats = LayerStatistics(importance=torch.tensor(importance), input_covariance=torch.tensor(covariance))
    fit = activation_importance_svd if rows else activation_aware_svd
    U, V = fit(torch.tensor(weight, dtype=torch.float32), rank, stats, damping=0.0, **SOLVER)
    ours = error(U.double().numpy(), V.double().numpy())
    best = _brute_force(lambda z: error(z[:m * rank].reshape(m, rank), z[m * rank:].reshape(rank, n)), m, n, rank)
    assert ours <= best * (1 + 1e-4) + 1e-9
    # Eckart-Young in the weighted coordinates: the error is the tail energy of D W L.
    tail = np.linalg.svd(scale[:, None] * weight @ np.linalg.cholesky(covariance), compute_uv=False)[rank:]
    assert ours == pytest.approx(float((tail**2).sum()), rel=1e-4)


def test_a_ridge_is_needed_for_a_singular_covariance():
    weight, covariance, _ = _problem()
    singular = torch.zeros(5, 5, dtype=torch.float64)
    singular[0, 0] = 1.0
    stats = LayerStatistics(input_covariance=singular)
    with pytest.raises(ValueError, match="not positive definite: increase activation_damping"):
        activation_aware_svd(torch.tensor(weight, dtype=torch.float32), 2, stats, damping=0.0, **SOLVER)
    U, V = activation_aware_svd(torch.tensor(weight, dtype=torch.float32), 2, stats, damping=0.01, **SOLVER)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


def test_compressor_calibrates_and_lowers_the_output_error_against_svd():
    config = lrsparse.PRESETS["svd"].replace(keep=0.3, factorizer="activation", activation_damping=1e-6,
                                             rank_allocation="uniform")
    model = tiny_bert()
    compressor = lrsparse.prepare(model, config, total_steps=1)
    with pytest.raises(ValueError, match="fits each layer's outputs: pass calibration="):
        compressor.factorize(total_steps=0)
    targets = dict(compressor.targets)
    covariances = input_covariances(model, targets, _batches())
    weights = {name: module.weight.detach().clone() for name, module in targets.items()}
    records = compressor.factorize(total_steps=0, calibration=_batches())
    svd = lrsparse.prepare(tiny_bert(), lrsparse.PRESETS["svd"].replace(keep=0.3, rank_allocation="uniform"),
                           total_steps=1)
    svd.factorize(total_steps=0)
    assert [r.factorizer for r in records] == ["activation"] * len(targets)
    for name, module in ((n, model.get_submodule(n)) for n in targets):
        plain = svd.model.get_submodule(name)
        c = covariances[name]

        def output_error(U, V):
            residual = (weights[name] - U.detach() @ V.detach()).double()
            return float(torch.trace(residual @ c @ residual.t()))

        assert output_error(module.U, module.V) <= output_error(plain.U, plain.V) * (1 + 1e-6), name


def test_pipeline_compresses_with_activation_aware_factorization(tmp_path, minilm_path, data_dir):
    checkpoint = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path, layers=1)
    config = RecipeConfig.create(task="sst2", keep=0.5, output_dir=str(tmp_path / "run"), model=str(checkpoint),
                                 data_dir=str(data_dir / "glue"), max_train_samples=64, max_eval_samples=32,
                                 epochs=1, batch_size=16, max_seq_len=32, device="cpu", checkpoint_every=0,
                                 factorizer="activation-importance", calibration_samples=40)
    report = pipeline.run_compression(config)
    assert {layer["factorizer"] for layer in report["layers"]} == {"activation-importance"}
    assert report["config"]["lpaf"]["calibration_samples"] == 40
