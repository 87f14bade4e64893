"""End-to-end `lrsparse compress | evaluate | inspect` on a tiny SST-2 subset with the real MiniLM checkpoint.

One uninterrupted run (in-process, so its final model can be compared with the saved one) is the reference: a run
killed after a stage and resumed must reproduce it exactly, and bad input must fail before any model is loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lrsparse
from lrsparse import PRESETS, pipeline
from lrsparse.cli import build_parser, config_from_args, main
from lrsparse.data import PaddingCollator, TokenizedDataset, load_glue
from cli_with_checkpoint_hooks import EXIT_AFTER_STAGE
from lrsparse.modeling import has_trained_head
from lrsparse.pipeline import CompressionRun
from lrsparse.report import PARAM_KEYS, validate_report

KEEP = 0.25


def compress_argv(data_dir: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [
        "compress", "--model", str(model), "--task", "sst2", "--keep", str(KEEP), "--output", str(output),
        "--data-dir", str(data_dir / "glue"), "--max-train-samples", "32", "--max-eval-samples", "32",
        "--max-seq-len", "32", "--batch-size", "8", "--epochs", "1", "--seed", "3", "--factorization-iters", "5",
        # --device cpu: the resumed run is compared bitwise, which is promised on the CPU only.
        "--threads", "1", "--no-inspect", "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir, minilm_path):
    """The uninterrupted run: (CompressionRun with its final model, report, output folder, argv)."""
    output = tmp_path_factory.mktemp("reference") / "run"
    argv = compress_argv(data_dir, minilm_path, output)
    run = CompressionRun(config_from_args(build_parser().parse_args(argv)))
    report = run.run()
    return run, report, output, argv


def test_report_schema_and_parameter_accounting(reference_run, minilm_path):
    from transformers import AutoModelForSequenceClassification

    _, report, output, _ = reference_run
    assert validate_report(report) is report
    assert json.loads((output / "report.json").read_text()) == report
    assert (report["task"], report["method"], report["keep"], report["seed"]) == ("sst2", "lpaf", KEEP, 3)
    assert set(report["versions"]) >= {"lrsparse", "torch", "transformers"}
    assert [s["name"] for s in report["stages"]] == ["dense", "prune", "factorize", "mixed_rank"]
    assert all(s["seconds"] > 0 and "main" in s["metrics"] for s in report["stages"])
    assert report["final_metrics"] == report["stages"][-1]["metrics"]
    assert report["stages"][0]["trained"] is True  # all-MiniLM has no SST-2 head
    assert report["stages"][1]["density"] == pytest.approx(KEEP, abs=1e-6)

    # Dense counts against an independently loaded model; compressed counts from the layer table.
    dense = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    params = report["params"]
    assert set(params) == set(PARAM_KEYS)
    assert params["total_dense"] == sum(p.numel() for p in dense.parameters())
    layers = report["layers"]
    assert len(layers) == 36  # 6 blocks x (query, key, value, attention output, intermediate, output)
    target_dense = sum(layer["in_features"] * layer["out_features"] + layer["out_features"] for layer in layers)
    target_compressed = sum(layer["rank"] * (layer["in_features"] + layer["out_features"]) + layer["out_features"]
                            for layer in layers)
    assert params["target_dense"] == target_dense
    assert params["target_compressed"] == target_compressed
    assert params["total_dense"] - params["total_compressed"] == target_dense - target_compressed
    biases = sum(layer["out_features"] for layer in layers)
    assert target_compressed - biases <= KEEP * (target_dense - biases)
    for layer in layers:  # the "budget" allocation: rank = floor(nnz / (m + n))
        nnz = round(layer["density"] * layer["in_features"] * layer["out_features"])
        assert layer["rank"] == max(1, nnz // (layer["in_features"] + layer["out_features"]))
    saved = sum(p.stat().st_size for p in (output / "model").iterdir() if p.is_file())
    assert report["checkpoint_bytes"] == saved


def test_saved_model_reloads_with_equal_logits(reference_run, data_dir, minilm_path, capsys):
    from transformers import AutoTokenizer

    from lrsparse.io import load_compressed

    run, report, output, _ = reference_run
    reloaded = load_compressed(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    examples = load_glue("sst2", "dev", data_dir / "glue", max_samples=16, seed=11)
    batch = PaddingCollator(tokenizer.pad_token_id)(list(TokenizedDataset(examples, tokenizer, 32)))
    batch.pop("labels")
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)

    # `lrsparse evaluate` on the saved model reproduces the pipeline's final evaluation.
    argv = ["evaluate", "--model", str(output), "--task", "sst2", "--data-dir", str(data_dir / "glue"),
            "--max-eval-samples", "32", "--max-seq-len", "32", "--seed", "3", "--json"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(report["final_metrics"])


def test_evaluate_defaults_to_the_runs_settings_and_task(reference_run, data_dir, capsys):
    from lrsparse.io import saved_extra

    _, report, output, _ = reference_run
    saved = saved_extra(output / "model")
    assert {k: saved[k] for k in ("task", "max_seq_len", "doc_stride", "seed")} == {
        "task": "sst2", "max_seq_len": 32, "doc_stride": None, "seed": 3}
    # Without --max-seq-len and --seed, evaluate takes the run's 32 and 3 (not 128 and 0): the run's scores.
    argv = ["evaluate", "--model", str(output), "--task", "sst2", "--data-dir", str(data_dir / "glue"),
            "--max-eval-samples", "32", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(report["final_metrics"])
    # MRPC has two labels too: the model would be scored on it without a word.
    argv[argv.index("sst2")] = "mrpc"
    assert main(argv) == 2
    assert "task 'mrpc' differs from the task 'sst2' the model" in capsys.readouterr().err
    # all-MiniLM has 512 positions: SST-2's short sentences would never reach them, and nothing would say so.
    argv[argv.index("mrpc")] = "sst2"
    assert main(argv + ["--max-seq-len", "1024"]) == 2
    assert re.search(r"error: max_seq_len 1024 exceeds what .* supports \(model max_position_embeddings 512",
                     capsys.readouterr().err)


def test_inspect_prints_tables(reference_run, capsys):
    _, report, output, _ = reference_run
    assert main(["inspect", str(output)]) == 0
    text = capsys.readouterr().out
    for expected in ("stages", "parameters", "layers", "mixed_rank", "bert.encoder.layer.5.output.dense",
                     f"{report['params']['target_dense']}", f"{report['final_metrics']['accuracy']:.4f}"):
        assert expected in text
    first = report["layers"][0]
    row = next(line for line in text.splitlines() if line.startswith(first["name"] + " "))
    assert row.split()[1:] == [str(first["in_features"]), str(first["out_features"]), f"{first['density']:.4f}",
                               str(first["rank"])]
    assert main(["inspect", str(output / "missing")]) == 2
    assert "missing not found: expected a run folder" in capsys.readouterr().err


def _run_cli_subprocess(argv: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    package_root = str(Path(lrsparse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "cli_with_checkpoint_hooks", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, data_dir, minilm_path):
    """A run whose process died right after the checkpoint of its "prune" stage (read-only: copy it to resume)."""
    output = tmp_path_factory.mktemp("crashed") / "run"
    crashed = _run_cli_subprocess(compress_argv(data_dir, minilm_path, output), {EXIT_AFTER_STAGE: "prune"})
    assert crashed.returncode == 75, crashed.stderr[-2000:]
    return output


def test_resume_after_crash_reproduces_the_uninterrupted_run(reference_run, crashed_run, tmp_path, data_dir,
                                                             minilm_path, capsys):
    _, reference, reference_output, _ = reference_run
    output = tmp_path / "run"
    shutil.copytree(crashed_run, output)
    argv = compress_argv(data_dir, minilm_path, output)
    manifest = json.loads((output / "checkpoint" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["dense", "prune"]
    assert not (output / "report.json").exists()

    # A different configuration is refused, naming what differs.
    assert main(compress_argv(data_dir, minilm_path, output, "--lr", "3e-4", "--resume")) == 2
    assert "lr: checkpoint 0.0001 vs now 0.0003" in capsys.readouterr().err
    # Without --resume the folder is not silently reused.
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err

    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((output / "report.json").read_text())
    # Nothing lost: the first two stages are the crashed process's records, the rest match the reference exactly.
    assert resumed["stages"][:2] == [{k: v for k, v in s.items() if k not in ("state_file", "sha256", "state_bytes",
                                                                              "index")} for s in manifest["stages"]]
    for ours, theirs in zip(resumed["stages"], reference["stages"]):
        assert ours["name"] == theirs["name"]
        assert ours["metrics"] == theirs["metrics"]
        assert ours.get("mean_loss") == theirs.get("mean_loss")
    assert resumed["layers"] == reference["layers"]
    assert resumed["params"] == reference["params"]
    ours = load_file(output / "model" / "model.safetensors")
    theirs = load_file(reference_output / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Resuming a finished run changes nothing.
    assert main([*argv, "--resume"]) == 0
    assert json.loads((output / "report.json").read_text()) == resumed


def test_corrupted_checkpoint_is_refused(crashed_run, tmp_path, data_dir, minilm_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(crashed_run, output)
    state = output / "checkpoint" / "stage1-prune.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert main([*compress_argv(data_dir, minilm_path, output), "--resume"]) == 2
    assert "is corrupted: SHA-256" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the pipeline gets as far as loading model weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(pipeline, "load_task_model", refuse)


def _write_sst2(root: Path, dev_text: str) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t0\n", encoding="utf-8")
    (folder / "dev.tsv").write_text(dev_text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--task": "imdb"}, "task 'imdb' is not a GLUE task"),
        ({"--keep": "0"}, r"keep must be a fraction in \(0, 1\], got 0.0"),
        ({"--keep": "1.5"}, r"keep must be a fraction in \(0, 1\], got 1.5"),
        ({"--method": "magnitude-svd", "--factorization": "fwsvd"},
         r"factorizer 'fwsvd' needs \['fisher'\], which pruner 'magnitude' does not collect"),
        ({"--method": "prune-only", "--pruner": "none"}, "pruner and factorizer cannot both be 'none'"),
        ({"--lr": "-1"}, "lr must be > 0"),
        ({"--data-dir": "EMPTY"}, r"sst2 train file not found: .*SST-2[/\\]train.tsv"),
        ({"--data-dir": "BAD_LABEL"}, r"dev.tsv line 2: label '7' of sst2"),
        ({"--data-dir": "NO_TABS"}, r"column\(s\) \['sentence', 'label'\] missing .*tab-separated"),
        ({"--model": "MISSING_MODEL"}, "model '.*' cannot be loaded"),
    ],
)
def test_bad_input_fails_before_any_model_work(change, message, tmp_path, data_dir, minilm_path, capsys,
                                              no_model_loading):
    folders = {
        "EMPTY": tmp_path / "empty",
        "BAD_LABEL": _write_sst2(tmp_path / "bad_label", "sentence\tlabel\nfine \t7\n"),
        "NO_TABS": _write_sst2(tmp_path / "no_tabs", "sentence,label\nfine,1\n"),
        "MISSING_MODEL": tmp_path / "no-such-model",
    }
    argv = compress_argv(data_dir, minilm_path, tmp_path / "out")
    for flag, value in change.items():
        value = str(folders.get(value, value))
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrsparse compress: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_missing_optional_package_is_a_clean_error(tmp_path, data_dir, minilm_path, capsys, monkeypatch,
                                                   no_model_loading):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    argv = compress_argv(data_dir, minilm_path, tmp_path / "out", "--tensorboard", str(tmp_path / "tb"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrsparse compress: error: TensorBoard logging to ")
    assert "pip install tensorboard" in err and "Traceback" not in err
    # Hub loading (no --data-dir) without `datasets`.
    monkeypatch.setitem(sys.modules, "datasets", None)
    argv = ["evaluate", "--model", str(tmp_path / "out"), "--task", "sst2"]
    (tmp_path / "out").mkdir()
    assert main(argv) == 2
    assert "lrsparse evaluate: error: loading GLUE from the hub needs `pip install datasets`" in (
        capsys.readouterr().err)


def test_folder_without_a_model_names_the_subfolder_that_has_one(tmp_path, data_dir, minilm_path, capsys,
                                                                 no_model_loading):
    # A pip package folder around the model (as the bundled MiniLM's): transformers alone asks for a `model_type` key.
    package = tmp_path / "package"
    (package / "model").mkdir(parents=True)
    (package / "model" / "config.json").write_text("{}", encoding="utf-8")
    expected = f"{package} is a folder without config.json .*the model may be in {package / 'model'}"
    assert main(compress_argv(data_dir, str(package), tmp_path / "out")) == 2
    assert re.search(f"lrsparse compress: error: model .* cannot be loaded .*: {expected}", capsys.readouterr().err)
    assert main(["evaluate", "--model", str(package), "--task", "sst2", "--data-dir", str(data_dir / "glue"),
                 "--max-eval-samples", "4"]) == 2
    assert re.search(f"lrsparse evaluate: error: {expected}", capsys.readouterr().err)
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--task", "sst2", "--keep", "0.5", "--output", "x", "--method", "pca"])
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'pca'" in capsys.readouterr().err


def test_every_method_gets_the_same_training_budget(tmp_path, data_dir, minilm_path, no_model_loading):
    steps = {}
    for method in PRESETS:
        argv = compress_argv(data_dir, minilm_path, tmp_path / method, "--method", method)
        steps[method] = CompressionRun(config_from_args(build_parser().parse_args(argv))).steps
    # 32 examples / batch 8 = 4 steps per epoch and stage.
    assert all(s["dense"] == 4 and s["prune"] == 4 and s["mixed_rank"] == 4 for s in steps.values()), steps


def test_trained_head_detection(minilm_path):
    from transformers import AutoConfig, BertConfig

    from lrsparse.data import get_task

    assert not has_trained_head(AutoConfig.from_pretrained(minilm_path), get_task("sst2"))  # BertModel: no head
    classifier = BertConfig(architectures=["BertForSequenceClassification"], num_labels=2)
    assert has_trained_head(classifier, get_task("sst2"))
    assert not has_trained_head(classifier, get_task("stsb"))  # a 2-way head is no regression head
    assert not has_trained_head(classifier, get_task("mnli"))


@pytest.mark.parametrize("method", ["prune-only", "magnitude-svd", "fwsvd"])
def test_baseline_methods_end_to_end(method, tmp_path, data_dir, minilm_path):
    from lrsparse.io import load_compressed

    output = tmp_path / "run"
    argv = compress_argv(data_dir, minilm_path, output, "--method", method)
    argv[argv.index("--max-train-samples") + 1] = "16"
    argv[argv.index("--max-eval-samples") + 1] = "16"
    run = CompressionRun(config_from_args(build_parser().parse_args(argv)))
    report = validate_report(run.run())
    names = [s["name"] for s in report["stages"]]
    model = load_compressed(output / "model")
    targets = [layer["name"] for layer in report["layers"]]
    if method == "prune-only":
        assert names == ["dense", "prune"]
        assert all(layer["rank"] is None for layer in report["layers"])
        # The saved sparse model keeps exactly round(keep * total) target weights.
        weights = [model.get_submodule(name).weight for name in targets]
        total = sum(w.numel() for w in weights)
        assert sum(int(torch.count_nonzero(w)) for w in weights) == round(KEEP * total)
        assert report["params"]["target_compressed"] == round(KEEP * total) + sum(
            model.get_submodule(name).bias.numel() for name in targets)
    else:
        assert names == ["dense", "prune" if method == "magnitude-svd" else "finetune", "factorize", "mixed_rank"]
        assert report["factorization"] == ("svd" if method == "magnitude-svd" else "fwsvd")
        assert report["stages"][1]["density"] == pytest.approx(KEEP if method == "magnitude-svd" else 1.0)
        assert all(type(model.get_submodule(name)).__name__ == "LowRankLinear" for name in targets)
    assert report["final_metrics"] == report["stages"][-1]["metrics"]


def test_scores_of_a_random_head_are_refused_unless_asked_for(tmp_path, data_dir, minilm_path, capsys):
    """The bundled MiniLM folder has no task head: evaluating it, or compressing it with --dense-finetune skip,
    would report the scores of a randomly initialized classifier."""
    glue = str(data_dir / "glue")
    assert main(["evaluate", "--model", str(minilm_path), "--task", "sst2", "--data-dir", glue,
                 "--max-eval-samples", "8"]) == 2
    err = capsys.readouterr().err
    assert "has no trained sst2 head" in err and "classifier.weight" in err and "--allow-random-head" in err
    assert main(["evaluate", "--model", str(minilm_path), "--task", "sst2", "--data-dir", glue,
                 "--max-eval-samples", "8", "--max-seq-len", "16", "--allow-random-head", "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    argv = compress_argv(data_dir, minilm_path, tmp_path / "out") + ["--dense-finetune", "skip"]
    assert main(argv) == 2
    assert "--dense-finetune skip: model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_checkpoint_of_lrsparse_0_1_is_refused_with_what_to_do(crashed_run, tmp_path, data_dir, minilm_path,
                                                                capsys):
    output = tmp_path / "run"
    shutil.copytree(crashed_run, output)
    manifest_path = output / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1  # what lrsparse 0.1 wrote
    manifest_path.write_text(json.dumps(manifest))
    assert main(compress_argv(data_dir, minilm_path, output, "--resume")) == 2
    err = capsys.readouterr().err
    assert "is not a version-3 lrsparse checkpoint (found version 1" in err and "--overwrite" in err
