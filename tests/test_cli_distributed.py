"""`lrsparse compress` data-parallel under torchrun: 2 CPU processes (gloo, 1 thread each) against 1 process with the
same global batch, on an own-data CSV and on a GLUE task; a rank SIGKILLed mid-pruning, then `--resume` under
torchrun; and the launch errors named before any work.

Against one process the masks and ranks are equal and the weights and metrics agree within float32 rounding: DDP
averages the two shards' gradients, which sums in another order than one process's mean over the whole batch (the
models have dropout 0, so both see the same computation). A resumed launch equals an unbroken one bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline_helpers import save_tiny_bert_checkpoint, write_csv

TESTS = Path(__file__).resolve().parent
TINY_RUN = ["--keep", "0.5", "--epochs", "2", "--batch-size", "8", "--max-seq-len", "16", "--threads", "1",
            "--checkpoint-every", "2", "--no-inspect"]


def _launch(args: list[str], nproc: int, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    script = [str(TESTS / "cli_with_checkpoint_hooks.py")]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
               if nproc > 1 else [sys.executable]) + script + args
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_path):
    folder = save_tiny_bert_checkpoint(tmp_path_factory.mktemp("tiny") / "bert", minilm_path, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the same computation on 1 or 2 ranks
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviews")
    rows = [[f"a {'good' if i % 2 else 'dull'} film, take {i}", "positive" if i % 2 else "negative"] for i in range(60)]
    write_csv(root / "train.csv", ["review", "verdict"], rows[:44])
    write_csv(root / "dev.csv", ["review", "verdict"], rows[44:])
    return root


def _own_data_args(tiny_model, reviews, output) -> list[str]:
    return ["compress", "--model", str(tiny_model), "--train-file", str(reviews / "train.csv"), "--validation-file",
            str(reviews / "dev.csv"), "--text-columns", "review", "--label-column", "verdict", "--output", str(output),
            *TINY_RUN]


def _result(run: Path) -> tuple[dict, dict]:
    return json.loads((run / "report.json").read_text()), load_file(str(run / "model" / "model.safetensors"))


def _assert_equivalent(parallel: Path, single: Path, dev_size: int) -> None:
    (report, weights), (one, one_weights) = _result(parallel), _result(single)
    assert report["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 8, "per_rank_batch": 4}
    assert [(l["name"], l["density"], l["rank"]) for l in report["layers"]] == \
        [(l["name"], l["density"], l["rank"]) for l in one["layers"]]
    assert report["steps"] == one["steps"] and report["train_examples"] == one["train_examples"]
    for stage, other in zip(report["stages"], one["stages"], strict=True):
        for metric, value in stage["metrics"].items():  # a flipped near-tie moves accuracy by one example at most
            assert value == pytest.approx(other["metrics"][metric], abs=max(1e-4, 1.01 / dev_size)), (stage, metric)
    assert weights.keys() == one_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, one_weights[name], rtol=1e-3, atol=1e-4, msg=name)


def test_own_data_on_two_processes_equals_one_process(tiny_model, reviews, tmp_path):
    _ok(_launch(_own_data_args(tiny_model, reviews, tmp_path / "parallel"), 2, tmp_path))
    _ok(_launch(_own_data_args(tiny_model, reviews, tmp_path / "single"), 1, tmp_path))
    _assert_equivalent(tmp_path / "parallel", tmp_path / "single", dev_size=16)
    report = subprocess.run([sys.executable, "-m", "lrsparse.cli", "inspect", str(tmp_path / "parallel")],
                            capture_output=True, text=True, check=True).stdout
    assert "data parallel: 2 ranks (gloo), batch 8 global = 4 per rank" in report


def test_glue_task_on_two_processes_equals_one_process(tiny_model, data_dir, tmp_path):
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    for split, count in (("train", 44), ("dev", 20)):
        with open(data_dir / "glue" / "SST-2" / f"{split}.tsv", encoding="utf-8") as source:
            lines = source.readlines()[:count + 1]
        (glue / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    args = ["compress", "--task", "sst2", "--model", str(tiny_model), "--data-dir", str(tmp_path / "glue"), *TINY_RUN]
    _ok(_launch([*args, "--output", str(tmp_path / "parallel")], 2, tmp_path))
    _ok(_launch([*args, "--output", str(tmp_path / "single")], 1, tmp_path))
    _assert_equivalent(tmp_path / "parallel", tmp_path / "single", dev_size=20)


def test_a_rank_killed_mid_pruning_resumes_under_torchrun_to_the_unbroken_result(tiny_model, reviews, tmp_path):
    _ok(_launch(_own_data_args(tiny_model, reviews, tmp_path / "unbroken"), 2, tmp_path))
    broken = tmp_path / "broken"
    killed = _launch(_own_data_args(tiny_model, reviews, broken), 2, tmp_path,
                     {"LRSPARSE_TEST_KILL_RANK_AFTER_CHECKPOINT": "1:prune:4"})
    assert killed.returncode != 0 and not (broken / "report.json").exists()
    manifest = json.loads((broken / "checkpoint" / "manifest.json").read_text())
    assert manifest["in_progress"]["name"] == "prune" and manifest["world_size"] == 2
    _ok(_launch(["compress", "--output", str(broken), "--resume", "--model", str(tiny_model), *TINY_RUN], 2, tmp_path))
    (report, weights), (unbroken, unbroken_weights) = _result(broken), _result(tmp_path / "unbroken")
    assert [s["metrics"] for s in report["stages"]] == [s["metrics"] for s in unbroken["stages"]]
    assert all(torch.equal(weights[name], unbroken_weights[name]) for name in unbroken_weights)
    # Resuming with another number of processes is refused (each rank's RNG state is in the checkpoint).
    killed = _launch(_own_data_args(tiny_model, reviews, tmp_path / "again"), 2, tmp_path,
                     {"LRSPARSE_TEST_KILL_RANK_AFTER_CHECKPOINT": "1:prune:4"})
    refused = _launch(["compress", "--output", str(tmp_path / "again"), "--resume", "--model", str(tiny_model),
                       *TINY_RUN], 1, tmp_path)
    assert refused.returncode == 2 and "made by 2 process(es), this launch has 1" in refused.stderr


def test_launch_errors_before_any_work(tiny_model, reviews, tmp_path):
    args = _own_data_args(tiny_model, reviews, tmp_path / "odd")
    args[args.index("--batch-size") + 1] = "7"
    done = _launch(args, 2, tmp_path)
    assert done.returncode != 0 and "batch_size 7 is the global batch: it must be divisible by the 2 ranks" in \
        done.stderr
    assert not (tmp_path / "odd").exists()
