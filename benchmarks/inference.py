"""Inference speed of the compressed (low-rank) model against the dense one, interleaved in one process, alone and
with another worker sharing the cores.

    PYTHONPATH=python python benchmarks/inference.py --json benchmarks/results/inference_cpu.json \
        --markdown benchmarks/results/inference_cpu.md [--keeps 0.25 0.5] [--rank-multiples 1 8] [--quick]

Each worker process loads the dense encoder and every compressed one (all-MiniLM-L6-v2 factorized at each keep with
the budget rank allocation and saved/reloaded as `lrsparse compress` saves it: weights do not change speed, shapes
do), then times them in rounds, dense and compressed alternating (torch.utils.benchmark medians), at batch 32 x 128
tokens (throughput) and batch 1 x 128 (latency); a speedup is the median over rounds of dense time / compressed
time, so load drifts hit both alike. Scenarios: one worker with 2 threads and with 1 thread alone; two workers at
once with 1 thread each (one per core: how servers run several workers) and with 2 threads each (oversubscribed).
With ``--device cuda`` one process measures instead, in bf16 (``--dtype``), each model eager, under ``torch.compile``
and under CUDA graphs (``torch.compile(mode="reduce-overhead")``), interleaved the same way.
The ideal speedup assumes the target linears' time shrinks with their multiply-adds and nothing else changes (the
linears' share of the dense forward is measured with the profiler in the same run: on a GPU, their GEMM kernels'
share of the kernel time at each batch size, which bounds what low rank can gain where the rest is latency-bound).
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


def variant_name(keep: float, rank_multiple: int) -> str:
    return f"keep {keep}" + (f" ranks x{rank_multiple}" if rank_multiple > 1 else "")


def make_compressed(model_path: str, keep: float, rank_multiple: int, out_dir: Path) -> None:
    import torch
    from transformers import AutoModel

    from lrsparse.factorization import factorize_model
    from lrsparse.io import save_compressed
    from lrsparse.layers import finalize_low_rank

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_path)
    factorize_model(model, keep, method="svd", rank_multiple=rank_multiple)
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
    for name, path in zip(args.names, args.paths):
        models[name] = load_compressed(path).eval()
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


def gpu_measure(args, variants: list[dict]) -> list[dict]:
    """Dense against each compressed model on the GPU: eager, compiled and CUDA-graph modes, interleaved rounds."""
    import torch
    import torch.utils.benchmark as tb
    from transformers import AutoModel

    from lrsparse.io import load_compressed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    models = {"dense": AutoModel.from_pretrained(args.model)}
    for variant in variants:
        models[variant["name"]] = load_compressed(variant["path"])
    models = {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}
    modes = {"eager": lambda m: m, "compile": torch.compile,
             "cudagraphs": lambda m: torch.compile(m, mode="reduce-overhead")}
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for batch, label in batches(args.batch_sizes):
            ids = torch.randint(1000, models["dense"].config.vocab_size, (batch, args.seq_len), generator=gen)
            inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
            share = profiled_linear_share(models["dense"], inputs)
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
                for variant in variants:
                    dense, compressed = times["dense"], times[variant["name"]]
                    speedups = [d / c for d, c in zip(dense, compressed)]
                    rows.append({"scenario": f"{args.device} {args.dtype} {mode}", "workers": 1, "threads": None,
                                 "measure": label, "keep": variant["keep"],
                                 "rank_multiple": variant["rank_multiple"], "speedup": statistics.median(speedups),
                                 "speedup_min": min(speedups), "speedup_max": max(speedups),
                                 "dense_seq_per_s": batch / statistics.median(dense),
                                 "compressed_seq_per_s": batch / statistics.median(compressed),
                                 "linear_flop_ratio": variant["flop_ratio"], "linear_share": share})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def profiled_linear_share(model, inputs) -> float | None:
    """Fraction of the model's time at this batch spent in the linears' GEMMs (aten::addmm and aten::mm), from the
    profiler: kernel time on a GPU, CPU time otherwise; None where the profiler gives no times."""
    import torch

    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    try:
        model(**inputs)
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            model(**inputs)
            sync()
        events = prof.key_averages()
        # Kernels' self times add up to the GPU's busy time; an op's device total includes the kernels it launched.
        total = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
        linear = sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events
                     if e.key in ("aten::addmm", "aten::mm"))
        return linear / total if total > 0 else None
    except Exception as exc:  # a measurement beside the timings must not cost them
        print(f"profiled linear share not measured: {exc!r}", flush=True)
        return None


def linear_share(model_path: str, seq_len: int, threads: int) -> float | None:
    """Fraction of the dense forward (batch 32, CPU) spent in the encoder's linear layers, from the profiler."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_path).eval()
    ids = torch.randint(1000, model.config.vocab_size, (32, seq_len))
    with torch.inference_mode():
        return profiled_linear_share(model, {"input_ids": ids})


def run_scenario(args, variants: list[dict], workers: int, threads: int) -> list[dict]:
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--threads", str(threads),
               "--seq-len", str(args.seq_len), "--rounds", str(args.rounds), "--min-time", str(args.min_time),
               "--batch-sizes", *map(str, args.batch_sizes), "--names", *(v["name"] for v in variants),
               "--paths", *(str(v["path"]) for v in variants)]
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


def summarize(scenario: str, workers: int, threads: int, results: list[dict], variants: list[dict],
              batch_sizes) -> list[dict]:
    rows = []
    for _, label in batches(batch_sizes):
        for variant in variants:
            name = variant["name"]
            speedups, dense_rate, compressed_rate = [], 0.0, 0.0
            for result in results:
                entry = result[label]
                dense, compressed = entry["seconds"]["dense"], entry["seconds"][name]
                speedups += [d / c for d, c in zip(dense, compressed)]
                dense_rate += entry["batch"] / statistics.median(dense)
                compressed_rate += entry["batch"] / statistics.median(compressed)
            rows.append({"scenario": scenario, "workers": workers, "threads": threads, "measure": label,
                         "keep": variant["keep"], "rank_multiple": variant["rank_multiple"], "speedup": statistics.median(speedups), "speedup_min": min(speedups),
                         "speedup_max": max(speedups), "dense_seq_per_s": dense_rate,
                         "compressed_seq_per_s": compressed_rate, "linear_flop_ratio": variant["flop_ratio"]})
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Inference: dense vs low-rank, interleaved in one process ({m['date']})", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']}. "
             f"all-MiniLM-L6-v2 encoder, {report['seq_len']} tokens per sequence, "
             f"{report['rounds']} interleaved rounds per worker. Linears' share of the dense forward (batch 32, "
             f"2 threads, profiler): {report['linear_share'] or 0:.1%}. Command: `python benchmarks/inference.py"
             f"{' --quick' if report['quick'] else ''} --keeps {' '.join(map(str, report['keeps']))}"
             + (f" --rank-multiples {' '.join(map(str, report['rank_multiples']))}"
                if report.get("rank_multiples", [1]) != [1] else "") + "`.", "",
             "Speedup: median over rounds of dense time / compressed time (min-max in brackets); seq/s summed "
             "over the workers. Ideal: the linears' time scaled by their multiply-adds, the rest unchanged.", "",
             "| scenario | measure | compressed model | speedup | ideal | dense seq/s | compressed seq/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        # A GPU row carries the GEMMs' share of the dense model's kernel time at its batch (profiled there); the
        # CPU rows use the CPU profile.
        share = r["linear_share"] if "linear_share" in r else report["linear_share"]
        ideal_text = "-" if share is None else f"{1 / (1 - share * (1 - r['linear_flop_ratio'])):.2f}x"
        lines.append(f"| {r['scenario']} | {r['measure']} | {variant_name(r['keep'], r.get('rank_multiple', 1))} | "
                     f"{r['speedup']:.2f}x "
                     f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {ideal_text} | {r['dense_seq_per_s']:.1f} | "
                     f"{r['compressed_seq_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    parser.add_argument("--rank-multiples", type=int, nargs="+", default=[1],
                        help="compress each keep once per value: ranks rounded down to a multiple of it (8: the "
                             "shapes tensor cores want)")
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
    parser.add_argument("--names", nargs="+", default=[], help=argparse.SUPPRESS)
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
        variants = []
        for keep in args.keeps:
            for rank_multiple in args.rank_multiples:
                out = Path(tmp) / f"keep{keep}-x{rank_multiple}"
                make_compressed(args.model, keep, rank_multiple, out)
                layers = [m for m in load_compressed(out).modules() if isinstance(m, LowRankLinear)]
                variants.append({"name": variant_name(keep, rank_multiple), "keep": keep,
                                 "rank_multiple": rank_multiple, "path": out,
                                 "flop_ratio": sum(m.rank * (m.in_features + m.out_features) for m in layers)
                                 / sum(m.in_features * m.out_features for m in layers)})
        share = linear_share(args.model, args.seq_len, 2)
        one_process = args.one_process or args.device != "cpu"
        if one_process:
            rows = gpu_measure(args, variants)
        for scenario, workers, threads in (() if one_process else SCENARIOS):
            results = run_scenario(args, variants, workers, threads)
            new = summarize(scenario, workers, threads, results, variants, args.batch_sizes)
            rows += new
            for row in new:
                print(json.dumps(row), flush=True)
    report = {"machine": machine_info(), "seq_len": args.seq_len, "rounds": args.rounds, "keeps": args.keeps,
              "rank_multiples": args.rank_multiples,
              "quick": args.quick, "linear_share": share, "results": rows,
              "device": "one-process" if one_process else "cpu"}
    if one_process:
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    save_report(report, to_markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
