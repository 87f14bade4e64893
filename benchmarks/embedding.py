"""Compressed sentence-embedding models against the dense one: STS-B dev quality and encode() speed, in PyTorch
(sentence-transformers) and in ONNX Runtime (fp32 and int8 dynamic quantization), measured side by side in one run.

    PYTHONPATH=python python benchmarks/embedding.py --runs runs/embedding/keep0.25 runs/embedding/keep0.5 \
        --data-dir ../shared/data/glue --out benchmarks/results/embedding

Each run folder is a finished `lrsparse compress --task embedding` run; its model is exported as users would export
it (`export --format sentence-transformers`, `export --format onnx [--int8]`). Every variant encodes the 3,000
sentences of the STS-B dev pairs at batch 64, as `SentenceTransformer.encode` does (sorted by length, each batch padded
to its longest sentence, tokenization included in the time). Rounds interleave the variants (the order rotates each
round) and a speedup is the median over rounds of (reference time / variant time) within the round, so load drifts
hit both alike. The score is the Spearman correlation of cosine similarity with the gold scores on the full dev set,
computed on the embeddings of the first round (the same number sentence-transformers' EmbeddingSimilarityEvaluator
gives: tests/test_embedding.py).
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


def prepare_variants(args, workdir: Path, tokenizer) -> list[dict]:
    """Every (model, format) variant with its encode function: the dense model and each run, each in PyTorch,
    ONNX fp32 and ONNX int8."""
    models = [("dense", 1.0, SentenceEmbeddingModel.from_pretrained(args.model).eval(), None)]
    for run in args.runs:
        report = json.loads((run / "report.json").read_text())
        factorizer = report["config"]["lpaf"]["factorizer"]
        models.append((f"keep {report['keep']} ({factorizer})", report["keep"], load_compressed(run / "model").eval(),
                       report))
    variants = []
    for name, keep, model, report in models:
        slug = f"variant{len(variants)}"
        folder = Path(args.model) if report is None else workdir / f"{slug}-st"
        if report is not None:
            export_sentence_transformers(model, folder, tokenizer)
        encode, st_model = st_encoder(folder)
        max_length = st_model.max_seq_length
        common = {"model": name, "keep": keep, "report": report}
        variants.append({**common, "format": "pytorch fp32", "encode": encode, "mb": file_mb(folder)})
        fp32 = export_onnx(model, workdir / f"{slug}.onnx")
        int8 = quantize_onnx_int8(fp32, workdir / f"{slug}-int8.onnx")
        for fmt, path in (("onnx fp32", fp32), ("onnx int8", int8)):
            variants.append({**common, "format": fmt, "encode": onnx_encoder(path, tokenizer, args.threads, max_length),
                             "mb": file_mb(path)})
    return variants


def measure(variants: list[dict], sentences: list[str], pairs: torch.Tensor, scores: torch.Tensor, rounds: int,
            batch_size: int) -> None:
    """Fills each variant's ``seconds`` (one per round, interleaved) and ``metrics`` (first round's embeddings)."""
    for variant in variants:
        variant["seconds"] = []
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            t0 = time.perf_counter()
            embeddings = variant["encode"](sentences, batch_size)
            variant["seconds"].append(time.perf_counter() - t0)
            if round_index == 0:
                variant["metrics"] = similarity_metrics(torch.from_numpy(embeddings), pairs, scores)
            print(f"round {round_index}: {variant['model']} {variant['format']}: {variant['seconds'][-1]:.2f} s, "
                  f"spearman {variant['metrics']['spearman_cosine']:.4f}", flush=True)


def speedup(variant: dict, reference: dict) -> float:
    return statistics.median(r / v for r, v in zip(reference["seconds"], variant["seconds"]))


def summarize(variants: list[dict], sentences: int) -> list[dict]:
    dense = {v["format"]: v for v in variants if v["model"] == "dense"}
    rows = []
    for v in variants:
        rows.append({
            "model": v["model"], "keep": v["keep"], "format": v["format"],
            "factorizer": None if v["report"] is None else v["report"]["config"]["lpaf"]["factorizer"],
            "spearman": v["metrics"]["spearman_cosine"], "pearson": v["metrics"]["pearson_cosine"],
            "sentences_per_s": sentences / statistics.median(v["seconds"]),
            "speedup_vs_dense_pytorch": speedup(v, dense["pytorch fp32"]),
            "speedup_vs_dense_same_format": speedup(v, dense[v["format"]]),
            "seconds": v["seconds"], "mb": v["mb"],
            "recipe": None if v["report"] is None else {
                key: v["report"]["config"][key] for key in ("train_text", "prune_epochs", "mixed_epochs", "batch_size",
                                                             "lr", "distill_hidden_weight", "seed")},
            "train_sentences": None if v["report"] is None else v["report"]["train_examples"],
            "steps": None if v["report"] is None else v["report"]["steps"],
            "run_minutes": None if v["report"] is None else v["report"]["run_seconds"] / 60,
        })
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Sentence embeddings: compressed all-MiniLM-L6-v2 against dense, PyTorch and ONNX Runtime",
        "",
        f"{m['date']}; {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, {report['threads']} thread(s); "
        f"torch {m['torch']}, onnxruntime {report['onnxruntime']}, sentence-transformers "
        f"{report['sentence_transformers']}.",
        "",
        f"STS-B dev: {report['pairs']} pairs, {report['sentences']} sentences encoded per round at batch "
        f"{report['batch_size']}, {report['rounds']} interleaved rounds (median). Spearman x 100 of the cosine "
        "similarity with the gold scores.",
        "",
        "| model | format | STS-B Spearman | sentences/s | speedup vs dense PyTorch | speedup vs dense, same format "
        "| size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['format']} | {100 * r['spearman']:.2f} | {r['sentences_per_s']:.1f} | "
                     f"{r['speedup_vs_dense_pytorch']:.2f}x | {r['speedup_vs_dense_same_format']:.2f}x | "
                     f"{r['mb']:.1f} |")
    lines += ["", "Runs (unlabelled training sentences, steps per stage, wall minutes on this machine):", ""]
    for r in report["rows"]:
        if r["recipe"] is not None and r["format"] == "pytorch fp32":
            lines.append(f"- {r['model']}: {r['train_sentences']} sentences from `{r['recipe']['train_text']}`, "
                         f"steps {r['steps']}, recipe {r['recipe']}, {r['run_minutes']:.0f} min")
    lines += ["", "Commands:", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Spearman against keep: one line per (format, factorizer), each ending at the dense model (keep 1)."""
    rows = report["rows"]
    with line_plot(path, "target-layer parameters kept", "STS-B dev Spearman x 100",
                   "all-MiniLM-L6-v2: embedding distillation") as ax:
        for fmt, marker in (("pytorch fp32", "o"), ("onnx int8", "s")):
            dense = next(r for r in rows if r["model"] == "dense" and r["format"] == fmt)
            for factorizer in sorted({r["factorizer"] for r in rows if r["factorizer"]}):
                line = sorted([r for r in rows if r["format"] == fmt and r["factorizer"] == factorizer] + [dense],
                              key=lambda r: r["keep"])
                ax.plot([r["keep"] for r in line], [100 * r["spearman"] for r in line], marker=marker,
                        label=f"{fmt}, {factorizer}")
        reference = next(r for r in rows if r["model"] == "dense" and r["format"] == "pytorch fp32")
        ax.axhline(100 * reference["spearman"] - 1.0, color="gray", linestyle="--", linewidth=0.8,
                   label="dense - 1.0 (target)")


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
    with tempfile.TemporaryDirectory(prefix="lrsparse-embedding-bench-") as workdir:
        variants = prepare_variants(args, Path(workdir), tokenizer)
        measure(variants, sentences, pairs, scores, args.rounds, args.batch_size)
    import onnxruntime
    import sentence_transformers

    commands = [f"PYTHONPATH=python python benchmarks/embedding.py {' '.join(sys.argv[1:] if argv is None else argv)}"]
    for variant in variants:
        if variant["report"] is not None and variant["format"] == "pytorch fp32":
            c = variant["report"]["config"]
            commands.insert(0, f"lrsparse compress --task embedding --train-text {c['train_text']} --data-dir DATA/glue "
                               f"--keep {variant['keep']} --factorization {c['lpaf']['factorizer']} --prune-epochs "
                               f"{c['prune_epochs']} --mixed-epochs {c['mixed_epochs']} --distill-hidden-weight "
                               f"{c['distill_hidden_weight']} --seed {c['seed']} --output runs/embedding/...")
    report = {"machine": machine_info(), "threads": args.threads, "onnxruntime": onnxruntime.__version__,
              "sentence_transformers": sentence_transformers.__version__, "pairs": n, "sentences": len(sentences),
              "batch_size": args.batch_size, "rounds": args.rounds, "rows": summarize(variants, len(sentences)),
              "commands": commands}
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
