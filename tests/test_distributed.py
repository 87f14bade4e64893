"""Pruning, factorization and mixed-rank fine-tuning under DistributedDataParallel: two real CPU processes (gloo).

Every rank must hold the same masks, factors and outputs, equal to a single process that trains on the whole global
batch (DDP averages the per-rank gradients of equal-sized shards, which is the gradient of the global mean loss);
only rank 0 writes the saved model; a pruner fed rank-local gradients fails at its first mask update.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import lrsparse
from lrsparse.checkpoint import CheckpointStore
from lrsparse.io import save_compressed
from lrsparse.layers import LowRankLinear
from pipeline_helpers import random_batches, tiny_bert

WORLD = 2
GLOBAL_BATCH = 8
PRUNE_STEPS, MIXED_STEPS, KEEP = 10, 6, 0.4
# Warm-ups of 2 and 3 of the PRUNE_STEPS steps.
CONFIG = lrsparse.PRESETS["lpaf"].replace(keep=KEEP, delta_t=2, initial_warmup_fraction=0.2,
                                          final_warmup_fraction=0.3, factorization_iters=20)


def batches(count: int, seed: int) -> list[dict]:
    return random_batches(count, seed=seed, batch=GLOBAL_BATCH, length=8)


def shard(batch: dict, rank: int, world: int) -> dict:
    size = GLOBAL_BATCH // world
    return {key: value[rank * size:(rank + 1) * size] for key, value in batch.items()}


def compress(rank: int, world: int, save_dir=None) -> dict:
    """Prune -> factorize -> mixed-rank on this rank's shard of every global batch; single process when world 1."""
    distributed = world > 1
    model = tiny_bert(seed=0)
    wrapped = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # On the module DDP wraps, not on DDP.
    compressor = lrsparse.prepare(model, CONFIG, total_steps=PRUNE_STEPS)
    model.train()
    first_grads = None
    for batch in batches(PRUNE_STEPS, seed=1):
        wrapped(**shard(batch, rank, world)).loss.backward()  # DDP all-reduces (averages) the gradients here
        if first_grads is None:  # what the pruner reads: the .grad of the wrapped module's weights
            first_grads = {name: m.weight.grad.clone() for name, m in compressor.targets.items()}
        optimizer.step()
        compressor.step()
        optimizer.zero_grad()
    pruner = compressor.pruner
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    scores = {name: pruner.scores(name) for name in pruner.targets}

    # Each rank calibrates on its own shard; the covariances are summed over the ranks (the global batch's).
    compressor.factorize(total_steps=MIXED_STEPS, calibration=[shard(b, rank, world) for b in batches(2, seed=4)])
    # New parameters (U, V): a new DDP wrapper and a new optimizer.
    wrapped = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches(MIXED_STEPS, seed=2):
        wrapped(**shard(batch, rank, world)).loss.backward()
        optimizer.step()
        was_final = compressor.phase == "done"
        compressor.step(optimizer)
        optimizer.zero_grad()
        if distributed and compressor.phase == "done" and not was_final:
            wrapped = DistributedDataParallel(model)  # the sparse weights left the model: re-register its params
    assert compressor.phase == "done" and compressor.scheduler.finalized

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batches(1, seed=3)[0]["input_ids"]).logits
    factors = {name: (m.U.detach().clone(), m.V.detach().clone())
               for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    written = None if save_dir is None else save_compressed(model, save_dir, config=compressor.config,
                                                            records=compressor.records)
    return {"grads": first_grads, "masks": masks, "scores": scores, "factors": factors, "logits": logits, "written": written}


def local_gradient_pruning(rank: int, world: int) -> str:
    """A compressor on a model NOT wrapped in DDP: each rank sees only its own gradients."""
    model = tiny_bert(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compressor = lrsparse.prepare(model, CONFIG, total_steps=PRUNE_STEPS)
    try:
        for batch in batches(PRUNE_STEPS, seed=1):
            model(**shard(batch, rank, world)).loss.backward()
            optimizer.step()
            compressor.step()
            optimizer.zero_grad()
    except RuntimeError as exc:
        return f"step {compressor.pruner.step_count}: {exc}"
    return "no error"


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, steps: int, seed: int):
        self.rows = [{"input_ids": ids, "labels": label} for batch in batches(steps, seed)
                     for ids, label in zip(batch["input_ids"], batch["labels"])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def with_trainer(directory: str, world: int) -> dict:
    """The same compression through transformers.Trainer and lrsparse.hf.CompressorCallback; under a process group
    Trainer (accelerate) wraps the model in DDP and shards each global batch of GLOBAL_BATCH over the ranks."""
    from transformers import Trainer, TrainingArguments

    from lrsparse.hf import CompressorCallback

    def arguments(steps):
        return TrainingArguments(
            output_dir=directory, max_steps=steps, per_device_train_batch_size=GLOBAL_BATCH // world,
            learning_rate=1e-3, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant",
            max_grad_norm=0.0, train_sampling_strategy="sequential", report_to="none", save_strategy="no",
            logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, average_tokens_across_devices=False,
            ddp_backend="gloo" if world > 1 else None)

    model = tiny_bert(seed=0)
    # "uniform" ranks fit keep exactly, which check_budget verifies.
    compressor = lrsparse.prepare(model, CONFIG.replace(rank_allocation="uniform"))
    pruning = Trainer(model=model, args=arguments(PRUNE_STEPS), train_dataset=TokenDataset(PRUNE_STEPS, seed=1),
                      callbacks=[CompressorCallback(compressor)])
    pruning.train()
    masks = {name: mask.clone() for name, mask in compressor.pruner.masks.items()}
    # The compressor gathered each rank's shard in the last pruning steps: pooled, the union of the ranks' examples.
    compressor.factorize()  # phase 2's length: max_steps
    trainer = Trainer(model=model, args=arguments(MIXED_STEPS), train_dataset=TokenDataset(MIXED_STEPS, seed=2),
                      callbacks=[CompressorCallback(compressor, check_budget=True)])
    trainer.train()
    assert compressor.phase == "done"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batches(1, seed=3)[0]["input_ids"]).logits
    factors = {name: (m.U.detach().clone(), m.V.detach().clone())
               for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {"masks": masks, "factors": factors, "logits": logits, "world_size": trainer.args.world_size,
            "wrapper": type(trainer.model_wrapped).__name__}


def _worker(rank: int, world: int, directory: str) -> None:
    torch.set_num_threads(1)
    # What torchrun sets: accelerate (inside Trainer) reads them and joins the process group created here.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        result = compress(rank, world, save_dir=os.path.join(directory, f"model-rank{rank}"))
        result["local_gradients"] = local_gradient_pruning(rank, world)
        result["trainer"] = with_trainer(os.path.join(directory, "trainer"), world)
        store = CheckpointStore(Path(directory) / f"run-rank{rank}")
        manifest = {"stages": []}
        store.commit(manifest, {"index": 0, "name": "dense"}, {"weight": torch.ones(2)})
        result["manifest"] = manifest
        torch.save(result, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(directory)), nprocs=WORLD, join=True)
    results = [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return directory, results


def test_ranks_agree_bitwise(ranks):
    _, (first, second) = ranks
    assert first["masks"].keys() == second["masks"].keys() and first["factors"].keys() == second["factors"].keys()
    for name in first["masks"]:
        assert torch.equal(first["grads"][name], second["grads"][name]), name
        assert torch.equal(first["masks"][name], second["masks"][name]), name
        assert torch.equal(first["scores"][name], second["scores"][name]), name
    for name in first["factors"]:
        assert all(torch.equal(a, b) for a, b in zip(first["factors"][name], second["factors"][name])), name
    assert torch.equal(first["logits"], second["logits"])


def test_ddp_equals_single_process_on_the_global_batch(ranks):
    _, (first, _) = ranks
    torch.set_num_threads(1)
    single = compress(0, 1)
    total = sum(m.numel() for m in single["masks"].values())
    assert sum(int(m.sum()) for m in first["masks"].values()) == round(KEEP * total)
    for name in single["masks"]:
        # After backward, a DDP rank's .grad is the gradient of the global-batch mean loss (the average of shards).
        torch.testing.assert_close(first["grads"][name], single["grads"][name], rtol=1e-4, atol=1e-7)
        assert torch.equal(first["masks"][name], single["masks"][name]), name
        torch.testing.assert_close(first["scores"][name], single["scores"][name], rtol=1e-4, atol=1e-9)
    for name in single["factors"]:  # the product: pooled covariances round differently (see the Trainer test)
        (u, v), (u1, v1) = first["factors"][name], single["factors"][name]
        torch.testing.assert_close(u @ v, u1 @ v1, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(first["logits"], single["logits"], rtol=1e-3, atol=1e-4)


def test_only_rank_zero_writes(ranks):
    directory, (first, second) = ranks
    assert first["written"] > 0 and (directory / "model-rank0" / "model.safetensors").is_file()
    assert second["written"] == 0 and not (directory / "model-rank1").exists()
    # Pipeline checkpoints: rank 0 writes state and manifest; every rank records the stage.
    assert (directory / "run-rank0" / "checkpoint" / "manifest.json").is_file()
    assert (directory / "run-rank0" / "checkpoint" / "stage0-dense.pt").is_file()
    assert not (directory / "run-rank1").exists()
    assert [s["name"] for s in first["manifest"]["stages"]] == [s["name"] for s in second["manifest"]["stages"]] \
        == ["dense"]


def test_rank_local_gradients_fail_at_first_mask_update(ranks):
    _, results = ranks
    for result in results:
        assert result["local_gradients"].startswith("step 4: pruning masks and importance scores differ between "
                                                    "ranks"), result["local_gradients"]


def test_trainer_callbacks_under_ddp(ranks, tmp_path):
    _, (first, second) = ranks
    assert [r["trainer"]["world_size"] for r in (first, second)] == [WORLD, WORLD]
    assert first["trainer"]["wrapper"] == "DistributedDataParallel"
    single = with_trainer(str(tmp_path), world=1)
    assert first["trainer"]["masks"].keys() == single["masks"].keys()
    for name in single["masks"]:
        assert torch.equal(first["trainer"]["masks"][name], second["trainer"]["masks"][name]), name
        assert torch.equal(first["trainer"]["masks"][name], single["masks"][name]), name
    for name in single["factors"]:
        for a, b in zip(first["trainer"]["factors"][name], second["trainer"]["factors"][name]):
            assert torch.equal(a, b), name
        # Against one process, the product: the covariance summed over the ranks differs from the one-process sum
        # in rounding, which may flip the sign of a factor pair (U_k, V_k) whose product is unchanged.
        (u, v), (u1, v1) = first["trainer"]["factors"][name], single["factors"][name]
        torch.testing.assert_close(u @ v, u1 @ v1, rtol=1e-3, atol=1e-4)
    assert torch.equal(first["trainer"]["logits"], second["trainer"]["logits"])
    torch.testing.assert_close(first["trainer"]["logits"], single["logits"], rtol=1e-3, atol=1e-4)


def test_launcher_rank_without_a_process_group(monkeypatch, tmp_path):
    """torchrun sets RANK and WORLD_SIZE; a program that creates no process group must still write on rank 0 only."""
    from lrsparse import distributed

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (1, 2, False)
    assert not distributed.is_distributed()  # no collectives without a group
    model = tiny_bert(seed=0)
    assert save_compressed(model, tmp_path / "rank1") == 0 and not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main_process()
    assert save_compressed(model, tmp_path / "rank0") > 0 and (tmp_path / "rank0" / "model.safetensors").is_file()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(ValueError, match="environment variable RANK must be an integer"):
        distributed.rank()
