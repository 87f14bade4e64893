"""Task embedding: the sentence-embedding model against sentence-transformers itself (embeddings, and the STS-B score
against its EmbeddingSimilarityEvaluator), pooling against a float64 loop, the cosine distillation loss by hand, the
readers' errors, a held-out training text, and a CLI run whose exports (sentence-transformers without lrsparse, ONNX
fp32 and int8) reproduce the compressed model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from lrsparse import cli
from lrsparse.data import load_glue
from lrsparse.distillation import Distiller, cosine_distance_loss
from lrsparse.embedding import (EMBEDDING_KEY, EmbeddingTask, SentenceEmbeddingModel, pool, read_sentence_transformers,
                                read_sentences)
from lrsparse.io import load_compressed
from lrsparse.recipe import RecipeConfig
from lrsparse.training import evaluate
from pipeline_helpers import BLOCK_LRSPARSE, save_tiny_bert_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _sentence_transformer(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(path), device="cpu")


def _stsb_dev(data_dir, pairs: int):
    return load_glue("stsb", "dev", data_dir / "glue", pairs, seed=0)


def _collate(tokenizer):
    from lrsparse.data import PaddingCollator

    return PaddingCollator(tokenizer.pad_token_id)


def test_model_reproduces_sentence_transformers_embeddings(minilm_path, data_dir):
    from transformers import AutoTokenizer

    sentences = _stsb_dev(data_dir, 12).texts_a
    model = SentenceEmbeddingModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    with torch.no_grad():
        ours = model(**tokenizer(sentences, padding=True, return_tensors="pt")).sentence_embedding
    reference = torch.from_numpy(_sentence_transformer(minilm_path).encode(sentences, batch_size=5))
    assert model.pooling == "mean" and model.normalize
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)  # other batching: GEMM rounding only


def test_stsb_score_matches_sentence_transformers_evaluator(minilm_path, data_dir):
    from transformers import AutoTokenizer

    try:  # sentence-transformers >= 6 moved it; the old path still works there, with a deprecation warning
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    examples = _stsb_dev(data_dir, 150)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    task = EmbeddingTask("unused")
    dataset = task.tokenize(examples, tokenizer, 128)
    assert len(dataset) < 2 * len(examples)  # repeated sentences are embedded once
    ours = evaluate(SentenceEmbeddingModel.from_pretrained(minilm_path), dataset, task, 32, _collate(tokenizer),
                    torch.device("cpu"))
    evaluator = EmbeddingSimilarityEvaluator(examples.texts_a, examples.texts_b, [s / 5 for s in examples.labels],
                                             name="sts-dev", write_csv=False)
    theirs = evaluator(_sentence_transformer(minilm_path))
    assert ours["main"] == ours["spearman_cosine"]
    # Embedded in other batches: rounding may swap a near-tied pair's rank (one swap moves Spearman by 4e-6 here).
    assert ours["spearman_cosine"] == pytest.approx(theirs["sts-dev_spearman_cosine"], abs=5e-5)
    assert ours["pearson_cosine"] == pytest.approx(theirs["sts-dev_pearson_cosine"], abs=1e-6)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_against_a_float64_loop(mode):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    expected = []
    for b in range(3):
        rows = [states[b, i].numpy() for i in range(5) if mask[b, i]]
        expected.append({"mean": np.mean(rows, 0), "cls": states[b, 0].numpy(), "max": np.max(rows, 0)}[mode])
    torch.testing.assert_close(pool(states, mask, mode), torch.from_numpy(np.stack(expected)))


def test_cosine_distillation_loss_by_hand_and_labelless_student():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    expected = np.mean([1 - s @ t / (np.linalg.norm(s) * np.linalg.norm(t))
                        for s, t in zip(student.double().numpy(), teacher.double().numpy())])
    assert float(cosine_distance_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(cosine_distance_loss(teacher * 3.0, teacher)) == pytest.approx(0.0, abs=1e-6)

    from transformers import BertConfig

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    setattr(config, EMBEDDING_KEY, {"pooling": "mean", "normalize": True, "max_seq_length": 32})
    torch.manual_seed(0)
    teacher_model, student_model = SentenceEmbeddingModel(config).eval(), SentenceEmbeddingModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (4, 7), generator=gen), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    loss = Distiller(teacher_model, weight=1.0, outputs=("sentence_embedding",), output_loss="cosine")(student_model,
                                                                                                     batch)
    with torch.no_grad():
        s, t = student_model(**batch).sentence_embedding, teacher_model(**batch).sentence_embedding
    assert float(loss.detach()) == pytest.approx(float(cosine_distance_loss(s, t)), rel=1e-6)
    with pytest.raises(ValueError, match="no task loss.*weight must be 1"):
        Distiller(teacher_model, weight=0.5, outputs=("sentence_embedding",), output_loss="cosine")(student_model,
                                                                                                  batch)


def test_sentence_transformers_folder_errors(tmp_path, minilm_path):
    with pytest.raises(ValueError, match="no modules.json"):
        read_sentence_transformers(tmp_path)
    for name in ("modules.json", "config.json", "sentence_bert_config.json"):
        (tmp_path / name).write_bytes((minilm_path / name).read_bytes())
    (tmp_path / "1_Pooling").mkdir()
    pooling = json.loads((minilm_path / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="exactly one of"):
        read_sentence_transformers(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert read_sentence_transformers(tmp_path)["pooling"] == "mean"
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        read_sentence_transformers(tmp_path)


def test_training_text_readers_and_held_out_dev_sentences(tmp_path, data_dir):
    glue = data_dir / "glue"
    with pytest.raises(FileNotFoundError, match="train_text 'nope.txt': no such file"):
        read_sentences("nope.txt", glue)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no sentences"):
        read_sentences(str(tmp_path / "empty.txt"), glue)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_sentences(str(tmp_path / "latin1.txt"), glue)
    with pytest.raises(ValueError, match="not a GLUE task"):
        read_sentences("glue:nosuch", glue)

    dev = load_glue("stsb", "dev", glue)
    dev_sentences = set(dev.texts_a + dev.texts_b)
    train = EmbeddingTask("glue:stsb").load("train", glue, None, 0)
    raw = load_glue("stsb", "train", glue)
    distinct = set(raw.texts_a + raw.texts_b)
    assert not dev_sentences & set(train.sentences)
    assert len(train) == len(distinct - dev_sentences) > 10_000
    (tmp_path / "mine.txt").write_text(f"a sentence of mine\n{dev.texts_a[0]}\n\nanother one\n")
    assert EmbeddingTask(str(tmp_path / "mine.txt")).load("train", glue, None, 0).sentences == [
        "a sentence of mine", "another one"]


@pytest.mark.parametrize("change, message", [
    ({"train_text": None}, "task embedding needs train_text"),
    ({"task": "sst2"}, "train_text applies to task embedding only"),
    ({"distill_weight": 0.5}, "distill_weight applies to labelled tasks"),
    ({"dense_finetune": "force"}, "has no labels"),
])
def test_recipe_options_checked_for_the_embedding_task(change, message, tmp_path):
    options = {"task": "embedding", "output_dir": str(tmp_path), "train_text": "glue:stsb", **change}
    with pytest.raises(ValueError, match=message):
        RecipeConfig(**options)


def _tiny_sentence_transformer(folder, minilm_path):
    save_tiny_bert_checkpoint(folder, minilm_path, layers=2)
    (folder / "modules.json").write_bytes((minilm_path / "modules.json").read_bytes())
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    pooling = json.loads((minilm_path / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": 32}))
    return folder


_PLAIN_ENV_SCRIPT = BLOCK_LRSPARSE + '''
import warnings
warnings.simplefilter("ignore")
import numpy as np
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
np.save(sys.argv[3], model.encode(open(sys.argv[2]).read().splitlines(), batch_size=4))
print(type(model[0].auto_model).__name__, sorted(n for n in sys.modules if n.split(".")[0] == "lrsparse"))
'''


def test_cli_compress_evaluate_and_export_embedding_model(tmp_path, minilm_path, data_dir, capsys):
    import onnxruntime
    from transformers import AutoTokenizer

    source = _tiny_sentence_transformer(tmp_path / "tiny-st", minilm_path)
    run = tmp_path / "run"
    code = cli.main(["compress", "--task", "embedding", "--model", str(source), "--train-text", "glue:stsb",
                     "--data-dir", str(data_dir / "glue"), "--keep", "0.5", "--max-train-samples", "96",
                     "--max-eval-samples", "40", "--epochs", "1", "--batch-size", "32", "--max-seq-len", "64",
                     "--output", str(run),
                     "--no-inspect", "--distill-hidden-weight", "1.0"])
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["dense", "prune", "factorize", "mixed_rank"]
    assert report["stages"][1]["teacher"] == "dense" and report["stages"][1]["steps"] == 3
    assert set(report["final_metrics"]) == {"pearson_cosine", "spearman_cosine", "main"}

    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(run), "--task", "embedding", "--data-dir", str(data_dir / "glue"),
                     "--max-eval-samples", "40", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["final_metrics"], abs=1e-9)

    model = load_compressed(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    sentences = _stsb_dev(data_dir, 6).texts_a
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).sentence_embedding

    out = tmp_path / "st-export"
    assert cli.main(["export", str(run), "--format", "sentence-transformers", "--out", str(out)]) == 0
    (tmp_path / "plain_env.py").write_text(_PLAIN_ENV_SCRIPT)
    (tmp_path / "sentences.txt").write_text("\n".join(sentences))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "plain_env.py", str(out), "sentences.txt", "st.npy"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "LowRankBertModel []"
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "st.npy")), expected, atol=2e-6, rtol=0)
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out), "--task", "embedding", "--data-dir", str(data_dir / "glue")]) == 2
    assert "is an `lrsparse export`" in capsys.readouterr().err  # not "no trained head": its layers load via remote code

    inputs = {k: v.numpy() for k, v in batch.items()}
    for flags, tolerance in (([], 2e-6), (["--int8"], 5e-3)):  # int8 per tensor: 2.4e-4 measured
        path = tmp_path / f"model{''.join(flags)}.onnx"
        assert cli.main(["export", str(run), "--format", "onnx", "--out", str(path), *flags]) == 0
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
        torch.testing.assert_close(torch.from_numpy(session.run(None, inputs)[0]), expected, atol=tolerance, rtol=0)
    assert cli.main(["export", str(run), "--format", "pytorch", "--out", str(tmp_path / "pt")]) == 2
    assert "--format sentence-transformers" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def test_embedding_run_interrupted_in_mixed_rank_resumes_bitwise(tmp_path, minilm_path, data_dir):
    from lrsparse import pipeline

    source = _tiny_sentence_transformer(tmp_path / "tiny-st", minilm_path)

    def recipe(name, **extra):
        return RecipeConfig.create("embedding", 0.5, str(tmp_path / name), model=str(source), train_text="glue:stsb",
                                   data_dir=str(data_dir / "glue"), max_train_samples=96, max_eval_samples=30,
                                   epochs=1.0, batch_size=16, max_seq_len=64, checkpoint_every=2,
                                   distill_teacher="pruned", **extra)

    whole = pipeline.run_compression(recipe("whole"))

    def interrupt(run, record):
        if record.get("step") == 2 and record["name"] == "mixed_rank":
            raise _Interrupt

    pipeline.CHECKPOINT_OBSERVERS.append(interrupt)
    try:
        with pytest.raises(_Interrupt):
            pipeline.run_compression(recipe("resumed"))
    finally:
        pipeline.CHECKPOINT_OBSERVERS.remove(interrupt)
    # The embedding model is rebuilt from the checkpoint's config (pooling included), the teacher from its file.
    assert (tmp_path / "resumed" / "checkpoint" / "teacher_pruned.safetensors").is_file()
    resumed = pipeline.run_compression(recipe("resumed", resume=True))
    assert resumed["final_metrics"] == whole["final_metrics"]
    expected = load_compressed(tmp_path / "whole" / "model").state_dict()
    actual = load_compressed(tmp_path / "resumed" / "model").state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
