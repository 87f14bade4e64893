"""Data-parallel training throughput of `lrsparse compress`'s loop: 2 processes x 1 thread (torchrun, gloo) against
1 process x 2 threads, and the all-reduce time of a gradient as the model grows (MiniLM-L6 against MPNet-base).

    PYTHONPATH=python python benchmarks/distributed.py --data-dir ../shared/data/glue \
        --models minilm mpnet --json benchmarks/results/distributed_cpu.json \
        --markdown benchmarks/results/distributed_cpu.md           # ~5 minutes on 2 cores with MPNet

Each configuration runs the pipeline's own training loop (``lrsparse.training.train``, DDP-wrapped under torchrun)
on SST-2 training sentences at global batch 32 for --warmup-steps, then times --steps steps; examples per second are
global (32 x steps / seconds). The all-reduce is timed on a float32 buffer of the model's parameter count, the size
DDP reduces per step, on the same 2 gloo processes. The machine's host, ISA and date are recorded with the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, save_report  # noqa: E402

BATCH = 32


def _model_path(name: str) -> str:
    if name == "minilm":
        from lrsparse.modeling import default_model

        return default_model()
    cache = Path(os.environ.get("LRSPARSE_MODEL_CACHE", Path.home() / ".cache" / "lrsparse" / "models"))
    path = cache / "all-mpnet-base-v2"
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} not found: run `make fetch-mpnet` first")
    return str(path)


def worker(model_name: str, data_dir: str, steps: int, warmup: int, out: str) -> None:
    """One process of a configuration (alone, or one rank under torchrun)."""
    from lrsparse.data import PaddingCollator, load_glue
    from lrsparse.distributed import is_distributed, is_main_process, setup_from_launcher, world_size
    from lrsparse.modeling import load_task_model
    from lrsparse.recipe import RecipeConfig
    from lrsparse.tasks import resolve_task
    from lrsparse.training import train
    from transformers import AutoTokenizer

    setup_from_launcher("cpu")
    source = _model_path(model_name)
    task = resolve_task("sst2")
    examples = load_glue("sst2", "train", data_dir, max_samples=BATCH * (steps + warmup), seed=0)
    from lrsparse.embedding import transformer_folder

    tokenizer = AutoTokenizer.from_pretrained(transformer_folder(source))
    dataset = task.tokenize(examples, tokenizer, 128)
    torch.manual_seed(0)
    model = load_task_model(source, task, keep_head=False)
    config = RecipeConfig.create(task="sst2", keep=1.0, output_dir=tempfile.mkdtemp(), batch_size=BATCH,
                                 checkpoint_every=0)
    from torch.nn.parallel import DistributedDataParallel

    def data_parallel(module):
        return DistributedDataParallel(module, find_unused_parameters=True)

    wrap = data_parallel if is_distributed() else None
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    train(model, dataset, config, warmup, 0, "warmup", collate, torch.device("cpu"), wrap=wrap)
    started = time.perf_counter()
    train(model, dataset, config, steps, 1, "timed", collate, torch.device("cpu"), wrap=wrap)
    seconds = time.perf_counter() - started
    row = {"model": model_name, "world_size": world_size(), "threads": torch.get_num_threads(), "steps": steps,
           "seconds": seconds, "examples_per_second": BATCH * steps / seconds,
           "parameters": sum(p.numel() for p in model.parameters())}
    if is_distributed():
        buffer = torch.zeros(row["parameters"])
        for _ in range(2):
            torch.distributed.all_reduce(buffer)
        torch.distributed.barrier()
        started = time.perf_counter()
        for _ in range(5):
            torch.distributed.all_reduce(buffer)
        row["allreduce_seconds"] = (time.perf_counter() - started) / 5
        row["allreduce_mb"] = buffer.numel() * 4 / 1e6
        torch.distributed.destroy_process_group()
    if is_main_process():
        Path(out).write_text(json.dumps(row))


def _run(model: str, args, world: int, threads: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "row.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--worker", model, "--data-dir", args.data_dir, "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps), "--out", str(out)]
    if world > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   *command[1:]]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE folder with SST-2/train.tsv")
    parser.add_argument("--models", nargs="+", choices=["minilm", "mpnet"], default=["minilm"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data_dir, args.steps, args.warmup_steps, args.out)
        return
    rows = []
    for model in args.models:
        single = _run(model, args, world=1, threads=2)
        parallel = _run(model, args, world=2, threads=1)
        parallel["speedup_vs_1x2"] = parallel["examples_per_second"] / single["examples_per_second"]
        rows += [single, parallel]
    report = {"machine": machine_info(), "batch": BATCH, "rows": rows}
    lines = [f"# Data-parallel training on CPU ({report['machine'].get('cpu_model', '?')}, "
             f"{report['machine'].get('vector_isa', '?')}, {report['machine'].get('date', '?')})", "",
             f"Global batch {BATCH} SST-2 sentences, max 128 tokens, fp32, the pipeline's training loop; "
             f"{args.steps} timed steps after {args.warmup_steps}.", "",
             "| model | processes x threads | examples/s | vs 1 x 2 | all-reduce of the gradient |",
             "|---|---|---|---|---|"]
    for row in rows:
        reduce = (f"{row['allreduce_seconds'] * 1e3:.0f} ms for {row['allreduce_mb']:.0f} MB"
                  if "allreduce_seconds" in row else "-")
        ratio = f"{row['speedup_vs_1x2']:.2f}x" if "speedup_vs_1x2" in row else "1.00x"
        lines.append(f"| {row['model']} | {row['world_size']} x {row['threads']} | {row['examples_per_second']:.1f} "
                     f"| {ratio} | {reduce} |")
    save_report(report, "\n".join(lines) + "\n", args.json, args.markdown)


if __name__ == "__main__":
    main()
