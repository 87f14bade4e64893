"""The main job on a user's own data, end to end: SST-2 rewritten as CSV files with string labels, compressed from a
model of the user's choosing (default all-mpnet-base-v2), then `lrsparse predict` on the dev file, its accuracy
scored by scikit-learn from the predictions file against the dev file's labels.

    scripts/fetch_mpnet.sh                                   # the model, cached outside the repository
    PYTHONPATH=python python benchmarks/own_data.py --data-dir ../shared/data/glue --work-dir /tmp/own \
        --json benchmarks/results/own_data_mpnet_sst2.json --markdown benchmarks/results/own_data_mpnet_sst2.md

The CSVs: `review,sentiment` with `negative` / `positive`; train = 10,000 SST-2 training sentences (a seeded shuffle,
seed 0, of the whole training file), dev = the full SST-2 dev set (872). The run: `lrsparse compress` with its
defaults but `--keep 0.25 --epochs 1 --seed 0 --threads 1` (fp32), checkpointed; rerunning the script resumes it, and
a finished run is only scored. The results record each stage's metrics and seconds, the run's wall time, the host,
its ISA and the date.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # noqa: E402

NAMES = {"0": "negative", "1": "positive"}


def write_csvs(glue: Path, work: Path, train_size: int) -> tuple[Path, Path]:
    """SST-2 as CSV files with other column names and the labels' names (the same rows on every call)."""
    def rows(split):
        with open(glue / "SST-2" / f"{split}.tsv", encoding="utf-8", newline="") as handle:
            return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]

    train = rows("train")
    random.Random(0).shuffle(train)
    work.mkdir(parents=True, exist_ok=True)
    paths = (work / "train.csv", work / "dev.csv")
    for path, data in zip(paths, (train[:train_size], rows("dev"))):
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "sentiment"])
            writer.writerows([text, NAMES[label]] for text, label in data)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="GLUE folder with SST-2/")
    parser.add_argument("--work-dir", required=True, type=Path, help="CSVs, the run and the predictions")
    parser.add_argument("--model", default=None, help="default: all-mpnet-base-v2 (scripts/fetch_mpnet.sh)")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or subprocess.run([str(Path(__file__).resolve().parents[1] / "scripts" / "fetch_mpnet.sh")],
                                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    train, dev = write_csvs(args.data_dir, args.work_dir, args.train_size)
    run = args.work_dir / "run"
    started = time.perf_counter()
    compress = [sys.executable, "-m", "lrsparse.cli", "compress", "--model", model, "--train-file", str(train),
                "--validation-file", str(dev), "--text-columns", "review", "--label-column", "sentiment", "--keep",
                "0.25", "--epochs", "1", "--seed", "0", "--precision", args.precision, "--threads", "1",
                "--checkpoint-every", "50", "--output", str(run), "--resume", "--no-inspect"]
    subprocess.run(compress, check=True)
    predictions = args.work_dir / "dev_predictions.jsonl"
    subprocess.run([sys.executable, "-m", "lrsparse.cli", "predict", str(run), "--input", str(dev), "--output",
                    str(predictions), "--no-progress"], check=True)
    seconds_here = time.perf_counter() - started

    from sklearn.metrics import accuracy_score, f1_score

    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    gold, predicted = [r["sentiment"] for r in rows], [r["prediction"] for r in rows]
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    majority = max(gold.count(name) for name in set(gold)) / len(gold)
    result = {"machine": machine_info(), "model": model, "command": " ".join(compress[1:]),
              "train_examples": report["train_examples"], "eval_examples": report["eval_examples"],
              "stages": [{"name": s["name"], "seconds": s["seconds"], "metrics": s["metrics"]} for s in report["stages"]],
              "run_seconds": report["run_seconds"], "params": report["params"],
              "predict": {"rows": len(rows), "accuracy": accuracy_score(gold, predicted),
                          "macro_f1": f1_score(gold, predicted, average="macro"), "example": rows[0]},
              "majority_accuracy": majority, "seconds_this_call": seconds_here}
    m = result["machine"]
    lines = [f"# Own data: {Path(model).name} on SST-2 as CSV with string labels ({m.get('cpu_model')}, "
             f"{m.get('vector_isa')}, {m.get('date')})", "",
             f"{result['train_examples']} training sentences, full dev set ({result['eval_examples']}), keep 0.25, "
             f"one seed (0), fp32, 1 thread. Majority-class accuracy: {100 * majority:.1f}.", "",
             "| stage | accuracy | macro-F1 | seconds |", "|---|---|---|---|"]
    for stage in result["stages"]:
        lines.append(f"| {stage['name']} | {100 * stage['metrics']['accuracy']:.1f} | "
                     f"{100 * stage['metrics']['macro_f1']:.1f} | {stage['seconds']:.0f} |")
    params = result["params"]
    lines += ["", f"Run time {result['run_seconds'] / 60:.1f} min; target layers {params['target_dense']:,} -> "
              f"{params['target_compressed']:,} parameters. `lrsparse predict` on dev: accuracy "
              f"{100 * result['predict']['accuracy']:.1f} (scikit-learn, from the predictions file)."]
    save_report(result, "\n".join(lines) + "\n", args.json, args.markdown)


if __name__ == "__main__":
    main()
