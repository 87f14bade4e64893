"""Model families beyond BERT through the main job: `lrsparse compress` on a CSV of labelled text, then every export
(transformers folder, TorchScript, ONNX) loaded in a process where lrsparse cannot be imported.

Each family is a tiny random config (hidden 32, 2 layers) saved with the real all-MiniLM-L6-v2 tokenizer (a WordPiece
tokenizer fits every family's embedding table when the vocabulary matches). The reference for every export is the
compressed model as lrsparse reloads it; the expected targets are each family's attention and feed-forward layers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from lrsparse.cli import main
from lrsparse.export import input_names
from lrsparse.io import load_compressed
from lrsparse.targets import TARGET_PATTERNS, find_targets
from pipeline_helpers import BLOCK_LRSPARSE, write_csv

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# model_type -> (config class and its extra settings, target layer suffixes per block)
FAMILIES = {
    "mpnet": (transformers.MPNetConfig, dict(max_position_embeddings=66),
              ["attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense",
               "output.dense"]),
    "deberta-v2": (transformers.DebertaV2Config, dict(max_position_embeddings=64),
                   ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                    "attention.output.dense", "intermediate.dense", "output.dense"]),
    "electra": (transformers.ElectraConfig, dict(embedding_size=32, max_position_embeddings=64),
                ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]),
    "xlm-roberta": (transformers.XLMRobertaConfig, dict(max_position_embeddings=66),
                    ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"]),
    "modernbert": (transformers.ModernBertConfig,
                   dict(max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                        cls_token_id=101, sep_token_id=102),
                   ["attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"]),
}

_NO_LRSPARSE = BLOCK_LRSPARSE + textwrap.dedent('''
    import numpy, onnxruntime, torch
    from transformers import AutoModelForSequenceClassification

    hf_dir, ts_path, onnx_path, inputs_path, out_path = sys.argv[1:]
    batch = torch.load(inputs_path)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=True).eval()
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    with torch.no_grad():
        results = {"hf": model(**batch).logits, "ts": torch.jit.load(ts_path)(*batch.values()),
                   "onnx": torch.from_numpy(numpy.asarray(session.run(None, feeds)[0])),
                   "id2label": {int(k): v for k, v in model.config.id2label.items()},
                   "modules": sorted(n for n in sys.modules if n.split(".")[0] == "lrsparse")}
    torch.save(results, out_path)
''')


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    return write_csv(path, ["review", "verdict"],
                     [[f"a good film, number {i}" if i % 2 else f"a dull film, number {i}",
                       "positive" if i % 2 else "negative"] for i in range(24)])


def _tiny_checkpoint(family: str, folder, minilm_path):
    config_class, extra, _ = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config_class(**SMALL, vocab_size=len(tokenizer), **extra)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_every_family_has_a_default_target_map():
    assert set(FAMILIES) <= set(TARGET_PATTERNS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compresses_from_a_csv_and_every_export_runs_without_lrsparse(family, labelled_csv, minilm_path,
                                                                             tmp_path):
    tokenizer = _tiny_checkpoint(family, tmp_path / "base", minilm_path)
    run = tmp_path / "run"
    assert main(["compress", "--model", str(tmp_path / "base"), "--train-file", str(labelled_csv), "--text-columns",
                 "review", "--label-column", "verdict", "--keep", "0.5", "--epochs", "1", "--batch-size", "8",
                 "--max-seq-len", "16", "--output", str(run), "--threads", "1", "--no-inspect"]) == 0
    compressed = load_compressed(run / "model")
    names = [layer["name"] for layer in json.loads((run / "report.json").read_text())["layers"]]
    expected = [f".{i}.{suffix}" for i in range(2) for suffix in FAMILIES[family][2]]
    assert len(names) == len(expected) and all(n.endswith(e) for n, e in zip(names, expected)), names
    assert compressed.config.id2label == {0: "negative", 1: "positive"}

    exports = {"pytorch": tmp_path / "plain", "torchscript": tmp_path / "model.pt", "onnx": tmp_path / "model.onnx"}
    for fmt, out in exports.items():
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    encoded = tokenizer(["a good film", "a rather dull and long film"], padding=True, return_tensors="pt")
    batch = {name: encoded[name] for name in input_names(compressed)}  # e.g. MPNet takes no token_type_ids
    torch.save(batch, tmp_path / "inputs.pt")
    (tmp_path / "no_lrsparse.py").write_text(_NO_LRSPARSE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "no_lrsparse.py", str(exports["pytorch"]), str(exports["torchscript"]),
                           str(exports["onnx"]), "inputs.pt", "out.pt"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = compressed(**batch).logits
    assert results["modules"] == []
    assert results["id2label"] == {0: "negative", 1: "positive"}
    for fmt in ("hf", "ts", "onnx"):
        torch.testing.assert_close(results[fmt].float(), expected, atol=1e-4, rtol=1e-4, msg=fmt)


def test_sentence_transformers_folder_with_a_transformer_subfolder_compresses_for_a_classification_task(
        labelled_csv, minilm_path, tmp_path):
    folder = tmp_path / "st"
    _tiny_checkpoint("mpnet", folder / "0_Transformer", minilm_path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    assert main(["compress", "--model", str(folder), "--train-file", str(labelled_csv), "--text-columns", "review",
                 "--label-column", "verdict", "--keep", "0.5", "--epochs", "1", "--batch-size", "8", "--max-seq-len",
                 "16", "--output", str(tmp_path / "run"), "--threads", "1", "--no-inspect"]) == 0
    assert type(load_compressed(tmp_path / "run" / "model")).__name__ == "MPNetForSequenceClassification"


def test_unknown_family_error_names_targets_and_lists_the_linear_layers():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig()
            self.config.model_type = "fancy-net"
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    with pytest.raises(ValueError) as error:
        find_targets(Tiny())
    message = str(error.value)
    assert "fancy-net" in message and "--targets" in message and "blocks.0, blocks.1" in message
