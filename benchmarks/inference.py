"""Inference speed of the compressed (low-rank) model against the dense one, interleaved in one process, alone and
with another worker sharing the cores.

    PYTHONPATH=python python benchmarks/inference.py --json benchmarks/results/inference_cpu.json \
        --markdown benchmarks/results/inference_cpu.md [--keeps 0.25 0.5] [--quick]

Each worker process loads the dense encoder and every compressed one (all-MiniLM-L6-v2 factorized at each keep with
the budget rank allocation and saved/reloaded as `lrsparse compress` saves it: weights do not change speed, shapes
do), then times them in rounds, dense and compressed alternating (torch.utils.benchmark medians), at batch 32 x 128
tokens (throughput) and batch 1 x 128 (latency); a speedup is the median over rounds of dense time / compressed
time, so load drifts hit both alike. Scenarios: one worker with 2 threads and with 1 thread alone; two workers at
once with 1 thread each (one per core: how servers run several workers) and with 2 threads each (oversubscribed).
With ``--device cuda`` one process measures instead, in bf16 (``--dtype``), each model eager, under ``torch.compile``
and under CUDA graphs (``torch.compile(mode="reduce-overhead")``), interleaved the same way.
The ideal speedup assumes the target linears' time shrinks with their multiply-adds and nothing else changes (the
linears' share of the dense forward is measured with the profiler in the same run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIOS = (("alone, 2 threads", 1, 2), ("alone, 1 thread", 1, 1), ("2 workers x 1 thread", 2, 1),
             ("2 workers x 2 threads", 2, 2))
def batches(sizes) -> list[tuple[int, str]]:
    """(batch size, measure label) pairs: batch 1 measures latency, larger ones throughput."""
    return [(b, "latency bs1" if b == 1 else f"throughput bs{b}") for b in sizes]


def make_compressed(model_path: str, keep: float, out_dir: Path) -> None:
    import torch
    from transformers import AutoModel

    from lrsparse.factorization import factorize_model
    from lrsparse.io import save_compressed
    from lrsparse.layers import finalize_low_rank

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_path)
    factorize_model(model, keep, method="svd")
    finalize_low_rank(model)
    save_compressed(model, out_dir)


def worker(args) -> None:
    """Loads the models, says "ready", waits for "go" on stdin, times them and prints one JSON line."""
    import torch
    import torch.utils.benchmark as tb
    from transformers import AutoModel

    from lrsparse.io import load_compressed

    torch.set_num_threads(args.threads)
    models = {"dense": AutoModel.from_pretrained(args.model).eval()}
    for keep, path in zip(args.keeps, args.paths):
        models[f"keep {keep}"] = load_compressed(path).eval()
    print("ready", flush=True)
    sys.stdin.readline()
    gen = torch.Generator().manual_seed(0)
    results = {}
    with torch.inference_mode():
        for batch, label in batches(args.batch_sizes):
            ids = torch.randint(1000, models["dense"].config.vocab_size, (batch, args.seq_len), generator=gen)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            for model in models.values():
                model(**inputs)  # warm-up
            times = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    timer = tb.Timer("model(**inputs)", globals={"model": model, "inputs": inputs},
                                     num_threads=args.threads)
                    times[name].append(timer.blocked_autorange(min_run_time=args.min_time).median)
            results[label] = {"batch": batch, "seconds": times}
    print(json.dumps(results), flush=True)


def gpu_measure(args, paths, flop_ratio: dict) -> list[dict]:
    """Dense against each compressed model on the GPU: eager, compiled and CUDA-graph modes, interleaved rounds."""
    import torch
    import torch.utils.benchmark as tb
    from transformers import AutoModel

    from lrsparse.io import load_compressed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    models = {"dense": AutoModel.from_pretrained(args.model)}
    for keep, path in zip(args.keeps, paths):
        models[f"keep {keep}"] = load_compressed(path)
    models = {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}
    modes = {"eager": lambda m: m, "compile": torch.compile,
             "cudagraphs": lambda m: torch.compile(m, mode="reduce-overhead")}
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for batch, label in batches(args.batch_sizes):
            ids = torch.randint(1000, models["dense"].config.vocab_size, (batch, args.seq_len), generator=gen)
            inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
            for mode in args.modes:
                runs = {name: modes[mode](model) for name, model in models.items()}
                for run in runs.values():  # compilation and graph capture happen here, outside the timings
                    for _ in range(3):
                        run(**inputs)
                times = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        timer = tb.Timer("run(**inputs)", globals={"run": run, "inputs": inputs})
                        times[name].append(timer.blocked_autorange(min_run_time=args.min_time).median)
                for keep in args.keeps:
                    dense, compressed = times["dense"], times[f"keep {keep}"]
                    speedups = [d / c for d, c in zip(dense, compressed)]
                    rows.append({"scenario": f"{args.device} {args.dtype} {mode}", "workers": 1, "threads": None,
                                 "measure": label, "keep": keep, "speedup": statistics.median(speedups),
                                 "speedup_min": min(speedups), "speedup_max": max(speedups),
                                 "dense_seq_per_s": batch / statistics.median(dense),
                                 "compressed_seq_per_s": batch / statistics.median(compressed),
                                 "linear_flop_ratio": flop_ratio[keep]})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def linear_share(model_path: str, seq_len: int, threads: int) -> float:
    """Fraction of the dense forward (batch 32, CPU) spent in the encoder's linear layers, from the profiler."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_path).eval()
    ids = torch.randint(1000, model.config.vocab_size, (32, seq_len))
    with torch.inference_mode():
        model(input_ids=ids)
        with torch.profiler.profile() as prof:
            model(input_ids=ids)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm")) / total


def run_scenario(args, paths, workers: int, threads: int) -> list[dict]:
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--threads", str(threads),
               "--seq-len", str(args.seq_len), "--rounds", str(args.rounds), "--min-time", str(args.min_time),
               "--keeps", *map(str, args.keeps), "--batch-sizes", *map(str, args.batch_sizes),
               "--paths", *map(str, paths)]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for proc in procs:  # every worker has loaded its models before any starts timing
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"inference worker failed to start (exit {proc.wait()})")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"inference worker failed with exit {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def summarize(scenario: str, workers: int, threads: int, results: list[dict], keeps, flop_ratio: dict,
              batch_sizes) -> list[dict]:
    rows = []
    for _, label in batches(batch_sizes):
        for keep in keeps:
            name = f"keep {keep}"
            speedups, dense_rate, compressed_rate = [], 0.0, 0.0
            for result in results:
                entry = result[label]
                dense, compressed = entry["seconds"]["dense"], entry["seconds"][name]
                speedups += [d / c for d, c in zip(dense, compressed)]
                dense_rate += entry["batch"] / statistics.median(dense)
                compressed_rate += entry["batch"] / statistics.median(compressed)
            rows.append({"scenario": scenario, "workers": workers, "threads": threads, "measure": label,
                         "keep": keep, "speedup": statistics.median(speedups), "speedup_min": min(speedups),
                         "speedup_max": max(speedups), "dense_seq_per_s": dense_rate,
                         "compressed_seq_per_s": compressed_rate, "linear_flop_ratio": flop_ratio[keep]})
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Inference: dense vs low-rank, interleaved in one process ({m['date']})", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']}. "
             f"all-MiniLM-L6-v2 encoder, {report['seq_len']} tokens per sequence, "
             f"{report['rounds']} interleaved rounds per worker. Linears' share of the dense forward (batch 32, "
             f"2 threads, profiler): {report['linear_share']:.1%}. Command: `python benchmarks/inference.py"
             f"{' --quick' if report['quick'] else ''} --keeps {' '.join(map(str, report['keeps']))}`.", "",
             "Speedup: median over rounds of dense time / compressed time (min-max in brackets); seq/s summed "
             "over the workers. Ideal: the linears' time scaled by their multiply-adds, the rest unchanged.", "",
             "| scenario | measure | keep | speedup | ideal | dense seq/s | compressed seq/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        # The linears' share is profiled on the CPU: no ideal is claimed for a GPU row.
        ideal = 1 / (1 - report["linear_share"] * (1 - r["linear_flop_ratio"]))
        ideal_text = f"{ideal:.2f}x" if report.get("device", "cpu") == "cpu" else "-"
        lines.append(f"| {r['scenario']} | {r['measure']} | {r['keep']} | {r['speedup']:.2f}x "
                     f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {ideal_text} | {r['dense_seq_per_s']:.1f} | "
                     f"{r['compressed_seq_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1],
                        help="sequences per forward (1: latency; larger: throughput)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per timing (blocked_autorange)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.3 s timings (a few minutes)")
    parser.add_argument("--device", default="cpu", help="cpu (the worker scenarios) or cuda (one GPU process)")
    parser.add_argument("--one-process", action="store_true",
                        help="the GPU measurement (implied by --device cuda), e.g. on the CPU for a dry run")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="GPU only")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "cudagraphs"],
                        choices=["eager", "compile", "cudagraphs"], help="GPU only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from lrsparse.modeling import default_model

        args.model = default_model()
    if args.worker:
        worker(args)
        return None
    if args.quick:
        args.rounds, args.min_time = 2, 0.3

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine_info, save_report

    from lrsparse.io import load_compressed
    from lrsparse.layers import LowRankLinear

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        flop_ratio = {}
        for keep in args.keeps:
            out = Path(tmp) / f"keep{keep}"
            make_compressed(args.model, keep, out)
            paths.append(out)
            layers = [m for m in load_compressed(out).modules() if isinstance(m, LowRankLinear)]
            flop_ratio[keep] = (sum(m.rank * (m.in_features + m.out_features) for m in layers)
                                / sum(m.in_features * m.out_features for m in layers))
        share = linear_share(args.model, args.seq_len, 2)
        one_process = args.one_process or args.device != "cpu"
        if one_process:
            rows = gpu_measure(args, paths, flop_ratio)
        for scenario, workers, threads in (() if one_process else SCENARIOS):
            results = run_scenario(args, paths, workers, threads)
            new = summarize(scenario, workers, threads, results, args.keeps, flop_ratio, args.batch_sizes)
            rows += new
            for row in new:
                print(json.dumps(row), flush=True)
    report = {"machine": machine_info(), "seq_len": args.seq_len, "rounds": args.rounds, "keeps": args.keeps,
              "quick": args.quick, "linear_share": share, "results": rows,
              "device": "one-process" if one_process else "cpu"}
    if one_process:
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    save_report(report, to_markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
