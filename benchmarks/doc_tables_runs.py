"""The tables of numbers in docs/ that come from the benchmark scripts other than the quality grid: sentence
embeddings, factorizers, inference, training steps, operators, and the machines they ran on.

Like benchmarks/doc_tables.py (the quality grid, and the conventions every table follows), each table is a function
of the results files alone. Each table names its results file and the machine that file records, so a statement
about "this machine" is always about a named host."""
from __future__ import annotations

import json

from doc_tables import RESULTS, load, signed, table

# The results files whose `machine` the documents cite, in the order docs/reproducibility.md lists them.
MEASURED_FILES = ("ops_cpu.json", "ops_cpu_weighted_lowrank.json", "factorization_cola_dense.json",
                  "factorization_cola_pruned.json", "inference_cpu.json", "training_cpu.json",
                  "training_cpu_bf16.json", "training_cpu_avx512bf16.json", "embedding.json",
                  "gpu/ops_cuda.json", "gpu/inference_cuda.json")


def host(name: str) -> str:
    """"AMD EPYC, 2 threads, 2026-11-30, ISA not recorded": the host as the file records it."""
    machine = load(name)["machine"]
    isa = machine.get("vector_isa") or machine.get("cpu_capability") or "ISA not recorded"
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine.get('cpu_model') or 'CPU model not recorded'}{gpu}, {machine['threads']} threads, " \
           f"{machine['date'][:10]}, {isa}"


def short_host(name: str) -> str:
    machine = load(name)["machine"]
    return f"{machine.get('cpu_model') or 'CPU not recorded'}{', ' + machine['gpu'] if machine.get('gpu') else ''}, " \
           f"{machine['date'][:10]}"


def machines_table() -> str:
    rows = []
    for name in MEASURED_FILES:
        machine = load(name)["machine"]
        rows.append([f"`{name}`", machine["date"], machine.get("cpu_model") or "not recorded",
                     machine.get("vector_isa") or machine.get("cpu_capability") or "not recorded",
                     f"{machine['cpu_count']} / {machine['threads']}", machine["torch"]])
    return table(["results file", "date", "CPU model (as recorded)", "vector ISA (as recorded)",
                  "cores / threads", "torch"], rows)


def embedding_table() -> str:
    """STS-B dev Spearman x 100 and encode() speed of the compressed sentence-transformers models."""
    data = load("embedding.json")
    quality = {(q["model"], q["format"]): q for q in data["quality"]}
    speed = {(s["model"], s["format"]): s for s in data["speed"]}
    models = list(dict.fromkeys(q["model"] for q in data["quality"]))
    rows = []
    for model in models:
        fp32, int8 = quality[(model, "pytorch fp32")], quality.get((model, "onnx int8"))
        seeds = [s for s in fp32["seeds"] if s is not None]

        def spearman(q: dict) -> str:
            value = f"{100 * q['spearman_mean']:.2f}"
            return value + (f" ± {100 * q['spearman_std']:.2f}" if len(q["spearman"]) > 1 else "")

        torch_speed, onnx_speed = speed[(model, "pytorch fp32")], speed.get((model, "onnx int8"))
        rows.append([model, str(len(seeds)) if seeds else "-", spearman(fp32), spearman(int8) if int8 else "-",
                     f"{torch_speed['speedup_vs_dense_pytorch']:.2f}x ({torch_speed['sentences_per_s']:.0f}/s)",
                     f"{onnx_speed['speedup_vs_dense_same_format']:.2f}x" if onnx_speed else "-",
                     f"{torch_speed['mb']:.1f} / {onnx_speed['mb']:.1f}" if onnx_speed else f"{torch_speed['mb']:.1f}"])
    return f"`embedding.json`, measured on: {host('embedding.json')}.\n\n" + table(["model", "seeds", "Spearman, PyTorch", "Spearman, ONNX int8", "encode() vs dense PyTorch",
                  "ONNX int8 vs dense ONNX int8", "size MB (PyTorch / int8)"], rows)


def embedding_hidden_matching() -> str:
    """The one-seed run with layer-wise hidden-state matching, from its saved run report."""
    report = json.loads((RESULTS / "embedding_runs" / "keep0.25-hidden.json").read_text())
    plain = json.loads((RESULTS / "embedding_runs" / "keep0.25.json").read_text())
    hidden, base = 100 * report["final_metrics"]["main"], 100 * plain["final_metrics"]["main"]
    return table(["keep 0.25, sparsity-aware factorizer, seed 0", "Spearman", "with matching − without"],
                 [["without hidden-state matching", f"{base:.2f}", "-"],
                  [f"hidden-state matching {report['config'].get('distill_hidden_weight', 1.0)}", f"{hidden:.2f}",
                   signed(hidden - base, 2)]])


def factorizers_table(name: str) -> str:
    """Each factorizer right after factorization (no training after it): dev MCC and mean output error."""
    data = load(name)
    rows = [r for r in data["rows"] if "output_error_mean" in r]
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    factorizers = list(dict.fromkeys(r["factorizer"] for r in rows))
    by = {(r["keep"], r["factorizer"]): r for r in rows}
    reference = ", ".join(f"{r['factorizer']} {100 * r['main']:.1f}" for r in data["rows"]
                          if "output_error_mean" not in r)
    lines = [[f"keep {k}"] + [f"{100 * by[(k, f)]['main']:.1f} / {by[(k, f)]['output_error_mean']:.3f}"
                              if (k, f) in by else "-" for f in factorizers] for k in keeps]
    return f"`{name}`, measured on: {host(name)}. Before factorization: {reference} (MCC x 100).\n\n" + table(
        ["dev MCC x 100 / mean per-layer output error"] + factorizers, lines)


def inference_table(name: str = "inference_cpu.json") -> str:
    data = load(name)
    rows = [[r["scenario"], r["measure"], f"{r['dense_seq_per_s']:.1f}", f"{r['compressed_seq_per_s']:.1f}",
             f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}x-{r['speedup_max']:.2f}x"] for r in data["results"]]
    ideal = 1 / (1 - data["linear_share"] * (1 - data["results"][0]["linear_flop_ratio"]))
    return (f"`{name}`, measured on: {host(name)}.\n\n" + table(["scenario", "measure", "dense seq/s", f"keep {data['keeps'][0]} seq/s", "speedup (median)",
                   "range over rounds"], rows)
            + f"\n\nLinears' share of the dense forward: {100 * data['linear_share']:.0f}%; their multiply-adds "
              f"at keep {data['keeps'][0]}: {100 * data['results'][0]['linear_flop_ratio']:.1f}%; the speedup if "
              f"only the linears' time shrank with them: {ideal:.2f}x.")


def training_table() -> str:
    """Seconds per training step by stage and precision, for the three training_cpu results files."""
    rows = []
    for name in ("training_cpu.json", "training_cpu_bf16.json", "training_cpu_avx512bf16.json"):
        data = load(name)
        steps = data["seconds_per_step"]
        gemm = ", ".join(f"{p} {v:.0f}" if v >= 10 else f"{p} {v:.2f}" for p, v in data["gemm_gflops"].items())
        for precision in data["settings"]["precisions"]:
            cells = [f"{steps[f'{stage}/{precision}']:.3f}" for stage in ("dense", "prune", "mixed_rank", "low_rank")]
            rows.append([f"`{name}`", short_host(name), precision, *cells, gemm])
    return table(["results file", "host, date", "precision", "dense s/step", "pruning s/step", "mixed-rank s/step",
                  "low-rank model s/step", "GEMM GFLOP/s (same run)"], rows)


def ops_table(name: str = "ops_cpu.json") -> str:
    data = load(name)
    rows = []
    for r in data["results"]:
        compiled = f"{r['compiled_ms']:.2f}" if r.get("compiled_ms") else "-"
        # inference rows of mixed_rank_linear: the speedup over a dense nn.Linear as a share of the FLOP ratio's
        ideal = f"{100 * r['fraction_of_ideal_speedup']:.0f}%" if "fraction_of_ideal_speedup" in r else "-"
        rows.append([f"`{r['op']}`", r["case"], f"{r['lrsparse_ms']:.2f}", f"{r['eager_ms']:.2f}",
                     f"{r['eager_ms'] / r['lrsparse_ms']:.2f}x", compiled, f"{r['bound_ms']:.2f}", ideal])
    return (f"`{name}`, measured on: {host(name)}; copy bandwidth {data['bandwidth_gbps']:.1f} GB/s and GEMM "
            f"{data['gemm_gflops']:.0f} GFLOP/s, measured in the same run.\n\n" + table(["op", "case", "lrsparse ms", "reference ms", "reference / lrsparse",
                                             "torch.compile ms", "bound ms", "of the ideal speedup over nn.Linear"],
                                            rows))


def glance_table() -> str:
    """The README's speed and size lines: the keep-0.25 MiniLM against dense, each with its results file and host."""
    inference = {(r["scenario"], r["measure"]): r for r in load("inference_cpu.json")["results"]}
    gpu = {(r["scenario"], r["measure"]): r for r in load("gpu/inference_cuda.json")["results"]}
    speed = {(s["model"], s["format"]): s for s in load("embedding.json")["speed"]}
    compressed = "keep 0.25 (activation)"
    rows = []
    for measure, label in (("throughput bs32", "batch 32"), ("latency bs1", "batch 1")):
        r = inference[("alone, 2 threads", measure)]
        rows.append([f"classifier inference, {label} x 128 tokens, 2 threads (seq/s)", f"{r['dense_seq_per_s']:.1f}",
                     f"{r['compressed_seq_per_s']:.1f}", f"**{r['speedup']:.2f}x**",
                     f"`inference_cpu.json`, {short_host('inference_cpu.json')}"])
    for fmt in ("pytorch fp32", "onnx int8"):
        dense, small = speed[("dense", fmt)], speed[(compressed, fmt)]
        rows.append([f"sentence embeddings, encode() at batch 64, {fmt} (sentences/s)",
                     f"{dense['sentences_per_s']:.0f}", f"{small['sentences_per_s']:.0f}",
                     f"**{small['speedup_vs_dense_same_format']:.2f}x**", f"`embedding.json`, {short_host('embedding.json')}"])
        rows.append([f"model size on disk, {fmt} (MB)", f"{dense['mb']:.1f}", f"{small['mb']:.1f}",
                     f"{small['mb'] / dense['mb']:.2f}x", "`embedding.json`"])
    r = gpu[("cuda bf16 cudagraphs", "throughput bs32")]
    rows.append(["GPU inference, batch 32 x 128, bf16, CUDA graphs (seq/s)", f"{r['dense_seq_per_s']:.0f}",
                 f"{r['compressed_seq_per_s']:.0f}", f"**{r['speedup']:.2f}x** (slower)",
                 f"`gpu/inference_cuda.json`, {short_host('gpu/inference_cuda.json')}"])
    return table(["all-MiniLM-L6-v2", "dense", "keep 0.25", "keep 0.25 / dense", "results file, host"], rows)


def distributed_table() -> str:
    """`lrsparse compress`'s training loop on 2 processes x 1 thread against 1 x 2 threads, per model."""
    name = "distributed_cpu.json"
    data = load(name)
    rows = [[r["model"], f"{r['world_size']} x {r['threads']}", f"{r['examples_per_second']:.1f}",
             f"{r.get('speedup_vs_1x2', 1.0):.2f}x",
             f"{1e3 * r['allreduce_seconds']:.0f} ms for {r['allreduce_mb']:.0f} MB" if "allreduce_seconds" in r
             else "-"] for r in data["rows"]]
    return (f"`{name}`, measured on: {host(name)}; global batch {data['batch']}.\n\n"
            + table(["model", "processes x threads", "examples/s", "vs 1 x 2", "all-reduce of the gradient"], rows))


def own_data_table() -> str:
    """The own-data run: stage metrics and times, and predict's accuracy scored from its output file."""
    name = "own_data_mpnet_sst2.json"
    data = load(name)
    rows = [[s["name"], f"{100 * s['metrics']['accuracy']:.1f}", f"{100 * s['metrics']['macro_f1']:.1f}",
             f"{s['seconds'] / 60:.1f}"] for s in data["stages"]]
    params = data["params"]
    return (f"`{name}`, measured on: {host(name)}; {data['train_examples']:,} training sentences, the full dev set "
            f"({data['eval_examples']}); majority class {100 * data['majority_accuracy']:.1f}; one seed.\n\n"
            + table(["stage", "accuracy", "macro-F1", "minutes"], rows)
            + f"\n\n`lrsparse predict` on the dev file: accuracy {100 * data['predict']['accuracy']:.1f} (scikit-learn, "
              f"from the predictions file). Run time {data['run_seconds'] / 60:.0f} min; target layers "
              f"{params['target_dense']:,} -> {params['target_compressed']:,} parameters.")
