"""``report.json`` of a compression run: building it, checking its schema, and printing it as tables."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# 2: layers are LayerRecord dicts (factorizer, kind, masked, bias); 1: lrsparse 0.1 (layers had "method").
REPORT_FORMAT = 2
PARAM_KEYS = ("target_dense", "target_compressed", "non_embedding_dense", "non_embedding_compressed", "total_dense",
              "total_compressed")
LAYER_KEYS = ("name", "in_features", "out_features", "density", "rank")
# Per-stage fields that only matter for resuming, not for readers of the report.
_CHECKPOINT_FIELDS = ("state_file", "sha256", "state_bytes", "index")

__all__ = ["build_report", "validate_report", "load_report", "format_report", "plot_report", "REPORT_FORMAT"]


def versions() -> dict[str, str]:
    import platform

    import torch
    import transformers

    import lrsparse

    return {"lrsparse": lrsparse.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_report(config, manifest: dict, records: list, compressed: dict, checkpoint_bytes: int,
                 head_trained: bool, train_examples: int, eval_examples: int, steps: dict) -> dict:
    """The report of a finished run from its :class:`~lrsparse.recipe.RecipeConfig`, checkpoint manifest (stage
    records), layer records (:class:`~lrsparse.records.LayerRecord`) and final model counts."""
    dense = manifest["dense_params"]
    stages = [{k: v for k, v in stage.items() if k not in _CHECKPOINT_FIELDS} for stage in manifest["stages"]]
    params = {
        "target_dense": dense["target"], "target_compressed": compressed["target"],
        "non_embedding_dense": dense["non_embedding"], "non_embedding_compressed": compressed["non_embedding"],
        "total_dense": dense["total"], "total_compressed": compressed["total"],
    }
    return {
        "format_version": REPORT_FORMAT,
        "task": config.task,
        "method": config.method,
        "keep": config.keep,
        "seed": config.seed,
        "model": config.model,
        "factorization": config.lpaf.factorizer if config.lpaf.factorizes else None,
        "versions": versions(),
        "config": {**config.identity(), "device": config.device},
        "head_trained_before": head_trained,
        "train_examples": train_examples,
        "eval_examples": eval_examples,
        "steps": {k: v for k, v in steps.items() if k != "finetune"},
        "final_metrics": dict(stages[-1]["metrics"]),
        "stages": stages,
        "params": params,
        "layers": [record.to_dict() for record in records],
        "checkpoint_bytes": checkpoint_bytes,
    }


def _require(mapping: Any, key: str, kind, where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"report {where} is missing key {key!r}")
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, kind):  # no schema field is a bool; True is an int
        raise ValueError(f"report {where}{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def validate_report(report: Any) -> dict:
    """Raises ValueError naming the first missing or mistyped field of the report schema; returns the report."""
    number = (int, float)
    for key, kind in (("task", str), ("method", str), ("keep", number), ("seed", int), ("versions", dict),
                      ("final_metrics", dict), ("stages", list), ("params", dict), ("layers", list),
                      ("checkpoint_bytes", int)):
        _require(report, key, kind, "")
    _require(report["final_metrics"], "main", number, "final_metrics.")
    if not report["stages"]:
        raise ValueError("report stages must not be empty")
    for i, stage in enumerate(report["stages"]):
        _require(stage, "name", str, f"stages[{i}].")
        _require(stage, "seconds", number, f"stages[{i}].")
        _require(_require(stage, "metrics", dict, f"stages[{i}]."), "main", number, f"stages[{i}].metrics.")
    for key in PARAM_KEYS:
        _require(report["params"], key, int, "params.")
    for i, layer in enumerate(report["layers"]):
        for key, kind in (("name", str), ("in_features", int), ("out_features", int), ("density", number)):
            _require(layer, key, kind, f"layers[{i}].")
        _require(layer, "rank", (int, type(None)), f"layers[{i}].")
    return report


def load_report(path: str | os.PathLike) -> dict:
    """Reads and validates ``path`` (a report.json, or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a run folder written by `lrsparse compress`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return validate_report(report)


def _table(headers: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """Plain-text table; ``align`` has one "<" or ">" per column."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(f"{row[i]:{align[i]}{widths[i]}}" for i in range(len(headers))).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _ratio(compressed: int, dense: int) -> float | None:
    return compressed / dense if dense else None


def format_report(report: dict) -> str:
    """The report as readable tables: run summary, stages with metrics and seconds, parameters, layers."""
    versions = report["versions"]
    lines = [
        f"lrsparse run: task {report['task']}, method {report['method']}, keep {report['keep']}, "
        f"seed {report['seed']}",
        f"model: {report.get('model', '?')}  factorization: {report.get('factorization') or '-'}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "final: " + ", ".join(f"{k} {v:.4f}" for k, v in report["final_metrics"].items()),
    ]
    parallel = report.get("distributed") or {}
    if parallel.get("world_size", 1) > 1:
        lines.append(f"data parallel: {parallel['world_size']} ranks ({parallel['backend']}), batch "
                     f"{parallel['global_batch']} global = {parallel['per_rank_batch']} per rank")
    lines += ["", "stages"]
    metric_names: list[str] = []
    for stage in report["stages"]:
        metric_names += [m for m in stage["metrics"] if m not in metric_names and m != "main"]
    rows = [[s["name"], s.get("steps"), s["seconds"]] + [s["metrics"].get(m) for m in metric_names]
            + [s["metrics"]["main"]] for s in report["stages"]]
    rows = [[r[0], r[1], f"{r[2]:.1f}"] + r[3:] for r in rows]
    lines += _table(["stage", "steps", "seconds", *metric_names, "main"], rows, "<>>" + ">" * (len(metric_names) + 1))
    params = report["params"]
    lines += ["", "parameters"]
    rows = [[label, params[f"{key}_dense"], params[f"{key}_compressed"],
             _ratio(params[f"{key}_compressed"], params[f"{key}_dense"])]
            for label, key in (("target layers", "target"), ("non-embedding", "non_embedding"), ("total", "total"))]
    lines += _table(["", "dense", "compressed", "ratio"], rows, "<>>>")
    lines.append(f"saved model: {report['checkpoint_bytes']:,} bytes")
    if report["layers"]:
        lines += ["", "layers"]
        rows = [[layer["name"], layer["in_features"], layer["out_features"], layer["density"], layer["rank"]]
                for layer in report["layers"]]
        lines += _table(["name", "in", "out", "density", "rank"], rows, "<>>>>")
    return "\n".join(lines)


def _short_layer_name(name: str) -> str:
    # "bert.encoder.layer.3.attention.self.query" -> "3.attention.self.query": the block index and the projection.
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1]:]) if digits else name


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """Draws the report as a PNG at ``path``: per-layer density, rank and rank / min(in, out), main metric per stage.

    Draws on matplotlib's Agg canvas (no display needed; pyplot's global backend is left alone); raises
    ImportError when matplotlib is missing.
    """
    figure = report_figure(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def report_figure(report: dict):
    """The matplotlib Figure that :func:`plot_report` saves (four panels, top to bottom)."""
    validate_report(report)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = report["layers"]
    labels = [_short_layer_name(layer["name"]) for layer in layers]
    positions = list(range(len(layers)))
    ranks = [layer["rank"] if layer["rank"] is not None else 0 for layer in layers]
    fractions = [rank / min(layer["in_features"], layer["out_features"]) for rank, layer in zip(ranks, layers)]
    # Figure() rather than pyplot: no global figure registry, so repeated calls in one process do not leak figures.
    figure = Figure(figsize=(max(8.0, 0.35 * len(layers) + 3.0), 10.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(4, 1)
    figure.suptitle(f"lrsparse {report['task']} {report['method']} keep {report['keep']}")
    for ax, values, title, top in ((axes[0], [layer["density"] for layer in layers], "density (kept / total)", 1.0),
                                   (axes[1], ranks, "rank", None),
                                   (axes[2], fractions, "rank / min(in, out)", 1.0)):
        ax.bar(positions, values, color="tab:blue")
        ax.set_title(title)
        if top is not None:
            ax.set_ylim(0, top)
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    if not layers:
        for ax in axes[:3]:
            ax.text(0.5, 0.5, "no compressed layers", ha="center", va="center", transform=ax.transAxes)
    stages = report["stages"]
    mains = [stage["metrics"]["main"] for stage in stages]
    axes[3].bar(range(len(stages)), mains, color="tab:orange")
    for i, value in enumerate(mains):
        axes[3].annotate(f"{value:.4f}", (i, value), ha="center", va="bottom", fontsize=8)
    axes[3].set_xticks(range(len(stages)))
    axes[3].set_xticklabels([stage["name"] for stage in stages])
    axes[3].set_title("main metric per stage")
    return figure
