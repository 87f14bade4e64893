"""Compression quality a reviewer can check: several seeds, full dev sets, the majority-class baseline beside every
number, degenerate runs marked.

    # the keep-0.25 grid, 3 seeds (hours on 2 CPU cores; resumable, extends the same results on every invocation)
    python benchmarks/quality.py --tasks stsb mrpc cola sst2 --presets dense svd fwsvd lpaf --keeps 0.25 \
        --seeds 0 1 2
    # other keeps for lpaf and svd
    python benchmarks/quality.py --tasks stsb mrpc --presets lpaf svd --keeps 0.5 0.1 --seeds 0 1 2
    # rewrite quality.md and the plots from quality.json
    python benchmarks/quality.py --render-only

Protocol. For each task and seed the dense model is fine-tuned from the pre-trained checkpoint (``--dense-epochs``,
the standard GLUE recipe of 3 epochs at lr 1e-4 for this small model); the dense rows report those runs. Every
compressed run starts from the seed-0 dense checkpoint of its task (the same model for every method and seed) and
trains ``--prune-epochs`` (pruning with the cubic schedule for lpaf; plain fine-tuning for svd/fwsvd) and
``--mixed-epochs`` (mixed-rank fine-tuning) with its own seed. Training uses the full training set of each task
(SST-2: a seeded ``--sst2-train-samples`` subset on CPU), evaluation the full dev set. A run with another budget
is a measurement of its own (its rows carry the epochs, its folders a suffix, its tables their own line), e.g. the
check that the dense baseline has converged::

    python benchmarks/quality.py --tasks cola --presets dense --dense-epochs 6 --seeds 0 1 2

Recipe variants. ``--variant NAME`` with recipe options (``--distill-weight``, ``--distill-hidden-weight``,
``--distill-teacher``, ``--mixed-rank``, ``--precision``, ``--device``) runs the compressed presets with them; the rows
carry ``variant`` and the options, and the tables show ``preset+variant`` as a method of its own. Example, LPAF with
distillation from the dense model (outputs and every layer's hidden states)::

    python benchmarks/quality.py --tasks mrpc --presets lpaf --variant kd --distill-weight 0.5 \
        --distill-hidden-weight 1.0

The ablations remove one LPAF component at a time with ``--set`` (any RecipeConfig or LPAFConfig field)::

    python benchmarks/quality.py --tasks mrpc stsb --presets lpaf --variant no-prune --set pruner=none
    python benchmarks/quality.py --tasks mrpc stsb --presets lpaf --variant no-activation --set factorizer=svd
    python benchmarks/quality.py --tasks mrpc stsb --presets lpaf --variant no-mixed --set mixed_rank=none

Results: ``<out>.json`` = ``{"majority": {task: score}, "rows": [...]}`` with one self-describing row per run,
``<out>.md`` with mean +- std tables, ``<out>_<task>.png``. A run scoring within 1 point of the majority-class
baseline (or below it) is marked degenerate. Each finished run is written at once; an interrupted run resumes
from its checkpoint on the next invocation. Several invocations may run at once with the same ``--out`` and
``--work-dir`` (e.g. one per core with ``--threads 1``): the results file and each task's dense training are locked,
so none of them loses another's rows or trains the same dense model twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from machine import software, vector_isa
from plotting import line_plot

from lrsparse.config import LPAFConfig
from lrsparse.data import get_task, load_glue
from lrsparse.metrics import compute_metrics
from lrsparse.pipeline import finetune_dense, run_compression
from lrsparse.recipe import RecipeConfig

# Runs within this many points (fractions: 0.01) of the majority-class score, or below it, are degenerate.
DEGENERATE_MARGIN = 0.01
MAIN_METRIC_NAMES = {"sst2": "accuracy", "mrpc": "F1", "stsb": "Pearson", "cola": "MCC"}
# The training budget of the grid (epochs per stage); a run with another budget is another measurement.
DEFAULT_EPOCHS = {"dense": 3.0, "prune": 3.0, "mixed": 2.0}


def cell(row: dict) -> tuple:
    """What makes two runs the same measurement (the seed included): task, method, keep, precision and budget."""
    epochs = tuple(sorted((stage, float(value)) for stage, value in row["epochs"].items()))
    return (row["task"], row["preset"], row["keep"], row["seed"], row.get("variant", ""),
            row.get("precision", "fp32"), epochs)


STAGE_COST_KEYS = ("seconds", "teacher_seconds", "teacher_bytes")


def stage_summary(stage: dict) -> dict:
    """A stage of a run's report as a row keeps it: its main metric and what it cost (seconds, and a distillation
    teacher's share of them and its memory), so a claim about a stage's time reads from the results file."""
    return {"name": stage["name"], "main": stage["metrics"]["main"],
            **{key: stage[key] for key in STAGE_COST_KEYS if key in stage}}


def budget_suffix(epochs: dict) -> str:
    """Run-folder suffix naming the stages whose epochs differ from the grid's (e.g. '-e-dense6'), so runs of
    different budgets never share a folder; '' for the grid's own budget (the folder names of the first runs)."""
    changed = [f"{stage}{value:g}" for stage, value in epochs.items() if float(value) != DEFAULT_EPOCHS[stage]]
    return "-e-" + "-".join(changed) if changed else ""


def majority_score(task: str, data_dir: str) -> float:
    """The main metric of predicting the most frequent training label (the training mean for regression, whose
    constant prediction has Pearson 0) on the whole dev set."""
    train, dev = load_glue(task, "train", data_dir), load_glue(task, "dev", data_dir)
    if get_task(task).is_regression:
        constant = sum(train.labels) / len(train.labels)
        return round(compute_metrics(task, torch.full((len(dev),), constant, dtype=torch.float64), dev.labels)["main"], 12)
    label = Counter(train.labels).most_common(1)[0][0]
    return compute_metrics(task, torch.full((len(dev),), label, dtype=torch.long), dev.labels)["main"]


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    # The vector ISA (AVX2 / AVX512): another one rounds the GEMMs differently, so the same seed trains other weights.
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads{gpu}, torch {torch.__version__}, {platform.platform()}, {vector_isa()}")


def weights_digest(folder: Path) -> str:
    """SHA-256 (first 16 hex digits) of a saved model's tensors, names and bytes in name order: two dense
    checkpoints with the same dev score may still differ in their last bits, and a run's pruning decisions amplify
    such a difference; the rows name the exact weights they started from."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class Results:
    """quality.json, rewritten (with the markdown and plots) after every finished run. Several invocations may share
    one results file (e.g. one process per core): every save takes a lock and first adds the rows the others wrote
    since, so no finished run is lost to a concurrent writer."""

    def __init__(self, out: Path):
        self.out = out
        self.json_path = out.with_suffix(".json")
        self.majority: dict[str, float] = {}
        self.rows: list[dict] = []
        self.add_saved()

    def add_saved(self) -> None:
        """Adds what the file holds and this object lacks (rows of cells it has not recorded, majority scores)."""
        saved = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}
        self.majority = {**saved.get("majority", {}), **self.majority}
        self.rows += [r for r in saved.get("rows", []) if not self.has(r)]

    def has(self, row: dict) -> bool:
        """Whether a run of the same cell and seed (see :func:`cell`) is already recorded."""
        key = cell(row)
        return any(cell(r) == key for r in self.rows)

    def add(self, row: dict, render: bool = True) -> None:
        row["degenerate"] = row["main"] <= self.majority[row["task"]] + DEGENERATE_MARGIN
        self.rows.append(row)
        self.save(render)

    def merge(self, other: Path) -> int:
        """Adds the rows of another results file (e.g. a GPU run's) that this one lacks; returns how many."""
        saved = json.loads(other.read_text())
        self.majority.update(saved.get("majority", {}))
        new = [r for r in saved.get("rows", []) if not self.has(r)]
        self.rows += new
        return len(new)

    def save(self, render: bool = True) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.json_path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.add_saved()  # what other processes sharing the file have written since this one read it
            # + 0.0 turns the -0.0 that a constant prediction's Pearson can round to into 0.0 (shown as "-0.0").
            self.majority = {task: score + 0.0 for task, score in self.majority.items()}
            payload = {"majority": self.majority, "degenerate_margin": DEGENERATE_MARGIN, "rows": self.rows}
            tmp = self.json_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            os.replace(tmp, self.json_path)
            if not render:  # e.g. on a GPU machine, whose results come back as few files as possible
                return
            markdown = to_markdown(self.majority, self.rows, self.json_path.name)
            self.out.with_suffix(".md").write_text(markdown)
            for task in sorted({r["task"] for r in self.rows}):
                plot(self.rows, task, self.majority.get(task), self.out.parent / f"{self.out.name}_{task}.png")


def method(row: dict) -> str:
    """The preset, with its recipe variant, a precision other than fp32 and a dense budget other than the grid's
    (e.g. lpaf+kd, svd (bf16), dense (6 epochs))."""
    precision = row.get("precision", "fp32")
    label = (row["preset"] + (f"+{row['variant']}" if row.get("variant") else "")
             + ("" if precision == "fp32" else f" ({precision})"))
    epochs = {stage: float(value) for stage, value in row.get("epochs", {}).items()}
    if any(value != DEFAULT_EPOCHS[stage] for stage, value in epochs.items()):
        label += f" ({epochs['dense']:g} epochs)" if row["preset"] == "dense" else f" (epochs {epochs_text(epochs)})"
    return label


def epochs_text(epochs: dict) -> str:
    return " / ".join(str(epochs.get(stage, "-")) for stage in DEFAULT_EPOCHS)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (1 seed)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def to_markdown(majority: dict, rows: list[dict], json_name: str = "quality.json") -> str:
    lines = ["# Compression quality: all-MiniLM-L6-v2 on GLUE (full dev sets)", "",
             "Main metric x 100, mean ± sample std over seeds (n = number of seeds). `majority` is the score of "
             "always predicting the most frequent training label (Pearson of a constant is 0). A run within 1 "
             "point of it, or below it, is degenerate (`deg.` counts them). Reproduce with the commands in "
             f"`benchmarks/quality.py`; every row of `{json_name}` holds its machine, date, budget and minutes "
             "(minutes per run: the mean over the runs that were not resumed after an interruption) and its "
             "`factorizer`: `lpaf` is LPAF's default recipe, whose factorizer is `activation` since 2026-12-01 "
             "(`lpaf+sparsity-aware` is the earlier default; a `+name` suffix is a recipe variant).", ""]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        first = task_rows[0]
        lines += [f"## {task} ({MAIN_METRIC_NAMES.get(task, 'main')}; majority {100 * majority[task]:.1f}; "
                  f"{first['train_examples']} training examples)", "",
                  "| preset | keep | n | main | deg. | epochs (dense / prune / mixed) | minutes per run | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in task_rows:
            groups.setdefault((method(r), r["keep"], epochs_text(r["epochs"])), []).append(r)
        for (preset, keep, epoch_text), group in sorted(groups.items(), key=lambda item: (-item[0][1], item[0][0],
                                                                                          item[0][2])):
            mains = [r["main"] for r in group]
            seeds = ", ".join(f"{r['seed']}: {100 * r['main']:.1f}{' (deg.)' if r['degenerate'] else ''}"
                              for r in sorted(group, key=lambda r: r["seed"]))
            # A resumed run's minutes miss the part of its interrupted stage that ran before the interruption.
            timed = [r["minutes"] for r in group if not r.get("resumed")]
            minutes = f"{statistics.mean(timed):.0f}" if timed else "-"
            lines.append(f"| {preset} | {keep} | {len(group)} | {mean_std(mains)} | "
                         f"{sum(r['degenerate'] for r in group)} | {epoch_text} | {minutes} | {seeds} |")
        lines.append("")
    return "\n".join(lines + variant_comparison(rows))


def variant_comparison(rows: list[dict], base: str = "lpaf") -> list[str]:
    """Each recipe variant of ``base`` (an ablation such as lpaf+no-mixed, or an alternative such as
    lpaf+sparsity-aware) against ``base`` itself at the same task, keep, precision and budget. A difference counts
    only when it exceeds the larger of the two seed standard deviations (the ablation target's "more than one standard
    deviation"); with fewer than 2 seeds on either side there is no spread to compare with and the verdict says so.
    The per-seed differences (same seed, same starting checkpoint) show whether the sign holds seed by seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["preset"] == base:
            key = (r["task"], r["keep"], r.get("precision", "fp32"), epochs_text(r["epochs"]), r.get("variant", ""))
            groups.setdefault(key, []).append(r)
    lines = []
    for (task, keep, precision, budget, variant), group in sorted(groups.items()):
        reference_rows = groups.get((task, keep, precision, budget, ""))
        if not variant or not reference_rows:
            continue
        values, reference = [r["main"] for r in group], [r["main"] for r in reference_rows]
        loss = statistics.mean(reference) - statistics.mean(values)
        if min(len(reference), len(values)) < 2:
            spread, verdict = "-", "no spread (n < 2)"
        else:
            larger = max(statistics.stdev(reference), statistics.stdev(values))
            spread = f"{100 * larger:.1f}"
            verdict = ("loses more than 1 std" if loss > larger else "gains more than 1 std" if -loss > larger
                       else "inside the noise")
            if min(len(reference), len(values)) < 3:
                verdict += " (n < 3)"
        by_seed = {r["seed"]: r["main"] for r in reference_rows}
        paired = ", ".join(f"{r['seed']}: {100 * (by_seed[r['seed']] - r['main']):+.1f}"
                           for r in sorted(group, key=lambda r: r["seed"]) if r["seed"] in by_seed)
        lines.append(f"| {task} | {keep} | {method(group[0])} | {len(values)} | {mean_std(values)} | "
                     f"{len(reference)} | {mean_std(reference)} | {100 * loss:+.1f} | {spread} | {verdict} | "
                     f"{paired or '-'} |")
    if not lines:
        return []
    return [f"## Recipe variants and ablations against {base}", "",
            f"`{base} - variant` is what the variant loses (positive: the variant is worse); `std` is the larger of "
            "the two sample standard deviations over seeds; `per seed` pairs the runs of the same seed.", "",
            f"| task | keep | variant | n | variant main | n ({base}) | {base} main | {base} - variant | std | "
            "verdict | per seed |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *lines, ""]


def plot(rows: list[dict], task: str, majority: float | None, path: Path) -> None:
    task_rows = [r for r in rows if r["task"] == task]
    with line_plot(path, "keep (fraction of target-layer parameters)",
                   f"{task} dev {MAIN_METRIC_NAMES.get(task, 'main')} x 100", f"{task}: mean ± std over seeds") as ax:
        dense_methods = sorted({method(r) for r in task_rows if r["preset"] == "dense"})
        for style, dense_method in zip(("--", "-.", ":"), dense_methods):  # reference levels, not points at keep 1
            dense = [100 * r["main"] for r in task_rows if method(r) == dense_method]
            mean, std = statistics.mean(dense), statistics.stdev(dense) if len(dense) > 1 else 0.0
            ax.axhline(mean, color="black", linestyle=style, label=f"{dense_method} (n={len(dense)})")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
        for preset in sorted({method(r) for r in task_rows} - set(dense_methods)):
            keeps = sorted({r["keep"] for r in task_rows if method(r) == preset})
            means, stds = [], []
            for keep in keeps:
                values = [100 * r["main"] for r in task_rows if method(r) == preset and r["keep"] == keep]
                means.append(statistics.mean(values))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(keeps, means, yerr=stds, marker="o", capsize=3, label=preset)
        if majority is not None:
            ax.axhline(100 * majority, color="gray", linestyle=":", label="majority class")


def parse_override(parser: argparse.ArgumentParser, item: str) -> dict:
    """``FIELD=VALUE`` of ``--set``: the field must be an option of the recipe or of the method."""
    field, sep, text = item.partition("=")
    known = {f.name for f in dataclasses.fields(RecipeConfig)} | {f.name for f in dataclasses.fields(LPAFConfig)}
    if not sep or field not in known:
        parser.error(f"--set expects FIELD=VALUE with FIELD one of the RecipeConfig or LPAFConfig fields, got {item!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return {field: value}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["stsb", "mrpc", "cola", "sst2"])
    parser.add_argument("--presets", nargs="+", default=["dense", "svd", "fwsvd", "lpaf"])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=os.environ.get("LRSPARSE_DATA_DIR", "../shared/data") + "/glue")
    parser.add_argument("--model", default=None, help="pre-trained checkpoint (default: the packaged MiniLM)")
    parser.add_argument("--sst2-train-samples", type=int, default=10000,
                        help="seeded SST-2 training subset (all 67,349 on a GPU: pass 0)")
    parser.add_argument("--dense-epochs", type=float, default=DEFAULT_EPOCHS["dense"])
    parser.add_argument("--prune-epochs", type=float, default=DEFAULT_EPOCHS["prune"])
    parser.add_argument("--mixed-epochs", type=float, default=DEFAULT_EPOCHS["mixed"])
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="add the rows of these results files (e.g. a GPU run's quality_<task>.json) to --out")
    parser.add_argument("--no-render", action="store_true", help="write the JSON only (no markdown or plots)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="cap every task's training set (dry runs only: rows record train_examples)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="cap the dev sets (dry runs only: such rows are not full-dev results)")
    parser.add_argument("--variant", default="", help="name of the recipe variant below (rows and tables)")
    parser.add_argument("--distill-weight", type=float, default=0.0)
    parser.add_argument("--distill-hidden-weight", type=float, default=0.0)
    parser.add_argument("--distill-teacher", default="dense", choices=["dense", "pruned"])
    parser.add_argument("--mixed-rank", default=None, help="mixed-rank strategy (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other recipe or method option (a RecipeConfig or LPAFConfig field; VALUE read as "
                             "JSON, else as a string), e.g. --set pruner=none: the ablations; repeatable")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    recipe_options = {"distill_weight": args.distill_weight, "distill_hidden_weight": args.distill_hidden_weight,
                      "distill_teacher": args.distill_teacher}
    if args.mixed_rank:
        recipe_options["mixed_rank"] = args.mixed_rank
    for item in args.overrides:
        recipe_options.update(parse_override(parser, item))
    if not args.variant and (args.distill_weight or args.distill_hidden_weight or args.mixed_rank or args.overrides):
        parser.error("recipe options change the method: name the variant with --variant")
    results = Results(args.out)
    if args.merge:
        for path in args.merge:
            print(f"{path}: {results.merge(path)} new rows")
        results.save()
        return
    if args.render_only:
        results.save()
        return
    render = not args.no_render
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    for task in args.tasks:
        if task not in results.majority:
            results.majority[task] = majority_score(task, args.data_dir)
            results.save(render)
        train_samples = (args.sst2_train_samples or None) if task == "sst2" else None
        if args.train_samples:
            train_samples = min(train_samples or args.train_samples, args.train_samples)
        base = {"data_dir": args.data_dir, "max_train_samples": train_samples, "max_seq_len": args.max_seq_len,
                "dense_epochs": args.dense_epochs, "prune_epochs": args.prune_epochs,
                "mixed_epochs": args.mixed_epochs, "device": args.device, "precision": args.precision,
                "max_eval_samples": args.eval_samples}
        if args.model:
            base["model"] = args.model

        suffix = "" if args.precision == "fp32" else f"-{args.precision}"  # a bf16 grid has its own runs
        dense_epochs = {"dense": args.dense_epochs}
        epochs = {**dense_epochs, "prune": args.prune_epochs, "mixed": args.mixed_epochs}

        def dense_dir(seed: int) -> Path:
            return args.work_dir / task / f"dense-seed{seed}{suffix}{budget_suffix(dense_epochs)}"

        def ensure_dense(seed: int) -> dict:
            folder = dense_dir(seed)
            # Several processes may share a work folder (one per task and seed on a GPU): every one of them needs
            # the seed-0 dense model, which exactly one of them must train while the others wait for it.
            folder.parent.mkdir(parents=True, exist_ok=True)
            with open(folder.parent / f"{folder.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (folder / "dense_metrics.json").exists():
                    finetune_dense(RecipeConfig.create(task, 1.0, str(folder), seed=seed, **base), folder)
            return json.loads((folder / "dense_metrics.json").read_text())

        # Seeds outermost: an interrupted grid has every preset at the first seeds rather than one preset at all.
        for keep in args.keeps:
            for seed in args.seeds:
                for preset in args.presets:
                    results.add_saved()  # a process sharing the results file may have run this cell since
                    if preset == "dense":
                        if results.has({"task": task, "preset": "dense", "keep": 1.0, "seed": seed,
                                        "precision": args.precision, "epochs": dense_epochs}):
                            continue
                        dense = ensure_dense(seed)
                        results.add({"task": task, "preset": "dense", "keep": 1.0, "seed": seed,
                                     "main": dense["metrics"]["main"], "metrics": dense["metrics"],
                                     "train_examples": dense["train_examples"],
                                     "epochs": dense_epochs, "minutes": dense["seconds"] / 60,
                                     "machine": machine(), "software": software(), "precision": args.precision,
                                     "date": now(), "weights": weights_digest(dense_dir(seed))}, render)
                        continue
                    if results.has({"task": task, "preset": preset, "keep": keep, "seed": seed,
                                    "variant": args.variant, "precision": args.precision, "epochs": epochs}):
                        continue
                    ensure_dense(0)
                    name = preset + (f"+{args.variant}" if args.variant else "")
                    run_dir = args.work_dir / task / f"{name}-keep{keep}-seed{seed}{suffix}{budget_suffix(epochs)}"
                    # Every method starts from the seed-0 dense checkpoint (base["model"] is what that was tuned from).
                    options = {**base, **recipe_options, "model": str(dense_dir(0))}
                    config = RecipeConfig.create(task, keep, str(run_dir), method=preset, seed=seed, resume=True,
                                                 **options)
                    t0 = time.time()
                    resumed = (run_dir / "checkpoint" / "manifest.json").is_file()
                    report = run_compression(config)
                    params = report["params"]
                    ranks = [layer["rank"] for layer in report["layers"] if layer.get("rank")]
                    results.add({
                        "task": task, "preset": preset, "keep": keep, "seed": seed,
                        **({"variant": args.variant, "recipe": recipe_options} if args.variant else {}),
                        "main": report["final_metrics"]["main"], "metrics": report["final_metrics"],
                        "train_examples": report.get("train_examples"),
                        "epochs": epochs,
                        # A resumed run's stages ran in several processes: their recorded times add up (the
                        # part of a stage lost to the interruption is not counted: "resumed" says so).
                        "minutes": sum(stage.get("seconds", 0.0) for stage in report["stages"]) / 60
                        if resumed else report.get("run_seconds", time.time() - t0) / 60,
                        "resumed": resumed,
                        "machine": machine(), "software": software(), "precision": args.precision, "date": now(),
                        "start_weights": weights_digest(dense_dir(0)),
                        "target_params_retained": params["target_compressed"] / params["target_dense"],
                        "mean_rank": sum(ranks) / len(ranks) if ranks else None,
                        "factorizer": report["factorization"],  # what the preset meant when it ran
                        "stages": [stage_summary(stage) for stage in report["stages"]],
                    }, render)


if __name__ == "__main__":
    main()
