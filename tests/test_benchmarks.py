"""The benchmark scripts run end to end against the current API (a few steps on the real model and data): the
training benchmark broke unnoticed when LPAF's default factorizer started to need calibration batches."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helpers (machine.py) as top-level modules
    spec = importlib.util.spec_from_file_location(f"lrsparse_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_times_every_stage_and_precision(data_dir, minilm_path, tmp_path, single_thread):
    from transformers import AutoModel

    training = load_benchmark("training")
    json_path, markdown_path = tmp_path / "training.json", tmp_path / "training.md"
    training.main(["--data-dir", str(data_dir / "glue"), "--model", str(minilm_path), "--max-seq-len", "32",
                   "--train-samples", "64", "--rounds", "1", "--steps", "1", "--warmup-steps", "2",
                   "--precisions", "fp32", "bf16", "--json", str(json_path), "--markdown", str(markdown_path)])
    report = json.loads(json_path.read_text())
    cells = {f"{s}/{p}" for s in training.STAGES for p in ("fp32", "bf16")}
    assert set(report["seconds_per_step"]) == cells
    assert all(math.isfinite(v) and v > 0 for v in report["seconds_per_step"].values())
    # Every linear layer of the encoder is a factorization target: counted independently on the checkpoint.
    encoder = AutoModel.from_pretrained(minilm_path)
    linears = [m for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and ".layer." in n]
    assert report["ranks"]["layers"] == len(linears) == 36
    assert 1 <= report["ranks"]["min"] <= report["ranks"]["max"] <= min(min(m.weight.shape) for m in linears)
    markdown = markdown_path.read_text()
    for stage in training.STAGES:
        assert f"| {stage} | " in markdown
    assert report["ratios"]["bf16_speedup/dense"] == pytest.approx(
        report["seconds_per_step"]["dense/fp32"] / report["seconds_per_step"]["dense/bf16"])
