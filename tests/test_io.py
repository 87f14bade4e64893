"""save_compressed / load_compressed: identical logits after the round trip, factors only on disk, clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification

from lrsparse.factorization import factorize_model
from lrsparse.io import LAYERS_FILE, WEIGHTS_FILE, load_compressed, save_compressed
from lrsparse.layers import LowRankLinear, finalize_low_rank
from pipeline_helpers import random_batches, tiny_bert, tiny_bert_config


def compress(model, keep=0.3, method="svd"):
    reports = factorize_model(model, keep, method=method)
    finalize_low_rank(model)
    return reports


def safetensors_keys(path):
    with safe_open(path, framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture()
def saved_tiny(tmp_path):
    model = tiny_bert()
    reports = compress(model)
    model.eval()
    size = save_compressed(model, tmp_path / "tiny", extra={"task": "unit"})
    return model, reports, tmp_path / "tiny", size


def test_tiny_bert_round_trip(saved_tiny):
    model, reports, directory, size = saved_tiny
    loaded = load_compressed(directory)
    assert type(loaded) is BertForSequenceClassification and not loaded.training
    ids = random_batches(1, seed=3)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert [(n, m.rank) for n, m in layers.items()] == [(r.name, r.rank) for r in reports]
    manifest = json.loads((directory / LAYERS_FILE).read_text())
    assert manifest["format_version"] == 2 and manifest["extra"] == {"task": "unit"}
    assert manifest["lpaf_config"] is None  # saved without the method's config
    assert manifest["layers"][0] == {"name": reports[0].name, "in_features": 32, "out_features": 32,
                                     "rank": reports[0].rank, "bias": True, "kind": "low-rank", "masked": False,
                                     "density": 1.0, "factorizer": "svd", "relative_error": None}
    files = [p for p in directory.iterdir() if p.is_file()]
    assert size == sum(p.stat().st_size for p in files)
    assert not [p for p in directory.iterdir() if p.name.startswith(".lrsparse-save")]  # staging removed


def test_compressed_layers_are_stored_as_factors_only(saved_tiny, tmp_path):
    model, reports, directory, _ = saved_tiny
    keys = safetensors_keys(directory / WEIGHTS_FILE)
    for report in reports:
        assert f"{report.name}.weight" not in keys
        assert {f"{report.name}.U", f"{report.name}.V", f"{report.name}.bias"} <= keys
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bert().state_dict().items()}, dense_path)
    assert (directory / WEIGHTS_FILE).stat().st_size < dense_path.stat().st_size


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    compress(model)
    model.eval()
    save_compressed(model, tmp_path / "mlm")
    loaded = load_compressed(tmp_path / "mlm")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    ids = random_batches(1)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_real_minilm_with_classification_head_round_trip(minilm_path, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dense_path)
    reports = compress(model, keep=0.25)
    assert len(reports) == 36
    model.eval()
    save_compressed(model, tmp_path / "minilm", tokenizer=tokenizer)
    loaded = load_compressed(tmp_path / "minilm")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "minilm")
    sentences = ["a gripping, beautifully shot film", "the plot never quite comes together ."]
    batch = reloaded_tokenizer(sentences, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokenizer(sentences, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    keys = safetensors_keys(tmp_path / "minilm" / WEIGHTS_FILE)
    assert not {f"{r.name}.weight" for r in reports} & keys
    assert (tmp_path / "minilm" / WEIGHTS_FILE).stat().st_size < 0.7 * dense_path.stat().st_size


def test_corrupted_manifest_is_a_clear_error(saved_tiny):
    _, _, directory, _ = saved_tiny
    (directory / LAYERS_FILE).write_text('{"format_version": 1, "layers": [')
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(directory)
    (directory / LAYERS_FILE).write_text(json.dumps({"format_version": 1, "layers": [{"name": "x", "rank": 2}]}))
    with pytest.raises(ValueError, match="in_features"):
        load_compressed(directory)
    (directory / LAYERS_FILE).write_text(json.dumps({"format_version": 99, "layers": []}))
    with pytest.raises(ValueError, match="format_version"):
        load_compressed(directory)
    (directory / LAYERS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=LAYERS_FILE):
        load_compressed(directory)


def test_missing_tensor_is_a_clear_error(saved_tiny):
    _, reports, directory, _ = saved_tiny
    tensors = load_file(directory / WEIGHTS_FILE)
    del tensors[f"{reports[2].name}.V"]
    save_file(tensors, directory / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f"missing tensors.*{reports[2].name}.V"):
        load_compressed(directory)


def test_wrong_shape_is_a_clear_error(saved_tiny):
    _, reports, directory, _ = saved_tiny
    tensors = load_file(directory / WEIGHTS_FILE)
    name = f"{reports[0].name}.U"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, directory / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        load_compressed(directory)


def test_manifest_layer_that_does_not_fit_the_model(saved_tiny):
    _, _, directory, _ = saved_tiny
    manifest = json.loads((directory / LAYERS_FILE).read_text())
    manifest["layers"][0]["out_features"] = 31
    (directory / LAYERS_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match"):
        load_compressed(directory)


def test_save_refuses_models_with_a_sparse_path(tmp_path):
    model = tiny_bert()
    factorize_model(model, 0.3, method="svd")
    with pytest.raises(ValueError, match="finalize_low_rank"):
        save_compressed(model, tmp_path / "x")
    finalize_low_rank(model)
    with pytest.raises(TypeError, match="extra"):
        save_compressed(model, tmp_path / "x", extra={"bad": object()})


def test_format_1_manifest_of_lrsparse_0_1_still_loads(saved_tiny, tmp_path):
    """A model saved by lrsparse 0.1 (manifest format 1: layers with "method", no kind, no config) loads into the
    same model; its records are migrated (kind low-rank, factorizer = the old method)."""
    import shutil

    from lrsparse.io import read_manifest

    model, reports, directory, _ = saved_tiny
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    manifest = json.loads((old / LAYERS_FILE).read_text())
    # Exactly the layout lrsparse 0.1's save_compressed wrote.
    old_manifest = {"format_version": 1, "model_class": manifest["model_class"],
                    "layers": [{"name": layer["name"], "in_features": layer["in_features"],
                                "out_features": layer["out_features"], "rank": layer["rank"], "bias": layer["bias"],
                                "method": layer["factorizer"]} for layer in manifest["layers"]],
                    "tied_weights": manifest["tied_weights"], "extra": manifest["extra"]}
    (old / LAYERS_FILE).write_text(json.dumps(old_manifest))
    loaded = load_compressed(old)
    ids = random_batches(1, seed=3)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    migrated = read_manifest(old)
    assert migrated["config"] is None
    assert [(r.name, r.rank, r.kind, r.factorizer) for r in migrated["records"]] == [
        (r.name, r.rank, "low-rank", "svd") for r in reports]
