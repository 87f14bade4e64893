"""The tables of numbers that README.md and docs/ show, built from the results files in benchmarks/results/.

Every table is a function of the JSON files alone (no clock, no machine), so rendering twice gives the same text and a
test can tell when a document has drifted from its results (benchmarks/render_docs.py writes them into the
documents). Conventions, stated once here and in docs/results.md:

- quality numbers are the main metric x 100, mean ± sample std over seeds, one decimal;
- a difference is always ``method − reference`` (negative: the method scores lower), the difference of the means;
- a recipe variant is paired with the ``lpaf`` runs of the same task, keep, seed, training budget and vector ISA
  (oneDNN's AVX2 and AVX-512 kernels round differently, so the same seed trains other weights on another ISA); the
  per-seed differences are those pairs;
- a difference "counts" when it is larger than the larger of the two seed standard deviations.
"""
from __future__ import annotations

import json
import statistics
from functools import lru_cache
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("cola", "mrpc", "stsb", "sst2")
TASK_LABELS = {"cola": "CoLA (MCC)", "mrpc": "MRPC (F1)", "stsb": "STS-B (Pearson)", "sst2": "SST-2 (accuracy)"}
GRID_EPOCHS = {"dense": 3.0, "prune": 3.0, "mixed": 2.0}  # the quality protocol's budget (benchmarks/quality.py)
# Rows written before quality.py recorded the vector ISA: the project's hosts ran AVX2 up to 2026-12-01 and AVX-512
# from 2026-12-02 on (docs/reproducibility.md), so an untagged row's ISA is inferred from its date and marked so.
FIRST_AVX512_DAY = "2026-12-02"
# Variants named in the ablation table, in the order docs/method.md discusses them, with what each one removes.
VARIANTS = {"no-activation": "activation-aware factorization (`factorizer=svd`)",
            "no-prune": "pruning (`pruner=none`)",
            "no-mixed": "the blend (`mixed_rank=none`)",
            "sparsity-aware": "`factorizer=sparsity-aware` (the default before 2026-12-01)",
            "stochastic": "`mixed_rank=stochastic`",
            "kd": "distillation from the dense model (`distill_weight=0.5`)",
            "match": "`mixed_rank_match=1.0` (removed 2026-12-02)"}


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def signed(value: float, digits: int = 1) -> str:
    """A difference with its sign, a true minus sign, and no sign where it rounds to zero."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text.replace("-", "−")


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def spread(values: list[float]) -> float:
    return 100 * statistics.stdev(values) if len(values) > 1 else float("nan")


# ---- quality grid (quality.json, quality_same_host.json) ------------------------------------------------------------

def isa(row: dict) -> str:
    """The vector ISA the row ran on: as recorded in its ``machine`` ("... ATen CPU AVX512"), else inferred."""
    recorded = row["machine"].split("ATen CPU ")[-1].split(" ")[0] if "ATen CPU" in row["machine"] else None
    if recorded:
        return recorded
    return ("AVX512" if row["date"][:10] >= FIRST_AVX512_DAY else "AVX2") + "*"


def isa_key(row: dict) -> str:
    return isa(row).rstrip("*")


def quality_rows() -> list[dict]:
    """The rows of quality.json and quality_same_host.json, each run once (the second file repeats some runs)."""
    seen, rows = set(), []
    for name in ("quality.json", "quality_same_host.json"):
        for row in load(name)["rows"]:
            key = (row["task"], row["preset"], row.get("variant", ""), row["keep"], row["seed"], row["date"],
                   row["main"])
            if key not in seen:
                seen.add(key)
                rows.append({**row, "source": name})
    return rows


def budget(row: dict) -> dict:
    return {stage: float(value) for stage, value in row["epochs"].items()}


def on_grid_budget(row: dict, dense_epochs: float = 3.0) -> bool:
    epochs = budget(row)
    return epochs.get("dense") == dense_epochs and all(epochs.get(s, GRID_EPOCHS[s]) == GRID_EPOCHS[s]
                                                       for s in ("prune", "mixed"))


def cell(task: str, preset: str, keep: float, dense_epochs: float = 3.0, source: str = "quality.json") -> list[dict]:
    """The runs of one method without a recipe variant: the grid's rows, from ``source``."""
    return sorted((r for r in quality_rows() if r["source"] == source and r["task"] == task
                   and r["preset"] == preset and not r.get("variant") and r["keep"] == keep
                   and on_grid_budget(r, dense_epochs)), key=lambda r: r["seed"])


def with_degenerate(rows: list[dict]) -> str:
    text = mean_std([r["main"] for r in rows])
    degenerate = sum(r["degenerate"] for r in rows)
    return text + (f" ({degenerate} of {len(rows)} degenerate)" if degenerate else "")


def seeds(rows: list[dict]) -> str:
    return ", ".join(f"{100 * r['main']:.1f}" for r in rows)


def mean(rows: list[dict]) -> float:
    return 100 * statistics.mean(r["main"] for r in rows)


def quality_table() -> str:
    """The default recipe against dense and the baselines at keep 0.25, with the majority-class score."""
    majority = load("quality.json")["majority"]
    lines = []
    for task in TASKS:
        dense, lpaf = cell(task, "dense", 1.0), cell(task, "lpaf", 0.25)
        svd, fwsvd = cell(task, "svd", 0.25), cell(task, "fwsvd", 0.25)
        lines.append([TASK_LABELS[task], f"{100 * majority[task]:.1f}", with_degenerate(dense),
                      f"**{with_degenerate(lpaf)}**", signed(mean(lpaf) - mean(dense)), with_degenerate(svd),
                      signed(mean(svd) - mean(dense)), with_degenerate(fwsvd), signed(mean(fwsvd) - mean(dense))])
    return table(["task (metric)", "majority", "dense", "**lpaf** keep 0.25", "lpaf − dense", "svd keep 0.25",
                  "svd − dense", "fwsvd keep 0.25", "fwsvd − dense"], lines)


def paired_reference(run: dict) -> dict | None:
    """The lpaf run a variant's run is compared with: same task, keep, seed, budget and vector ISA."""
    matches = [r for r in quality_rows() if r["preset"] == "lpaf" and not r.get("variant")
               and r["task"] == run["task"] and r["keep"] == run["keep"] and r["seed"] == run["seed"]
               and budget(r) == budget(run) and isa_key(r) == isa_key(run)]
    if len(matches) > 1:
        raise ValueError(f"two lpaf references for {run['task']} {run.get('variant')} seed {run['seed']}")
    return matches[0] if matches else None


def verdict(difference: float, larger_std: float) -> str:
    if larger_std != larger_std:  # nan: fewer than 2 seeds on one side
        return "no spread (1 seed)"
    if abs(difference) <= larger_std:
        return "inside the noise"
    return "lower by more than 1 std" if difference < 0 else "higher by more than 1 std"


def variant_pairs(task: str, variant: str) -> list[tuple[dict, dict]]:
    runs = sorted((r for r in quality_rows() if r["task"] == task and r["preset"] == "lpaf"
                   and r.get("variant") == variant and r["keep"] == 0.25 and on_grid_budget(r)),
                  key=lambda r: r["seed"])
    return [(run, ref) for run in runs if (ref := paired_reference(run)) is not None]


def ablation_table() -> str:
    """Each variant of the default recipe against lpaf runs from the same host ISA, variant − lpaf."""
    lines = []
    for variant, removed in VARIANTS.items():
        for task in ("cola", "mrpc", "stsb"):
            pairs = variant_pairs(task, variant)
            if not pairs:
                continue
            runs, refs = [p[0] for p in pairs], [p[1] for p in pairs]
            difference = mean(runs) - mean(refs)
            larger = max(spread([r["main"] for r in runs]), spread([r["main"] for r in refs]))
            per_seed = ", ".join(signed(100 * (run["main"] - ref["main"])) for run, ref in pairs)
            isas = "/".join(sorted({isa(r) for r in runs + refs}))
            degenerate = sum(r["degenerate"] for r in runs)
            lines.append([f"`{variant}`: {removed}", task, isas, with_degenerate(runs), mean_std(
                [r["main"] for r in refs]), f"**{signed(difference)}**", per_seed,
                "-" if larger != larger else f"{larger:.1f}", verdict(difference, larger)
                + (f"; {degenerate} degenerate" if degenerate else "")])
    return table(["variant (what changes)", "task", "ISA", "variant", "lpaf (same ISA)", "variant − lpaf",
                  "per seed", "larger std", "verdict"], lines)


def keeps_table() -> str:
    """CoLA at keeps 0.5, 0.25 and 0.1 for lpaf and svd."""
    keeps = (0.5, 0.25, 0.1)
    rows = {p: [cell("cola", p, k) for k in keeps] for p in ("lpaf", "svd")}
    lines = [[p] + [f"{mean_std([r['main'] for r in runs])} ({seeds(runs)})" for runs in rows[p]] for p in rows]
    lines.append(["lpaf − svd"] + [signed(mean(a) - mean(b)) for a, b in zip(rows["lpaf"], rows["svd"])])
    lines.append(["ISA"] + ["/".join(sorted({isa(r) for r in a + b})) for a, b in zip(rows["lpaf"], rows["svd"])])
    return table(["CoLA (MCC)"] + [f"keep {k}" for k in keeps], lines)


def converged_table() -> str:
    """CoLA with the dense model trained 6 epochs instead of 3, every compressed run from its seed-0 checkpoint."""
    columns = [("dense", 1.0), ("lpaf", 0.25), ("svd", 0.25), ("fwsvd", 0.25)]
    runs = [cell("cola", p, k, dense_epochs=6.0) for p, k in columns]
    dense = runs[0]
    return table(["CoLA (MCC), dense trained 6 epochs", "dense", "lpaf keep 0.25", "svd keep 0.25",
                  "fwsvd keep 0.25"],
                 [["per seed"] + [seeds(c) for c in runs],
                  ["mean ± std"] + [mean_std([r["main"] for r in c]) for c in runs],
                  ["method − dense (6 epochs)", "-"] + [signed(mean(c) - mean(dense)) for c in runs[1:]],
                  ["ISA", "/".join(sorted({isa(r) for r in dense}))] + ["/".join(sorted({isa(r) for r in c}))
                                                                        for c in runs[1:]]])


def targets_table() -> str:
    """The quality targets of the keep-0.25 grid, judged against the protocol's dense baseline (3 epochs)."""
    lines = []
    for task in TASKS:
        dense, lpaf = cell(task, "dense", 1.0), cell(task, "lpaf", 0.25)
        limit = 4.0 if task == "cola" else 1.5
        gap = mean(lpaf) - mean(dense)
        lines.append([f"lpaf within {limit:g} of dense", task, signed(gap), "met" if gap >= -limit else "missed"])
    for baseline in ("svd", "fwsvd"):
        for task in TASKS:
            lpaf, other = cell(task, "lpaf", 0.25), cell(task, baseline, 0.25)
            gap = mean(lpaf) - mean(other)
            lines.append([f"lpaf at least 3 above {baseline}", task, signed(gap), "met" if gap >= 3 else "missed"])
    runs = [r for r in quality_rows() if r["preset"] == "lpaf" and not r.get("variant")]
    degenerate = sum(r["degenerate"] for r in runs)
    lines.append(["no lpaf run degenerate", "all", f"{degenerate} of {len(runs)}", "met" if not degenerate else
                  "missed"])
    return table(["target (keep 0.25, mean of 3 seeds)", "task", "measured (lpaf − reference)", "verdict"], lines)


def hosts_table() -> str:
    """Which vector ISA the quality rows ran on, recorded or inferred (*), by date."""
    groups: dict[tuple, int] = {}
    for r in quality_rows():
        key = (r["date"][:10], isa(r), r["source"])
        groups[key] = groups.get(key, 0) + 1
    return table(["date", "vector ISA (* inferred from the date)", "results file", "rows"],
                 [[d, i, f"`{s}`", str(n)] for (d, i, s), n in sorted(groups.items())])


def stage_seconds(row: dict, name: str) -> float | None:
    stage = next((s for s in row.get("stages", []) if s["name"] == name), None)
    return stage["seconds"] if stage and stage.get("seconds") else None


def stage_times_table() -> str:
    """Seconds of the pruning and mixed-rank stages of the default recipe and its variants (rows that kept them)."""
    groups: dict[tuple, list[dict]] = {}
    for r in quality_rows():
        if r["preset"] == "lpaf" and r["keep"] == 0.25 and on_grid_budget(r) and stage_seconds(r, "mixed_rank"):
            groups.setdefault((r["task"], r.get("variant") or "lpaf (blend)"), []).append(r)

    def span(values: list[float]) -> str:
        low, high = f"{min(values):.0f}", f"{max(values):.0f}"
        return low if low == high else f"{low}-{high}"

    lines = []
    for (task, variant), runs in sorted(groups.items()):
        first = "prune" if all(stage_seconds(r, "prune") for r in runs) else "finetune"
        teacher = [s["teacher_seconds"] / s["seconds"] for r in runs for s in r["stages"] if s.get("teacher_seconds")]
        lines.append([task, variant, str(len(runs)), span([stage_seconds(r, first) for r in runs]),
                      span([stage_seconds(r, "mixed_rank") for r in runs]),
                      f"{100 * min(teacher):.0f}-{100 * max(teacher):.0f}%" if teacher else "-",
                      "/".join(sorted({isa(r) for r in runs}))])
    return table(["task", "variant", "runs", "pruning (or fine-tuning) stage, s", "mixed-rank stage, s",
                  "teacher's share of a stage", "ISA"], lines)


def stage_main(row: dict, *names: str) -> float | None:
    stage = next((s for s in row.get("stages", []) if s["name"] in names), None)
    return None if stage is None else stage["main"]


def stages_table() -> str:
    """Where each method's score goes, stage by stage, per seed (the 3-epoch grid at keep 0.25)."""
    lines = []
    for task in TASKS:
        methods: dict[str, list[dict]] = {}
        for r in quality_rows():
            if (r["task"] == task and r["preset"] in ("lpaf", "svd", "fwsvd") and r["keep"] == 0.25
                    and on_grid_budget(r) and r.get("variant", "") in ("", "sparsity-aware", "no-activation",
                                                                        "no-prune")):
                label = r["preset"] + (f"+{r['variant']}" if r.get("variant") else "") + f" ({isa(r)})"
                methods.setdefault(label, []).append(r)
        for label, runs in sorted(methods.items()):
            runs.sort(key=lambda r: r["seed"])

            def per_seed(*names: str) -> str:
                values = [stage_main(r, *names) for r in runs]
                return ", ".join("-" if v is None else f"{100 * v:.1f}" for v in values)
            lines.append([task, label, ", ".join(str(r["seed"]) for r in runs), per_seed("prune", "finetune"),
                          per_seed("factorize"), per_seed("mixed_rank")])
    return table(["task", "method (ISA)", "seeds", "pruned (lpaf) or fine-tuned 3 more epochs (svd, fwsvd, no-prune)",
                  "right after factorization", "final"], lines)
