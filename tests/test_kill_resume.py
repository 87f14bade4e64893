"""A real `python -m lrsparse.cli compress` process killed with SIGKILL in the middle of a training stage and resumed
with --resume gives bitwise the same weights and metrics as an uninterrupted run (CPU, one thread).

The model is a tiny random BERT saved with the real all-MiniLM-L6-v2 tokenizer (MiniLM itself would make every
intra-stage checkpoint ~0.5 GB); the data a small SST-2 subset. The uninterrupted reference runs without intra-stage
checkpoints, so it also shows that checkpointing does not perturb the run. The LRSPARSE_TEST_PAUSE_AFTER_CHECKPOINT hook (tests/cli_with_checkpoint_hooks.py)
only makes the process wait after a given checkpoint so the kill lands there; the kill is a real SIGKILL.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lrsparse
from lrsparse.cli import build_parser, config_from_args, main
from lrsparse.io import LAYERS_FILE
from cli_with_checkpoint_hooks import PAUSE_AFTER_CHECKPOINT
from lrsparse.checkpoint import CHECKPOINT_FORMAT, CheckpointStore
from lrsparse.pipeline import CompressionRun

# 96 examples / batch 8 = 12 steps per epoch; 1.5 epochs = 18 steps per stage, so the data order crosses an epoch.
STEPS = 18
CHECKPOINT_EVERY = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer random BERT (no task head, so the dense stage trains too) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # dropout 0.1: the RNG state matters
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compress_argv(data_dir: Path, model: Path, output: Path, checkpoint_every: int) -> list[str]:
    return [
        "compress", "--model", str(model), "--task", "sst2", "--keep", "0.3", "--output", str(output),
        "--data-dir", str(data_dir / "glue"), "--max-train-samples", "96", "--max-eval-samples", "32",
        "--max-seq-len", "32", "--batch-size", "8", "--epochs", "1.5", "--seed", "5", "--factorization-iters", "3",
        "--delta-t", "3", "--lr", "2e-3", "--threads", "1", "--checkpoint-every", str(checkpoint_every), "--no-inspect",
        # Bitwise resume equality is promised on the CPU only (cuBLAS and atomics-based kernels may reorder sums).
        "--device", "cpu",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, tiny_model):
    """The uninterrupted run (no intra-stage checkpoints): (report, output folder)."""
    output = tmp_path_factory.mktemp("reference") / "run"
    argv = compress_argv(data_dir, tiny_model, output, checkpoint_every=0)
    run = CompressionRun(config_from_args(build_parser().parse_args(argv)))
    assert run.steps["prune"] == run.steps["mixed_rank"] == STEPS
    return run.run(), output


def _in_progress(manifest_path: Path) -> dict | None:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("in_progress")
    except (OSError, json.JSONDecodeError):  # not written yet (the rename makes a partial read impossible)
        return None


def kill_at_checkpoint(argv: list[str], output: Path, stage: str, step: int, log_path: Path) -> dict:
    """Runs the CLI in a subprocess, SIGKILLs it once the manifest records the checkpoint of ``stage`` at ``step``;
    returns that manifest record."""
    env = dict(os.environ, **{PAUSE_AFTER_CHECKPOINT: f"{stage}:{step}", "OMP_NUM_THREADS": "1"})
    package_root = str(Path(lrsparse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    manifest_path = output / "checkpoint" / "manifest.json"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "cli_with_checkpoint_hooks", *argv], env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            record = _in_progress(manifest_path)
            while not (record and (record["name"], record["step"]) == (stage, step)):
                assert process.poll() is None, f"the run ended (rc {process.returncode}) before {stage}:{step}:\n" \
                                               + log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no checkpoint {stage}:{step}:\n" + log_path.read_text()[-3000:]
                time.sleep(0.05)
                record = _in_progress(manifest_path)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return record


def assert_same_run(output: Path, reference_output: Path, reference_report: dict) -> None:
    resumed = json.loads((output / "report.json").read_text())
    assert [s["name"] for s in resumed["stages"]] == [s["name"] for s in reference_report["stages"]]
    for ours, theirs in zip(resumed["stages"], reference_report["stages"]):
        for key in ("metrics", "mean_loss", "steps", "skipped_steps", "density", "mean_relative_error"):
            assert ours.get(key) == theirs.get(key), (ours["name"], key)
    assert resumed["final_metrics"] == reference_report["final_metrics"]
    assert resumed["layers"] == reference_report["layers"]
    ours = load_file(output / "model" / "model.safetensors")
    theirs = load_file(reference_output / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
    assert (output / "model" / LAYERS_FILE).read_text() == (reference_output / "model" / LAYERS_FILE).read_text()


# prune step 16 is after the epoch boundary (step 12) and mask updates; mixed_rank step 4 is before alpha reaches 1
# (step 9: the model still has its sparse path), step 12 after it (the model is low-rank already).
@pytest.mark.parametrize("stage, step", [("prune", 16), ("mixed_rank", 4), ("mixed_rank", 12)])
def test_sigkill_mid_stage_then_resume_is_bitwise_identical(stage, step, reference, tmp_path, data_dir, tiny_model,
                                                            caplog):
    reference_report, reference_output = reference
    output = tmp_path / "run"
    argv = compress_argv(data_dir, tiny_model, output, checkpoint_every=CHECKPOINT_EVERY)
    record = kill_at_checkpoint(argv, output, stage, step, tmp_path / "killed.log")

    manifest = json.loads((output / "checkpoint" / "manifest.json").read_text())
    done = ["dense", "prune", "factorize"][: ["dense", "prune", "factorize", "mixed_rank"].index(stage)]
    assert [s["name"] for s in manifest["stages"]] == done
    assert (output / "checkpoint" / record["state_file"]).is_file()
    assert not (output / "report.json").exists()

    with caplog.at_level(logging.INFO, logger="lrsparse.pipeline"):
        assert main([*argv, "--resume"]) == 0
    assert f"resuming stage '{stage}' at step {step}" in caplog.text
    assert_same_run(output, reference_output, reference_report)
    # Finished: only the manifest is left in the checkpoint folder (the saved model supersedes the states).
    assert [p.name for p in (output / "checkpoint").iterdir()] == ["manifest.json"]


def test_finished_run_removes_a_state_orphaned_by_a_kill_inside_commit(monkeypatch, tmp_path):
    # A kill after the manifest names the new state but before the previous state is removed leaves the previous
    # one unreferenced (seen once under load in the SIGKILL test above); the end of the run must still remove it.
    store = CheckpointStore(tmp_path)
    store.directory.mkdir()
    manifest = {"format_version": CHECKPOINT_FORMAT, "stages": [], "completed": False}
    store.commit(manifest, {"index": 1, "name": "prune", "step": 12}, {"x": torch.ones(2)}, in_progress=True)
    with monkeypatch.context() as patched:
        def killed(self, missing_ok=False):
            raise KeyboardInterrupt  # stands for the SIGKILL: nothing after the manifest write runs
        patched.setattr(Path, "unlink", killed)
        with pytest.raises(KeyboardInterrupt):
            store.commit(manifest, {"index": 1, "name": "prune", "step": 16}, {"x": torch.zeros(2)}, in_progress=True)
    on_disk = json.loads(store.manifest_path.read_text())
    assert on_disk["in_progress"]["state_file"] == "stage1-prune-step16.pt"
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "manifest.json", "stage1-prune-step12.pt", "stage1-prune-step16.pt"]
    store.remove_states()
    assert [p.name for p in store.directory.iterdir()] == ["manifest.json"]
