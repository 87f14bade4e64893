"""Command line: ``lrsparse compress | evaluate | inspect | export``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lrsparse.tasks import TASK_NAMES

log = logging.getLogger("lrsparse")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from lrsparse.export import FORMATS
    from lrsparse.pipeline import (DENSE_FINETUNE_MODES, FACTORIZATIONS, METHODS, MIXED_RANK_STRATEGIES,
                                   NONFINITE_GRAD_MODES, RANK_ALLOCATIONS, default_model)

    parser = argparse.ArgumentParser(prog="lrsparse", description="Low-Rank Prune-And-Factorize compression")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="fine-tune, prune, factorize and save a model for a GLUE task "
                                   "or SQuAD")
    compress.add_argument("--model", default=default_model(),
                          help="checkpoint folder or hub name (default: the bundled all-MiniLM-L6-v2)")
    compress.add_argument("--task", required=True, help=f"GLUE task or squad: {', '.join(TASK_NAMES)}")
    compress.add_argument("--keep", required=True, type=float,
                          help="fraction of the target layers' parameters to keep, in (0, 1]")
    compress.add_argument("--output", required=True, help="run folder (checkpoint/, model/, report.json)")
    compress.add_argument("--data-dir", default=None,
                          help="folder with <TASK>/{train,dev}.tsv in the GLUE layout, or for squad the official "
                          "dev-v1.1.json (+ train-v1.1.json; without it the dev articles are split 80/20) "
                          "(default: the hub)")
    compress.add_argument("--method", default="lpaf", choices=METHODS)
    compress.add_argument("--max-train-samples", type=_positive_int, default=None)
    compress.add_argument("--max-eval-samples", type=_positive_int, default=None)
    compress.add_argument("--epochs", type=float, default=3.0, help="epochs of each training stage")
    compress.add_argument("--dense-epochs", type=float, default=None, help="override --epochs for dense fine-tuning")
    compress.add_argument("--prune-epochs", type=float, default=None,
                          help="override --epochs for fine-tuning with pruning (svd/fwsvd: plain fine-tuning)")
    compress.add_argument("--mixed-epochs", type=float, default=None,
                          help="override --epochs for mixed-rank fine-tuning")
    compress.add_argument("--batch-size", type=_positive_int, default=32)
    compress.add_argument("--eval-batch-size", type=_positive_int, default=64)
    compress.add_argument("--lr", type=float, default=1e-4)
    compress.add_argument("--weight-decay", type=float, default=0.01)
    compress.add_argument("--warmup-ratio", type=float, default=0.06)
    compress.add_argument("--max-seq-len", type=int, default=128)
    compress.add_argument("--doc-stride", type=_positive_int, default=None,
                          help="squad: tokens shared by consecutive windows of a long context (default max-seq-len/4)")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("--dense-finetune", choices=DENSE_FINETUNE_MODES, default="auto",
                          help="auto: only when the checkpoint has no trained head for the task")
    compress.add_argument("--factorization", choices=FACTORIZATIONS, default=None,
                          help="default: sparsity-aware for lpaf, svd for svd/magnitude-svd, fwsvd for fwsvd")
    compress.add_argument("--rank-allocation", choices=RANK_ALLOCATIONS, default="budget")
    compress.add_argument("--rank-multiple", type=_positive_int, default=1, help="round ranks down to a multiple")
    compress.add_argument("--factorization-iters", type=_positive_int, default=100,
                          help="EM iterations of the sparsity-aware weighted low-rank fit (cost grows linearly)")
    compress.add_argument("--mixed-rank", choices=MIXED_RANK_STRATEGIES, default="blend")
    compress.add_argument("--blend-fraction", type=float, default=0.5,
                          help="fraction of mixed-rank fine-tuning over which alpha goes 0 -> 1")
    compress.add_argument("--delta-t", type=_positive_int, default=10, help="steps between pruning mask updates")
    compress.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    compress.add_argument("--threads", type=_positive_int, default=None,
                          help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")
    compress.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    compress.add_argument("--checkpoint-every", type=_non_negative_int, default=200, metavar="N",
                          help="also checkpoint every N optimizer steps inside the training stages (0: only after "
                               "each stage)")
    compress.add_argument("--nonfinite-grads", choices=NONFINITE_GRAD_MODES, default="skip",
                          help="a training step with non-finite gradients is skipped (and counted) or an error")
    compress.add_argument("--overwrite", action="store_true", help="start over in an output folder that has a run")
    compress.add_argument("--no-inspect", action="store_true", help="do not print the report table at the end")
    compress.add_argument("--tensorboard", metavar="DIR", default=None,
                          help="write TensorBoard scalars (loss, density, alpha, dev metrics) to DIR")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved compressed model on a GLUE or SQuAD dev split")
    evaluate.add_argument("--model", required=True, help="folder written by `lrsparse compress` (its model/ folder "
                          "or the run folder)")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--max-eval-samples", type=_positive_int, default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    # None: the value the compression run saved with the model, so that the scores match the run's.
    evaluate.add_argument("--max-seq-len", type=int, default=None,
                          help="default: the compression run's (128 for a model saved without it)")
    evaluate.add_argument("--doc-stride", type=_positive_int, default=None,
                          help="squad: see compress --doc-stride (default: the compression run's)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="seed of the --max-eval-samples subset (default: the compression run's, else 0)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    inspect = commands.add_parser("inspect", help="print the report of a run as tables")
    inspect.add_argument("run", help="run folder (or its report.json)")
    inspect.add_argument("--json", action="store_true", help="print the validated report JSON instead")
    inspect.add_argument("--plot", metavar="PNG", default=None,
                         help="also draw per-layer density/rank and the main metric per stage into this PNG")

    export = commands.add_parser("export", help="export a saved compressed model to ONNX, TorchScript or a "
                                 "plain-PyTorch transformers folder (none needs lrsparse to run)")
    export.add_argument("model", help="folder written by `lrsparse compress` (its model/ folder or the run folder)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="pytorch: transformers folder (trust_remote_code), torchscript: .pt, onnx: .onnx")
    export.add_argument("--out", required=True, help="output folder (pytorch) or file (torchscript, onnx)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The CompressionConfig of parsed ``compress`` arguments (per-stage epochs default to --epochs)."""
    from lrsparse.pipeline import CompressionConfig

    def epochs(value):
        return args.epochs if value is None else value

    return CompressionConfig(
        task=args.task, keep=args.keep, output_dir=args.output, model=args.model, method=args.method,
        data_dir=args.data_dir, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        dense_epochs=epochs(args.dense_epochs), prune_epochs=epochs(args.prune_epochs),
        mixed_epochs=epochs(args.mixed_epochs), batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride,
        seed=args.seed, dense_finetune=args.dense_finetune, factorization=args.factorization,
        rank_allocation=args.rank_allocation, rank_multiple=args.rank_multiple,
        factorization_iters=args.factorization_iters, mixed_rank=args.mixed_rank,
        blend_fraction=args.blend_fraction, delta_t=args.delta_t, device=args.device, threads=args.threads,
        resume=args.resume,
        overwrite=args.overwrite, checkpoint_every=args.checkpoint_every, nonfinite_grads=args.nonfinite_grads,
        tensorboard_dir=args.tensorboard,
    )


def _compress(args) -> int:
    from lrsparse.pipeline import run_compression
    from lrsparse.report import format_report

    report = run_compression(config_from_args(args))
    if not args.no_inspect:
        print(format_report(report))
    return 0


def _model_dir(path: str):
    from pathlib import Path

    model_dir = Path(path)
    if (model_dir / "report.json").is_file() and (model_dir / "model").is_dir():
        return model_dir / "model"  # a run folder
    return model_dir


def _evaluate(args) -> int:
    from lrsparse.pipeline import evaluate_saved

    model_dir = _model_dir(args.model)
    metrics = evaluate_saved(model_dir, args.task, args.data_dir, args.max_eval_samples, args.batch_size,
                             args.max_seq_len, args.device, args.seed, args.doc_stride)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.task} dev ({model_dir}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _inspect(args) -> int:
    from lrsparse.report import format_report, load_report, plot_report

    report = load_report(args.run)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot is not None:
        log.info("wrote %s", plot_report(report, args.plot))
    return 0


def _export(args) -> int:
    from lrsparse.export import describe, export_compressed

    print(describe(export_compressed(_model_dir(args.model), args.format, args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from lrsparse.factorization import FactorizationError
    from lrsparse.pipeline import CheckpointError

    handlers = {"compress": _compress, "evaluate": _evaluate, "inspect": _inspect, "export": _export}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # ImportError: a missing optional package (tensorboard, datasets, onnx); the message says what to install.
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, FactorizationError, FloatingPointError,
            ImportError) as exc:
        if args.log_level == "DEBUG":
            raise
        print(f"lrsparse {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
