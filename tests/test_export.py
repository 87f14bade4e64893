"""`lrsparse export`: every format reproduces the loaded compressed model and runs without lrsparse's extension.

A tiny random BERT is compressed (truncated SVD), saved and reloaded; its outputs are the reference, checked in turn
against an independent float64 model in which each low-rank layer is the dense product ``U V``.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertForMaskedLM, BertForQuestionAnswering, BertTokenizer, GPT2Config, GPT2LMHeadModel

from lrsparse import export as lrexport
from lrsparse.cli import main
from lrsparse.factorization import factorize_model
from lrsparse.io import load_compressed, save_compressed
from lrsparse.layers import LowRankLinear, finalize_low_rank
from pipeline_helpers import BLOCK_LRSPARSE, VOCAB, tiny_bert, tiny_bert_config

# (batch, length, seed): none is the (2, 8) shape the traced formats were traced with.
SHAPES = [(3, 13, 1), (1, 5, 2), (4, 9, 3)]


def tiny_tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"tok{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(VOCAB - len(words))]
    return BertTokenizer(vocab={word: i for i, word in enumerate(words)})


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    model = tiny_bert(seed=4)
    factorize_model(model, 0.3, method="svd")
    finalize_low_rank(model)
    directory = tmp_path_factory.mktemp("compressed") / "model"
    save_compressed(model.eval(), directory, tokenizer=tiny_tokenizer())
    return directory


@pytest.fixture(scope="module")
def loaded(compressed_dir):
    return load_compressed(compressed_dir)


def batches(model) -> list[dict[str, torch.Tensor]]:
    """Padded batches of several shapes, plus one without padding."""
    result = [dict(zip(lrexport.input_names(model), lrexport.example_inputs(model, b, n, seed=s)))
              for b, n, s in SHAPES]
    unpadded = dict(result[0])
    unpadded["attention_mask"] = torch.ones_like(unpadded["attention_mask"])
    return result + [unpadded]


def float64_dense_reference(model: nn.Module) -> nn.Module:
    """The model in float64 with each LowRankLinear as one dense nn.Linear of weight U V (no lrsparse op)."""
    reference = copy.deepcopy(model).double()
    for name, layer in [(n, m) for n, m in reference.named_modules() if isinstance(m, LowRankLinear)]:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(layer.U @ layer.V)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, dense)
    return reference.eval()


@pytest.fixture(scope="module")
def expected(loaded):
    """(lrsparse outputs, float64 dense outputs) of every batch; the two must already agree."""
    reference = float64_dense_reference(loaded)
    with torch.no_grad():
        ours = [loaded(**batch).logits for batch in batches(loaded)]
        exact = [reference(**batch).logits for batch in batches(loaded)]
    for actual, wanted in zip(ours, exact):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-6)
    return ours, exact


def assert_matches(outputs, expected, atol=1e-5) -> None:
    ours, exact = expected
    assert len(outputs) == len(ours)
    for actual, lrsparse_out, float64_out in zip(outputs, ours, exact):
        actual = torch.as_tensor(actual)
        torch.testing.assert_close(actual, lrsparse_out, rtol=1e-5, atol=atol)
        torch.testing.assert_close(actual.double(), float64_out, rtol=1e-5, atol=atol)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------------------------
# The plain tree
# ----------------------------------------------------------------------------------------------------------------
def test_plain_tree_is_two_linears_per_layer_and_calls_no_lrsparse_op(loaded, expected):
    plain = lrexport.to_plain_pytorch(loaded)
    originals = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert len(originals) == 12 and not any(isinstance(m, LowRankLinear) for m in plain.modules())
    for name, layer in originals.items():
        down, up = plain.get_submodule(name)
        assert type(down) is nn.Linear and type(up) is nn.Linear and down.bias is None
        assert torch.equal(down.weight, layer.V) and torch.equal(up.weight, layer.U)
        assert torch.equal(up.bias, layer.bias)
        assert down.weight.data_ptr() != layer.V.data_ptr()  # a copy: the loaded model is left alone
    assert [(e["name"], e["rank"]) for e in lrexport.low_rank_layers(loaded)] == [
        (n, m.rank) for n, m in originals.items()]

    with torch.no_grad(), OpNames() as seen:
        outputs = [plain(**batch).logits for batch in batches(loaded)]
    assert "lrsparse" not in seen.namespaces and "aten" in seen.namespaces
    assert_matches(outputs, expected)
    with torch.no_grad(), OpNames() as seen:  # the check above can fail: the loaded model does call the op
        loaded(**batches(loaded)[0])
    assert "lrsparse" in seen.namespaces


def test_plain_tree_inplace_shares_parameters(loaded):
    model = copy.deepcopy(loaded)
    layer = model.bert.encoder.layer[0].attention.self.query
    plain = lrexport.to_plain_pytorch(model, inplace=True)
    assert plain is model
    assert plain.bert.encoder.layer[0].attention.self.query[0].weight is layer.V


def test_plain_tree_refuses_a_sparse_path_and_non_modules():
    model = tiny_bert()
    factorize_model(model, 0.3, method="svd")
    with pytest.raises(ValueError, match="finalize_low_rank"):
        lrexport.to_plain_pytorch(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lrexport.to_plain_pytorch({"weight": torch.ones(2)})


# ----------------------------------------------------------------------------------------------------------------
# pytorch and torchscript: loaded in a process where lrsparse cannot be imported
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pytorch_export(compressed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pytorch") / "plain"
    assert main(["export", str(compressed_dir), "--format", "pytorch", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def torchscript_export(compressed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchscript") / "model.pt"
    assert main(["export", str(compressed_dir), "--format", "torchscript", "--out", str(out)]) == 0
    return out


_PLAIN_ENV_SCRIPT = BLOCK_LRSPARSE + textwrap.dedent('''
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        import lrsparse._C
    except ImportError:
        pass
    else:
        raise SystemExit("lrsparse._C could be imported: the test does not prove anything")
    hf_dir, ts_path, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=True).eval()
    scripted = torch.jit.load(ts_path)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    results = {"hf": [], "ts": [], "class": type(model).__name__,
               "tokens": tokenizer(["tokaa tokab tokzz"])["input_ids"][0]}
    with torch.no_grad():
        for batch in torch.load(inputs_path):
            results["hf"].append(model(**batch).logits)
            results["ts"].append(scripted(*batch.values()))
    results["modules"] = sorted(n for n in sys.modules if "lrsparse" in n and "modeling_lrsparse" not in n)
    torch.save(results, out_path)
''')


def test_pytorch_and_torchscript_exports_run_without_lrsparse(loaded, expected, pytorch_export, torchscript_export,
                                                             tmp_path):
    (tmp_path / "plain_env.py").write_text(_PLAIN_ENV_SCRIPT)
    torch.save(batches(loaded), tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "plain_env.py", str(pytorch_export), str(torchscript_export), "inputs.pt", "out.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert results["class"] == "LowRankBertForSequenceClassification" and results["modules"] == []
    assert results["tokens"] == tiny_tokenizer()(["tokaa tokab tokzz"])["input_ids"][0] == [2, 5, 6, 1, 3]
    assert_matches(results["hf"], expected)
    assert_matches(results["ts"], expected)


def test_pytorch_export_stores_factors_only(loaded, pytorch_export):
    with safe_open(pytorch_export / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    for name, layer in layers.items():
        assert f"{name}.weight" not in tensors
        assert torch.equal(tensors[f"{name}.0.weight"], layer.V) and torch.equal(tensors[f"{name}.1.weight"], layer.U)
        assert torch.equal(tensors[f"{name}.1.bias"], layer.bias)
    assert "import lrsparse" not in (pytorch_export / lrexport.MODELING_FILE).read_text()


def _import_file(path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("architecture", ["bert-mlm-tied", "gpt2-conv1d"])
def test_pytorch_export_of_tied_and_conv1d_models(architecture, tmp_path):
    if architecture == "bert-mlm-tied":
        model = BertForMaskedLM(tiny_bert_config())
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    factorize_model(model, 0.3, method="svd")
    finalize_low_rank(model)
    model.eval()
    lrexport.export_pytorch(model, tmp_path / architecture)
    generated = _import_file(tmp_path / architecture / lrexport.MODELING_FILE)
    cls = getattr(generated, f"LowRank{type(model).__name__}")
    reloaded = cls.from_pretrained(tmp_path / architecture).eval()
    assert not any(isinstance(m, LowRankLinear) for m in reloaded.modules())
    reference = float64_dense_reference(model)
    batch = dict(zip(lrexport.input_names(model), lrexport.example_inputs(model, 3, 9, seed=2)))
    assert ("token_type_ids" in batch) == (architecture == "bert-mlm-tied")  # GPT-2 would embed zeros as tokens
    with torch.no_grad():
        actual, exact = reloaded(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(actual.double(), exact, rtol=1e-5, atol=1e-5)
    if architecture == "bert-mlm-tied":
        assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight


def test_torchscript_graph_has_no_lrsparse_op(loaded, torchscript_export):
    graph = str(torch.jit.load(str(torchscript_export)).inlined_graph)
    layers = [m for m in loaded.modules() if isinstance(m, LowRankLinear)]
    dense = [m for m in loaded.modules() if type(m) is nn.Linear]
    assert graph.count("aten::linear(") == 2 * len(layers) + len(dense)
    assert "lrsparse::" not in graph


# ----------------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_export(compressed_dir, tmp_path_factory):
    missing = lrexport.missing_onnx_packages()
    if missing:
        pytest.skip(f"ONNX export needs {missing} (pip install 'lrsparse[export]')")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(compressed_dir), "--format", "onnx", "--out", str(out)]) == 0
    return out


def _weight_matmuls(graph):
    """(node, weight in nn.Linear's out x in layout) of every MatMul/Gemm with a constant right operand."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in constants:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weight = constants[node.input[1]]
        found.append((node, weight if trans_b else weight.T))
    return found


def test_onnx_graph_is_two_chained_matmuls_per_low_rank_layer(loaded, onnx_export):
    import onnx

    model = onnx.load(str(onnx_export))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert not [n.op_type for n in model.graph.node if "lrsparse" in n.op_type.lower()]
    matmuls = _weight_matmuls(model.graph)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    dense = [m for m in loaded.modules() if type(m) is nn.Linear]  # pooler and classifier
    assert len(matmuls) == 2 * len(layers) + len(dense)
    for name, layer in layers.items():
        (down,) = [node for node, w in matmuls if np.array_equal(w, layer.V.detach().numpy())]
        (up,) = [node for node, w in matmuls if np.array_equal(w, layer.U.detach().numpy())]
        assert up.input[0] == down.output[0], name  # x V^T feeds U: no dense U V anywhere
    names = [i.name for i in model.graph.input]
    assert names == lrexport.input_names(loaded)
    for graph_input in model.graph.input:  # batch and sequence axes are symbolic
        assert all(d.dim_param and not d.dim_value for d in graph_input.type.tensor_type.shape.dim)


def test_onnxruntime_matches_pytorch(loaded, expected, onnx_export):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'lrsparse[export]')")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_export), options, providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {k: v.numpy() for k, v in batch.items()})[0] for batch in batches(loaded)]
    assert_matches(outputs, expected)


# ----------------------------------------------------------------------------------------------------------------
# Question answering: both span ends are exported
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def question_answering(tmp_path_factory):
    """(compressed directory, inputs, float64 dense {output name: outputs per batch}) of a tiny QA BERT."""
    torch.manual_seed(5)
    model = BertForQuestionAnswering(tiny_bert_config())
    factorize_model(model, 0.3, method="svd")
    finalize_low_rank(model)
    directory = tmp_path_factory.mktemp("qa") / "model"
    save_compressed(model.eval(), directory)
    loaded = load_compressed(directory)
    inputs = batches(loaded)
    reference = float64_dense_reference(loaded)
    with torch.no_grad():
        exact = [reference(**batch) for batch in inputs]
    wanted = {name: [out[name] for out in exact] for name in ("start_logits", "end_logits")}
    # The two heads differ: an export that returned one of them twice would not match both.
    assert not torch.allclose(wanted["start_logits"][0], wanted["end_logits"][0], atol=1e-3)
    return directory, inputs, wanted


def assert_span_outputs(outputs, wanted) -> None:
    """outputs: (start_logits, end_logits) per batch."""
    assert len(outputs) == len(wanted["start_logits"])
    for i, pair in enumerate(outputs):
        assert len(pair) == 2
        for name, actual in zip(("start_logits", "end_logits"), pair):
            torch.testing.assert_close(torch.as_tensor(actual).double(), wanted[name][i], rtol=1e-5, atol=1e-5)


def test_question_answering_torchscript_returns_start_and_end_logits(question_answering, tmp_path):
    directory, inputs, wanted = question_answering
    script = tmp_path / "qa.pt"
    assert main(["export", str(directory), "--format", "torchscript", "--out", str(script)]) == 0
    scripted = torch.jit.load(str(script))
    with torch.no_grad():
        outputs = [scripted(*batch.values()) for batch in inputs]
    assert all(isinstance(out, tuple) for out in outputs)
    assert_span_outputs(outputs, wanted)


def test_question_answering_onnx_has_start_and_end_logits(question_answering, tmp_path):
    if lrexport.missing_onnx_packages():
        pytest.skip(f"ONNX export needs {lrexport.missing_onnx_packages()} (pip install 'lrsparse[export]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'lrsparse[export]')")
    directory, inputs, wanted = question_answering
    onnx_path = tmp_path / "qa.onnx"
    assert main(["export", str(directory), "--format", "onnx", "--out", str(onnx_path)]) == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
    assert_span_outputs([session.run(None, {k: v.numpy() for k, v in batch.items()}) for batch in inputs], wanted)


def test_output_names_by_head(loaded):
    assert lrexport.output_names(loaded) == ["logits"]
    assert lrexport.output_names(BertForQuestionAnswering(tiny_bert_config())) == ["start_logits", "end_logits"]
    assert lrexport.output_names(loaded.bert) == ["last_hidden_state"]


# ----------------------------------------------------------------------------------------------------------------
# torch.compile of the loaded model (custom op included)
# ----------------------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager(loaded, expected):
    # The whole model must be one graph (the op's fake kernel covers it). aot_eager keeps this test fast; inductor's
    # code generation around the op is tested by test_mixed_rank_linear.py (a whole-model inductor compile costs
    # about a minute of C++ compilation here, see the README).
    torch._dynamo.reset()
    compiled = torch.compile(loaded, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        outputs = [compiled(**batch).logits for batch in batches(loaded)]
    assert_matches(outputs, expected)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_cli_errors(compressed_dir, tmp_path, capsys, monkeypatch):
    assert main(["export", str(tmp_path / "absent"), "--format", "pytorch", "--out", str(tmp_path / "o")]) == 2
    assert "absent not found" in capsys.readouterr().err

    (tmp_path / "plain_folder").mkdir()
    assert main(["export", str(tmp_path / "plain_folder"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "not a compressed model" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(compressed_dir), "--format", "tflite", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of pytorch, torchscript, onnx"):
        lrexport.export_compressed(compressed_dir, "tflite", tmp_path / "o")

    assert main(["export", str(compressed_dir), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    assert "out must be a file path" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(compressed_dir), "--format", "pytorch", "--out", str(tmp_path / "taken")]) == 2
    assert "not an empty directory" in capsys.readouterr().err

    real_find_spec = lrexport.importlib.util.find_spec
    monkeypatch.setattr(lrexport.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    assert main(["export", str(compressed_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert 'needs onnxscript: pip install "lrsparse[export]"' in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
