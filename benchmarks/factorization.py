"""Factorizers compared right after factorization (no training after it): dev metric and per-layer output error.

    # a fine-tuned dense checkpoint, e.g. from the quality grid: runs/quality/cola/dense-seed0
    PYTHONPATH=python python benchmarks/factorization.py --task cola --model runs/quality/cola/dense-seed0 \
        --data-dir ../shared/data/glue --keeps 0.5 0.25 --json benchmarks/results/factorization_cola.json \
        --markdown benchmarks/results/factorization_cola.md [--prune-epochs 3]

Statistics (importance, Fisher) come from a first-order pruner: at density 1 over --stat-batches training batches
without any weight update (the dense model stays as it is), or, with --prune-epochs, from LPAF's pruning stage
itself (fine-tuning while pruning to each keep; the factorizers then compare on that same pruned model, as in the
pipeline). Activation-aware factorizers calibrate on --calibration-samples training examples; the output error is
measured on other, held-out training examples: per layer ``||(W - U V) X^T|| / ||W X^T||`` with ``W`` the matrix
factorized (the pruned weight after pruning). Every factorizer gets the same budget ranks at a keep.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lrsparse
from lrsparse.activation import input_covariances
from lrsparse.data import PaddingCollator
from lrsparse.factorization import factorize_model
from lrsparse.layers import finalize_low_rank
from lrsparse.modeling import load_task_model
from lrsparse.pruning import FirstOrderPruner
from lrsparse.recipe import RecipeConfig
from lrsparse.tasks import resolve_task
from lrsparse.training import evaluate, steps_for, train

FACTORIZERS = ("svd", "fwsvd", "sparsity-aware", "activation", "activation-importance")


def batches_of(dataset, indices, size, collate):
    return [collate([dataset[i] for i in indices[start:start + size]]) for start in range(0, len(indices), size)]


@torch.no_grad()
def output_errors(model, names, weights, covariances) -> dict[str, float]:
    """Relative output error of each factorized layer on inputs of the given (held-out) covariance."""
    errors = {}
    for name in names:
        module = model.get_submodule(name)
        w = weights[name].double()
        residual = w - (module.U @ module.V).double()
        c = covariances[name]
        errors[name] = float(torch.sqrt(torch.trace(residual @ c @ residual.t()) / torch.trace(w @ c @ w.t())))
    return errors


def statistics_pruner(model, args, dataset, collate, keep: float | None, device):
    """A first-order pruner holding importance and Fisher: LPAF's pruning stage to ``keep`` (training), or
    gradients of --stat-batches batches at density 1 without updating the model."""
    if keep is not None:
        recipe = RecipeConfig.create(args.task, keep, "unused", max_seq_len=args.max_seq_len,
                                     checkpoint_every=0, device=str(device))
        steps = steps_for(args.prune_epochs, len(dataset), recipe.batch_size)
        # A factorizer that needs Fisher makes the pruner track it: every factorizer then compares on this one
        # pruned model (the pruning itself does not depend on the factorizer).
        compressor = lrsparse.prepare(model, recipe.lpaf.replace(factorizer="fwsvd"), total_steps=steps)
        train(model, dataset, recipe, steps, 1, f"prune to {keep}", collate, device, compressor)
        return compressor.pruner
    steps = args.stat_batches
    pruner = FirstOrderPruner(model, 1.0, steps + 1)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1)).tolist()
    model.train()
    for batch in batches_of(dataset, order[:steps * 32], 32, collate):
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        pruner.step()  # reads the gradients; at density 1 no mask changes, and no optimizer step is taken
        model.zero_grad(set_to_none=True)
    return pruner


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned checkpoint with the task's head")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--factorizers", nargs="+", default=list(FACTORIZERS))
    parser.add_argument("--stat-batches", type=int, default=64)
    parser.add_argument("--prune-epochs", type=float, default=0.0, help="0: factorize the dense model")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine_info, save_report
    from transformers import AutoTokenizer

    device = torch.device("cpu")
    task = resolve_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    train_set = task.tokenize(task.load("train", args.data_dir, None, 0), tokenizer, args.max_seq_len)
    dev_set = task.tokenize(task.load("dev", args.data_dir, None, 0), tokenizer, args.max_seq_len)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
    calibration = batches_of(train_set, order[:args.calibration_samples], 64, collate)
    held_out = batches_of(train_set, order[args.calibration_samples:2 * args.calibration_samples], 64, collate)
    dense = load_task_model(args.model, task, keep_head=True).to(device)
    rows = [{"keep": 1.0, "factorizer": "dense", "main": evaluate(dense, dev_set, task, 64, collate, device)["main"]}]
    print(json.dumps(rows[-1]), flush=True)
    shared_pruner = None if args.prune_epochs else statistics_pruner(dense, args, train_set, collate, None, device)
    for keep in args.keeps:
        base, pruner = dense, shared_pruner
        if args.prune_epochs:
            base = copy.deepcopy(dense)
            pruner = statistics_pruner(base, args, train_set, collate, keep, device)
            rows.append({"keep": keep, "factorizer": "pruned (not factorized)",
                         "main": evaluate(base, dev_set, task, 64, collate, device)["main"]})
        targets = dict(pruner.targets)
        weights = {name: module.weight.detach().clone() for name, module in targets.items()}
        held_out_cov = input_covariances(base, targets, held_out)
        for method in args.factorizers:
            model, method_pruner = copy.deepcopy((base, pruner))
            method_targets = dict(method_pruner.targets)
            covariances = input_covariances(model, method_targets, calibration) if method.startswith(
                "activation") else None
            start = time.perf_counter()
            records = factorize_model(model, keep, method=method, allocation="budget", pruner=method_pruner,
                                      targets=method_targets, input_covariances=covariances)
            seconds = time.perf_counter() - start
            errors = output_errors(model, list(method_targets), weights, held_out_cov)
            finalize_low_rank(model)
            metrics = evaluate(model, dev_set, task, 64, collate, device)
            rows.append({"keep": keep, "factorizer": method, "main": metrics["main"], "metrics": metrics,
                         "seconds": seconds, "output_error_mean": statistics.mean(errors.values()),
                         "output_error_max": max(errors.values()), "output_errors": errors,
                         "weight_error_mean": statistics.mean(r.relative_error for r in records)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "output_errors"}), flush=True)
    report = {"machine": machine_info(), "task": args.task, "model": args.model, "rows": rows,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}}
    save_report(report, to_markdown(report), args.json, args.markdown)
    return report


def to_markdown(report: dict) -> str:
    s = report["settings"]
    source = (f"LPAF's pruning stage ({s['prune_epochs']} epochs) to each keep, then each factorizer on that pruned "
              "model" if s["prune_epochs"] else f"the dense model, statistics from {s['stat_batches']} batches of "
              "gradients without weight updates")
    lines = [f"# Factorizers right after factorization: {report['task']} ({report['machine']['date']})", "",
             f"Model {report['model']}; {source}; budget ranks; full dev set, no training after factorization. "
             f"Output error: relative, per layer, on {s['calibration_samples']} held-out training examples "
             f"(activation-aware factorizers calibrate on {s['calibration_samples']} others). Command: "
             f"`python benchmarks/factorization.py --task {report['task']} --model MODEL --keeps "
             f"{' '.join(map(str, s['keeps']))}{' --prune-epochs ' + str(s['prune_epochs']) if s['prune_epochs'] else ''}`.",
             "", "| keep | factorizer | dev main x 100 | output error mean | output error max | weight error mean "
             "| seconds |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "output_error_mean" not in r:
            lines.append(f"| {r['keep']} | {r['factorizer']} | {100 * r['main']:.1f} | - | - | - | - |")
            continue
        lines.append(f"| {r['keep']} | {r['factorizer']} | {100 * r['main']:.1f} | {r['output_error_mean']:.3f} | "
                     f"{r['output_error_max']:.3f} | {r['weight_error_mean']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
