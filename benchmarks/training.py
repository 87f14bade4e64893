"""Seconds per optimizer step of each compression stage, fp32 against bf16, on the real model and real batches.

    PYTHONPATH=python python benchmarks/training.py --data-dir ../shared/data/glue \
        --json benchmarks/results/training_cpu.json --markdown benchmarks/results/training_cpu.md   # ~10 min
    PYTHONPATH=python python benchmarks/training.py --quick --data-dir ../shared/data/glue        # < 3 min

Stages, each a model in the state the pipeline trains it in, stepped by the pipeline's own loop
(``lrsparse.training.train``: autocast, backward, clipping, AdamW, ``compressor.step``):
  dense       plain fine-tuning;
  prune       the same with the LPAF compressor: importance update every step, a global mask update every delta_t
              steps of the cubic schedule, masks re-applied;
  mixed_rank  after factorization at --keep: MixedRankLinear layers, the sparse path and the factors both computed;
  low_rank    the final low-rank model.
Every (stage, precision) cell runs --steps steps per round, rounds interleaved over all cells so that load drifts
hit every cell alike; a cell's figure is its median seconds per step over the rounds. Ratios: pruning overhead
(prune / dense), the mixed-rank stage against the final model (mixed_rank / low_rank), and the bf16 speedup per
stage (fp32 / bf16). The machine's fp32 and bf16 GEMM rates are measured in the same run. All cells see the same
batches: SST-2 training sentences, batch 32, padded to the batch's longest (at most --max-seq-len tokens).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lrsparse
from lrsparse.data import PaddingCollator
from lrsparse.modeling import default_model, load_task_model
from lrsparse.recipe import RecipeConfig
from lrsparse.tasks import resolve_task
from lrsparse.training import train
from machine import machine_info, measure_gemm_gflops, save_report

STAGES = ("dense", "prune", "mixed_rank", "low_rank")
PRECISIONS = ("fp32", "bf16")


class TimedCompressor:
    """Passes ``step`` through to a Compressor and adds up the seconds it takes (its share of the step)."""

    def __init__(self, compressor):
        self.compressor, self.seconds, self.calls = compressor, 0.0, 0

    def step(self, optimizer=None, **options) -> None:
        start = time.perf_counter()
        self.compressor.step(optimizer, **options)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def build_stages(args, dataset, collate, recipe) -> dict:
    """The four models (and compressors) of the stages, from one fine-tuning start."""
    task = resolve_task("sst2")
    torch.manual_seed(0)
    dense = load_task_model(args.model, task, keep_head=False)
    pruned = copy.deepcopy(dense)
    # The pruning schedule spans the whole measurement, so its mask updates come at their usual rate.
    prune_steps = args.rounds * args.steps * len(args.precisions) + args.warmup_steps
    compressor = lrsparse.prepare(pruned, lrsparse.PRESETS["lpaf"].replace(keep=args.keep), total_steps=prune_steps)
    # Warm-up of the pruning model: importance statistics for the factorization, and first-call allocations.
    train(pruned, dataset, recipe("fp32"), args.warmup_steps, 0, "warm-up", collate, torch.device("cpu"), compressor)
    mixed, mixed_compressor = copy.deepcopy((pruned, compressor))
    mixed_compressor.pruner.update_mask(args.keep)  # the density the pruning stage ends at
    # LPAF's activation-aware factorizer fits each layer's outputs on calibration batches (its first 256 examples).
    calibration = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate)
    # alpha stays near 0: both paths run, as during the blend
    mixed_compressor.factorize(total_steps=10**9, calibration=calibration)
    low_rank, low_rank_compressor = copy.deepcopy((mixed, mixed_compressor))
    low_rank_compressor.convert()  # a converted compressor's step() does nothing: the final model trains alone
    return {"dense": (dense, None), "prune": (pruned, compressor), "mixed_rank": (mixed, mixed_compressor),
            "low_rank": (low_rank, low_rank_compressor)}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    task = resolve_task("sst2")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = task.load("train", args.data_dir, args.train_samples, 0)
    dataset = task.tokenize(examples, tokenizer, args.max_seq_len)
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    workdir = tempfile.mkdtemp(prefix="lrsparse-training-bench-")

    def recipe(precision: str) -> RecipeConfig:
        return RecipeConfig(task="sst2", output_dir=workdir, precision=precision, checkpoint_every=0,
                            max_seq_len=args.max_seq_len, warmup_ratio=0.0)

    machine = machine_info()
    gemm = {p: measure_gemm_gflops(0.5, dtype) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"GEMM 2048^3: fp32 {gemm['fp32']:.0f} GFLOP/s, bf16 {gemm['bf16']:.0f} GFLOP/s", flush=True)
    if args.precisions is None:
        # A CPU without bf16 instructions (no avx512_bf16 / AMX) emulates bf16 products many times slower than
        # fp32: timing whole training steps there only restates the GEMM rates above.
        args.precisions = list(PRECISIONS) if gemm["bf16"] >= gemm["fp32"] else ["fp32"]
    precisions = args.precisions
    stages = build_stages(args, dataset, collate, recipe)
    seconds = {(s, p): [] for s in STAGES for p in precisions}
    compressor_seconds = {(s, p): 0.0 for s in STAGES for p in precisions}
    for round_index in range(args.rounds):
        for stage in STAGES:
            model, compressor = stages[stage]
            for precision in precisions:
                timed = TimedCompressor(compressor) if compressor is not None else None
                start = time.perf_counter()
                # Every cell and round sees the same batches (data seed 0).
                train(model, dataset, recipe(precision), args.steps, 0, stage, collate, torch.device("cpu"), timed)
                seconds[stage, precision].append((time.perf_counter() - start) / args.steps)
                if timed is not None:
                    compressor_seconds[stage, precision] += timed.seconds / args.steps
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{s}/{p} {seconds[s, p][-1]:.3f}s" for s in STAGES for p in precisions), flush=True)
    median = {f"{s}/{p}": statistics.median(seconds[s, p]) for s in STAGES for p in precisions}
    ratios = {}
    for p in precisions:
        ratios[f"prune_over_dense/{p}"] = median[f"prune/{p}"] / median[f"dense/{p}"]
        ratios[f"mixed_rank_over_low_rank/{p}"] = median[f"mixed_rank/{p}"] / median[f"low_rank/{p}"]
        ratios[f"dense_over_low_rank/{p}"] = median[f"dense/{p}"] / median[f"low_rank/{p}"]
    if "bf16" in precisions:
        for s in STAGES:
            ratios[f"bf16_speedup/{s}"] = median[f"{s}/fp32"] / median[f"{s}/bf16"]
    ranks = [r.rank for r in stages["low_rank"][1].records]
    return {"machine": machine, "gemm_gflops": gemm,
            "settings": {"model": args.model, "keep": args.keep, "batch_size": 32, "max_seq_len": args.max_seq_len,
                         "steps_per_round": args.steps, "rounds": args.rounds, "train_samples": args.train_samples,
                         "quick": args.quick, "precisions": precisions},
            "seconds_per_step": median, "all_seconds_per_step": {f"{s}/{p}": v for (s, p), v in seconds.items()},
            "compressor_seconds_per_step": {f"{s}/{p}": v / args.rounds for (s, p), v in compressor_seconds.items()
                                            if s in ("prune", "mixed_rank")},
            "ratios": ratios, "ranks": {"min": min(ranks), "max": max(ranks), "layers": len(ranks)}}


def to_markdown(report: dict) -> str:
    m, settings = report["machine"], report["settings"]
    lines = [f"# Training step time per stage, fp32 and bf16 ({m['date']})", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['threads']} threads, torch {m['torch']}. "
             f"GEMM 2048^3 measured in the same run: fp32 {report['gemm_gflops']['fp32']:.0f} GFLOP/s, bf16 "
             f"{report['gemm_gflops']['bf16']:.0f} GFLOP/s.",
             f"Real SST-2 batches (32 sentences, padded to the longest, at most {settings['max_seq_len']} tokens), "
             f"all-MiniLM-L6-v2, keep {settings['keep']}; median over {settings['rounds']} interleaved rounds of "
             f"{settings['steps_per_round']} steps per cell; {report['ranks']['layers']} factorized layers, ranks "
             f"{report['ranks']['min']}-{report['ranks']['max']}.",
             f"Command: `python benchmarks/training.py{' --quick' if settings['quick'] else ''} --precisions "
             f"{' '.join(settings['precisions'])}`.", ""]
    precisions, seconds, r = settings["precisions"], report["seconds_per_step"], report["ratios"]
    if "bf16" not in precisions:
        lines += ["bf16 cells not timed: this CPU's bf16 GEMM rate is below its fp32 rate (no avx512_bf16 or AMX "
                  "instructions, bf16 products are emulated).", ""]
    lines += ["| stage | " + " | ".join(f"{p} s/step" for p in precisions)
              + (" | bf16 speedup" if "bf16" in precisions else "") + " | compressor.step (fp32) |",
              "|---" * (len(precisions) + 2 + ("bf16" in precisions)) + "|"]
    for s in STAGES:
        share = report["compressor_seconds_per_step"].get(f"{s}/fp32")
        share_text = "-" if share is None else f"{share * 1e3:.1f} ms ({share / seconds[f'{s}/fp32']:.1%} of the step)"
        speedup = f" | {r[f'bf16_speedup/{s}']:.2f}x" if "bf16" in precisions else ""
        lines.append(f"| {s} | " + " | ".join(f"{seconds[f'{s}/{p}']:.3f}" for p in precisions)
                     + f"{speedup} | {share_text} |")
    lines += ["", "| ratio | " + " | ".join(precisions) + " |", "|---" * (len(precisions) + 1) + "|"]
    for name, label in (("prune_over_dense", "pruning stage / plain fine-tuning"),
                        ("mixed_rank_over_low_rank", "mixed-rank stage / final low-rank model"),
                        ("dense_over_low_rank", "dense / final low-rank model")):
        lines.append(f"| {label} | " + " | ".join(f"{r[f'{name}/{p}']:.3f}" for p in precisions) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="GLUE folder with SST-2/train.tsv")
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="default: fp32 and bf16, or fp32 alone where the measured bf16 GEMM rate is below fp32's")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (under 3 minutes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="steps per cell and round")
    parser.add_argument("--warmup-steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps = 2, 3, 4
    report = run(args)
    save_report(report, to_markdown(report), args.json, args.markdown)


if __name__ == "__main__":
    main()
