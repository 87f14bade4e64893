"""LPAF with an ordinary ``transformers.Trainer``: prune while fine-tuning, factorize, mixed-rank fine-tune, save.

Single process (the packaged all-MiniLM-L6-v2, local GLUE data)::

    python examples/trainer_compress.py --task sst2 --keep 0.25 --data-dir ../shared/data/glue \\
        --max-train-samples 2000 --output runs/trainer-sst2

Two processes with DDP (CPU: gloo; on GPUs drop --cpu and use nccl)::

    torchrun --nproc_per_node 2 examples/trainer_compress.py --task sst2 --keep 0.25 \\
        --data-dir ../shared/data/glue --max-train-samples 2000 --output runs/trainer-sst2-ddp --cpu

``--tensorboard DIR`` writes density, alpha, loss and the dev metric for TensorBoard (needs ``pip install
tensorboard``). The checkpoint has no trained head for the task, so the pruning phase also trains the new head.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from lrsparse.data import PaddingCollator, TokenizedDataset, get_task, load_glue
from lrsparse.distributed import is_main_process
from lrsparse.factorization import factorize_model
from lrsparse.hf import MixedRankCallback, PruningCallback
from lrsparse.io import save_compressed
from lrsparse.metrics import compute_metrics
from lrsparse.pipeline import default_model

log = logging.getLogger("lrsparse.examples.trainer_compress")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--keep", type=float, default=0.25, help="density of the pruned target matrices")
    parser.add_argument("--data-dir", required=True, help="folder holding the GLUE task folders (SST-2/, ...)")
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--prune-epochs", type=float, default=2.0)
    parser.add_argument("--mixed-epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="steps per phase (overrides the epochs)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--factorization-iters", type=int, default=100, help="EM iterations of the weighted SVD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard", metavar="DIR", default=None, help="write TensorBoard scalars to DIR")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (DDP over gloo under torchrun)")
    return parser.parse_args(argv)


def training_args(args, phase: str, epochs: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=os.path.join(args.output, f"trainer-{phase}"), num_train_epochs=epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, learning_rate=args.lr,
        weight_decay=0.01, warmup_steps=0.06, max_grad_norm=1.0, eval_strategy="no", save_strategy="no",
        logging_steps=10, report_to="none", seed=args.seed, use_cpu=args.cpu,
        # Otherwise Trainer multiplies the loss by the world size for models whose loss ignores num_items_in_batch
        # (sequence classification): the gradients (and the logged loss) would be world_size times too large.
        average_tokens_across_devices=False,
        ddp_backend="gloo" if args.cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The process group starts inside TrainingArguments; torchrun's RANK tells the main process before that.
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_set = TokenizedDataset(load_glue(task.name, "train", args.data_dir, args.max_train_samples, args.seed),
                                 tokenizer, args.max_seq_len)
    eval_set = TokenizedDataset(load_glue(task.name, "dev", args.data_dir, args.max_eval_samples, args.seed),
                                tokenizer, args.max_seq_len)
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    torch.manual_seed(args.seed)  # the new head: the same on every rank
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=task.num_labels, ignore_mismatched_sizes=True, dtype=torch.float32,
        problem_type="regression" if task.is_regression else "single_label_classification")

    def metrics(prediction) -> dict:
        return compute_metrics(task.name, torch.as_tensor(prediction.predictions),
                               torch.as_tensor(prediction.label_ids))

    tensorboard = None if args.tensorboard is None else Path(args.tensorboard)

    # Phase 1: first-order pruning while fine-tuning.
    pruning = PruningCallback(args.keep, delta_t=args.delta_t,
                              tensorboard_dir=None if tensorboard is None else str(tensorboard / "pruning"))
    trainer = Trainer(model=model, args=training_args(args, "prune", args.prune_epochs), train_dataset=train_set,
                      eval_dataset=eval_set, data_collator=collate, compute_metrics=metrics, callbacks=[pruning])
    trainer.train()
    pruned = trainer.evaluate()
    log.info("pruned to density %.4f: %s", pruning.pruner.density(), pruned)

    # Factorize (every rank computes the same factors from the same masks and scores), then phase 2 in a new
    # Trainer: its optimizer is built from the factorized model (U, V, and the sparse weights until alpha = 1).
    layers = factorize_model(model, keep=args.keep, pruner=pruning.pruner,
                             solver_options={"max_iters": args.factorization_iters, "seed": args.seed})
    mixing = MixedRankCallback(keep=args.keep, tensorboard_dir=None if tensorboard is None else str(tensorboard / "mixed"))
    trainer = Trainer(model=model, args=training_args(args, "mixed", args.mixed_epochs), train_dataset=train_set,
                      eval_dataset=eval_set, data_collator=collate, compute_metrics=metrics, callbacks=[mixing])
    trainer.train()
    final = trainer.evaluate()
    log.info("low-rank model: %s", final)
    for callback in (pruning, mixing):
        callback.close()

    written = save_compressed(model.cpu(), Path(args.output) / "model", tokenizer=tokenizer)  # rank 0 only
    summary = {"task": task.name, "keep": args.keep, "density": pruning.pruner.density(),
               "pruned_eval": pruned, "final_eval": final,
               "ranks": {layer.name: layer.rank for layer in layers}, "checkpoint_bytes": written}
    if is_main_process():
        (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", Path(args.output) / "model")
    return summary


if __name__ == "__main__":
    main()
