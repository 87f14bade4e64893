"""Compression quality: every method of the pipeline on real GLUE data with the real MiniLM model, same training
budget and seed for all, plus the rank of first-order vs magnitude pruned matrices.

    # issue table: SST-2 (full dev set), keep 0.25, six methods
    python benchmarks/compression.py --tasks sst2 --keeps 0.25 --out benchmarks/results/compression_sst2
    # the full grid (hours on 2 cores): four tasks x three keeps, with the LPAF ablations
    python benchmarks/compression.py --tasks sst2 mrpc cola stsb --keeps 0.5 0.25 0.15 --ablations \
        --out benchmarks/results/compression

Each task is fine-tuned densely once (``lrsparse.pipeline.finetune_dense``); every method then compresses that same
dense model through ``run_compression`` with the same number of pruning/fine-tuning and mixed-rank steps. Writes
``<out>.json``, ``<out>.md`` and ``<out>_<task>.png`` (metric vs fraction of target parameters retained).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from plotting import line_plot

from lrsparse.pipeline import finetune_dense, run_compression
from lrsparse.recipe import RecipeConfig

METHODS = ["prune-only", "svd", "fwsvd", "magnitude-svd", "lpaf"]
# LPAF ablations: (label, config overrides)
ABLATIONS = [
    ("lpaf: plain svd factorization", {"factorizer": "svd"}),
    ("lpaf: no mixed-rank (alpha=1)", {"mixed_rank": "none"}),
    ("lpaf: uniform ranks", {"rank_allocation": "uniform"}),
    ("lpaf: energy ranks", {"rank_allocation": "energy"}),
]


def rank_statistics(model_dir: Path, density: float, first_order_masks: dict | None) -> dict:
    """Average rank of the target matrices: dense, first-order pruned (from the prune-only run) and global magnitude
    pruning of the same dense model to the same density.

    Ranks: numerical rank = number of singular values > 1e-3 * largest; 90%-energy rank = smallest r whose top-r
    squared singular values hold 90% of the squared Frobenius norm.
    """
    from transformers import AutoModelForSequenceClassification

    from lrsparse.targets import find_targets

    def ranks(matrix: torch.Tensor) -> tuple[int, int]:
        s = torch.linalg.svdvals(matrix.double())
        numerical = int((s > 1e-3 * s[0]).sum()) if s[0] > 0 else 0
        energy = torch.cumsum(s.square(), 0) / s.square().sum()
        return numerical, int((energy < 0.9).sum()) + 1

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    targets = find_targets(model)
    weights = {name: m.weight.detach() for name, m in targets.items()}
    scores = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    k = int(round(density * scores.numel()))
    threshold = torch.topk(scores, k).values[-1]
    out = {"rank_definition": "numerical: singular values > 1e-3 * max; energy90: smallest r holding 90% of ||W||_F^2"}
    variants = {"dense": {n: w for n, w in weights.items()},
                "magnitude": {n: w * (w.abs() >= threshold) for n, w in weights.items()}}
    if first_order_masks is not None:
        variants["first_order"] = first_order_masks
    for label, mats in variants.items():
        r = [ranks(m) for m in mats.values()]
        out[label] = {"numerical_rank": sum(a for a, _ in r) / len(r), "energy90_rank": sum(b for _, b in r) / len(r)}
    out["mean_min_dim"] = sum(min(w.shape) for w in weights.values()) / len(weights)
    return out


def first_order_pruned_weights(run_dir: Path) -> dict:
    """Target matrices of a prune-only run's saved sparse model."""
    from transformers import AutoModelForSequenceClassification

    from lrsparse.targets import find_targets

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    return {name: m.weight.detach() for name, m in find_targets(model).items()}


def plot(results: list[dict], task: str, path: Path) -> None:
    rows = [r for r in results if r["task"] == task]
    with line_plot(path, "fraction of target-layer parameters retained", f"{task} dev {rows[0]['metric']}",
                   f"{task}: metric vs parameters retained") as ax:
        dense = [r for r in rows if r["method"] == "dense"]
        for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
            pts = sorted((r["target_params_retained"], r["main"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense:
            ax.axhline(dense[0]["main"], color="black", linestyle="--", label="dense")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ablations", action="store_true", help="also run the LPAF ablations")
    parser.add_argument("--data-dir", default=os.environ.get("LRSPARSE_DATA_DIR", "../shared/data") + "/glue")
    parser.add_argument("--model", default=None, help="pre-trained checkpoint (default: the packaged MiniLM)")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--dense-train-samples", type=int, default=None,
                        help="training examples of the one dense fine-tuning per task (default: --train-samples); "
                             "tasks such as CoLA need more than the compression budget to learn at all")
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the whole dev set")
    parser.add_argument("--dense-epochs", type=float, default=2.0)
    parser.add_argument("--prune-epochs", type=float, default=2.0)
    parser.add_argument("--mixed-epochs", type=float, default=1.0)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/compression"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression"))
    parser.add_argument("--render-only", action="store_true", help="rewrite <out>.md and plots from <out>.json")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(to_markdown(report))
        for task in {r["task"] for r in report["results"]}:
            plot(report["results"], task, args.out.parent / f"{args.out.name}_{task}.png")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    base = {"data_dir": args.data_dir, "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
            "dense_epochs": args.dense_epochs, "prune_epochs": args.prune_epochs, "mixed_epochs": args.mixed_epochs,
            "max_seq_len": args.max_seq_len, "seed": args.seed}
    if args.model:
        base["model"] = args.model
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    # An existing report is extended, not replaced: finished (task, method, keep) cells are skipped, so the grid can
    # be run in several invocations (or resumed after an interruption) into the same --out.
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    results: list[dict] = previous.get("results", [])
    extras: dict = previous.get("ranks", {})
    done = {(r["task"], r["method"], r["keep"]) for r in results}
    started = time.time() - previous.get("seconds", 0.0)

    def save():
        report = {
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "budget": base, "results": results, "ranks": extras, "seconds": time.time() - started,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(to_markdown(report))
        for task in {r["task"] for r in results}:
            plot(results, task, args.out.parent / f"{args.out.name}_{task}.png")

    runs = [(m, {}) for m in args.methods] + (ABLATIONS if args.ablations else [])
    for task in args.tasks:
        dense_dir = args.work_dir / task / "dense"
        if not (dense_dir / "dense_metrics.json").exists():
            dense_budget = {**base, "max_train_samples": args.dense_train_samples or args.train_samples}
            finetune_dense(RecipeConfig.create(task, 1.0, str(dense_dir), **dense_budget), dense_dir)
        dense = json.loads((dense_dir / "dense_metrics.json").read_text())
        if (task, "dense", 1.0) not in done:
            results.append({"task": task, "method": "dense", "keep": 1.0, "main": dense["metrics"]["main"],
                            "metric": "main", "metrics": dense["metrics"], "target_params_retained": 1.0,
                            "seconds": dense["seconds"], "train_examples": dense["train_examples"],
                            "eval_examples": dense["eval_examples"]})
            save()
        for keep in args.keeps:
            for label, overrides in runs:
                method = overrides.get("method", label if not overrides else "lpaf")
                if (task, label, keep) in done:
                    continue
                run_dir = args.work_dir / task / f"{label.replace(' ', '_').replace(':', '').replace('(', '').replace(')', '').replace('=', '')}-keep{keep}"
                config = RecipeConfig.create(task, keep, str(run_dir), method=method, model=str(dense_dir),
                                             resume=True, **{**base, **overrides})
                report = run_compression(config)
                params = report["params"]
                results.append({
                    "task": task, "method": label, "keep": keep, "main": report["final_metrics"]["main"],
                    "metric": "main", "metrics": report["final_metrics"],
                    "target_params_retained": params["target_compressed"] / params["target_dense"],
                    "params": params, "seconds": report.get("run_seconds"),
                    "mean_rank": (sum(l["rank"] for l in report["layers"] if l.get("rank")) /
                                  max(1, sum(1 for l in report["layers"] if l.get("rank")))),
                    "stages": [{"name": s["name"], "main": s["metrics"]["main"]} for s in report["stages"]],
                })
                save()
                if label == "prune-only":
                    extras[f"{task} keep {keep}"] = rank_statistics(dense_dir, keep,
                                                                    first_order_pruned_weights(run_dir))
                    save()
    save()


def to_markdown(report: dict) -> str:
    b = report["budget"]
    lines = [
        f"# Compression quality ({report['date']})", "",
        f"Machine: {report['machine']['platform']}, {report['machine']['threads']} threads, torch "
        f"{report['machine']['torch']}. Model: all-MiniLM-L6-v2 (real checkpoint), fine-tuned densely once per task.",
        f"Budget for every method: {b['max_train_samples']} training examples (seeded subset), dense "
        f"{b['dense_epochs']} epochs, pruning/fine-tuning {b['prune_epochs']} epochs, mixed-rank {b['mixed_epochs']} "
        f"epochs, max_seq_len {b['max_seq_len']}, seed {b['seed']}; evaluation on the "
        f"{'whole dev set' if b['max_eval_samples'] is None else str(b['max_eval_samples']) + ' dev examples'}.",
        f"Reproduce: `python benchmarks/compression.py` with the arguments in its docstring "
        f"(total {report['seconds'] / 60:.0f} min).", "",
        "| task | keep | method | main metric | all metrics | target params retained | mean rank | minutes | main after each stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k != "main")
        stages = " -> ".join(f"{s['name']} {s['main']:.4f}" for s in r.get("stages", []))
        rank = f"{r['mean_rank']:.1f}" if r.get("mean_rank") else "-"
        method = r["method"]
        if method == "dense" and r.get("train_examples") not in (None, b["max_train_samples"]):
            method += f" (fine-tuned on {r['train_examples']} examples)"
        minutes = f"{r['seconds'] / 60:.1f}" if r.get("seconds") else "-"
        lines.append(f"| {r['task']} | {r['keep']} | {method} | **{r['main']:.4f}** | {metrics} | "
                     f"{r['target_params_retained']:.3f} | {rank} | {minutes} | {stages} |")
    if report["ranks"]:
        lines += ["", "## Rank of pruned matrices (average over the 36 target matrices)", ""]
        for key, stats in report["ranks"].items():
            lines.append(f"{key} ({stats['rank_definition']}; mean min(m, n) = {stats['mean_min_dim']:.0f}):")
            lines.append("")
            lines.append("| matrices | numerical rank | 90%-energy rank |")
            lines.append("|---|---|---|")
            labels = {"dense": "dense fine-tuned", "first_order": "first-order pruned (the prune-only run)",
                      "magnitude": "magnitude pruned (one-shot global |w|, same density)"}
            for label, title in labels.items():
                if label in stats:
                    lines.append(f"| {title} | {stats[label]['numerical_rank']:.1f} | "
                                 f"{stats[label]['energy90_rank']:.1f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
