"""Compressed sentence-embedding models against the dense one: STS-B dev quality over seeds and encode() speed, in
PyTorch (sentence-transformers) and in ONNX Runtime (fp32 and int8 dynamic quantization), measured side by side in
one run.

    PYTHONPATH=python python benchmarks/embedding.py --runs runs/embedding/keep0.25-s* runs/embedding/keep0.5-s* \
        --data-dir ../shared/data/glue --out benchmarks/results/embedding

Each run folder is a finished `lrsparse compress --task embedding` run; runs that differ only in their seed form one
configuration. Every model is exported as users would export it (`export --format sentence-transformers`,
`export --format onnx [--int8]`) and scored in each format: the Spearman correlation of cosine similarity with the
gold scores on the full STS-B dev set (the number sentence-transformers' EmbeddingSimilarityEvaluator gives:
tests/test_embedding.py), reported as mean and standard deviation over a configuration's seeds.

Speed is measured on the dense model and on the lowest-seed model of each configuration (the seeds share the
architecture up to a few ranks): every variant encodes the 3,000 sentences of the STS-B dev pairs at batch 64, as
`SentenceTransformer.encode` does (sorted by length, each batch padded to its longest sentence, tokenization included
in the time). Rounds interleave the variants (the order rotates each round) and a speedup is the median over rounds
of (reference time / variant time) within the round, so load drifts hit both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # noqa: E402
from plotting import line_plot  # noqa: E402

from lrsparse.data import load_glue  # noqa: E402
from lrsparse.embedding import SentenceEmbeddingModel, similarity_metrics  # noqa: E402
from lrsparse.export import export_onnx, export_sentence_transformers, quantize_onnx_int8  # noqa: E402
from lrsparse.io import load_compressed  # noqa: E402
from lrsparse.modeling import default_model, quiet_transformers  # noqa: E402

FORMATS = ("pytorch fp32", "onnx fp32", "onnx int8")
# The recipe fields a configuration is told apart by (its seed excepted) and that the commands repeat.
RECIPE_KEYS = ("train_text", "prune_epochs", "mixed_epochs", "batch_size", "lr", "distill_hidden_weight")


def onnx_encoder(path: Path, tokenizer, threads: int, max_length: int):
    """``encode(sentences, batch_size)`` over an ONNX Runtime session, batching as SentenceTransformer.encode."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def encode(sentences: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        out = [None] * len(sentences)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = tokenizer([sentences[i] for i in index], padding=True, truncation=True, max_length=max_length,
                              return_tensors="np")
            embeddings = session.run(None, {name: batch[name].astype(np.int64) for name in names})[0]
            for row, i in enumerate(index):
                out[i] = embeddings[row]
        return np.stack(out)

    return encode


def st_encoder(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    return lambda sentences, batch_size: model.encode(sentences, batch_size=batch_size, convert_to_numpy=True), model


def file_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def configuration(report: dict, base: dict) -> tuple[str, dict]:
    """A run's configuration label (keep, factorizer, and whatever recipe option differs from ``base``, the first
    run's) and its recipe, seed excluded."""
    config = report["config"]
    recipe = {key: config[key] for key in RECIPE_KEYS}
    differences = [f"{key} {value}" for key, value in recipe.items() if base.get(key, value) != value]
    return f"keep {report['keep']} ({', '.join([config['lpaf']['factorizer'], *differences])})", recipe


def load_models(args) -> list[dict]:
    """The dense model and every run's model, each with its configuration label and seed. Runs of one label
    share their recipe, so that a mean over seeds is a mean over seeds only."""
    models = [{"model": "dense", "keep": 1.0, "seed": None, "net": SentenceEmbeddingModel.from_pretrained(args.model),
               "report": None, "recipe": None}]
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    base = configuration(reports[0], {})[1]
    for run, report in zip(args.runs, reports):
        label, recipe = configuration(report, base)
        if any(m["model"] == label and m["seed"] == report["seed"] for m in models):
            raise ValueError(f"--runs: {run} repeats '{label}' seed {report['seed']}")
        models.append({"model": label, "keep": report["keep"], "seed": report["seed"],
                       "net": load_compressed(run / "model"), "report": report, "recipe": recipe})
    timed = {}
    for m in sorted(models, key=lambda m: -1 if m["seed"] is None else m["seed"]):
        timed.setdefault(m["model"], m)
    for m in models:
        m["net"].eval()
        m["timed"] = timed[m["model"]] is m
    return models


def prepare_variants(models: list[dict], args, workdir: Path, tokenizer) -> list[dict]:
    """Every (model, format) variant with its encode function: each model in PyTorch (its sentence-transformers
    export), ONNX fp32 and ONNX int8."""
    variants = []
    for index, m in enumerate(models):
        folder = Path(args.model) if m["report"] is None else workdir / f"model{index}-st"
        if m["report"] is not None:
            export_sentence_transformers(m["net"], folder, tokenizer)
        encode, st_model = st_encoder(folder)
        max_length = st_model.max_seq_length
        fp32 = export_onnx(m["net"], workdir / f"model{index}.onnx")
        int8 = quantize_onnx_int8(fp32, workdir / f"model{index}-int8.onnx")
        common = {key: m[key] for key in ("model", "keep", "seed", "report", "recipe", "timed")}
        variants.append({**common, "format": FORMATS[0], "encode": encode, "mb": file_mb(folder)})
        for fmt, path in zip(FORMATS[1:], (fp32, int8)):
            variants.append({**common, "format": fmt, "encode": onnx_encoder(path, tokenizer, args.threads, max_length),
                             "mb": file_mb(path)})
    return variants


def score(variants: list[dict], sentences: list[str], pairs: torch.Tensor, scores: torch.Tensor,
          batch_size: int) -> None:
    """Fills each variant's ``metrics`` from one encoding of the dev sentences."""
    for variant in variants:
        embeddings = variant["encode"](sentences, batch_size)
        variant["metrics"] = similarity_metrics(torch.from_numpy(embeddings), pairs, scores)
        print(f"{variant['model']} seed {variant['seed']} {variant['format']}: spearman "
              f"{variant['metrics']['spearman_cosine']:.4f}", flush=True)


def measure(variants: list[dict], sentences: list[str], rounds: int, batch_size: int) -> None:
    """Fills each variant's ``seconds``, one per round, the variants interleaved."""
    for variant in variants:
        variant["seconds"] = []
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            t0 = time.perf_counter()
            variant["encode"](sentences, batch_size)
            variant["seconds"].append(time.perf_counter() - t0)
            print(f"round {round_index}: {variant['model']} {variant['format']}: {variant['seconds'][-1]:.2f} s",
                  flush=True)


def speedup(variant: dict, reference: dict) -> float:
    return statistics.median(r / v for r, v in zip(reference["seconds"], variant["seconds"]))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(variants: list[dict], sentences: int) -> tuple[list[dict], list[dict]]:
    """(speed rows: one per timed variant; quality rows: one per configuration and format, over its seeds)."""
    timed = [v for v in variants if v["timed"]]
    dense = {v["format"]: v for v in timed if v["model"] == "dense"}
    speed = [{"model": v["model"], "keep": v["keep"], "seed": v["seed"], "format": v["format"],
              "sentences_per_s": sentences / statistics.median(v["seconds"]),
              "speedup_vs_dense_pytorch": speedup(v, dense["pytorch fp32"]),
              "speedup_vs_dense_same_format": speedup(v, dense[v["format"]]),
              "seconds": v["seconds"], "mb": v["mb"]} for v in timed]
    quality = []
    for v in timed:
        seeds = [s for s in variants if s["model"] == v["model"] and s["format"] == v["format"]]
        spearman = [s["metrics"]["spearman_cosine"] for s in seeds]
        mean, std = mean_std(spearman)
        report = v["report"]
        quality.append({
            "model": v["model"], "keep": v["keep"], "format": v["format"],
            "factorizer": None if report is None else report["config"]["lpaf"]["factorizer"],
            "seeds": [s["seed"] for s in seeds], "spearman": spearman, "spearman_mean": mean, "spearman_std": std,
            "pearson": [s["metrics"]["pearson_cosine"] for s in seeds], "recipe": v["recipe"],
            "train_sentences": None if report is None else report["train_examples"],
            "steps": None if report is None else report["steps"],
            "run_minutes": [s["report"]["run_seconds"] / 60 for s in seeds if s["report"] is not None],
        })
    return speed, quality


def to_markdown(report: dict) -> str:
    m = report["machine"]
    quality = {(q["model"], q["format"]): q for q in report["quality"]}
    dense = {fmt: quality[("dense", fmt)]["spearman_mean"] for fmt in FORMATS}
    lines = [
        "# Sentence embeddings: compressed all-MiniLM-L6-v2 against dense, PyTorch and ONNX Runtime",
        "",
        f"{m['date']}; {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, {report['threads']} thread(s); "
        f"torch {m['torch']}, onnxruntime {report['onnxruntime']}, sentence-transformers "
        f"{report['sentence_transformers']}.",
        "",
        f"STS-B dev: {report['pairs']} pairs. Quality: Spearman x 100 of the cosine similarity with the gold scores, "
        "mean ± standard deviation over each configuration's seeds (the dense model is not trained: one value). "
        f"Speed: {report['sentences']} sentences encoded per round at batch {report['batch_size']}, "
        f"{report['rounds']} interleaved rounds (median), the dense model and the lowest-seed model of each "
        "configuration.",
        "",
        "## Quality over seeds",
        "",
        "Trivial baseline: a constant embedding ranks no pair above another (Spearman 0, strictly undefined); a configuration whose "
        "mean is within 1 point of it is marked degenerate.",
        "",
        "| model | format | seeds | STS-B Spearman | vs dense, same format | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for q in report["quality"]:
        std = f" ± {100 * q['spearman_std']:.2f}" if len(q["seeds"]) > 1 else ""
        degenerate = " (degenerate)" if 100 * q["spearman_mean"] <= 1.0 else ""
        lines.append(f"| {q['model']}{degenerate} | {q['format']} | {len(q['seeds'])} | "
                     f"{100 * q['spearman_mean']:.2f}{std} | "
                     f"{100 * (q['spearman_mean'] - dense[q['format']]):+.2f} | "
                     f"{', '.join(f'{100 * s:.2f}' for s in q['spearman'])} |")
    lines += [
        "",
        "## Speed",
        "",
        "| model | format | sentences/s | speedup vs dense PyTorch | speedup vs dense, same format | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["speed"]:
        lines.append(f"| {r['model']} | {r['format']} | {r['sentences_per_s']:.1f} | "
                     f"{r['speedup_vs_dense_pytorch']:.2f}x | {r['speedup_vs_dense_same_format']:.2f}x | "
                     f"{r['mb']:.1f} |")
    lines += ["", "Runs (unlabelled training sentences, steps per stage, wall minutes per run on this machine):", ""]
    for q in report["quality"]:
        if q["recipe"] is not None and q["format"] == FORMATS[0]:
            minutes = ", ".join(f"{t:.0f}" for t in q["run_minutes"])
            lines.append(f"- {q['model']}: {q['train_sentences']} sentences from `{q['recipe']['train_text']}`, "
                         f"steps {q['steps']}, recipe {q['recipe']}, seeds {q['seeds']}, {minutes} min")
    lines += ["", "Commands:", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Spearman (mean ± std over seeds) against keep: one line per (format, configuration without its keep), each
    ending at the dense model (keep 1)."""
    quality = report["quality"]
    with line_plot(path, "target-layer parameters kept", "STS-B dev Spearman x 100",
                   "all-MiniLM-L6-v2: embedding distillation") as ax:
        for fmt, marker in (("pytorch fp32", "o"), ("onnx int8", "s")):
            dense = next(q for q in quality if q["model"] == "dense" and q["format"] == fmt)
            kinds = {q["model"].split(" ", 2)[2] for q in quality if q["factorizer"]}
            for kind in sorted(kinds):
                line = sorted([q for q in quality if q["format"] == fmt and q["factorizer"]
                               and q["model"].split(" ", 2)[2] == kind] + [dense], key=lambda q: q["keep"])
                if len(line) < 3:
                    continue  # a lone keep is in the tables; a line needs two compressed points
                ax.errorbar([q["keep"] for q in line], [100 * q["spearman_mean"] for q in line],
                            yerr=[100 * q["spearman_std"] for q in line], marker=marker, capsize=3,
                            label=f"{fmt}, {kind.strip('()')}")
        reference = next(q for q in quality if q["model"] == "dense" and q["format"] == "pytorch fp32")
        ax.axhline(100 * reference["spearman_mean"] - 1.0, color="gray", linestyle="--", linewidth=0.8,
                   label="dense - 1.0 (target)")


def commands(models: list[dict], argv: list[str]) -> list[str]:
    lines = []
    for m in models:
        if m["report"] is not None:
            c = m["report"]["config"]
            lines.append(f"lrsparse compress --task embedding --train-text {c['train_text']} --data-dir DATA/glue "
                         f"--keep {m['keep']} --factorization {c['lpaf']['factorizer']} --prune-epochs "
                         f"{c['prune_epochs']} --mixed-epochs {c['mixed_epochs']} --distill-hidden-weight "
                         f"{c['distill_hidden_weight']}"
                         + f" --seed {m['seed']} --output runs/embedding/...")
    return lines + [f"PYTHONPATH=python python benchmarks/embedding.py {' '.join(argv)}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished task-embedding run folders")
    parser.add_argument("--model", default=default_model(), help="the dense sentence-transformers folder")
    parser.add_argument("--data-dir", required=True, help="GLUE folder (STS-B/dev.tsv)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-pairs", type=int, default=None, help="dev subset (a dry run only)")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json, OUT.md and OUT.png")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        render(report, args.out)
        return
    torch.set_num_threads(args.threads)
    quiet_transformers()
    from transformers import AutoTokenizer

    examples = load_glue("stsb", "dev", args.data_dir, args.max_pairs, 0)
    sentences = examples.texts_a + examples.texts_b
    n = len(examples)
    pairs = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1)
    scores = torch.tensor(examples.labels, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models = load_models(args)
    with tempfile.TemporaryDirectory(prefix="lrsparse-embedding-bench-") as workdir:
        variants = prepare_variants(models, args, Path(workdir), tokenizer)
        score(variants, sentences, pairs, scores, args.batch_size)
        measure([v for v in variants if v["timed"]], sentences, args.rounds, args.batch_size)
    import onnxruntime
    import sentence_transformers

    speed, quality = summarize(variants, len(sentences))
    report = {"machine": machine_info(), "threads": args.threads, "onnxruntime": onnxruntime.__version__,
              "sentence_transformers": sentence_transformers.__version__, "pairs": n, "sentences": len(sentences),
              "batch_size": args.batch_size, "rounds": args.rounds, "speed": speed, "quality": quality,
              "commands": commands(models, sys.argv[1:] if argv is None else argv)}
    render(report, args.out)


def render(report: dict, out: Path | None) -> None:
    text = to_markdown(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot(report, out.with_suffix(".png"))
        text += f"\n![STS-B Spearman against keep]({out.with_suffix('.png').name})\n"
    save_report(report, text, None if out is None else out.with_suffix(".json"),
                None if out is None else out.with_suffix(".md"))


if __name__ == "__main__":
    main()
