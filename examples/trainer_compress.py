"""LPAF with an ordinary ``transformers.Trainer``: prune while fine-tuning, factorize, mixed-rank fine-tune, save.

One :class:`lrsparse.Compressor` goes through two Trainer runs, driven by one ``lrsparse.hf.CompressorCallback``.
The method's options are the flags of ``lrsparse compress`` (generated from :class:`lrsparse.LPAFConfig`: ``--keep``,
``--delta-t``, ``--factorization``, ``--blend-fraction``, ... over the ``--method`` preset); the other flags are
this example's own.

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
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

import lrsparse
from lrsparse.cli import add_dataclass_arguments
from lrsparse.data import PaddingCollator, TokenizedDataset, get_task, load_glue
from lrsparse.distributed import is_main_process
from lrsparse.hf import CompressorCallback
from lrsparse.metrics import compute_metrics
from lrsparse.modeling import load_task_model
from lrsparse.recipe import RecipeConfig

log = logging.getLogger("lrsparse.examples.trainer_compress")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    example = parser.add_argument_group("example")
    # The recipe options the example shares with `lrsparse compress`, from the same dataclass (one name, default
    # and help each); --data-dir is required here (the example reads local GLUE files).
    add_dataclass_arguments(example, RecipeConfig, only=("task", "output_dir", "model", "data_dir",
                                                         "max_train_samples", "max_eval_samples", "max_seq_len",
                                                         "batch_size", "lr", "seed", "tensorboard_dir"))
    example.add_argument("--epochs", type=float, default=2.0, help="epochs of each phase")
    example.add_argument("--max-steps", type=int, default=-1, help="steps of each phase (overrides --epochs)")
    example.add_argument("--cpu", action="store_true", help="train on CPU (DDP over gloo under torchrun)")
    method = parser.add_argument_group("method (override the --method preset)")
    add_dataclass_arguments(method, RecipeConfig, only=("method",))
    lpaf_defaults = dataclasses.asdict(lrsparse.PRESETS["lpaf"])
    add_dataclass_arguments(method, lrsparse.LPAFConfig,
                            preset_defaults={k: v for k, v in lpaf_defaults.items() if k != "keep"})
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir is required: the folder holding the GLUE task folders (SST-2/, ...)")
    try:
        args.lpaf = method_config(args)  # a bad option fails here, before anything is loaded
    except ValueError as exc:
        parser.error(str(exc))
    return args


def method_config(args: argparse.Namespace) -> lrsparse.LPAFConfig:
    """The --method preset with the method flags given on the command line."""
    values = vars(args)
    overrides = {f.name: values[f.name] for f in dataclasses.fields(lrsparse.LPAFConfig)
                 if values.get(f.name) is not None}
    return lrsparse.PRESETS[args.method].replace(**overrides)


def training_args(args, phase: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=os.path.join(args.output_dir, f"trainer-{phase}"), num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.06, max_grad_norm=1.0, eval_strategy="no",
        save_strategy="no", logging_steps=10, report_to="none", seed=args.seed, use_cpu=args.cpu,
        # Otherwise Trainer multiplies the loss by the world size for models whose loss ignores num_items_in_batch
        # (sequence classification): the gradients (and the logged loss) would be world_size times too large.
        average_tokens_across_devices=False,
        ddp_backend="gloo" if args.cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = args.lpaf
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
    model = load_task_model(args.model, task, keep_head=False)

    def metrics(prediction) -> dict:
        return compute_metrics(task.name, torch.as_tensor(prediction.predictions),
                               torch.as_tensor(prediction.label_ids))

    def run_phase(phase: str) -> dict:
        # A new Trainer per phase: after factorize() its optimizer must be built from the factorized model
        # (U, V, and the sparse weights until alpha reaches 1). The same callback drives both runs.
        trainer = Trainer(model=model, args=training_args(args, phase), train_dataset=train_set,
                          eval_dataset=eval_set, data_collator=collate, compute_metrics=metrics, callbacks=[callback])
        trainer.train()
        return trainer.evaluate()

    # Phase 1: fine-tuning while pruning; its length is the Trainer's max_steps.
    compressor = lrsparse.prepare(model, config, seed=args.seed)
    callback = CompressorCallback(compressor, tensorboard_dir=args.tensorboard_dir)
    pruned = run_phase("prune")
    density = compressor.density()  # None without a pruner (plain fine-tuning)
    log.info("after phase 1 (density %s): %s", density, pruned)
    final = pruned
    if config.factorizes:
        # Every rank computes the same factors from the same masks and scores; an activation-aware factorizer (the
        # default) also fits each layer's outputs on calibration inputs: the first config.calibration_samples
        # training examples, read from this loader.
        compressor.factorize(calibration=torch.utils.data.DataLoader(train_set, batch_size=64, collate_fn=collate))
        final = run_phase("mixed")
        log.info("low-rank model: %s", final)
    callback.close()

    out = Path(args.output_dir) / "model"
    written = lrsparse.save_compressed(model.cpu(), out, tokenizer=tokenizer, config=compressor.config,
                                       records=compressor.records)  # rank 0 only
    summary = {"task": task.name, "config": config.to_dict(), "density": density,
               "phase1_eval": pruned, "final_eval": final,
               "ranks": {r.name: r.rank for r in compressor.records}, "checkpoint_bytes": written}
    if is_main_process():
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out)
    return summary


if __name__ == "__main__":
    main()
